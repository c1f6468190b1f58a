"""`preftune data validate | clean | convert | agreement`: argparse wiring for the data tools.

``register(subparsers)`` adds the ``data`` command to the top-level CLI's subparsers; every subcommand sets
``func(args) -> exit code``. Handlers raise ``PreftuneError`` for user errors (the top-level CLI prints it on one
line). ``python -m preftune.data.cli ...`` runs the same commands standalone (used by the benchmark).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from preftune.cli_args import fraction_or_zero, nonnegative_int, positive_int
from preftune.data.load import MAX_ROW_BYTES
from preftune.errors import PreftuneError

VALIDATE_EXIT = "exit 0 when the data is usable, 1 when it is not (or when --fail-on is met)"


def _add_read_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default="train", help="split to read from a hub id or saved DatasetDict")
    p.add_argument("--max-row-bytes", type=positive_int, default=MAX_ROW_BYTES,
                   help=f"JSONL/CSV lines longer than this are dropped unread as row_too_large "
                        f"(default {MAX_ROW_BYTES})")


def _write_report(path: Path, text: str, inputs: list) -> None:
    from preftune.data.outputs import refuse_overwrite

    refuse_overwrite(inputs, [path])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")


def _thresholds(args: argparse.Namespace):
    from preftune.data.validate import DEFAULT_THRESHOLDS

    th = DEFAULT_THRESHOLDS
    if getattr(args, "near_threshold", None) is not None:
        th = replace(th, near_identical=args.near_threshold)
    if getattr(args, "length_bias", None) is not None:
        th = replace(th, length_bias=args.length_bias)
    if getattr(args, "max_unusable", None) is not None:
        th = replace(th, max_unusable_fraction=args.max_unusable)
    return th


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``data`` with its four subcommands to ``subparsers``; returns the ``data`` parser."""
    data = subparsers.add_parser("data", help="check, clean, convert preference data; annotator agreement",
                                 description="Find problems in preference data before a GPU hour is spent.")
    sub = data.add_subparsers(dest="data_command", metavar="{validate,clean,convert,agreement}")
    sub.required = True

    v = sub.add_parser("validate", help="report structural and quality problems; " + VALIDATE_EXIT,
                       description="Read any format the trainer reads and report every problem with counts, "
                                   "percentages and example rows. " + VALIDATE_EXIT + ".")
    v.add_argument("path", help="training data: .jsonl/.json/.csv/.parquet, saved dataset dir, or hub id")
    v.add_argument("eval_path", nargs="?", help="evaluation data: prompts found in both are reported as leakage")
    v.add_argument("--tokenizer", help="HF tokenizer name or path: lengths in tokens (default: whitespace words)")
    v.add_argument("--max-length", type=positive_int, help="report rows whose prompt + response exceed this")
    v.add_argument("--report", type=Path, help="write the JSON report here (schema: docs/data.md)")
    v.add_argument("--html", type=Path, help="write a self-contained HTML report here")
    v.add_argument("--max-examples", type=nonnegative_int, default=5, help="example rows per finding (default 5)")
    v.add_argument("--near-threshold", type=fraction_or_zero, help="near-identical similarity ratio (default 0.9)")
    v.add_argument("--length-bias", type=fraction_or_zero, help="warn above this chosen-longer share (default 0.65)")
    v.add_argument("--max-unusable", type=fraction_or_zero,
                   help="largest share of unusable rows that still counts as usable data (default 0.1)")
    v.add_argument("--fail-on", choices=("unusable", "error", "warning"), default="unusable",
                   help="exit 1 when the data is unusable (default), or on any error / warning finding")
    _add_read_args(v)
    v.set_defaults(func=cmd_validate)

    c = sub.add_parser("clean", help="write kept rows and CLEAN.dropped.jsonl (kept + dropped = read)",
                       description="Drop rows with the named findings (rows the trainer cannot use are always "
                                   "dropped) and write every dropped row with its source line and reason.")
    c.add_argument("path")
    c.add_argument("--out", type=Path, required=True, help="kept rows (JSONL); dropped rows go to OUT.dropped.jsonl")
    c.add_argument("--drop", default="identical,duplicates,contradictions",
                   help="comma-separated findings to drop: identical, near_identical, swapped (= swapped_rating, "
                        "swapped_refusal, swapped_length), duplicates, contradictions, control_characters, "
                        "empty_prompt, truncation, leakage, all, none (default: identical,duplicates,contradictions)")
    c.add_argument("--min-margin", type=float, help="drop pairs whose chosen - rejected rating is below this")
    c.add_argument("--fix", help="repair instead of drop: swapped_rating (swap chosen/rejected), control_characters")
    c.add_argument("--eval", dest="eval_path", help="evaluation data, for --drop leakage")
    c.add_argument("--tokenizer", help="HF tokenizer for --max-length")
    c.add_argument("--max-length", type=positive_int, help="with --drop truncation")
    c.add_argument("--near-threshold", type=fraction_or_zero)
    _add_read_args(c)
    c.set_defaults(func=cmd_clean)

    from preftune.data.convert import FORMATS_IN, FORMATS_OUT, PAIRINGS, PROMPT_STYLES

    k = sub.add_parser("convert", help="convert between HH-RLHF, UltraFeedback, standard, conversational, KTO",
                       description="Convert preference data; rows that cannot be converted go to OUT.dropped.jsonl.")
    k.add_argument("path")
    k.add_argument("--to", required=True, choices=FORMATS_OUT)
    k.add_argument("--out", type=Path, required=True)
    k.add_argument("--from", dest="from_", choices=FORMATS_IN, help="input format (default: detected per row)")
    k.add_argument("--pairing", choices=PAIRINGS, default="best-vs-worst",
                   help="how rated completions (UltraFeedback) become pairs (default best-vs-worst)")
    k.add_argument("--min-margin", type=float, help="UltraFeedback: minimum rating margin of a pair")
    k.add_argument("--rating-key", help="UltraFeedback: rating field of a completion (default: overall_score, "
                                        "rating, score, fine-grained_score, first present)")
    k.add_argument("--seed", type=int, default=0, help="seed for best-vs-random")
    k.add_argument("--prompt-style", choices=PROMPT_STYLES, default="plain",
                   help="--to standard: plain text prompts (single-turn only) or HH transcripts")
    _add_read_args(k)
    k.set_defaults(func=cmd_convert)

    a = sub.add_parser("agreement", help="kappa, gold accuracy and drift, position bias; filter by agreement",
                       description="Multi-annotator pairwise labels, one row per item x annotator.")
    a.add_argument("path")
    a.add_argument("--min-agreement", type=fraction_or_zero, default=0.66,
                   help="keep items where at least this share of annotators agree with the majority (0.66)")
    a.add_argument("--windows", type=positive_int, default=4, help="time windows for gold-accuracy drift")
    a.add_argument("--first-label", default="a", type=str.lower, choices=("a", "b"),
                   help="label shown first when rows have no shown_first (default a)")
    a.add_argument("--out", type=Path, help="write kept items here (and dropped ones to OUT.dropped.jsonl)")
    a.add_argument("--report", type=Path, help="write the JSON report here")
    _add_read_args(a)
    a.set_defaults(func=cmd_agreement)
    return data


