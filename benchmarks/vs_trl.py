"""DPO training, preftune vs TRL's DPOTrainer: same models, same pairs, same batch, same precision, offline.

    python benchmarks/vs_trl.py --model both --precision both --steps 3 [--threads 1]
    python benchmarks/vs_trl.py --model tiny --steps 20 --rows trl-off,preftune       # steady state, two rows
    python benchmarks/vs_trl.py --model smol135m --microbatch 3 --threads 1     # one micro-batch, both engines

Builds, in ``--workdir``, a word-level tokenizer (one token per generated word) and randomly initialised
Llamas saved in Hugging Face format — ``tiny`` (about 4.7M parameters), ``smol135m`` (SmolLM2-135M's shape:
576 hidden, 30 layers, 9 heads, 3 KV heads, 49152 vocabulary, tied embeddings) and ``qwen05b`` (Qwen2.5-0.5B's
sizes as a LlamaConfig: 896 hidden, 24 layers, 14 heads, 2 KV heads, intermediate 4864, 151936 vocabulary, tied;
no q/k/v bias, so not Qwen2's architecture, only its shape; meant for a GPU) — and ``steps x 8`` pairs
(prompts about 130 tokens, responses about 180). Each run is a fresh subprocess, so peak RSS
(``ru_maxrss``) belongs to one tool. All runs: 2 pairs x 4 accumulation, max_length 512, beta 0.1, lr 1e-6.

Rows (``--rows``, comma-separated; default all of them):
    trl-on, trl-off          TRL with precompute_ref_log_probs on / off
    trl-gc                   TRL with gradient_checkpointing=True (precompute on)
    preftune                 preftune.train with its defaults (packed layout, precomputed reference)
    preftune-compile         engine.compile: true, a fresh TORCHINDUCTOR_CACHE_DIR (cold: compilation counted)
    preftune-compile-warm    the same again, reusing preftune-compile's cache dir (needs that row)
    preftune-gc              engine.gradient_checkpointing: true (compared with trl-gc)
    preftune-bf16w           model_dtype: bf16 (bf16 weights, fp32 master copies in the optimizer), run under
                             --precision bf16 only, as its own precision mode "bf16 weights"
The flags of earlier versions (``--trl-precompute``, ``--preftune-compile``, ``--preftune-checkpointing``) still
select the rows they used to when ``--rows`` is not given.

End to end = wall time from loading the model to the end of training, including tokenization and the
reference pass (precomputed, or per step); for preftune it includes its end-of-run plots and report. Steady
state = samples/s over optimizer steps 2..N from per-step timestamps (TRL: a ``TrainerCallback.on_step_end``;
preftune: a callback's ``on_step``), so setup, the reference pass, compilation and step 1 are left out; it
needs ``--steps`` of 2 or more (20 gives a stable figure). Library imports (torch, transformers, datasets, trl
or preftune) happen before the clock starts, on both sides. Samples/s count trained pairs; tokens/s count the
tokens of the two sequences of each trained pair (the same for both tools). CPU s is the worker's user +
system time: on a shared machine it is the measure least disturbed by other jobs (``--threads 1`` keeps
OpenMP from waiting on a core someone else holds). Ratios are preftune against the faster TRL setting of the
same kind (checkpointing rows against TRL's checkpointing row). ``--device cuda`` (default: cuda when torch
sees a GPU) trains both tools on the GPU and adds peak GPU memory. Results go to ``--out`` (JSON, with the
machine: CPU model, bf16 flags, GPU) and a table on stdout (also to ``--md``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import (  # noqa: E402
    StepClock,
    gpu_peak_mib,
    machine,
    machine_line,
    resolve_device,
    steady_rate,
    trl_step_clock,
    worker_env,
)

MODELS = {
    # 4.69M parameters: 4096 x 256 (tied embedding) + 4 layers x 0.91M
    "tiny": dict(vocab_size=4096, hidden_size=256, intermediate_size=928, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    # SmolLM2-135M's shape
    "smol135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3),
    # Qwen2.5-0.5B's sizes (as a Llama: no q/k/v bias); 494M parameters, for a GPU
    "qwen05b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                    num_attention_heads=14, num_key_value_heads=2),
}
BOTH = ("tiny", "smol135m")  # --model both: the CPU pair (qwen05b is named explicitly)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
BATCH, ACCUM, MAX_LENGTH, BETA, LR = 2, 4, 512, 0.1, 1e-6


# ---- setup: tokenizer, models, pairs -------------------------------------------------------------------------


def build_model_dir(kind: str, root: Path) -> Path:
    """Tokenizer + random-weight Llama of ``kind``, saved once under ``root/kind``."""
    out = root / kind
    if (out / "config.json").exists():
        return out
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    shape = MODELS[kind]
    words = SPECIALS + [f"w{i}" for i in range(shape["vocab_size"] - len(SPECIALS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0,
                      rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def build_pairs(path: Path, n: int, vocab: int, seed: int = 0) -> Path:
    """``n`` pairs of random words: prompt 110-150 words, chosen and rejected 150-210 (one token per word)."""
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(f"w{rng.randrange(vocab - len(SPECIALS))}" for _ in range(rng.randint(lo, hi)))

    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": text(110, 150), "chosen": " " + text(150, 210),
                                "rejected": " " + text(150, 210)}) + "\n")
    return path


def pair_tokens(path: Path, n: int) -> int:
    """Tokens of the two sequences of the first ``n`` pairs (prompt twice, both responses, an EOS each)."""
    total = 0
    with open(path) as f:
        for line in list(f)[:n]:
            row = json.loads(line)
            p, c, r = (len(row[k].split()) for k in ("prompt", "chosen", "rejected"))
            total += 2 * p + c + r + 2
    return total


# ---- workers: one tool per process ---------------------------------------------------------------------------


def worker_trl(a) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    extra = {"attn_implementation": a.attn} if a.attn else {}
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32, **extra)
    data = load_dataset("json", data_files=str(a.data), split="train")
    args = DPOConfig(
        output_dir=str(a.run_dir), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
        max_length=MAX_LENGTH, beta=BETA, learning_rate=LR, bf16=a.precision == "bf16", use_cpu=a.device == "cpu",
        report_to="none", precompute_ref_log_probs=a.precompute == "on", max_steps=a.steps, logging_steps=1,
        save_strategy="no", gradient_checkpointing=a.checkpointing, disable_tqdm=True, seed=0,
        padding_free=a.trl_padding_free,
    )
    clock = StepClock()
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                         callbacks=[trl_step_clock(clock)])
    t_init = time.perf_counter()
    trainer.train()
    t_end = time.perf_counter()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # TRL 1.16 turns padding_free off again with a warning ("temporarily unavailable"): record what ran.
    return {"wall_s": t_end - t0, "setup_s": t_init - t0, "train_s": t_end - t_init, "first_loss": losses[0],
            "last_loss": losses[-1], "step_times": [t - t0 for t in clock.times],
            "padding_free": bool(getattr(trainer, "padding_free", False))}


def worker_preftune(a) -> dict:
    # Libraries imported before the clock starts, as worker_trl does (preftune imports them lazily).
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import preftune
    import preftune.trainer.loop  # noqa: F401

    t0 = time.perf_counter()
    config = {
        "model": str(a.model_dir),
        "data": {"train": str(a.data)},
        "loss": {"name": "dpo", "beta": BETA},
        "reference": {"precompute": True, "cache_dir": str(a.run_dir / "refcache")},  # fresh: no cache hit
        "training": {"output_dir": str(a.run_dir), "learning_rate": LR, "per_device_batch_size": BATCH,
                     "gradient_accumulation_steps": ACCUM, "max_steps": a.steps, "max_length": MAX_LENGTH,
                     "precision": a.precision, "allow_slow_bf16": True, "save_model": False, "progress_bar": False,
                     "logging_every": 1},
    }
    if a.engine_json:
        config["engine"] = json.loads(a.engine_json)
    if a.model_dtype != "fp32":
        config["model_dtype"] = a.model_dtype
    if a.attn:
        config["attn_implementation"] = a.attn
    clock = StepClock()
    summary = preftune.train(config, log=lambda *m: print(*m, file=sys.stderr), callbacks=[clock])
    t_end = time.perf_counter()
    records = [json.loads(line) for line in (a.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in records if r.get("split", "train") == "train" and "loss" in r]
    return {"wall_s": t_end - t0, "setup_s": summary["train_runtime_s"] - summary["train_loop_s"],
            "train_s": summary["train_loop_s"], "first_loss": losses[0], "last_loss": losses[-1],
            "step_times": [t - t0 for t in clock.times]}


def run_worker(a) -> None:
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    start = resource.getrusage(resource.RUSAGE_SELF)
    result = worker_trl(a) if a.worker == "trl" else worker_preftune(a)
    end = resource.getrusage(resource.RUSAGE_SELF)
    result["peak_rss_mb"] = end.ru_maxrss / 1024
    result["cpu_s"] = end.ru_utime + end.ru_stime - start.ru_utime - start.ru_stime
    result["peak_gpu_mb"] = gpu_peak_mib()
    Path(a.result).write_text(json.dumps(result))


# ---- driver --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One selectable run: which tool, with which settings, and which TRL rows it is compared with (``group``)."""

    label: str
    tool: str
    precompute: str = "on"
    engine: dict = field(default_factory=dict)
    checkpointing: bool = False  # TRL's gradient_checkpointing
    model_dtype: str = "fp32"  # preftune's model_dtype; bf16 runs under --precision bf16 only
    cache: str = ""  # inductor cache: "cold" (a fresh dir) or "warm" (the cold row's dir)
    group: str = "plain"  # ratios against the best TRL row of the same group


