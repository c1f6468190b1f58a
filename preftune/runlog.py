"""A run's ``metrics.jsonl``: the one record every report, the monitor and ``eval`` read, and its writer.

A neutral room: the trainer writes through :class:`MetricWriter` (which also feeds the experiment trackers,
:mod:`preftune.trackers`); ``report``, ``monitor`` and the drivers read through :func:`read_metrics`, so none of
them imports the trainer. One JSON object per line::

    {"step": 10, "split": "train" | "eval" | ..., "<metric>": value, ...}

A kill can leave the last line half-written (no newline, not parseable): readers skip that one line (it is
redone on resume); a broken line anywhere else, or a line that is not an object with an integer ``step``, is an
error naming the file and line. ``samples.jsonl`` is read the same way (:func:`read_records`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from preftune.configfile import flat_params, write_config
from preftune.errors import PreftuneError
from preftune.fsio import write_text_atomic
from preftune.trackers import open_trackers

METRICS_FILE = "metrics.jsonl"


def _json_value(value):
    """Non-finite floats become null (standard JSON has no NaN / Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricWriter:
    """Appends one JSON object per record to ``metrics.jsonl`` and logs its numbers to the experiment trackers.

    Args:
        run_dir: the run directory (created if absent).
        report_to: tracker names (``training.report_to``): accelerate's trackers, e.g. ``["tensorboard",
            "wandb", "mlflow"]``; TensorBoard writes under ``run_dir/tensorboard``.
        config: the resolved config as plain data (:func:`preftune.configfile.config_tree`): written to
            ``run_dir/config.yaml`` and given to every tracker as hyperparameters (TensorBoard hparams, W&B
            config, MLflow params).
        resume_step: the checkpoint's step when resuming, else None. Records past it are removed from
            ``metrics.jsonl`` (they are redone); TensorBoard purges its events from that step on (``purge_step``),
            and W&B / MLflow continue the same tracker run (ids in ``trackers.json``) and skip steps they
            already received, so every tracker shows each step once.
    """

    def __init__(self, run_dir: Path, report_to=("tensorboard",), *, config: dict | None = None,
                 resume_step: int | None = None):
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / METRICS_FILE
        logged_through = None if resume_step is None else truncate_after(run_dir, resume_step)
        self.file = open(self.path, "a" if resume_step is not None else "w", encoding="utf-8")
        if config is not None:
            write_config(run_dir, config)
            config = flat_params(config)
        self.trackers = open_trackers(list(report_to), run_dir, config, resume_step, logged_through)

    def write(self, step: int, split: str, values: dict) -> None:
        record = {"step": step, "split": split, **{k: _json_value(v) for k, v in values.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {f"{split}/{k}": v for k, v in values.items()
                   if isinstance(v, (int, float)) and math.isfinite(v)}
        if scalars:
            self.trackers.log(scalars, step)

    def text(self, step: int, tag: str, text: str) -> None:
        """Markdown text (the samples table) for the trackers that show text (TensorBoard)."""
        self.trackers.text(tag, text, step)

    def close(self, failed: bool = False) -> None:
        """Close ``metrics.jsonl`` and end the tracker runs (marked failed when training raised)."""
        if not self.file.closed:
            self.file.close()
            self.trackers.finish(failed)


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


def truncate_records(path: Path, step: int, what: str = "metrics record") -> int:
    """Keep only the records up to ``step`` (a resumed run redoes the rest, so none is written twice); the file
    is replaced through a rename, so a kill during it loses nothing. Returns the highest step the file held
    before (``step`` when it held none past it)."""
    path = Path(path)
    if not path.exists():
        return step
    records = read_records(path, what)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records if r["step"] <= step))
    return max([step] + [r["step"] for r in records])


def truncate_after(run_dir: Path, step: int) -> int:
    """:func:`truncate_records` of ``run_dir/metrics.jsonl``."""
    return truncate_records(Path(run_dir) / METRICS_FILE, step)
