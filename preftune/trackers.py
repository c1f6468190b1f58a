"""Experiment trackers (``training.report_to``): accelerate's tracker classes, opened for one run directory.

    tensorboard  events under ``run_dir/tensorboard``; the config as hparams (a sub-run, as the HParams tab reads)
    wandb        a W&B run in project ``$WANDB_PROJECT`` (default ``preftune``), named after the run directory;
                 ``WANDB_MODE=offline`` writes it under ``$WANDB_DIR`` (default: the run directory) with no network
    mlflow       an MLflow run in experiment ``$MLFLOW_EXPERIMENT_NAME`` (default ``preftune``) at
                 ``$MLFLOW_TRACKING_URI`` (MLflow's default: ``sqlite:///mlflow.db`` in the working directory;
                 ``file:./mlruns`` needs ``MLFLOW_ALLOW_FILE_STORE=true`` from MLflow 3 on); nested under a run the
                 caller already has open
    comet_ml, aim, clearml, dvclive, swanlab, trackio: accelerate's defaults, configured by their own variables

Each receives the numbers of every ``metrics.jsonl`` record as ``split/key`` scalars at the record's step, and
the config once, as dotted hyperparameters. A tracker whose package is missing is an error before training
(:func:`check_trackers`), not a silent omission.

**Resume.** The tracker run ids are kept in ``run_dir/trackers.json``; a resumed run continues the same W&B and
MLflow runs and skips the steps they already received (up to the last step ``metrics.jsonl`` held before it was
cut back to the checkpoint: a resumed run reproduces those numbers), while TensorBoard is opened with
``purge_step`` so that its events from the checkpoint's next step on are replaced. Each step shows once.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

from preftune.errors import ConfigError, PreftuneError

TRACKERS_FILE = "trackers.json"
PROJECT = "preftune"
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
             "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


def check_trackers(names) -> None:
    """Raise :class:`PreftuneError` for a tracker accelerate does not know or whose package is not installed."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            near = difflib.get_close_matches(str(name), LOGGER_TYPE_TO_CLASS, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ConfigError(f"training.report_to: unknown tracker {name!r}; {hint}accelerate offers "
                                f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))} ([] for none)")
        if name not in available:
            extra = " (or pip install 'preftune[tracking]')" if name in ("wandb", "mlflow") else ""
            raise PreftuneError(f"training.report_to: {name} is not installed: pip install "
                                f"{_PACKAGES.get(name, name)}{extra}, or remove it from training.report_to")


class Trackers:
    """The open trackers of a run: ``[(name, accelerate tracker, steps already received or None)]``."""

    def __init__(self, opened: list):
        self.opened = opened

    def log(self, scalars: dict[str, float], step: int) -> None:
        for _, tracker, through in self.opened:
            if through is None or step > through:
                tracker.log(scalars, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        for name, tracker, _ in self.opened:
            if name == "tensorboard":
                tracker.log({tag: text}, step=step)

    def finish(self, failed: bool = False) -> None:
        for name, tracker, _ in self.opened:
            if failed and name == "mlflow":
                import mlflow

                mlflow.end_run(status="FAILED")
            elif failed and name == "wandb":
                tracker.run.finish(exit_code=1)
            else:
                tracker.finish()
        self.opened = []


def open_trackers(names: list[str], run_dir: Path, params: dict | None, resume_step: int | None,
                  logged_through: int | None) -> Trackers:
    """Start each tracker of ``names`` for ``run_dir`` and give it ``params`` (dotted hyperparameters).

    ``resume_step``: the checkpoint step of a resumed run (None for a fresh one); ``logged_through``: the last
    step the interrupted run logged, which trackers that continue their run skip up to.
    """
    if not names:
        return Trackers([])
    from accelerate import PartialState
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    PartialState()  # accelerate's trackers log through its state (the trainer's Accelerator has made it)
    check_trackers(names)
    ids_path = run_dir / TRACKERS_FILE
    ids = json.loads(ids_path.read_text()) if resume_step is not None and ids_path.exists() else {}
    opened = []
    for name in dict.fromkeys(names):
        continued = ids.get(name)
        if name == "tensorboard":
            kwargs = {} if resume_step is None else {"purge_step": resume_step + 1}
            tracker = LOGGER_TYPE_TO_CLASS[name]("tensorboard", str(run_dir), **kwargs)
        elif name == "wandb":
            kwargs = {"name": run_dir.name, **({"id": continued, "resume": "allow"} if continued else {})}
            if not os.environ.get("WANDB_DIR"):
                kwargs["dir"] = str(run_dir)
            tracker = LOGGER_TYPE_TO_CLASS[name](os.environ.get("WANDB_PROJECT", PROJECT), **kwargs)
        elif name == "mlflow":
            import mlflow

            tracker = LOGGER_TYPE_TO_CLASS[name](PROJECT, run_id=continued, run_name=run_dir.name,
                                                 nested_run=mlflow.active_run() is not None)
        else:
            cls = LOGGER_TYPE_TO_CLASS[name]
            tracker = cls(PROJECT, str(run_dir)) if cls.requires_logging_directory else cls(PROJECT)
        try:
            tracker.start()
        except Exception as e:
            Trackers(opened).finish(failed=True)
            raise PreftuneError(f"training.report_to: {name} could not start: {type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
        if params and not (name == "tensorboard" and resume_step is not None):  # hparams once per TB run
            tracker.store_init_configuration(params)
        ids[name] = _run_id(name, tracker) or ids.get(name)
        opened.append((name, tracker, logged_through if continued and name != "tensorboard" else None))
    ids = {k: v for k, v in ids.items() if v}
    if ids:
        ids_path.write_text(json.dumps(ids, indent=1))
    return Trackers(opened)


def _run_id(name: str, tracker) -> str | None:
    if name == "wandb":
        return tracker.run.id
    if name == "mlflow":
        return tracker.active_run.info.run_id
    return None
