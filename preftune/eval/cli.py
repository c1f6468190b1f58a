"""`preftune eval MODEL --data PAIRS [--reference REF] [--judge JUDGE] [--out EVAL.json]`.

``register(subparsers)`` adds the command to the top-level CLI. MODEL and REF are model directories or hub ids;
a LoRA adapter directory (``adapter_config.json``, as training saves with LoRA) is loaded on its base model
and merged. Heavy imports happen inside the handler so ``preftune --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from preftune.errors import PreftuneError


def register(subparsers: argparse._SubParsersAction) -> None:
    from preftune.cli_args import positive_int
    from preftune.judges.spec import JUDGE_HELP

    p = subparsers.add_parser(
        "eval", help="preference accuracy, KL, lengths, diversity and win rate of a model against a reference",
        description="Evaluate MODEL on held-out preference pairs: accuracy by implicit reward (with --reference) "
                    "and by log-prob comparison, the margin distribution, chosen perplexity; generations on the "
                    "pairs' prompts for KL, length and distinct-n; with --judge, the win rate of MODEL's greedy "
                    "responses against REF's (both orders, ties counted) and a length-controlled win rate.",
    )  # fmt: skip
    p.add_argument("model", help="model directory, LoRA adapter directory, or hub id")
    p.add_argument("--data", required=True, help="held-out preference pairs (JSONL/JSON/Parquet/CSV, a saved "
                                                 "dataset or a hub id)")
    p.add_argument("--reference", help="reference model (directory, adapter directory, or hub id)")
    p.add_argument("--judge", help=JUDGE_HELP)
    p.add_argument("--out", type=Path, help="write the full result as JSON here")
    p.add_argument("--tokenizer", help="tokenizer path or hub id (default: MODEL's)")
    p.add_argument("--beta", type=float, default=0.1, help="beta of the implicit reward margins (default 0.1)")
    p.add_argument("--num-prompts", type=positive_int, default=64, help="distinct prompts to generate for (64)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens per generation at most (64)")
    p.add_argument("--max-length", type=positive_int, default=512, help="prompt + response tokens at most (512)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="pairs per forward pass (8)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the KL generations (0)")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights (float32)")
    p.set_defaults(func=cmd_eval)


def load_model(name: str, dtype, device: str):
    """A causal LM from a directory or hub id; a LoRA adapter directory is loaded on its base and merged."""
    from preftune.models import load_causal_lm

    path = Path(name).expanduser()
    if (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        try:
            model = AutoPeftModelForCausalLM.from_pretrained(str(path), dtype=dtype).merge_and_unload()
        except (OSError, ValueError) as e:
            raise PreftuneError(f"could not load the LoRA adapter {name} on its base model: "
                                f"{str(e).splitlines()[0]}") from None
    else:
        model = load_causal_lm(name, dtype=dtype)
    return model.to(device).eval()


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from preftune.data.load import is_local_path
    from preftune.eval.evaluate import evaluate_model, format_table
    from preftune.judges.spec import make_judge
    from preftune.models import load_tokenizer

    if is_local_path(args.data) and not Path(args.data).expanduser().exists():
        raise PreftuneError(f"data file not found: {args.data}")
    judge = make_judge(args.judge) if args.judge else None  # a bad --judge fails before loading models
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    model = load_model(args.model, dtype, device)
    reference = load_model(args.reference, dtype, device) if args.reference else None
    meta = {"model": args.model, "reference": args.reference, "data": args.data}
    computed: dict = {}

    def before_judge(partial: dict) -> None:  # the judge may fail (endpoint, parsing): these are kept first
        computed.update(partial)
        if args.out:
            _write(args.out, {**meta, **partial, "judge": {"judge": judge.name, "error": "the judge did not finish"}})

    try:
        result = evaluate_model(model, tokenizer, args.data, reference=reference, judge=judge, beta=args.beta,
                                num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                                max_length=args.max_length, batch_size=args.batch_size, seed=args.seed,
                                before_judge=before_judge)
    except Exception as e:
        if not computed:
            raise
        print(format_table({**meta, **computed}))
        if args.out:
            _write(args.out, {**meta, **computed, "judge": {"judge": judge.name, "error": _first_line(e)}})
        kept = f"written to {args.out}" if args.out else "printed above"
        raise PreftuneError(f"the judge {judge.name} failed ({_first_line(e)}); every other metric was {kept}") from e
    result = {**meta, **result}
    print(format_table(result))
    if args.out:
        _write(args.out, result)
        print(f"wrote {args.out}")
    return 0


def _write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_clean(result), indent=2) + "\n", encoding="utf-8")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _clean(value):
    """NaN and infinities as null: strict JSON."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
