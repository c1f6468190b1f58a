"""GRPO, preftune vs TRL's GRPOTrainer: same local models, prompts, reward function and settings, offline.

    python benchmarks/grpo_vs_trl.py --model both --precision fp32 --steps 4 --threads 2
    python benchmarks/grpo_vs_trl.py --check-math            # same rollout through both: loss, KL, advantages

Models and tokenizer come from ``benchmarks/vs_trl.py`` (built once in ``--workdir``): a word-level tokenizer
(one token per word) and two randomly initialised Llamas in Hugging Face format, ``tiny`` (4.69M parameters)
and ``smol135m`` (SmolLM2-135M's shape: 576 hidden, 30 layers, 9 heads, 3 KV heads, intermediate 1536, 49152
vocabulary, tied embeddings). Prompts: ``steps x 2`` rows of 120-136 random words (~128 tokens). One reward
function file for both (TRL's signature): the share of even-numbered words in the completion.

Both tools, each in a fresh subprocess, with the same settings: G = 4 completions per prompt, 2 prompts per
optimizer step (TRL: ``per_device_train_batch_size`` 8 completions, ``gradient_accumulation_steps`` 1, so
``generation_batch_size`` = 8 = 2 prompts; preftune: ``per_device_batch_size`` 2 prompts), 64 new tokens at
temperature 1 (no top-k / top-p), β = 0.04 with the k3 KL (a frozen reference: TRL loads a second copy from
disk, preftune keeps a frozen copy in memory), ε = 0.2, token-level "dapo" aggregation (TRL's default
``loss_type``), group-scaled advantages, μ = 1, lr 1e-6, no vLLM, no gradient checkpointing.

End to end = wall time from loading the model to the end of training (preftune's includes its end-of-run
plots and report); library imports happen before the clock starts, on both sides. Generation = time inside the
sampler (TRL: ``_generate_single_turn``; preftune: ``time/generate_s``); training = the rest of the loop (TRL's
rollout bookkeeping, reference log-probs, forward and backward, optimizer; preftune's ``time/score_s`` +
``time/train_s``). Peak RSS = the worker's ``ru_maxrss``. With a random model EOS is almost never sampled, so
every completion has 64 tokens: the first step's loss is then 0 on both sides (ρ = 1, each group's advantages
sum to 0, equal lengths) and its KL 0 (policy = reference); ``--check-math`` compares them on a rollout where they
are not (see :func:`check_math`).

bf16 runs only on a CPU with AMX or AVX512-BF16 (``preftune.hardware``); elsewhere it is recorded as not run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import gpu_peak_mib, machine, machine_line, resolve_device, worker_env  # noqa: E402
from vs_trl import BOTH, MODELS, SPECIALS, build_model_dir  # noqa: E402  (the DPO benchmark's models and tokenizer)

G, PROMPTS_PER_STEP, NEW_TOKENS, BETA, EPSILON, LR = 4, 2, 64, 0.04, 0.2, 1e-6

REWARD = '''
def reward(completions, **kwargs):
    """Share of even-numbered words (w0, w2, ...) in each completion: a spread within every group."""
    out = []
    for c in completions:
        words = [w for w in c.split() if w[1:].isdigit()]
        out.append(sum(int(w[1:]) % 2 == 0 for w in words) / max(1, len(words)))
    return out
'''


def build_prompts(path: Path, n: int, vocab: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = " ".join(f"w{rng.randrange(vocab - len(SPECIALS))}" for _ in range(rng.randint(120, 136)))
            f.write(json.dumps({"prompt": words}) + "\n")
    return path


# ---- workers: one tool per process ---------------------------------------------------------------------------


def _reward_fn(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_reward", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reward


def trl_trainer(a, steps: int, lr: float = LR):
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    data = load_dataset("json", data_files=str(a.data), split="train")
    args = GRPOConfig(
        output_dir=str(a.run_dir), per_device_train_batch_size=G * PROMPTS_PER_STEP, gradient_accumulation_steps=1,
        num_generations=G, max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0, beta=BETA,
        epsilon=EPSILON, loss_type="dapo", scale_rewards="group", num_iterations=1, learning_rate=lr,
        use_vllm=False, bf16=a.precision == "bf16", use_cpu=a.device == "cpu", report_to="none", max_steps=steps,
        logging_steps=1, save_strategy="no", gradient_checkpointing=False, disable_tqdm=True, seed=0,
        log_completions=False,
    )
    return GRPOTrainer(model=model, reward_funcs=_reward_fn(a.reward), args=args, train_dataset=data,
                       processing_class=tok)


def worker_trl(a) -> dict:
    from trl import GRPOTrainer

    generate_s = [0.0]
    real = GRPOTrainer._generate_single_turn

    def timed(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return real(self, *args, **kwargs)
        finally:
            generate_s[0] += time.perf_counter() - t

    GRPOTrainer._generate_single_turn = timed
    t0 = time.perf_counter()
    trainer = trl_trainer(a, a.steps)
    t_init = time.perf_counter()
    trainer.train()
    t_end = time.perf_counter()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"wall_s": t_end - t0, "setup_s": t_init - t0, "generate_s": generate_s[0],
            "train_s": t_end - t_init - generate_s[0], "first_loss": logs[0]["loss"], "first_kl": logs[0].get("kl"),
            "second_loss": logs[1]["loss"] if len(logs) > 1 else None,
            "second_kl": logs[1].get("kl") if len(logs) > 1 else None}


def worker_preftune(a) -> dict:
    # Libraries imported before the clock starts, as worker_trl does (importing trl loads transformers' modeling,
    # generation and Trainer modules; preftune imports them lazily, on first use, so they are loaded here).
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import matplotlib.pyplot  # noqa: F401  (the end-of-run plots)
    import transformers.generation.utils  # noqa: F401
    import transformers.models.auto.tokenization_auto  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import preftune
    import preftune.trainer.loop  # noqa: F401

    t0 = time.perf_counter()
    config = {
        "model": str(a.model_dir), "data": {"train": str(a.data)},
        "loss": {"name": "grpo", "beta": BETA, "epsilon": EPSILON, "aggregation": "dapo"},
        "rollout": {"num_generations": G, "max_new_tokens": NEW_TOKENS, "temperature": 1.0},
        "reward": {"functions": [f"{a.reward}:reward"]},
        "training": {"output_dir": str(a.run_dir), "learning_rate": LR, "per_device_batch_size": PROMPTS_PER_STEP,
                     "max_steps": a.steps, "max_length": 512, "precision": a.precision, "allow_slow_bf16": True,
                     "save_model": False, "progress_bar": False, "logging_every": 1},
    }
    import preftune.trainer.loop as loop

    plots = [0.0]
    real_plots = loop._plots

    def timed_plots(run_dir, say):
        t = time.perf_counter()
        real_plots(run_dir, say)
        plots[0] = time.perf_counter() - t

    loop._plots = timed_plots
    if a.checkpointing:
        config["engine"] = {"gradient_checkpointing": True}
    preftune.train(config, log=lambda *m: print(*m, file=sys.stderr))
    t_end = time.perf_counter()
    records = [json.loads(line) for line in (a.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("split") == "train"]
    gen = sum(r.get("time/generate_s", 0.0) for r in train)
    in_loop = sum(r.get("time/generate_s", 0.0) + r.get("time/score_s", 0.0) + r.get("time/train_s", 0.0)
               for r in train)
    return {"wall_s": t_end - t0, "setup_s": t_end - t0 - in_loop - plots[0], "report_s": plots[0],
            "generate_s": gen, "train_s": in_loop - gen,
            "first_loss": train[0].get("loss"), "first_kl": train[0].get("kl"),
            "second_loss": train[1].get("loss") if len(train) > 1 else None,
            "second_kl": train[1].get("kl") if len(train) > 1 else None}


def run_worker(a) -> None:
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    start = resource.getrusage(resource.RUSAGE_SELF)
    result = {"trl": worker_trl, "preftune": worker_preftune, "check": check_math}[a.worker](a)
    end = resource.getrusage(resource.RUSAGE_SELF)
    result["peak_rss_mb"] = end.ru_maxrss / 1024
    result["cpu_s"] = end.ru_utime + end.ru_stime - start.ru_utime - start.ru_stime
    result["peak_gpu_mb"] = gpu_peak_mib()
    Path(a.result).write_text(json.dumps(result))


# ---- the same rollout through both ----------------------------------------------------------------------------


def check_math(a) -> dict:
    """TRL trains 3 steps at lr 1e-3; at each step's loss, preftune recomputes on TRL's own micro-batch (its prompts, its
    sampled completions, the same policy and reference weights at that moment): per-token log-probs with its
    packed engine at the temperature, rewards with the same function, advantages with
    ``advantages.group_relative``, and the loss and KL with the registered ``grpo`` loss, normalized over the
    step's tokens. From step 2 on the policy has moved, so the KL and the loss are not 0."""
    import torch
    from trl import GRPOTrainer

    from preftune import advantages as adv
    from preftune.data.batch import padded
    from preftune.data.layouts import LAYOUTS
    from preftune.data.tokenize import TokenizedGroup
    from preftune.logprobs import LogpModel
    from preftune.losses import get_loss

    trainer = trl_trainer(a, 3, lr=1e-3)  # a large step, so that step 2's policy is far from the reference
    reward = _reward_fn(a.reward)
    tok = trainer.processing_class
    rows = []
    real = GRPOTrainer._compute_loss

    def compare(self, model, inputs):
        loss = real(self, model, inputs)
        with torch.no_grad():
            p_ids, p_mask = inputs["prompt_ids"], inputs["prompt_mask"]  # (B, Tp) left-padded
            c_ids, c_mask = inputs["completion_ids"], inputs["completion_mask"]  # (B, Tc) right-padded
            B = c_ids.shape[0]
            prompts = [p_ids[i][p_mask[i].bool()].tolist() for i in range(B)]
            comps = [c_ids[i][c_mask[i].bool()].tolist() for i in range(B)]
            # TRL shuffles the rows of a generation batch before splitting it: find each prompt's G rows.
            rows_of: dict[tuple, list[int]] = {}
            for i, p in enumerate(prompts):
                rows_of.setdefault(tuple(p), []).append(i)
            keys = list(rows_of)
            P = len(keys)
            assert all(len(rows_of[k]) == G for k in keys), "a micro-batch without whole groups"
            groups = [TokenizedGroup(list(k), [comps[i] for i in rows_of[k]]) for k in keys]
            seqs = LAYOUTS["packed"](groups, tok.pad_token_id)
            order = [0] * B  # TRL row -> preftune sequence u + k·P
            for u, k in enumerate(keys):
                for j, i in enumerate(rows_of[k]):
                    order[i] = u + j * P

            def logps(m):
                t, _ = LogpModel(m, 256)(*seqs.model_args(), per_token=True, temperature=self.temperature)
                return padded(t, seqs.target_seq, seqs.num_sequences)[order]  # (B, T) in TRL's row order

            was = model.training
            model.eval()
            policy, ref = logps(model), logps(self.ref_model)
            model.train(was)
            texts = tok.batch_decode(comps, skip_special_tokens=True)
            r = torch.tensor(reward(texts), dtype=torch.float32)  # (B,) in TRL's rows
            by_group = torch.stack([r[rows_of[k]] for k in keys])  # (P, G)
            a_groups = adv.group_relative(by_group, scale="group")  # (P, G)
            a_pt = torch.empty(B)
            for u, k in enumerate(keys):
                a_pt[rows_of[k]] = a_groups[u]
            mask = torch.zeros_like(policy)
            for i, c in enumerate(comps):
                mask[i, : len(c)] = 1
            out = get_loss("grpo").fn(policy, None, a_pt, mask, ref, beta=BETA, epsilon=EPSILON, aggregation="dapo",
                                      num_tokens_in_step=float(mask.sum()))
            kl_tok = (out.metrics["kl"] * mask.sum(1)).sum() / mask.sum()  # token mean, as TRL logs it
            rows.append({"trl_loss": float(loss.detach()), "preftune_loss": float(out.losses.sum()),
                         "trl_kl": self._metrics["train"]["kl"][-1], "preftune_kl": float(kl_tok),
                         "max_abs_ref_logp_diff": float(((ref - inputs["ref_per_token_logps"][:, : ref.shape[1]])
                                                         * mask).abs().max()),
                         "max_abs_advantage_diff": float((a_pt - inputs["advantages"].float()).abs().max()),
                         "mean_length": float(mask.sum(1).mean())})
        return loss

    GRPOTrainer._compute_loss = compare
    trainer.train()
    return {"steps": rows}


