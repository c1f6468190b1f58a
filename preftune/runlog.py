"""A run's ``metrics.jsonl``: the one record every report, the monitor and ``eval`` read, and its writer.

A neutral room: the trainer writes through :class:`MetricWriter` (which also feeds the experiment trackers,
:mod:`preftune.trackers`); ``report``, ``monitor`` and the drivers read through :func:`read_metrics`, so none of
them imports the trainer. One JSON object per line::

    {"step": 10, "split": "train" | "eval" | ..., "<metric>": value, ...}

A kill can leave the last line half-written: readers skip that one line (it is redone on resume); a broken
line anywhere else is an error naming the file and line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from preftune.errors import PreftuneError
from preftune.runconfig import flat_params, write_config
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
        config: the resolved config as plain data (:func:`preftune.runconfig.config_record`): written to
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


def truncate_after(run_dir: Path, step: int) -> int:
    """Keep only the records up to ``step`` (a resumed run redoes the rest, so none is written twice); returns
    the highest step the file held before (``step`` when it held none past it)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return step
    records = read_metrics(run_dir)
    kept = [r for r in records if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    return max([step] + [r["step"] for r in records])
