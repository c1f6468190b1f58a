"""The run directory: who owns it, what it holds, and when a run may continue in it.

    output_dir/
      run.json              run id, when and where it started, each resume, how it stopped
      .preftune.lock        held (flock) while a run is live: pid, host, run id (``runlock.py``)
      metrics.jsonl  tensorboard/  plots/  report.html  samples.jsonl  dropped.jsonl  train_summary.json
      checkpoints/step-N/   resumable; trainer_state.json records the run id and the resolved config
      final/  best/         the model, each replaced in one atomic step

A run never mixes with another run's files. :func:`claim` takes the lock (a second live run into the same
directory fails; a stale lock of a dead process is taken over), cleans what interrupted writes left behind,
and refuses a directory that holds a previous run unless told ``resume`` (continue it) or ``overwrite``
(replace it: that run's files are set aside at the claim and removed by :meth:`RunDir.commit` once the new run
is built, so a start that fails on a bad config or a missing model loses nothing; files preftune did not write
are left alone).

Resuming checks the config: keys that change the math (``runconfig.math_changes``) must equal the checkpoint's;
cadence, logging and monitor keys may change. After a non-finite stop the learning rate may change too
(:meth:`RunDir.nonfinite_stop` records the stop; the resumed run peaks at the new rate).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any

import torch

from preftune.errors import ConfigError, PreftuneError
from preftune.fsio import recover_dirs, temp_dir, write_dir_atomic, write_text_atomic
from preftune.trainer import checkpoint as ckpt
from preftune.trainer.runconfig import (
    AFTER_NONFINITE,
    config_record,
    math_changes,
    short_repr,
    with_file_digests,
)
from preftune.trainer.runlock import RunLock, now, release_lock

RUN_FILE = "run.json"
# Everything a run writes into output_dir (what --overwrite removes); other files there are not touched.
RUN_FILES = ("metrics.jsonl", "train_summary.json", "samples.jsonl", "dropped.jsonl", "report.html", RUN_FILE,
             "config.yaml", "trackers.json", ".reference-weights.pt")
RUN_DIRS = ("checkpoints", "final", "best", "tensorboard", "plots", "wandb")
# What makes a directory "used": the results of a run that got somewhere.
RESULTS = ("metrics.jsonl", "samples.jsonl", "train_summary.json", "final", "best")


_CLAIMED: dict[Path, RunDir] = {}  # the run directories this process has claimed, by resolved path


def release(output_dir) -> None:
    """Let go of ``output_dir`` (``train`` calls it when the run ends, however it ends): a previous run set aside
    by ``overwrite`` comes back if this one never started (:meth:`RunDir.commit`), and the lock is released."""
    rd = _CLAIMED.pop(Path(output_dir).resolve(), None)
    if rd is not None:
        rd.release()
    release_lock(output_dir)


# ---- claiming ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunDir:
    """A claimed run directory: this run's id, the checkpoint to continue from, the lock (main process)."""

    path: Path
    run_id: str
    record_of: Any  # () -> the config record (``runconfig.config_record``), computed once when first needed
    say: Any
    lock: RunLock | None = None
    candidates: list[Path] = dataclasses.field(default_factory=list)  # checkpoint to resume, then fallbacks
    latest: bool = False  # resuming "latest": a corrupt checkpoint falls back to the older one
    peak_lr: float | None = None  # a new peak learning rate, accepted after a non-finite stop
    aside: Path | None = None  # the previous run, moved here by overwrite until this one has started
    prior: str | None = None  # what the previous run had left (for messages)

    @functools.cached_property
    def record(self) -> dict:
        """This run's resolved config as checkpoints record it (hashing local data files: only when needed)."""
        return self.record_of()

    @property
    def resume_from(self) -> Path | None:
        return self.candidates[0] if self.candidates else None

    def checkpoint_fields(self) -> dict:
        """What every checkpoint of this run records beside the loop's position."""
        return {"run_id": self.run_id, "config": self.record}

    def commit(self) -> None:
        """The run is built and about to take its first step: a previous run set aside by ``overwrite`` goes."""
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None
            self.say(f"--overwrite: removed the previous run in {self.path} ({self.prior})")

    def release(self) -> None:
        """Put a set-aside previous run back (this run failed before its first step), then release the lock."""
        try:
            if self.aside is not None and self.aside.is_dir():
                remove_run(self.path)  # what the failed start wrote (run.json, dropped.jsonl, ...)
                for entry in self.aside.iterdir():
                    os.rename(entry, self.path / entry.name)
                self.aside.rmdir()
                self.say(f"--overwrite: this run stopped before its first step; the previous run in {self.path} "
                         "is back in place")
            self.aside = None
        finally:
            if self.lock is not None:
                self.lock.release()

    # -- resume

    def restore(self, model, optimizer, scheduler) -> dict:
        """Load the chosen checkpoint; resuming "latest", a corrupt one is skipped (with a warning) for the next
        older one. Returns its loop state."""
        while self.candidates:
            path = self.candidates[0]
            try:
                state = ckpt.load_checkpoint(path, model, optimizer, scheduler)
                break
            except ckpt.CorruptCheckpoint as e:
                if not self.latest:
                    raise PreftuneError(f"--resume: {e}; resume from another checkpoint of {path.parent}") from None
                self.candidates.pop(0)
                if not self.candidates:
                    raise PreftuneError(f"--resume: {e}, and no older checkpoint is left") from None
                self.say(f"warning: {e}; falling back to the older checkpoint {self.candidates[0]}")
                self.check_config(self.candidates[0])
        else:
            raise PreftuneError("--resume: no checkpoint to resume")
        if self.peak_lr is not None:
            ckpt.set_peak_learning_rate(optimizer, scheduler, self.peak_lr)
        return state

    def check_config(self, path: Path) -> None:
        """Refuse a checkpoint whose recorded config differs from this run's in a key that changes the math."""
        try:
            state = ckpt.read_state(path)
        except ckpt.CorruptCheckpoint:
            return  # restore() reports it (and falls back when resuming "latest")
        saved = state.get("config")
        if saved is None:
            self.say(f"warning: {path} records no config (written by an older preftune); it is not checked")
            return
        stop = _read_json(path.parent.parent / RUN_FILE).get("stop") or {}
        after_nonfinite = stop.get("reason") == "nonfinite" and state["step"] <= stop.get("step", -1)
        allowed = AFTER_NONFINITE if after_nonfinite else frozenset()
        changes = math_changes(saved, self.record, allowed)
        if changes:
            listed = "; ".join(f"{k}: {short_repr(a)} there, {short_repr(b)} now" for k, a, b in changes)
            hint = ("only training.learning_rate may change after a non-finite stop" if after_nonfinite else
                    "eval/save/logging cadence, progress bar and monitor settings may change")
            raise PreftuneError(f"--resume: {path} was written with another config, and these keys change the "
                                f"training math: {listed}. Set them back, or start a new run (--overwrite or another "
                                f"training.output_dir); {hint}")
        lr_then, lr_now = saved.get("training.learning_rate"), self.record["training.learning_rate"]
        if after_nonfinite and lr_then != lr_now:
            self.peak_lr = float(lr_now)
            self.say(f"resume: training.learning_rate {lr_then} -> {lr_now} (accepted after the non-finite stop "
                     f"at step {stop['step']})")

    # -- how the run ends

    def nonfinite_stop(self, step: int, main: bool, what: str) -> PreftuneError:
        """Record a stop on non-finite values at ``step`` (no checkpoint of these weights is written) and return
        the error that names the last good checkpoint and how to resume from it."""
        mine = [c for c in ckpt.list_checkpoints(self.path)[0] if c.state.get("run_id") == self.run_id]
        good = mine[-1].path if mine else None
        if main:
            self._update(stop={"reason": "nonfinite", "step": step, "last_good": str(good) if good else None,
                               "at": now()})
        if good is not None:
            where = (f"the last good checkpoint is {good}: resume from it with a lower learning rate, "
                     f"`preftune train CONFIG --resume {good} --set training.learning_rate=...` (a changed "
                     "learning rate is accepted after this stop)")
        else:
            where = ("no checkpoint was written before it (training.save_every); rerun with a lower "
                     "training.learning_rate and --overwrite")
        return PreftuneError(f"{what} at step {step}; stopped without saving these weights; {where}. Likely causes: "
                             "learning rate too high, beta too large or too small, or rows with extreme lengths "
                             "(see dropped.jsonl)")

    def publish_model(self, name: str, write) -> Path:
        """``write(tmp_dir)`` saves the model; it then replaces ``output_dir/name`` in one step."""
        return write_dir_atomic(self.path / name, write, f"the model ({name}/) to")

    def _update(self, **fields) -> None:
        info = _read_json(self.path / RUN_FILE)
        info.update(fields)
        write_text_atomic(self.path / RUN_FILE, json.dumps(info, indent=1))


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except OSError:
        return False


