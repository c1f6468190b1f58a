"""Sampling speed: preftune's generation engine vs plain Hugging Face ``model.generate``, side by side.

    python benchmarks/generation.py [--threads 2] [--prompts 4] [--n 4] [--new 64] [--repeats 2]
    python benchmarks/generation.py --models smol135m --threads 1 --breakdown   # prefill vs decoding step

Two randomly initialised Llamas built in memory: ``toy`` (the quickstart's model, ``preftune.toy.build_model``,
about 0.1M parameters, 50-token vocabulary) and ``smol135m`` (SmolLM2-135M's shape: 576 hidden, 30 layers,
9 heads, 3 KV heads, 1536 intermediate, 49152 vocabulary, tied embeddings), fp32. The same ``--prompts``
random prompts of 124-132 tokens (different lengths, so both sides left-pad) go to both sides in one batch:

    HF:      model.generate(ids, attention_mask, do_sample=True, num_return_sequences=n, max_new_tokens=new,
                            temperature=1, top_k=0, top_p=1, eos_token_id=None)
    preftune generation.generate(model, prompts, SamplingParams(new, temperature=1, n=n), seeds, batch_size=P*n)

Neither side stops early (no stop ids), so both generate exactly prompts x n x new tokens; tokens/s counts
those. HF repeats every prompt n times before its prefill; the engine prefills each prompt once and expands
the KV cache (and writes it in place instead of re-concatenating it every step), and also returns every
sampled token's log-prob. Each side is warmed up with a 2-token call, then the two alternate ``--repeats``
times (same process, same threads); the table shows the best run of each (the least disturbed by other jobs on
a shared machine) and the median in brackets, by wall time and by the process's CPU time (user + system, all
threads: on a shared machine the measure least disturbed by other jobs, as in ``vs_trl.py``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, tie_word_embeddings=True)


def build(kind: str):
    """(model, vocabulary size, pad id) of ``kind``, random weights from seed 0, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from preftune import toy

    if kind == "toy":
        tok = toy.build_tokenizer()
        model = toy.build_model(tok, seed=0).eval()
        model.config.max_position_embeddings = 2048  # RoPE has no length limit; this only silences HF's warning
        return model, len(tok), tok.pad_token_id
    torch.manual_seed(0)
    config = LlamaConfig(**SMOL, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval(), SMOL["vocab_size"], 0


def make_prompts(count: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(4, vocab, (124 + (8 * i) % 9,), generator=g).tolist() for i in range(count)]


def run_hf(model, prompts, pad_id: int, n: int, new: int) -> int:
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])  # (P, T) left-padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # (P, T)
    config = GenerationConfig(do_sample=True, num_return_sequences=n, max_new_tokens=new, temperature=1.0, top_k=0,
                              top_p=1.0, pad_token_id=pad_id, eos_token_id=None, use_cache=True)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)  # (P * n, T + new)
    return (out.shape[1] - width) * out.shape[0]


def run_engine(model, prompts, pad_id: int, n: int, new: int) -> int:
    from preftune.generation import SamplingParams, generate

    groups = generate(model, prompts, SamplingParams(new, temperature=1.0, n=n), list(range(len(prompts))),
                      pad_id=pad_id, batch_size=len(prompts) * n)
    return sum(len(c.ids) for g in groups for c in g)


def bench(kind: str, args) -> dict:
    model, vocab, pad_id = build(kind)
    prompts = make_prompts(args.prompts, vocab)
    sides = {"preftune": run_engine, "hf": run_hf}
    times: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    tokens = {}
    for fn in sides.values():  # warm-up (2 new tokens), untimed
        fn(model, prompts, pad_id, args.n, 2)
    for _ in range(args.repeats):
        for name, fn in sides.items():
            t0, c0 = time.perf_counter(), time.process_time()
            tokens[name] = fn(model, prompts, pad_id, args.n, args.new)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    assert tokens["preftune"] == tokens["hf"] == args.prompts * args.n * args.new, tokens
    tps = {k: tokens[k] / min(v) for k, v in times.items()}
    med = {k: tokens[k] / statistics.median(v) for k, v in times.items()}
    per_cpu = {k: tokens[k] / min(v) for k, v in cpu.items()}
    params = sum(p.numel() for p in model.parameters())
    return {"model": kind, "params": params, "tps": tps, "median": med, "per_cpu": per_cpu, "tokens": tokens["hf"]}


def breakdown(kind: str, args) -> None:
    """Prefill and per-step CPU seconds of each side, from two runs of 2 and 18 new tokens:
    step = (cpu(18) - cpu(2)) / 16, prefill = cpu(2) - 2 * step."""
    model, vocab, pad_id = build(kind)
    prompts = make_prompts(args.prompts, vocab)
    run_engine(model, prompts, pad_id, args.n, 2)  # warm-up
    for name, fn in (("preftune", run_engine), ("hf", run_hf)):
        cpu = {}
        for new in (2, 18):
            c0 = time.process_time()
            fn(model, prompts, pad_id, args.n, new)
            cpu[new] = time.process_time() - c0
        step = (cpu[18] - cpu[2]) / 16
        print(f"{kind} {name}: prefill {cpu[2] - 2 * step:.3f} CPU s, decoding step {step * 1e3:.1f} CPU ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="toy,smol135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--breakdown", action="store_true", help="print prefill and per-step CPU time instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.breakdown:
        for kind in args.models.split(","):
            breakdown(kind, args)
        return
    rows = [bench(kind, args) for kind in args.models.split(",")]
    print(f"\n{args.prompts} prompts (124-132 tokens) x n={args.n} samples x {args.new} new tokens, fp32, "
          f"{args.threads} threads, torch {torch.__version__}; best of {args.repeats} [median]\n")
    print("| model | parameters | preftune engine, tokens/s | HF generate, tokens/s | speed-up | "
          "preftune, tokens per CPU s | HF, tokens per CPU s | speed-up (CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, m, c = r["tps"], r["median"], r["per_cpu"]
        print(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {t['preftune']:.0f} [{m['preftune']:.0f}] | "
              f"{t['hf']:.0f} [{m['hf']:.0f}] | {t['preftune'] / t['hf']:.2f}x [{m['preftune'] / m['hf']:.2f}x] | "
              f"{c['preftune']:.0f} | {c['hf']:.0f} | {c['preftune'] / c['hf']:.2f}x |")


if __name__ == "__main__":
    main()