ROWS = {
    "trl-on": Row("trl (precompute on)", "trl"),
    "trl-off": Row("trl (precompute off)", "trl", precompute="off"),
    "trl-gc": Row("trl (grad ckpt)", "trl", checkpointing=True, group="gc"),
    "preftune": Row("preftune", "preftune"),
    "preftune-compile": Row("preftune (compile, cold cache)", "preftune", engine={"compile": True}, cache="cold"),
    "preftune-compile-warm": Row("preftune (compile, warm cache)", "preftune", engine={"compile": True},
                                 cache="warm"),
    "preftune-gc": Row("preftune (grad ckpt)", "preftune", engine={"gradient_checkpointing": True}, group="gc"),
    "preftune-bf16w": Row("preftune (bf16 weights)", "preftune", model_dtype="bf16"),
}


def select_rows(a, error) -> list[str]:
    """``--rows`` checked (in ROWS order), or the rows the pre-``--rows`` flags meant when only they are given."""
    legacy = (a.trl_precompute, a.preftune_compile, a.preftune_checkpointing)
    if a.rows is None and legacy == (None, None, False):
        return list(ROWS)
    if a.rows is None:  # today's behaviour: trl on/off, preftune without/with compile, checkpointing on request
        trl, comp = a.trl_precompute or "both", a.preftune_compile or "both"
        names = [f"trl-{s}" for s in ("on", "off") if trl in (s, "both")]
        names += [n for n, c in (("preftune", "off"), ("preftune-compile", "on")) if comp in (c, "both")]
        return names + (["preftune-gc"] if a.preftune_checkpointing else [])
    names = [n.strip() for n in a.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown or not names:
        error(f"--rows: unknown row {', '.join(map(repr, unknown)) or '(none given)'}; known: {', '.join(ROWS)}")
    if "preftune-compile-warm" in names and "preftune-compile" not in names:
        error("--rows: preftune-compile-warm reuses preftune-compile's inductor cache; select both")
    return [n for n in ROWS if n in names]


def launch(row: Row, model_dir: Path, data: Path, precision: str, steps: int, work: Path, a, *,
           engine: dict, inductor: Path | None = None) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"{row.tool}-", dir=work))
    result = run_dir / "result.json"
    cmd = [sys.executable, __file__, "--worker", row.tool, "--model-dir", str(model_dir), "--data", str(data),
           "--precision", precision, "--steps", str(steps), "--run-dir", str(run_dir), "--result", str(result),
           "--precompute", row.precompute, "--engine-json", json.dumps({**engine, **row.engine}),
           "--model-dtype", row.model_dtype, "--device", a.device]
    cmd += (["--checkpointing"] if row.checkpointing else []) + (["--attn", a.attn] if a.attn else [])
    cmd += ["--trl-padding-free"] if a.trl_padding_free else []
    env = dict(os.environ, **worker_env(a.device))
    if a.threads:
        cmd += ["--threads", str(a.threads)]
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    env = dict(env, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(run_dir / "hf_datasets"), TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false",
               TORCHINDUCTOR_CACHE_DIR=str(inductor or run_dir / "inductor"))  # fresh unless warm
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{row.tool} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(result.read_text())
    out["process_s"] = time.perf_counter() - t0
    return out