def claim(cfg, *, resume=None, overwrite: bool = False, processes: int = 1, main: bool = True, say=print) -> RunDir:
    """Take ``training.output_dir`` for this run (see the module docstring); ``resume``: True/"latest" or a
    checkpoint path, or ``"auto"`` (for drivers that rerun a trial: the newest checkpoint when there is one,
    else a fresh start that replaces what an earlier attempt left). On processes other than the main one nothing is written: they read what the main one chose
    (call it there after the main process's claim)."""
    path = Path(cfg.training.output_dir)
    if resume == "auto":  # drivers (sweep trials, iterate rounds): continue when possible, else start afresh
        resume, overwrite = (True, overwrite) if ckpt.list_checkpoints(path)[0] else (None, True)
    latest = resume is True or resume == "latest"
    explicit = Path(resume) if resume and not latest else None
    own = explicit is not None and _inside(explicit, path)  # a checkpoint of this directory's own run
    if overwrite and (latest or own):
        raise ConfigError("--resume and --overwrite contradict each other for a checkpoint of the same "
                          "output_dir: --resume continues the run there, --overwrite removes it")
    # the structure now (before LoRA changes a loaded model), the data files' hashes when first needed
    record = functools.partial(with_file_digests, config_record(cfg, processes, digest_files=False), cfg)
    if not main:
        rd = RunDir(path, _read_json(path / RUN_FILE).get("run_id", ""), record, say)
        return _choose(rd, latest, explicit) if resume else rd
    path.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:12]
    lock = RunLock.acquire(path, run_id, say)
    rd = None
    try:
        for line in _recover(path):
            say(f"run dir: {line}")
        prior = previous_run(path)
        aside = None
        if prior and overwrite:  # removed only once this run has started (commit): a failing start loses nothing
            aside = temp_dir(path, "overwritten")
            for name in RUN_FILES + RUN_DIRS:
                if (path / name).exists():
                    os.rename(path / name, aside / name)
        elif prior and not (latest or own):
            if explicit is not None:
                raise PreftuneError(f"training.output_dir {path} holds a previous run ({prior}); to start this run "
                                    f"there from {explicit}, add --overwrite (removes it), or choose another "
                                    "training.output_dir")
            raise PreftuneError(f"training.output_dir {path} holds a previous run ({prior}); pass --resume to "
                                "continue it or --overwrite to replace it (preftune.train(..., resume=True) / "
                                "overwrite=True), or choose another training.output_dir")
        elif not prior and (path / RUN_FILE).exists():
            remove_run(path)  # remnants of an attempt that stopped before logging anything
        info = _read_json(path / RUN_FILE) if resume else {}
        rd = RunDir(path, info.get("run_id") or run_id, record, say, lock, aside=aside, prior=prior)
        _CLAIMED[path.resolve()] = rd
        if resume:
            _choose(rd, latest, explicit, finished=(path / "final").exists(), prior=prior)
            lock.note(rd.run_id)
        history = info.get("history", []) + [{"started": now(), "host": socket.gethostname(), "pid": os.getpid(),
                                              "resumed_from": str(rd.resume_from) if rd.resume_from else None}]
        # a non-finite stop stays on record: resuming from before it may change the learning rate, also twice
        write_text_atomic(path / RUN_FILE, json.dumps({"run_id": rd.run_id, "created": info.get("created", now()),
                                                       "history": history, "stop": info.get("stop")}, indent=1))
        return rd
    except BaseException:
        if rd is not None:
            _CLAIMED.pop(path.resolve(), None)
            rd.release()  # puts a set-aside previous run back
        else:
            lock.release()
        raise


