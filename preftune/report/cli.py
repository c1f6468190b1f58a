"""`preftune report RUN_DIR`: write ``RUN_DIR/report.html`` (and the PNG plots) from the run's metrics.

``register(subparsers)`` adds the command to the top-level CLI. Training writes the same report at its end;
this command rebuilds it, e.g. while a run is still going or after editing nothing but wanting a fresh copy.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", help="write RUN_DIR/report.html: curves, KL, lengths, diversity, alarms, samples",
        description="Build a self-contained HTML report of a training run from its metrics.jsonl (and "
                    "samples.jsonl): plots over steps, the monitor's alarms and diagnoses on a timeline, and the "
                    "sample generations beside the reference's.",
    )  # fmt: skip
    p.add_argument("run_dir", type=Path, help="the run's training.output_dir")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from preftune.errors import PreftuneError
    from preftune.report.html import report_summary, write_report

    if not args.run_dir.is_dir():
        raise PreftuneError(f"run directory not found: {args.run_dir}")
    path = write_report(args.run_dir)
    info = report_summary(args.run_dir)
    alarms = ", ".join(sorted(set(info["alarms"]))) or "none"
    print(f"alarms: {alarms}; last health state: {info['health'] or '-'}")
    print(f"wrote {path}")
    return 0