def run_group(kind: str, precision: str, names: list[str], a, work: Path, engine: dict) -> list[dict]:
    """The selected rows for one model and precision, each in its own process, with their ratios."""
    model_dir = build_model_dir(kind, work / "models")
    pairs = a.pairs or a.steps * BATCH * ACCUM
    data = build_pairs(work / f"pairs_{kind}_{pairs}.jsonl", pairs, MODELS[kind]["vocab_size"])
    n = a.steps * BATCH * ACCUM
    tokens = pair_tokens(data, n)
    runs, cold = {}, None
    for name in names:
        row = ROWS[name]
        if row.model_dtype == "bf16" and precision != "bf16":
            continue  # bf16 weights is a bf16 mode
        inductor = None
        if row.cache:
            cold = Path(tempfile.mkdtemp(prefix="inductor-", dir=work)) if row.cache == "cold" else cold
            inductor = cold
        label = "bf16 weights" if row.model_dtype == "bf16" else precision
        try:
            r = launch(row, model_dir, data, precision, a.steps, work, a, engine=engine, inductor=inductor)
        except RuntimeError as e:  # one failed row (a compiler missing, out of memory) does not lose the others
            print(f"  {kind} {precision} {row.label}: {e}", file=sys.stderr)
            last = [line for line in str(e).splitlines() if line.strip()][-1][:200]
            runs[name] = dict(tool=row.label, row=name, group=row.group, model=kind, precision=label, error=last)
            continue
        print(f"  {kind} {precision} {row.label}: {r}", file=sys.stderr)
        steady = steady_rate(r["step_times"], BATCH * ACCUM)
        r.update(tool=row.label, row=name, group=row.group, model=kind, steps=a.steps, threads=a.threads,
                 precision=label, device=a.device,
                 samples_per_s=n / r["wall_s"], tokens_per_s=tokens / r["wall_s"], steady_samples_per_s=steady,
                 steady_tokens_per_s=steady * tokens / n if steady else None)
        runs[name] = r
    done = [r for r in runs.values() if "error" not in r]
    for pt in (r for r in done if r["row"].startswith("preftune")):
        trl = [r for r in done if r["row"].startswith("trl") and r["group"] == pt["group"]]
        if not trl:
            continue
        best = max(trl, key=lambda r: r["samples_per_s"])
        pt["vs"] = best["tool"]
        pt["speedup_vs_best_trl"] = pt["samples_per_s"] / best["samples_per_s"]
        pt["cpu_ratio_vs_best_trl"] = best["cpu_s"] / pt["cpu_s"]
        pt["rss_ratio_vs_best_trl"] = pt["peak_rss_mb"] / best["peak_rss_mb"]
        pt["first_loss_diff"] = abs(pt["first_loss"] - best["first_loss"])
        steady = [r["steady_samples_per_s"] for r in trl if r["steady_samples_per_s"]]
        if steady and pt["steady_samples_per_s"]:
            pt["steady_speedup_vs_best_trl"] = pt["steady_samples_per_s"] / max(steady)
        if pt["peak_gpu_mb"] and best["peak_gpu_mb"]:
            pt["gpu_mem_ratio_vs_best_trl"] = pt["peak_gpu_mb"] / best["peak_gpu_mb"]
    return list(runs.values())


