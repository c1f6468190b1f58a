"""What a run records about itself besides its metrics, and the checks that must pass before it starts.

    preflight(cfg, callbacks)   before any model loads: trackers installed, push settings, callbacks have hooks
    data_record(run)            each split's source, examples used and fingerprints (into train_summary.json)
    end_of_run(run)             the model card in final/ (every run that saves its model), then the push
    closing_on_error(run)       a run that raises still closes its trackers (marked failed) and its snapshot

``config.yaml`` itself is written when the run log opens (:class:`preftune.runlog.MetricWriter`).
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

from preftune.configfile import describe
from preftune.data.load import is_local_path
from preftune.errors import ConfigError
from preftune.hub import push, write_model_card
from preftune.trackers import check_trackers
from preftune.trainer.callbacks import check_callbacks
from preftune.trainer.reference import examples_fingerprint


def preflight(cfg, callbacks=None) -> None:
    """Errors that would otherwise surface after model loading or at the end of training."""
    tc = cfg.training
    check_trackers(tc.report_to)
    if tc.push_to_hub and not tc.hub_model_id:
        raise ConfigError("training.push_to_hub needs training.hub_model_id (the repository, `user/name`)")
    if tc.push_to_hub and not tc.save_model:
        raise ConfigError("training.push_to_hub needs training.save_model: true (nothing else is uploaded)")
    check_callbacks(callbacks)


def _file_sha256(source) -> str | None:
    """sha256 of a local data file (None for directories, hub ids and in-memory rows)."""
    if not isinstance(source, (str, Path)) or not is_local_path(str(source)):
        return None
    path = Path(source).expanduser()
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_record(run) -> dict:
    """``{"train": {...}, "eval": {...}}``: source (path, hub id or a description), examples used, the blake2b
    fingerprint of the tokenized examples (what the model saw, under this tokenizer) and a local file's sha256."""
    out = {}
    for split, source, examples in (("train", run.cfg.data.train, run.source.data.examples),
                                    ("eval", run.cfg.data.eval, run.eval_set.examples)):
        if not examples:  # no held-out set (or, on-policy, the source evaluates its own prompts)
            continue
        if source is None:
            source = f"{run.cfg.data.eval_fraction:g} of train (data.eval_fraction)"
        record = {"source": str(source) if isinstance(source, (str, Path)) else describe(source),
                  "examples": len(examples), "fingerprint": examples_fingerprint(examples)}
        sha = _file_sha256(source)
        if sha:
            record["sha256"] = sha
        out[split] = record
    return out


def end_of_run(run) -> None:
    """Main process: the model card in ``final/``, then the upload when ``training.push_to_hub``."""
    tc = run.cfg.training
    if not run.main or not tc.save_model:
        return
    card = write_model_card(run.run_dir, tc.hub_model_id if tc.push_to_hub else None)
    run.say(f"model card: {card}")
    if tc.push_to_hub:
        run.say(f"pushed to {push(run.run_dir, tc.hub_model_id)}")


@contextlib.contextmanager
def closing_on_error(run):
    """On an exception: end the tracker runs as failed and remove the reference snapshot, then re-raise."""
    try:
        yield
    except BaseException:
        if run.writer is not None:
            run.writer.close(failed=True)
        run.monitor.close()
        raise
