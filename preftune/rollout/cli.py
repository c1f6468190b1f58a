"""`preftune generate` and `preftune judge`: sampled responses, then judged preference pairs.

    preftune generate --model M --prompts P --n 4 --temperatures 0.3,0.7,1.0 --out GEN.jsonl
    preftune judge GEN.jsonl --judge CONFIG --pairs all|best-vs-worst [--min-margin X] --out PAIRS.jsonl

``register(subparsers)`` adds both commands to the top-level CLI. Handlers raise ``PreftuneError`` for user
errors; heavy imports (torch, transformers, openai) happen inside the handlers so ``preftune --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from preftune.cli_args import fraction, positive_int
from preftune.errors import PreftuneError
from preftune.judges.spec import JUDGE_HELP, make_judge


def _temperatures(text: str) -> list[float]:
    try:
        temps = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not temps or any(t < 0 for t in temps):
        raise argparse.ArgumentTypeError(f"expected one or more temperatures >= 0, got {text!r}")
    return temps


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``generate`` and ``judge`` to the top-level CLI's ``subparsers``."""
    g = subparsers.add_parser(
        "generate", help="sample n responses per prompt (HF generate, vLLM, or an OpenAI-compatible endpoint)",
        description="Sample responses for every prompt and append one JSONL row per prompt to --out. Re-running "
                    "the same command after a crash skips prompts already in --out. Response i of a prompt is "
                    "sampled at temperatures[i mod len(temperatures)] with its own recorded seed.",
    )  # fmt: skip
    g.add_argument("--model", required=True, help="local path or hub id (hf/vllm), or the served model name (openai)")
    g.add_argument("--prompts", required=True, type=Path,
                   help="JSONL with \"prompt\" (text or messages), or a text file with one prompt per line")
    g.add_argument("--out", required=True, type=Path, help="GEN.jsonl (appended to; resumable)")
    g.add_argument("--n", type=positive_int, default=4, help="responses per prompt (default 4)")
    g.add_argument("--temperatures", type=_temperatures, default=[1.0],
                   help="comma-separated; response i uses temperatures[i mod k]; 0 = greedy (default 1.0)")
    g.add_argument("--max-new-tokens", type=positive_int, default=256, help="tokens per response at most (256)")
    g.add_argument("--top-p", type=fraction, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    g.add_argument("--seed", type=int, default=0, help="base seed of the per-response seeds (default 0)")
    g.add_argument("--chat", action="store_true",
                   help="send text prompts through the chat template as a user message (stored as messages)")
    g.add_argument("--backend", choices=("auto", "hf", "vllm", "openai"), default="auto",
                   help="auto: openai with --base-url, else vllm when installed and a GPU is present, else hf")
    g.add_argument("--tokenizer", help="tokenizer path or hub id (hf/vllm; default: the model's)")
    g.add_argument("--batch-size", type=positive_int, default=16, help="hf: sequences decoded together (16)")
    g.add_argument("--device", help="hf: cuda, cpu, ... (default: cuda when available)")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="hf/vllm weights (auto: bfloat16 on a GPU that has it, else float32)")
    g.add_argument("--base-url", help="openai: endpoint root, e.g. http://localhost:8000/v1")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="openai: NAME of the environment variable holding the key; 'none' for keyless servers")
    g.add_argument("--max-concurrency", type=positive_int, default=8, help="openai: requests in flight (8)")
    g.set_defaults(func=cmd_generate)

    j = subparsers.add_parser(
        "judge", help="judge GEN.jsonl into preference pairs with lineage (ties dropped) + a length-bias check",
        description="Build preference pairs from generated responses. Kept pairs go to --out (standard "
                    "prompt/chosen/rejected rows with a lineage object), every dropped candidate with its "
                    "reason to OUT.dropped.jsonl.",
    )  # fmt: skip
    j.add_argument("gen", type=Path, help="GEN.jsonl written by preftune generate")
    j.add_argument("--judge", required=True, help=JUDGE_HELP)
    j.add_argument("--out", required=True, type=Path, help="PAIRS.jsonl")
    j.add_argument("--pairs", choices=("all", "best-vs-worst"), default="best-vs-worst",
                   help="all: every pair of distinct responses judged pairwise; best-vs-worst: one pair per "
                        "prompt (default)")
    j.add_argument("--min-margin", type=float,
                   help="drop pairs whose score difference is below this (scores, or wins with --scoring wins)")
    j.add_argument("--scoring", choices=("auto", "score", "wins"), default="auto",
                   help="best-vs-worst: judge.score, pairwise wins, or auto (score when the judge has one)")
    j.add_argument("--tokenizer", help="count lengths for the length-bias check in this tokenizer's tokens "
                                      "(default: whitespace words)")
    j.add_argument("--length-bias", type=fraction, default=0.65,
                   help="warn when chosen is longer in more than this share of pairs (0.65)")
    j.set_defaults(func=cmd_judge)


