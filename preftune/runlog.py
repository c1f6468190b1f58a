"""A run's ``metrics.jsonl``: the one record every report, the monitor and ``eval`` read, and its writer.

A neutral room: the trainer writes through :class:`MetricWriter`; ``report``, ``monitor`` and the drivers read
through :func:`read_metrics`, so none of them imports the trainer. One JSON object per line::

    {"step": 10, "split": "train" | "eval" | ..., "<metric>": value, ...}

A kill can leave the last line half-written: readers skip that one line (it is redone on resume); a broken
line anywhere else is an error naming the file and line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from preftune.errors import PreftuneError

METRICS_FILE = "metrics.jsonl"


def _json_value(value):
    """Non-finite floats become null (standard JSON has no NaN / Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricWriter:
    """Appends one JSON object per record to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, append: bool = False):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / METRICS_FILE
        self.file = open(self.path, "a" if append else "w", encoding="utf-8")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, split: str, values: dict) -> None:
        record = {"step": step, "split": split, **{k: _json_value(v) for k, v in values.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{split}/{key}", value, step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of ``run_dir/metrics.jsonl`` ([] when there is none); a half-written last line is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):  # the line a kill leaves behind
                break
            raise PreftuneError(f"{path}:{number}: not a JSON record ({e.msg})") from None
    return records


def truncate_after(run_dir: Path, step: int) -> None:
    """Keep only the records up to ``step`` (a resumed run redoes the rest, so none is written twice)."""
    path = Path(run_dir) / METRICS_FILE
    if path.exists():
        kept = [r for r in read_metrics(run_dir) if r["step"] <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