# ---- driver --------------------------------------------------------------------------------------------------


def launch(tool: str, model_dir: Path, data: Path, reward: Path, precision: str, steps: int, work: Path,
           threads: int | None, checkpointing: bool = False, device: str = "cpu") -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"grpo-{tool}-", dir=work))
    result = run_dir / "result.json"
    cmd = [sys.executable, __file__, "--worker", tool, "--model-dir", str(model_dir), "--data", str(data),
           "--reward", str(reward), "--precision", precision, "--steps", str(steps), "--run-dir", str(run_dir),
           "--result", str(result), "--device", device] + (["--checkpointing"] if checkpointing else [])
    env = dict(os.environ, **worker_env(device))
    if threads:
        cmd += ["--threads", str(threads)]
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env = dict(env, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(run_dir / "hf_datasets"), TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(result.read_text())
    out["process_s"] = time.perf_counter() - t0
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=[*MODELS, "both"], default="both", help="both: tiny and smol135m")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where both tools train (auto: cuda when torch sees a GPU)")
    p.add_argument("--md", default=None, help="also append the machine line, command and table to this file")
    p.add_argument("--precision", choices=["fp32", "bf16", "both"], default="fp32")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run (2 prompts x 4 completions each)")
    p.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads for both tools")
    p.add_argument("--tools", default="trl,preftune", help="which tools to run, comma-separated")
    p.add_argument("--check-math", action="store_true", help="instead: the same-rollout check on the tiny model")
    p.add_argument("--preftune-checkpointing", action="store_true",
                   help="also run preftune with engine.gradient_checkpointing (outside the benchmark's rules: a "
                        "separate row, to show what it buys)")
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "preftune_vs_trl"))
    p.add_argument("--out", default=None, help="JSON results (default WORKDIR/grpo_results.json)")
    # worker mode (internal)
    p.add_argument("--worker", choices=["trl", "preftune", "check"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--reward", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        run_worker(a)
        return 0

    from preftune.hardware import cpu_has_native_bf16

    a.device = resolve_device(a.device)
    info = machine(a.device)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    reward = work / "grpo_reward.py"
    reward.write_text(REWARD)
    print(machine_line(info))
    if a.check_math:
        model_dir = build_model_dir("tiny", work / "models")
        data = build_prompts(work / "grpo_prompts_tiny_check.jsonl", 6, MODELS["tiny"]["vocab_size"])
        r = launch("check", model_dir, data, reward, "fp32", 3, work, a.threads, device=a.device)
        print("| step | TRL loss | preftune loss | TRL KL | preftune KL | max |Δ ref log-prob| | max |Δ advantage| | "
              "mean length |\n|---|---|---|---|---|---|---|---|")
        for i, s in enumerate(r["steps"], 1):
            print(f"| {i} | {s['trl_loss']:.6g} | {s['preftune_loss']:.6g} | {s['trl_kl']:.6g} | "
                  f"{s['preftune_kl']:.6g} | {s['max_abs_ref_logp_diff']:.2g} | {s['max_abs_advantage_diff']:.2g} | "
                  f"{s['mean_length']:.1f} |")
        return 0
    kinds = list(BOTH) if a.model == "both" else [a.model]
    precisions = ["fp32", "bf16"] if a.precision == "both" else [a.precision]
    tools = a.tools.split(",")
    rows = []
    for kind in kinds:
        model_dir = build_model_dir(kind, work / "models")
        data = build_prompts(work / f"grpo_prompts_{kind}_{a.steps}.jsonl", a.steps * PROMPTS_PER_STEP,
                             MODELS[kind]["vocab_size"])
        for precision in precisions:
            if precision == "bf16" and a.device == "cpu" and cpu_has_native_bf16() is False:
                rows.append({"model": kind, "precision": "bf16", "tool": "both",
                             "note": "not run on this CPU (no AMX/AVX512-BF16)"})
                continue
            runs = {}
            for tool in tools:
                runs[tool] = launch(tool, model_dir, data, reward, precision, a.steps, work, a.threads,
                                    device=a.device)
                print(f"  {kind} {precision} {tool}: {runs[tool]}", file=sys.stderr)
            if a.preftune_checkpointing:
                name = "preftune (grad ckpt, off-rules)"
                runs[name] = launch("preftune", model_dir, data, reward, precision, a.steps, work, a.threads, True,
                                    a.device)
                print(f"  {kind} {precision} {name}: {runs[name]}", file=sys.stderr)
            for tool, r in runs.items():
                r.update(tool=tool, model=kind, precision=precision, steps=a.steps, threads=a.threads,
                         device=a.device)
            if "trl" in runs:
                t = runs["trl"]
                for pt in (r for n, r in runs.items() if n.startswith("preftune")):
                    pt["speedup_vs_trl"] = t["wall_s"] / pt["wall_s"]
                    pt["loop_speedup_vs_trl"] = (t["generate_s"] + t["train_s"]) / (pt["generate_s"] + pt["train_s"])
                    pt["cpu_speedup_vs_trl"] = t["cpu_s"] / pt["cpu_s"]
                    pt["rss_ratio_vs_trl"] = pt["peak_rss_mb"] / t["peak_rss_mb"]
            rows.extend(runs.values())
    text = table(rows)
    print(text)
    out = Path(a.out) if a.out else work / "grpo_results.json"
    command = " ".join(sys.argv)
    out.write_text(json.dumps({"command": command, "machine": info, "cpu": info["cpu"],
                               "load_before": info["load_before"], "rows": rows}, indent=1))
    if a.md:
        with open(a.md, "a") as f:
            f.write(f"\n`{command}`\n\n{machine_line(info)}\n\n{text}\n")
    print(f"\nresults: {out}")
    return 0


def _f(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    head = ("| model | precision | tool | end-to-end s | setup s | generation s | training s | report s | CPU s | "
            "peak RSS MiB | first loss | first KL | 2nd loss | 2nd KL | speed vs TRL (wall) | (loop) | (CPU time) | "
            "RSS vs TRL |")
    gpu = any(r.get("peak_gpu_mb") for r in rows)
    if gpu:
        head += " peak GPU MiB |"
    lines = [head, "|" + "---|" * (18 + gpu)]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['model']} | {r['precision']} | {r['tool']} | {r['note']} |" + " |" * 14)
            continue
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['tool']} | {r['wall_s']:.1f} | {r['setup_s']:.1f} | "
            f"{r['generate_s']:.1f} | {r['train_s']:.1f} | {_f(r.get('report_s'), '.1f')} | {r['cpu_s']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | "
            f"{_f(r['first_loss'], '.4g')} | {_f(r['first_kl'], '.3g')} | {_f(r['second_loss'], '.4g')} | "
            f"{_f(r['second_kl'], '.3g')} | {_f(r.get('speedup_vs_trl'), '.2f')}x | "
            f"{_f(r.get('loop_speedup_vs_trl'), '.2f')}x | {_f(r.get('cpu_speedup_vs_trl'), '.2f')}x | "
            f"{_f(r.get('rss_ratio_vs_trl'), '.2f')}x |" + (f" {_f(r.get('peak_gpu_mb'), '.0f')} |" if gpu else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