# ---- generate -----------------------------------------------------------------------------------------------


def _resolve_backend(args: argparse.Namespace) -> str:
    if args.backend != "auto":
        return args.backend
    if args.base_url:
        return "openai"
    try:
        import torch
        import vllm  # noqa: F401

        if torch.cuda.is_available():
            return "vllm"
    except ImportError:
        pass
    return "hf"


def _build_backend(args: argparse.Namespace, kind: str):
    from preftune.rollout.generate import HFBackend, OpenAIBackend, VLLMBackend

    if kind == "openai":
        key_env = None if str(args.api_key_env).lower() in ("none", "null", "") else args.api_key_env
        return OpenAIBackend(args.model, base_url=args.base_url, api_key_env=key_env,
                             max_new_tokens=args.max_new_tokens, top_p=args.top_p,
                             max_concurrency=args.max_concurrency)
    if args.base_url:
        raise PreftuneError(f"--base-url is for --backend openai, not {kind}")
    if kind == "vllm":
        dtype = "auto" if args.dtype == "auto" else args.dtype
        return VLLMBackend(args.model, tokenizer=args.tokenizer, max_new_tokens=args.max_new_tokens,
                           top_p=args.top_p, dtype=dtype)
    import torch

    from preftune.models import load_causal_lm, load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype == "auto":
        bf16 = device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16 else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    model = load_causal_lm(args.model, dtype=dtype).to(device)
    return HFBackend(model, tokenizer, max_new_tokens=args.max_new_tokens, top_p=args.top_p,
                     batch_size=args.batch_size, name=args.model)


def cmd_generate(args: argparse.Namespace) -> int:
    from preftune.rollout.generate import check_out, check_settings, run_generation, scan_existing

    if not args.prompts.exists():
        raise PreftuneError(f"prompts file not found: {args.prompts}")
    settings = {"max_new_tokens": args.max_new_tokens, "top_p": args.top_p}
    check_out(args.out, args.prompts)
    if args.out.exists():  # refuse a mismatched resume before spending minutes loading a model (read-only)
        check_settings(args.out, scan_existing(args.out).settings, {
            "n": args.n, "temperatures": args.temperatures, "seed": args.seed, "chat": args.chat, **settings})
    kind = _resolve_backend(args)
    backend = _build_backend(args, kind)
    print(f"generate: {backend.name}, n={args.n}, temperatures={args.temperatures}, seed={args.seed}", flush=True)
    res = run_generation(backend, args.prompts, args.out, n=args.n, temperatures=args.temperatures,
                         seed=args.seed, chat=args.chat, settings=settings)
    print(res.summary())
    print(f"wrote {args.out}")
    return 0


# ---- judge --------------------------------------------------------------------------------------------------


def cmd_judge(args: argparse.Namespace) -> int:
    from preftune.synth.pairs import dropped_path, judge_generations

    if not args.gen.exists():
        raise PreftuneError(f"generations file not found: {args.gen}")
    judge = make_judge(args.judge)
    tokenizer: Any = None
    if args.tokenizer:
        from preftune.models import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer, None)
    spec = args.judge if not args.judge.lstrip().startswith("{") else "<inline config>"
    result, bias = judge_generations(args.gen, judge, args.out, mode=args.pairs, min_margin=args.min_margin,
                                     scoring=args.scoring, judge_spec=spec, tokenizer=tokenizer,
                                     length_threshold=args.length_bias)
    print(f"judge: {judge.name} ({type(judge).__name__}), pairs={args.pairs}")
    print(result.summary())
    stats = judge.position_stats
    if not judge.order_invariant and stats.compared + stats.failed:
        print(f"position bias: verdict flipped with order in {stats.flipped} of {stats.compared} comparisons "
              f"({100 * stats.rate:.1f}%), {stats.failed} failed")
    print(bias.summary())
    print(f"wrote {args.out} ({len(result.pairs)} pairs) and {dropped_path(args.out)} ({len(result.dropped)})")
    if not result.pairs:
        print("warning: no pairs kept; check the judge, --min-margin, or generate more diverse responses")
    summary_path = args.out.with_name(args.out.stem + ".summary.json")
    summary = {"pairs": len(result.pairs), "dropped": len(result.dropped), "reasons": dict(result.reasons),
               "prompts": result.prompts, "responses_set_aside": dict(result.responses),
               "position_bias": stats.as_dict(), "length_bias": bias.to_dict()}
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0
