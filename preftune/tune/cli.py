"""`preftune iterate`, `preftune sweep` and `preftune review export|import`.

    preftune iterate CONFIG [--set k=v] [--out DIR] [--rounds R]
    preftune sweep CONFIG [--set k=v] [--out DIR] [--trials N] [--sampler tpe|random|grid] [--storage URL] [--study NAME]
    preftune review export RUN --prompts P --out SHEET [--against RUN2] [--n N] [--seed S] [--key KEY]
    preftune review import SHEET... --key KEY [--judge J] [--out REPORT.json]

``register(subparsers)`` adds them to the top-level CLI; heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    from preftune.rollout.cli import JUDGE_HELP

    p = subparsers.add_parser(
        "iterate", help="iterative DPO: rounds of sample -> judge -> pairs -> validate -> train -> evaluate",
        description="Run the rounds of CONFIG's iterate: section (docs/tune.md). Each round's directory holds its "
                    "prompts, generations, verdicts, pairs, model, metrics and lineage.json; running the same "
                    "command again after a kill resumes at the step where it stopped.")  # fmt: skip
    p.add_argument("config", help="YAML config: a training config plus an iterate: section")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--out", help="the iterate directory (default: training.output_dir)")
    p.add_argument("--rounds", type=_positive_int, help="override iterate.rounds (raise it to continue a run)")
    p.set_defaults(func=cmd_iterate)

    p = subparsers.add_parser(
        "sweep", help="hyperparameter sweep (Optuna): trials scored by win rate, KL and coherence",
        description="Search CONFIG's sweep: space, one normal training run per trial, each scored against the "
                    "reference on held-out prompts. The study is stored in SQLite in the sweep directory (or "
                    "--storage), so running the command again resumes it; several machines share one study "
                    "through one --storage URL such as postgresql://user:pass@host/db.")  # fmt: skip
    p.add_argument("config", help="YAML config: a training config plus a sweep: section")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--out", help="the sweep directory (default: training.output_dir)")
    p.add_argument("--trials", type=_positive_int, help="trials in the study (finished ones count)")
    p.add_argument("--sampler", choices=("tpe", "random", "grid"), help="override sweep.sampler")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///<sweep dir>/sweep.db)")
    p.add_argument("--study", help="study name (default: sweep.study_name)")
    p.set_defaults(func=cmd_sweep)

    r = subparsers.add_parser("review", help="blind A/B sheets for human raters, and their answers as numbers")
    rs = r.add_subparsers(dest="review_command", metavar="SUBCOMMAND", required=True)
    e = rs.add_parser(
        "export", help="write a blind A/B sheet (CSV + HTML form) and its key",
        description="Greedy responses of RUN and of the reference (or --against) to the prompts, shown as A and B "
                    "in an order shuffled per item; the model names are only in the key file, which raters must "
                    "not see.")  # fmt: skip
    e.add_argument("run", help="a run directory (its final/ model), an iterate round or sweep trial, or a model")
    e.add_argument("--prompts", required=True, type=Path, help="JSONL with \"prompt\", or one prompt per line")
    e.add_argument("--out", required=True, type=Path, help="SHEET: writes SHEET.csv and SHEET.html")
    e.add_argument("--against", help="the other side: a run or model (default: the reference the run recorded)")
    e.add_argument("--key", type=Path, help="where the key goes (default: SHEET.key.json); keep it from raters")
    e.add_argument("--n", type=_positive_int, help="use the first N prompts")
    e.add_argument("--seed", type=int, default=0, help="seed of the A/B order (0)")
    e.add_argument("--max-new-tokens", type=_positive_int, default=256, help="tokens per response at most (256)")
    e.set_defaults(func=cmd_review_export)
    i = rs.add_parser(
        "import", help="raters' answers -> win rate with a confidence interval, kappa, agreement with a judge",
        description="Read answer sheets (CSV exported by the HTML form, or the CSV sheet filled in: columns "
                    "item_id, rater, choice with a / b / tie) and the key.")  # fmt: skip
    i.add_argument("sheets", nargs="+", type=Path, help="answer CSV files, one or more raters each")
    i.add_argument("--key", required=True, type=Path, help="the key written by review export")
    i.add_argument("--judge", help="also judge the same items and report agreement: " + JUDGE_HELP)
    i.add_argument("--out", type=Path, help="write the full result as JSON here")
    i.set_defaults(func=cmd_review_import)


def _quiet() -> None:
    from preftune.tune.adapter import quiet_progress_bars

    quiet_progress_bars()


def cmd_iterate(args: argparse.Namespace) -> int:
    from preftune.tune.iterate import run_iterate

    _quiet()
    run_iterate(args.config, overrides=args.set or [], out=args.out, rounds=args.rounds)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from preftune.tune.sweep import run_sweep

    _quiet()
    run_sweep(args.config, overrides=args.set or [], out=args.out, trials=args.trials, sampler=args.sampler,
              storage=args.storage, study_name=args.study)
    return 0


def cmd_review_export(args: argparse.Namespace) -> int:
    from preftune.tune.review import export_sheet

    _quiet()
    paths = export_sheet(args.run, args.prompts, args.out, against=args.against, key=args.key, n=args.n,
                         seed=args.seed, max_new_tokens=args.max_new_tokens)
    print(f"wrote {paths['csv']} and {paths['html']} ({paths['items']} items); the key, for import only: "
          f"{paths['key']}")
    return 0


def cmd_review_import(args: argparse.Namespace) -> int:
    from preftune.tune.review import format_result, import_answers

    _quiet()
    result = import_answers(args.sheets, args.key, judge=args.judge)
    print(format_result(result))
    if args.out:
        from preftune.tune.files import write_json

        write_json(args.out, result)
        print(f"wrote {args.out}")
    else:
        print(json.dumps({"win_rate": result["win_rate"], "ci": result["ci"]}))
    return 0
