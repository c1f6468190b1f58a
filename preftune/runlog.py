"""A run's ``metrics.jsonl``: the one record every report, the monitor and ``eval`` read, and its writer.

A neutral room: the trainer writes through :class:`MetricWriter`; ``report``, ``monitor`` and the drivers read
through :func:`read_metrics`, so none of them imports the trainer. One JSON object per line::

    {"step": 10, "split": "train" | "eval" | ..., "<metric>": value, ...}

A kill can leave the last line half-written (no newline, not parseable): readers skip that one line (it is
redone on resume); a broken line anywhere else, or a line that is not an object with an integer ``step``, is an
error naming the file and line. ``samples.jsonl`` is read the same way (:func:`read_records`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from preftune.errors import PreftuneError
from preftune.fsio import write_text_atomic

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


def read_records(path: Path, what: str = "metrics record") -> list[dict]:
    """The JSON objects of a JSONL log, each with an integer ``step`` ([] when the file does not exist).

    A last line without its newline that does not parse is what a kill mid-write leaves: it is skipped (the
    step is redone on resume). Any other line that is not such an object is an error naming file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n"):  # the line a kill leaves behind
                break
            raise PreftuneError(f"{path}:{number}: not a JSON record ({e.msg})") from None
        if not isinstance(record, dict):
            raise PreftuneError(f"{path}:{number}: not a JSON record (a {type(record).__name__}, not an object)")
        if not isinstance(record.get("step"), int) or isinstance(record.get("step"), bool):
            raise PreftuneError(f"{path}:{number}: not a {what} (no integer \"step\")")
        records.append(record)
    return records


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of ``run_dir/metrics.jsonl`` ([] when there is none); a half-written last line is skipped."""
    return read_records(Path(run_dir) / METRICS_FILE)


def truncate_records(path: Path, step: int, what: str = "metrics record") -> None:
    """Keep only the records up to ``step`` (a resumed run redoes the rest, so none is written twice); the file
    is replaced through a rename, so a kill during it loses nothing."""
    path = Path(path)
    if path.exists():
        kept = [r for r in read_records(path, what) if r["step"] <= step]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def truncate_after(run_dir: Path, step: int) -> None:
    """:func:`truncate_records` of ``run_dir/metrics.jsonl``."""
    truncate_records(Path(run_dir) / METRICS_FILE, step)