def _choose(rd: RunDir, latest: bool, explicit: Path | None, finished: bool = False, prior=None) -> RunDir:
    """Set the checkpoint to resume (and, resuming "latest", the older fallbacks), checking its config."""
    if explicit is not None:
        if not (explicit / ckpt.STATE).exists():
            raise PreftuneError(f"--resume: {explicit} is not a checkpoint directory (no {ckpt.STATE})")
        rd.candidates = [explicit]
        if _inside(explicit, rd.path):
            state = _read_json(explicit / ckpt.STATE)
            rd.run_id = state.get("run_id") or rd.run_id
    else:
        done, broken = ckpt.list_checkpoints(rd.path)
        mine = [c for c in done if c.state.get("run_id") == rd.run_id] or done
        rd.candidates, rd.latest = [c.path for c in reversed(mine)], True
        newest = mine[-1].step if mine else -1
        for path in broken:
            if (ckpt.step_of(path) or 0) > newest:
                rd.say(f"warning: {path / ckpt.STATE} is unreadable; that checkpoint is skipped")
        if not rd.candidates:
            why = ("the previous run finished: final/ holds its model" if finished else
                   "nothing has run there yet; drop --resume" if not prior else
                   "the previous run stopped before its first checkpoint (training.save_every); rerun it with "
                   "--overwrite")
            raise PreftuneError(f"--resume: no checkpoint in {rd.path / 'checkpoints'} ({why})")
        if mine and mine[-1].state.get("run_id"):
            rd.run_id = mine[-1].state["run_id"]
    rd.check_config(rd.candidates[0])
    return rd


