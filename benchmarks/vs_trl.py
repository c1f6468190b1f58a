"""DPO training, preftune vs TRL's DPOTrainer: same models, same pairs, same batch, same precision, offline.

    python benchmarks/vs_trl.py --model both --precision both --steps 3 [--threads 1]
    python benchmarks/vs_trl.py --model smol135m --microbatch 3 --threads 1     # one micro-batch, both engines

Builds, in ``--workdir``, a word-level tokenizer (one token per generated word) and two randomly initialised
Llamas saved in Hugging Face format — ``tiny`` (about 4.7M parameters) and ``smol135m`` (SmolLM2-135M's shape:
576 hidden, 30 layers, 9 heads, 3 KV heads, 49152 vocabulary, tied embeddings) — and ``steps x 8`` pairs
(prompts about 130 tokens, responses about 180). Each run is a fresh subprocess, so peak RSS
(``ru_maxrss``) belongs to one tool: TRL with ``precompute_ref_log_probs`` on and off, then ``preftune.train``,
all with 2 pairs x 4 accumulation, max_length 512, beta 0.1, lr 1e-6, no gradient checkpointing.

End to end = wall time from loading the model to the end of training, including tokenization and the
reference pass (precomputed, or per step); for preftune it includes its end-of-run plots and report. Library
imports (torch, transformers, datasets, trl or preftune) happen before the clock starts, on both sides. Samples/s count
trained pairs; tokens/s count the tokens of the two sequences of each trained pair (the same for both tools).
CPU s is the worker's user + system time: on a shared machine it is the measure least disturbed by other jobs
(``--threads 1`` keeps OpenMP from waiting on a core someone else holds). Ratios are preftune against the faster
TRL setting. Results go to ``--out`` (JSON) and a table on stdout.
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
from pathlib import Path

MODELS = {
    # 4.69M parameters: 4096 x 256 (tied embedding) + 4 layers x 0.91M
    "tiny": dict(vocab_size=4096, hidden_size=256, intermediate_size=928, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    # SmolLM2-135M's shape
    "smol135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3),
}
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
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    data = load_dataset("json", data_files=str(a.data), split="train")
    args = DPOConfig(
        output_dir=str(a.run_dir), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
        max_length=MAX_LENGTH, beta=BETA, learning_rate=LR, bf16=a.precision == "bf16", use_cpu=True,
        report_to="none", precompute_ref_log_probs=a.precompute == "on", max_steps=a.steps, logging_steps=1,
        save_strategy="no", gradient_checkpointing=False, disable_tqdm=True, seed=0,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    t_init = time.perf_counter()
    trainer.train()
    t_end = time.perf_counter()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"wall_s": t_end - t0, "setup_s": t_init - t0, "train_s": t_end - t_init, "first_loss": losses[0],
            "last_loss": losses[-1]}


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
    summary = preftune.train(config, log=lambda *m: print(*m, file=sys.stderr))
    t_end = time.perf_counter()
    records = [json.loads(line) for line in (a.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in records if r.get("split", "train") == "train" and "loss" in r]
    return {"wall_s": t_end - t0, "setup_s": summary["train_runtime_s"] - summary["train_loop_s"],
            "train_s": summary["train_loop_s"], "first_loss": losses[0], "last_loss": losses[-1]}


def run_worker(a) -> None:
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    start = resource.getrusage(resource.RUSAGE_SELF)
    result = worker_trl(a) if a.worker == "trl" else worker_preftune(a)
    end = resource.getrusage(resource.RUSAGE_SELF)
    result["peak_rss_mb"] = end.ru_maxrss / 1024
    result["cpu_s"] = end.ru_utime + end.ru_stime - start.ru_utime - start.ru_stime
    Path(a.result).write_text(json.dumps(result))


# ---- one micro-batch, both engines in one process ---------------------------------------------------------------


def microbatch_ab(kind: str, precision: str, repeats: int) -> dict:
    """CPU seconds of one DPO micro-batch (2 pairs, forward + backward) on the same model, alternating TRL's
    collator + fused LM head (as ``DPOTrainer`` runs it, with its policy-side extra outputs) and preftune's
    packed layout + chunked head. Median over ``repeats`` after one warm-up each."""
    import statistics

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import add_fused_lm_head

    from preftune.config import EngineConfig
    from preftune.data.layouts import LAYOUTS
    from preftune.data.tokenize import TokenizedPair
    from preftune.logprobs import sequence_logps

    torch.manual_seed(0)
    rng = random.Random(0)
    shape = MODELS[kind]
    model = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=True,
                                         rope_theta=100000.0, attn_implementation="sdpa"))
    model.train()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))

    def ids(n):
        return [rng.randrange(len(SPECIALS), shape["vocab_size"]) for _ in range(n)]

    pairs = [TokenizedPair(ids(rng.randint(110, 150)), ids(rng.randint(150, 210)) + [2],
                           ids(rng.randint(150, 210)) + [2]) for _ in range(2 * (repeats + 1))]
    collator = DataCollatorForPreference(pad_token_id=0)
    engine = EngineConfig()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def trl(two):
        batch = collator([{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids}
                          for p in two])
        completion = batch.pop("completion_mask")
        labels = batch["input_ids"].masked_fill(completion == 0, -100)
        with autocast:
            logps = model(**batch, labels=labels, fused_lm_head=True, use_cache=False).log_probs.sum(1)
        logps.sum().backward()

    def preftune(two):
        with autocast:
            logps, _ = sequence_logps(model, LAYOUTS[engine.layout](two, 0), engine.chunk_size)
        logps.sum().backward()

    times = {"trl": [], "preftune": []}
    for i in range(repeats + 1):
        for name, fn in (("trl", trl), ("preftune", preftune)):
            t0 = time.process_time()
            fn(pairs[2 * i : 2 * i + 2])
            if i:
                times[name].append(time.process_time() - t0)
            model.zero_grad(set_to_none=True)
    out = {name: statistics.median(v) for name, v in times.items()}
    out["ratio"] = out["trl"] / out["preftune"]
    return out


# ---- driver --------------------------------------------------------------------------------------------------


def launch(tool: str, model_dir: Path, data: Path, precision: str, steps: int, work: Path, *,
           precompute: str = "on", engine: dict | None = None, threads: int | None = None) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"{tool}-", dir=work))
    result = run_dir / "result.json"
    cmd = [sys.executable, __file__, "--worker", tool, "--model-dir", str(model_dir), "--data", str(data),
           "--precision", precision, "--steps", str(steps), "--run-dir", str(run_dir), "--result", str(result),
           "--precompute", precompute, "--engine-json", json.dumps(engine or {})]
    env = dict(os.environ)
    if threads:
        cmd += ["--threads", str(threads)]
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env = dict(env, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(run_dir / "hf_datasets"), TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false",
               TORCHINDUCTOR_CACHE_DIR=str(run_dir / "inductor"))  # cold: compilation is counted in full
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(result.read_text())
    out["process_s"] = time.perf_counter() - t0
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "smol135m", "both"], default="both")
    p.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (8 pairs each)")
    p.add_argument("--pairs", type=int, default=None, help="pairs in the data set (default steps x 8: one epoch)")
    p.add_argument("--trl-precompute", choices=["on", "off", "both"], default="both")
    p.add_argument("--preftune-engine", action="append", default=[], metavar="KEY=VALUE",
                   help="an engine setting for every preftune run, e.g. layout=padded or reuse_freed_memory=false "
                        "(VALUE is read as JSON when it parses, else as a string); repeatable")
    p.add_argument("--preftune-compile", choices=["on", "off", "both"], default="both",
                   help="run preftune with engine.compile (regional torch.compile), without it, or both")
    p.add_argument("--preftune-checkpointing", action="store_true",
                   help="also run preftune with engine.gradient_checkpointing (outside the benchmark's rules: "
                        "a separate row, to show what it buys)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch / OpenMP threads for both tools (default: torch's, one per core)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "preftune_vs_trl"))
    p.add_argument("--out", default=None, help="JSON results (default WORKDIR/results.json)")
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
    a = p.parse_args(argv)
    if a.worker:
        run_worker(a)
        return 0

    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    kinds = list(MODELS) if a.model == "both" else [a.model]
    precisions = ["fp32", "bf16"] if a.precision == "both" else [a.precision]
    if a.microbatch:
        for kind in kinds:
            for precision in precisions:
                r = microbatch_ab(kind, precision, a.microbatch)
                print(f"{kind} {precision}: one micro-batch, CPU s: TRL {r['trl']:.2f}, preftune {r['preftune']:.2f}, "
                      f"ratio {r['ratio']:.2f}x")
        return 0
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    settings = ["on", "off"] if a.trl_precompute == "both" else [a.trl_precompute]
    engine = dict(_setting(kv) for kv in a.preftune_engine)
    pairs = a.pairs or a.steps * BATCH * ACCUM
    rows = []
    for kind in kinds:
        model_dir = build_model_dir(kind, work / "models")
        data = build_pairs(work / f"pairs_{kind}_{pairs}.jsonl", pairs, MODELS[kind]["vocab_size"])
        tokens = pair_tokens(data, a.steps * BATCH * ACCUM)
        for precision in precisions:
            runs = {}
            for s in settings:
                runs[f"trl (precompute {s})"] = launch("trl", model_dir, data, precision, a.steps, work, precompute=s,
                                                   threads=a.threads)
                print(f"  {kind} {precision} trl precompute={s}: {runs[f'trl (precompute {s})']}", file=sys.stderr)
            for c in ["off", "on"] if a.preftune_compile == "both" else [a.preftune_compile]:
                name = "preftune (compile)" if c == "on" else "preftune"
                runs[name] = launch("preftune", model_dir, data, precision, a.steps, work,
                                    engine={**engine, "compile": c == "on"}, threads=a.threads)
                print(f"  {kind} {precision} {name}: {runs[name]}", file=sys.stderr)
            if a.preftune_checkpointing:
                name = "preftune (grad ckpt, off-rules)"
                runs[name] = launch("preftune", model_dir, data, precision, a.steps, work,
                                    engine={**engine, "gradient_checkpointing": True}, threads=a.threads)
                print(f"  {kind} {precision} {name}: {runs[name]}", file=sys.stderr)
            for name, r in runs.items():
                r.update(tool=name, model=kind, precision=precision, steps=a.steps, threads=a.threads,
                         samples_per_s=a.steps * BATCH * ACCUM / r["wall_s"], tokens_per_s=tokens / r["wall_s"])
            best = max((r for n, r in runs.items() if n.startswith("trl")), key=lambda r: r["samples_per_s"])
            for pt in (r for n, r in runs.items() if n.startswith("preftune")):
                pt["speedup_vs_best_trl"] = pt["samples_per_s"] / best["samples_per_s"]
                pt["cpu_ratio_vs_best_trl"] = best["cpu_s"] / pt["cpu_s"]
                pt["rss_ratio_vs_best_trl"] = pt["peak_rss_mb"] / best["peak_rss_mb"]
                pt["first_loss_diff"] = abs(pt["first_loss"] - best["first_loss"])
            rows.extend(runs.values())
    print(table(rows))
    out = Path(a.out) if a.out else work / "results.json"
    out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    print(f"\nresults: {out}")
    ok = all(abs(r["first_loss"] - math.log(2)) < 1e-3 for r in rows)
    print(f"first-step losses {'all' if ok else 'NOT all'} at ln 2 = {math.log(2):.4f} (policy == reference)")
    return 0


def _setting(kv: str) -> tuple[str, object]:
    key, _, value = kv.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def table(rows: list[dict]) -> str:
    head = ("| model | precision | tool | end-to-end s | setup+ref s | CPU s | samples/s | tokens/s | peak RSS MiB "
            "| first loss | speed vs best TRL (wall) | (CPU time) | RSS vs best TRL |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        ratio = f"{r['speedup_vs_best_trl']:.2f}x" if "speedup_vs_best_trl" in r else ""
        cpu = f"{r['cpu_ratio_vs_best_trl']:.2f}x" if "cpu_ratio_vs_best_trl" in r else ""
        rss = f"{r['rss_ratio_vs_best_trl']:.2f}x" if "rss_ratio_vs_best_trl" in r else ""
        lines.append(f"| {r['model']} | {r['precision']} | {r['tool']} | {r['wall_s']:.1f} | {r['setup_s']:.1f} | "
                     f"{r['cpu_s']:.0f} | {r['samples_per_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['first_loss']:.4f} | {ratio} | {cpu} | {rss} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