def cmd_validate(args: argparse.Namespace) -> int:
    from preftune.data.report_html import write_html
    from preftune.data.validate import validate

    inputs = [args.path, args.eval_path]
    if args.html:
        from preftune.data.outputs import refuse_overwrite

        refuse_overwrite(inputs, [args.html])
    report = validate(args.path, eval_source=args.eval_path, tokenizer=args.tokenizer, max_length=args.max_length,
                      max_examples=args.max_examples, split=args.split, thresholds=_thresholds(args),
                      max_row_bytes=args.max_row_bytes)
    print(report.summary())
    if args.report:
        _write_report(args.report, report.to_json(), inputs)
        print(f"JSON report: {args.report}")
    if args.html:
        print(f"HTML report: {write_html(report, args.html)}")
    failed = not report.usable
    if args.fail_on == "error":
        failed |= bool(report.errors)
    elif args.fail_on == "warning":
        failed |= bool(report.errors or report.warnings)
    return 1 if failed else 0


def cmd_clean(args: argparse.Namespace) -> int:
    from preftune.data.clean import clean

    res = clean(args.path, args.out, drop=args.drop, min_margin=args.min_margin, fix=args.fix,
                eval_source=args.eval_path, tokenizer=args.tokenizer, max_length=args.max_length,
                split=args.split, thresholds=_thresholds(args), max_row_bytes=args.max_row_bytes)
    print(res.summary())
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from preftune.data.convert import convert

    res = convert(args.path, args.out, to=args.to, from_=args.from_, pairing=args.pairing,
                  min_margin=args.min_margin, seed=args.seed, rating_key=args.rating_key,
                  prompt_style=args.prompt_style, split=args.split, max_row_bytes=args.max_row_bytes)
    print(res.summary())
    return 0


def cmd_agreement(args: argparse.Namespace) -> int:
    from preftune.data.agreement import analyze, read_annotations, write_filtered
    from preftune.data.outputs import dropped_path_for, json_text, refuse_overwrite

    outputs = [p for p in (args.out, args.out and dropped_path_for(args.out), args.report) if p]
    refuse_overwrite([args.path], outputs)
    anns, payload, bad = read_annotations(args.path, split=args.split, max_row_bytes=args.max_row_bytes)
    if not anns:
        raise PreftuneError(f"{args.path}: no annotation rows with item_id, annotator and choice"
                            + (f" ({len(bad)} unreadable, e.g. line {bad[0]['line']}: {bad[0]['reason']})"
                               if bad else ""))
    report = analyze(anns, min_agreement=args.min_agreement, windows=args.windows, first_label=args.first_label,
                     unreadable=bad)
    print(report.summary())
    if args.out:
        out, dropped, n = write_filtered(report, payload, args.out)
        print(f"kept {n} items -> {out}; dropped {report.items - n} -> {dropped}")
    if args.report:
        _write_report(args.report, json_text(report.to_dict(include_items=True), indent=2), [args.path])
        print(f"JSON report: {args.report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: ``python -m preftune.data.cli validate data.jsonl``."""
    parser = argparse.ArgumentParser(prog="preftune")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except PreftuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