def previous_run(path: Path) -> str | None:
    """What a previous run left in ``path`` (checkpoints, metrics, models), or None when nothing."""
    done, broken = ckpt.list_checkpoints(path)
    parts = [f"checkpoints up to step {done[-1].step}"] if done else []
    parts += [f"{len(broken)} unreadable checkpoint(s)"] if broken else []
    for name in RESULTS:
        p = path / name
        if p.is_dir() or (p.is_file() and p.stat().st_size > 0):
            parts.append(f"{name}/" if p.is_dir() else name)
    return ", ".join(parts) or None


def remove_run(path: Path) -> None:
    """Remove everything a run writes into ``path`` (:data:`RUN_FILES`, :data:`RUN_DIRS`); nothing else."""
    for name in RUN_DIRS:
        shutil.rmtree(path / name, ignore_errors=True)
    for name in RUN_FILES:
        (path / name).unlink(missing_ok=True)


def _recover(path: Path) -> list[str]:
    """Interrupted writes of a dead run: temporary checkpoint, final/ and best/ directories, swaps half done."""
    lines = recover_dirs(path, legacy=(".best-",))
    old_best = path / "best.old"  # the monitor's former swap name
    if old_best.is_dir():
        if not (path / "best").exists():
            os.rename(old_best, path / "best")
            lines.append("restored best/ from an interrupted replacement")
        else:
            shutil.rmtree(old_best, ignore_errors=True)
    lines += [f"checkpoints/: {line}" for line in recover_dirs(path / "checkpoints", legacy=(".step-",))]
    return lines


def claim_run(cfg, *, resume, overwrite: bool, accelerator, say) -> RunDir:
    """:func:`claim` on every process: the main one claims; if it fails, all fail; then the others follow."""
    main, world = accelerator.is_main_process, accelerator.num_processes
    error, rd = None, None
    if main:
        try:
            rd = claim(cfg, resume=resume, overwrite=overwrite, processes=world, main=True, say=say)
        except Exception as e:
            error = e
    if world > 1:
        failed = accelerator.reduce(torch.tensor([float(error is not None)], device=accelerator.device), "sum")
        if failed.item() > 0 and error is None:
            raise PreftuneError(f"the main process could not claim {cfg.training.output_dir}")
        if not main:
            rd = claim(cfg, resume=resume, overwrite=overwrite, processes=world, main=False, say=say)
    if error is not None:
        raise error
    return rd