def loss_check(rows: list[dict]) -> list[str]:
    """Rows whose first-step loss is off: policy == reference, so ln 2 (within 1e-4 in fp32, 1e-3 in bf16), and
    within the same of TRL's."""
    bad = []
    for r in rows:
        if "error" in r:
            bad.append(f"{r['model']} {r['precision']} {r['tool']}: failed")
            continue
        tol = 1e-4 if r["precision"] == "fp32" else 1e-3
        if abs(r["first_loss"] - math.log(2)) > tol or r.get("first_loss_diff", 0.0) > tol:
            bad.append(f"{r['model']} {r['precision']} {r['tool']}: {r['first_loss']:.6f}")
    return bad


def parse_models(value: str) -> list[str]:
    kinds = [k.strip() for k in value.split(",") if k.strip()]
    kinds = [x for k in kinds for x in (BOTH if k == "both" else [k])]
    bad = [k for k in kinds if k not in MODELS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"unknown model {', '.join(map(repr, bad)) or '(none)'}; known: "
                                         f"{', '.join(MODELS)}, both (= tiny,smol135m), or a comma-separated list")
    return list(dict.fromkeys(kinds))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=parse_models, default=list(BOTH), metavar="MODELS",
                   help=f"{', '.join(MODELS)}, both (= tiny,smol135m; the default) or a comma-separated list")
    p.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (8 pairs each)")
    p.add_argument("--pairs", type=int, default=None, help="pairs in the data set (default steps x 8: one epoch)")
    p.add_argument("--rows", default=None, metavar="NAMES",
                   help=f"comma-separated rows to run (default all): {', '.join(ROWS)}")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where both tools train (auto: cuda when torch sees a GPU)")
    p.add_argument("--attn", default=None, help="attn_implementation for both tools (sdpa, eager, "
                   "flash_attention_2: preftune then needs --preftune-engine layout=padded); default the model's")
    p.add_argument("--trl-padding-free", action="store_true",
                   help="DPOConfig(padding_free=True) for TRL (TRL 1.16 switches it off again with a warning; "
                        "the JSON records what ran)")
    p.add_argument("--trl-precompute", choices=["on", "off", "both"], default=None,
                   help="(before --rows) TRL rows: precompute on, off or both")
    p.add_argument("--preftune-engine", action="append", default=[], metavar="KEY=VALUE",
                   help="an engine setting for every preftune run, e.g. layout=padded or reuse_freed_memory=false "
                        "(VALUE is read as JSON when it parses, else as a string); repeatable")
    p.add_argument("--preftune-compile", choices=["on", "off", "both"], default=None,
                   help="(before --rows) preftune rows: without engine.compile, with it (cold cache), or both")
    p.add_argument("--preftune-checkpointing", action="store_true",
                   help="(before --rows) also the preftune-gc row")
    p.add_argument("--threads", type=int, default=None,
                   help="torch / OpenMP threads for both tools (default: torch's, one per core)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "preftune_vs_trl"))
    p.add_argument("--out", default=None, help="JSON results (default WORKDIR/results.json)")
    p.add_argument("--md", default=None, help="also append the machine line, command and table to this file")
    p.add_argument("--microbatch", type=int, default=0, metavar="N",
                   help="instead: time N micro-batches (forward + backward) of each engine in one process")
    # worker mode (internal)
    p.add_argument("--worker", choices=["trl", "preftune"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--precompute", default="on", help=argparse.SUPPRESS)
    p.add_argument("--engine-json", default="", help=argparse.SUPPRESS)
    p.add_argument("--model-dtype", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        run_worker(a)
        return 0
    if a.steps < 1:
        p.error("--steps: at least 1")
    names = select_rows(a, p.error)
    a.device = resolve_device(a.device)

    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    precisions = ["fp32", "bf16"] if a.precision == "both" else [a.precision]
    if a.microbatch:
        from vs_trl_microbatch import microbatch_ab

        for kind in a.model:
            for precision in precisions:
                r = microbatch_ab(MODELS[kind], len(SPECIALS), precision, a.microbatch)
                print(f"{kind} {precision}: one micro-batch, CPU s: TRL {r['trl']:.2f}, preftune {r['preftune']:.2f}, "
                      f"ratio {r['ratio']:.2f}x")
        return 0
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    engine = dict(_setting(kv) for kv in a.preftune_engine)
    info = machine(a.device)
    print(machine_line(info))
    rows = [r for kind in a.model for precision in precisions for r in run_group(kind, precision, names, a, work,
                                                                                  engine)]
    text = table(rows)
    print(text)
    out = Path(a.out) if a.out else work / "results.json"
    command = " ".join(sys.argv)
    out.write_text(json.dumps({"command": command, "machine": info, "rows": rows}, indent=1))
    print(f"\nresults: {out}")
    bad = loss_check(rows)
    verdict = (f"first-step losses all at ln 2 = {math.log(2):.4f} (policy == reference; 1e-4 fp32, 1e-3 bf16) and "
               f"with TRL's" if not bad else "first-step losses NOT all at ln 2 / TRL's: " + "; ".join(bad))
    print(verdict)
    if a.md:
        with open(a.md, "a") as f:
            f.write(f"\n`{command}`\n\n{machine_line(info)}\n\n{text}\n\n{verdict}\n")
    return 0


def _setting(kv: str) -> tuple[str, object]:
    key, _, value = kv.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _x(r: dict, key: str, spec: str = ".2f", suffix: str = "x") -> str:
    return "" if r.get(key) is None else f"{format(r[key], spec)}{suffix}"


def table(rows: list[dict]) -> str:
    gpu = any(r.get("peak_gpu_mb") for r in rows)
    cols = ["model", "precision", "tool", "end-to-end s", "setup+ref s", "CPU s", "samples/s",
            "steady samples/s (steps 2..N)", "tokens/s", "peak RSS MiB"] + (["peak GPU MiB"] if gpu else []) + [
            "first loss", "speed vs best TRL (wall)", "(steady)", "(CPU time)", "RSS vs best TRL"] + (
            ["GPU mem vs best TRL"] if gpu else [])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['precision']} | {r['tool']} | failed: {r['error']} |"
                         + " |" * (len(cols) - 4))
            continue
        cells = [r["model"], r["precision"], r["tool"], f"{r['wall_s']:.1f}", f"{r['setup_s']:.1f}",
                 f"{r['cpu_s']:.0f}", f"{r['samples_per_s']:.3f}", _x(r, "steady_samples_per_s", ".3f", ""),
                 f"{r['tokens_per_s']:.0f}", f"{r['peak_rss_mb']:.0f}"]
        cells += [_x(r, "peak_gpu_mb", ".0f", "")] if gpu else []
        cells += [f"{r['first_loss']:.4f}", _x(r, "speedup_vs_best_trl"), _x(r, "steady_speedup_vs_best_trl"),
                  _x(r, "cpu_ratio_vs_best_trl"), _x(r, "rss_ratio_vs_best_trl")]
        cells += [_x(r, "gpu_mem_ratio_vs_best_trl")] if gpu else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
