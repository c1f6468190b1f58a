"""`preftune quickstart`: the whole pipeline on the toy task, offline, in about a minute on 2 CPU cores.

    toy task -> SFT (the reference model) -> preference pairs -> DPO -> evaluate before and after -> report

Both training runs go through :func:`preftune.train` with the loaded model and tokenizer in the config dict.
The DPO run writes into ``out_dir`` itself (``metrics.jsonl``, ``tensorboard/``, ``plots/``,
``train_summary.json``, ``final/``); the SFT run into ``out_dir/sft``. Both train with ``overwrite=True``: running
the demo again into the same directory replaces its own previous runs there. ``report.json`` holds::

    {"before": {...}, "after": {...}, "passed": bool, "targets": {...}, "config": {...}, "runs": {...}, ...}

``preference_accuracy``: held-out pairs whose implicit DPO reward β·(log π/π_ref) ranks chosen above rejected,
an exact tie counting 0.5 (:func:`preftune.eval.preference_accuracy.preference_accuracy`). Before DPO the policy *is*
the reference, every margin is exactly 0 and the accuracy is 0.5 by construction; after DPO it is the final
evaluation of the DPO run (``rewards/accuracies``). ``generation_accuracy``: greedy generations on the
held-out prompts that :func:`preftune.toy.verify` accepts.

``--method online_dpo`` (:func:`run_online_dpo_quickstart`) keeps the task and the SFT phase
(:func:`sft_phase`, which every method shares) and replaces the pairs and DPO with online DPO: every step the
policy answers 16 train prompts 4 times, ``preftune.rewards:toy_verifier`` scores the answers and DPO trains on
each prompt's best vs worst (:data:`ONLINE`); its ``report.json`` has ``before`` / ``after``
``generation_accuracy`` and ``"method": "online_dpo"``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from preftune import generation, toy

# The recipe. Learning rates this high are for a model of 0.1M parameters (see the toy module docstring).
SFT = {"steps": 800, "batch_size": 32, "learning_rate": 3e-3, "warmup_ratio": 0.05}
DPO = {"pairs": 2000, "epochs": 2, "batch_size": 16, "learning_rate": 2e-4, "warmup_ratio": 0.1, "beta": 2.0}
HELD_OUT = 300
MAX_LENGTH = 64
MAX_NEW_TOKENS = 16  # the longest accepted answer is 5 tokens + EOS; a signed-off one 10 + EOS
TARGETS = {"preference_accuracy": 0.95, "generation_accuracy": 0.90, "gain": 0.30}
# Online DPO from the same SFT model: per step 16 prompts x 4 samples at temperature 1, scored by the toy
# verifier, best vs worst of each prompt (ties skipped). β lower than offline DPO's: the pairs are the
# policy's own samples, close to it, and a large β barely moves it on them.
ONLINE = {"steps": 60, "prompts_per_step": 16, "num_generations": 4, "temperature": 1.0, "beta": 0.5,
          "learning_rate": 2e-4, "eval_prompts": 64}
ONLINE_TARGETS = {"generation_accuracy": 0.90, "gain": 0.25}


def generate(model, tokenizer, prompts: list[str], batch_size: int = 128) -> list[str]:
    """Greedy completions of text prompts (:func:`preftune.generation.generate`), decoded without the EOS."""
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    params = generation.SamplingParams(MAX_NEW_TOKENS, temperature=0, stop_ids=(tokenizer.eos_token_id,))
    groups = generation.generate(model, ids, params, pad_id=tokenizer.pad_token_id, batch_size=batch_size)
    return [tokenizer.decode(g[0].ids, skip_special_tokens=True) for g in groups]


def generation_accuracy(model, tokenizer, items: list[toy.Item]) -> tuple[float, list[dict]]:
    """Share of held-out prompts whose greedy answer the verifier accepts, and every (prompt, answer, ok)."""
    answers = generate(model, tokenizer, [it.prompt for it in items])
    rows = [{"prompt": it.prompt, "response": a, "ok": toy.verify(it.prompt, a)} for it, a in zip(items, answers)]
    return sum(r["ok"] for r in rows) / len(rows), rows


def pair_logps(model, tokenizer, pairs: list[dict], batch_size: int = 64) -> torch.Tensor:
    """Summed completion log-probs of held-out pairs, (n, 2) [chosen, rejected], tokenized as training does."""
    from preftune.data.collate import collate_padded
    from preftune.data.formats import PairRecord
    from preftune.data.tokenize import Tokenization
    from preftune.logprobs import sequence_logps

    tokenization = Tokenization(tokenizer, max_length=MAX_LENGTH)
    examples = [tokenization.pair(PairRecord(p["prompt"], p["chosen"], p["rejected"])) for p in pairs]
    device = next(model.parameters()).device
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            logps, _ = sequence_logps(model, collate_padded(chunk, tokenizer.pad_token_id).to(device))  # (2b,)
            out.append(torch.stack([logps[: len(chunk)], logps[len(chunk) :]], dim=1).cpu())  # (b, 2)
    return torch.cat(out)  # (n, 2)


def implicit_reward_accuracy(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> float:
    """Mean of :func:`preference_accuracy` over margins β·((π_w − r_w) − (π_l − r_l)); logps (n, 2)."""
    from preftune.eval.preference_accuracy import preference_accuracy

    rho = policy_logps - reference_logps  # (n, 2)
    margins = beta * (rho[:, 0] - rho[:, 1])  # (n,)
    return float(preference_accuracy(margins).mean())


def run_quickstart(out_dir: str | Path, seed: int = 0, log=print, *, sft_dir: str | Path | None = None) -> dict:
    """Build the toy task, SFT a tiny Llama, DPO it on preference pairs, evaluate before and after.

    Writes ``out_dir/report.json`` (and the runs' files, see the module docstring); returns the report.
    ``sft_dir``: the ``sft`` directory of an earlier quickstart with the same seed, reused instead of training
    SFT again (the tests share one). Same seed, same machine: same numbers.
    """
    return run_on_one_thread(_dpo, out_dir, seed, log, sft_dir)


def run_online_dpo_quickstart(out_dir: str | Path, seed: int = 0, log=print, *,
                              sft_dir: str | Path | None = None) -> dict:
    """``preftune quickstart --method online_dpo``: the same task and SFT model, then online DPO (every step the
    policy samples, the toy verifier scores, DPO trains best vs worst); before / after generation accuracy."""
    return run_on_one_thread(_online_dpo, out_dir, seed, log, sft_dir)


def run_on_one_thread(run, out_dir, seed: int, log, sft_dir) -> dict:
    """``run(out, seed, log, t_start, sft_dir)`` with ``out_dir`` created and torch on one thread (restored
    after): the shape every quickstart method runs in."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    # A 0.1M-parameter model gains nothing from intra-op threads: their start-up costs more than the matmuls,
    # and on a busy 2-core machine a second thread waits for a core. One thread is faster here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(out, seed, log, t_start, sft_dir)
    finally:
        torch.set_num_threads(threads)


@dataclass
class SFTPhase:
    """The toy task and the SFT reference model every quickstart method starts from.

    Attributes:
        model: the SFT model (trained in place, saved in ``run_dir/final``); tokenizer: the toy tokenizer.
        sft_items: the prompts SFT trained on; items: the other train prompts (the DPO pairs' prompts, the
            on-policy methods' prompts); held_out: the held-out prompts every method is evaluated on.
        run_dir: the SFT run directory; config / summary: its training config and ``train_summary.json``.
    """

    tokenizer: Any
    model: Any
    sft_items: list[toy.Item]
    items: list[toy.Item]
    held_out: list[toy.Item]
    run_dir: Path
    config: dict
    summary: dict

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "final"


def sft_phase(out: Path, seed: int = 0, log=print, sft_dir: str | Path | None = None) -> SFTPhase:
    """Build the toy task and SFT-train the reference model into ``out/sft`` (same seed: same model).

    ``sft_dir``: an earlier phase's run directory (``.../sft``, holding ``final/`` and ``quickstart_sft.json``)
    whose model is loaded instead of trained; it must have been built with the same seed and recipe.
    """
    import preftune

    quiet = lambda *_: None  # noqa: E731  (the run's own chatter; the phase is logged here)
    n_sft = SFT["steps"] * SFT["batch_size"]  # every SFT example seen once
    items, held_out = toy.split_items(seed, n_train=n_sft + DPO["pairs"], n_test=HELD_OUT)
    sft_items, rest = items[:n_sft], items[n_sft:]
    tokenizer = toy.build_tokenizer()
    run_dir = Path(sft_dir) if sft_dir is not None else out / "sft"
    config = {
        "loss": {"name": "sft"},
        "training": {"output_dir": str(run_dir), "learning_rate": SFT["learning_rate"],
                     "per_device_batch_size": SFT["batch_size"], "max_steps": SFT["steps"],
                     "warmup_ratio": SFT["warmup_ratio"], "max_length": MAX_LENGTH, "seed": seed,
                     "logging_every": 50, "progress_bar": False},
    }
    stamp = {"seed": seed, "recipe": SFT, "max_length": MAX_LENGTH}
    if sft_dir is not None:
        model = _load_sft(run_dir, stamp)
        summary = json.loads((run_dir / "train_summary.json").read_text())
        log(f"quickstart: SFT model reused from {run_dir}")
        return SFTPhase(tokenizer, model, sft_items, rest, held_out, run_dir, config, summary)
    model = toy.build_model(tokenizer, seed=seed)
    log(f"quickstart: toy task, {len(sft_items)} SFT prompts, {len(rest)} further train prompts, "
        f"{len(held_out)} held-out prompts; model {sum(p.numel() for p in model.parameters()):,} parameters")
    t0 = time.perf_counter()
    # overwrite=True: `quickstart --out DIR` is a demo; running it again replaces its own previous runs in DIR
    summary = preftune.train({"model": model, "tokenizer": tokenizer,
                              "data": {"train": toy.sft_rows(sft_items, seed=seed)}, **config},
                             overwrite=True, log=quiet)
    (run_dir / "quickstart_sft.json").write_text(json.dumps(stamp, indent=1))
    log(f"quickstart: SFT {SFT['steps']} steps in {time.perf_counter() - t0:.1f}s, final loss "
        f"{summary['final_loss']:.3f}")
    return SFTPhase(tokenizer, model, sft_items, rest, held_out, run_dir, config, summary)


def _load_sft(run_dir: Path, stamp: dict):
    """The SFT model saved in ``run_dir/final``, after checking it was built by the same recipe and seed."""
    from transformers import AutoModelForCausalLM

    from preftune.errors import PreftuneError

    info = run_dir / "quickstart_sft.json"
    if not (run_dir / "final").is_dir() or not info.exists():
        raise PreftuneError(f"{run_dir} is not a quickstart SFT directory (no final/ or quickstart_sft.json)")
    if json.loads(info.read_text()) != json.loads(json.dumps(stamp)):
        raise PreftuneError(f"{info} was built with {info.read_text().strip()}, not {json.dumps(stamp)}; "
                            "train the SFT model again (leave out sft_dir)")
    return AutoModelForCausalLM.from_pretrained(run_dir / "final")


def _dpo(out: Path, seed: int, log, t_start: float, sft_dir=None) -> dict:
    import preftune

    quiet = lambda *_: None  # noqa: E731  (the runs' own chatter; the phases are logged here)

    # ---- the task and SFT: the reference model -----------------------------------------------------------
    sft = sft_phase(out, seed, log, sft_dir)
    tokenizer, model, held_out = sft.tokenizer, sft.model, sft.held_out
    sft_config, sft_summary = sft.config, sft.summary
    train_pairs = toy.pair_rows(sft.items, seed=seed + 1)
    test_pairs = toy.pair_rows(held_out, seed=seed + 2)
    log(f"quickstart: DPO on {len(train_pairs)} train pairs, {len(test_pairs)} held-out pairs")

    # ---- before: the SFT model ---------------------------------------------------------------------------
    reference = pair_logps(model, tokenizer, test_pairs)  # (n, 2); the DPO run's reference is this model
    policy = pair_logps(model, tokenizer, test_pairs)  # the same model: every margin is 0
    before_gen, before_rows = generation_accuracy(model, tokenizer, held_out)
    before = {"preference_accuracy": implicit_reward_accuracy(policy, reference, DPO["beta"]),
              "generation_accuracy": before_gen, "reward_margin": 0.0,
              "likelihood_preference_accuracy": float((reference[:, 0] > reference[:, 1]).float().mean())}
    model.train()

    # ---- DPO from the SFT model --------------------------------------------------------------------------
    dpo_config = {
        "loss": {"name": "dpo", "beta": DPO["beta"]},
        "reference": {"cache_dir": str(out / "reference_cache")},
        "training": {"output_dir": str(out), "learning_rate": DPO["learning_rate"],
                     "per_device_batch_size": DPO["batch_size"], "num_epochs": DPO["epochs"],
                     "warmup_ratio": DPO["warmup_ratio"], "max_length": MAX_LENGTH, "seed": seed,
                     "logging_every": 5, "eval_every": 25, "progress_bar": False},
    }
    t0 = time.perf_counter()
    dpo_summary = preftune.train({"model": model, "tokenizer": tokenizer,
                                  "data": {"train": train_pairs, "eval": test_pairs}, **dpo_config},
                                 overwrite=True, log=quiet)
    log(f"quickstart: DPO {dpo_summary['steps']} steps in {time.perf_counter() - t0:.1f}s, final loss "
        f"{dpo_summary['final_loss']:.3f}")

    # ---- after -------------------------------------------------------------------------------------------
    final = dpo_summary["final_eval_metrics"]
    after_gen, after_rows = generation_accuracy(model, tokenizer, held_out)
    after_logps = pair_logps(model, tokenizer, test_pairs)
    after = {"preference_accuracy": final["rewards/accuracies"], "generation_accuracy": after_gen,
             "reward_margin": final["rewards/margins"],
             "likelihood_preference_accuracy": float((after_logps[:, 0] > after_logps[:, 1]).float().mean())}

    # ---- report ------------------------------------------------------------------------------------------
    checks = {
        "preference_accuracy": after["preference_accuracy"] >= TARGETS["preference_accuracy"],
        "generation_accuracy": after["generation_accuracy"] >= TARGETS["generation_accuracy"],
        "preference_gain": after["preference_accuracy"] - before["preference_accuracy"] >= TARGETS["gain"],
        "generation_gain": after["generation_accuracy"] - before["generation_accuracy"] >= TARGETS["gain"],
    }
    report = {
        "before": before,
        "after": after,
        "passed": all(checks.values()),
        "checks": checks,
        "targets": TARGETS,
        "seed": seed,
        "seeds": {"task": seed, "model_init": seed, "sft": seed, "train_pairs": seed + 1, "held_out_pairs": seed + 2},
        "config": {"sft": sft_config, "dpo": dpo_config, "recipe": {"sft": SFT, "dpo": DPO, "held_out": HELD_OUT,
                                                                     "max_new_tokens": MAX_NEW_TOKENS}},
        "runs": {
            "sft": {"summary": str(sft.run_dir / "train_summary.json"), "model": sft_summary["model_dir"],
                    "train_runtime_s": sft_summary["train_runtime_s"], "steps": sft_summary["steps"]},
            "dpo": {"summary": str(out / "train_summary.json"), "model": dpo_summary["model_dir"],
                    "train_runtime_s": dpo_summary["train_runtime_s"], "steps": dpo_summary["steps"]},
        },
        "samples": [{"prompt": b["prompt"], "before": b["response"], "after": a["response"]}
                    for b, a in zip(before_rows[:8], after_rows[:8])],
        "wall_time_s": time.perf_counter() - t_start,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    log(_table(report, ("preference_accuracy", "generation_accuracy", "likelihood_preference_accuracy"), TARGETS))
    log(f"quickstart: {'PASSED' if report['passed'] else 'FAILED'} in {report['wall_time_s']:.0f}s; "
        f"wrote {out / 'report.json'}, metrics.jsonl, tensorboard/, plots/")
    return report


def online_dpo_config(out: Path, seed: int, train_prompts: list[toy.Item], eval_prompts: list[toy.Item]) -> dict:
    """The online DPO run of ``--method online_dpo`` (everything but the model and tokenizer)."""
    o = ONLINE
    return {
        "data": {"train": [{"prompt": it.prompt} for it in train_prompts],
                 "eval": [{"prompt": it.prompt} for it in eval_prompts[: o["eval_prompts"]]]},
        "loss": {"name": "dpo", "beta": o["beta"]},
        "rollout": {"num_generations": o["num_generations"], "temperature": o["temperature"],
                    "max_new_tokens": MAX_NEW_TOKENS},
        "reward": {"functions": ["preftune.rewards:toy_verifier"]},
        "training": {"output_dir": str(out), "learning_rate": o["learning_rate"],
                     "per_device_batch_size": o["prompts_per_step"], "max_steps": o["steps"],
                     "max_length": MAX_LENGTH, "seed": seed, "logging_every": 5, "eval_every": 20,
                     "progress_bar": False},
        "monitor": {"num_prompts": 8},
    }


def _online_dpo(out: Path, seed: int, log, t_start: float, sft_dir=None) -> dict:
    """``--method online_dpo``: the SFT model samples, the toy verifier scores, DPO learns best vs worst."""
    import preftune

    sft = sft_phase(out, seed, log, sft_dir)
    tokenizer, model, held_out = sft.tokenizer, sft.model, sft.held_out
    before_gen, before_rows = generation_accuracy(model, tokenizer, held_out)
    model.train()
    config = online_dpo_config(out, seed, sft.items, held_out)
    log(f"quickstart: online DPO, {ONLINE['steps']} steps of {ONLINE['prompts_per_step']} prompts x "
        f"{ONLINE['num_generations']} samples, reward preftune.rewards:toy_verifier")
    t0 = time.perf_counter()
    summary = preftune.train({"model": model, "tokenizer": tokenizer, **config}, overwrite=True, log=lambda *_: None)
    log(f"quickstart: online DPO {summary['steps']} steps in {time.perf_counter() - t0:.1f}s "
        f"({summary['source_s']:.1f}s of them sampling and scoring), final loss {summary['final_loss']:.3f}")
    after_gen, after_rows = generation_accuracy(model, tokenizer, held_out)
    final = {"eval/reward/mean": summary["final_eval_metrics"].get("reward/mean"),
             "train/rollout/skipped_fraction": summary["final_train_metrics"].get("rollout/skipped_fraction")}
    return on_policy_report("online_dpo", out=out, seed=seed, t_start=t_start, log=log, sft=sft, summary=summary,
                            config=config, recipe=ONLINE, targets=ONLINE_TARGETS, final=final,
                            before=(before_gen, before_rows), after=(after_gen, after_rows), run_keys=("source_s",))


def on_policy_report(method: str, *, out: Path, seed: int, t_start: float, log, sft, summary: dict, config: dict,
                     recipe: dict, targets: dict, final: dict, before: tuple[float, list], after: tuple[float, list],
                     run_keys: tuple[str, ...] = (), table: str | None = None) -> dict:
    """The ``report.json`` of an on-policy quickstart (online DPO, GRPO / RLOO, PPO), written and logged.

    ``before`` / ``after``: (generation accuracy, its rows) of :func:`generation_accuracy` around training;
    ``final``: the run's last metrics to show; ``run_keys``: more fields of the method's train summary for
    ``runs``; ``table``: the console table (default: :func:`_table` of the accuracy with three samples).
    """
    (before_gen, before_rows), (after_gen, after_rows) = before, after
    checks = {"generation_accuracy": after_gen >= targets["generation_accuracy"],
              "generation_gain": after_gen - before_gen >= targets["gain"]}
    report = {
        "method": method, "before": {"generation_accuracy": before_gen}, "after": {"generation_accuracy": after_gen},
        "passed": all(checks.values()), "checks": checks, "targets": targets, "seed": seed, "final": final,
        "config": {"sft": sft.config, method: config["training"] | {k: config[k] for k in ("loss", "rollout", "reward")},
                   "recipe": {"sft": SFT, method: recipe, "held_out": HELD_OUT}},
        "runs": {"sft": {"summary": str(sft.run_dir / "train_summary.json"), "model": sft.summary["model_dir"],
                         "train_runtime_s": sft.summary["train_runtime_s"], "steps": sft.summary["steps"]},
                 method: {"summary": str(out / "train_summary.json"), "model": summary["model_dir"],
                          "train_runtime_s": summary["train_runtime_s"], "steps": summary["steps"],
                          **{k: summary[k] for k in run_keys}}},
        "samples": [{"prompt": b["prompt"], "before": b["response"], "after": a["response"]}
                    for b, a in zip(before_rows[:8], after_rows[:8])],
        "wall_time_s": time.perf_counter() - t_start,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    log(table if table is not None else _table(report, ("generation_accuracy",), targets))
    log(f"quickstart: {'PASSED' if report['passed'] else 'FAILED'} in {report['wall_time_s']:.0f}s; "
        f"wrote {out / 'report.json'}, metrics.jsonl, samples.jsonl, tensorboard/, plots/, report.html")
    return report


def _table(report: dict, keys: tuple[str, ...], targets: dict) -> str:
    lines = [f"{'metric':<32}{'before':>8}{'after':>8}   target", "-" * 62]
    for key in keys:
        b, a = report["before"][key], report["after"][key]
        target = f">= {targets[key]:.2f}" if key in targets else ""
        lines.append(f"{key:<32}{b:>8.3f}{a:>8.3f}   {target}")
    lines.append("")
    lines.extend(f"  {s['prompt']!r}: {s['before']!r} -> {s['after']!r}" for s in report["samples"][:3])
    return "\n".join(lines)
