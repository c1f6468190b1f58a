"""Resumable checkpoints, written atomically, pruned by the run that wrote them.

A checkpoint directory ``checkpoints/step-N`` holds the trainable weights (all of them, or the LoRA adapter),
optimizer, scheduler, every RNG state and ``trainer_state.json``: the loop's position plus what the run
directory records with it (run id, resolved config; see ``rundir.py``). It is written under a temporary name
(``.step-N.tmp-*``) and swapped into place, so a run killed mid-write leaves the previous checkpoint intact and
never a half-written one that looks complete. Weights that are not finite are never written.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from preftune.errors import PreftuneError
from preftune.fsio import publish_dir, temp_dir, write_error

STATE = "trainer_state.json"
FILES = ("trainable.pt", "optimizer.pt", "scheduler.pt", "rng.pt", STATE)


class CorruptCheckpoint(PreftuneError):
    """A checkpoint file cannot be read back (truncated, zip error, bad JSON, missing)."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    state: dict  # trainer_state.json


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def parameters_finite(params) -> bool:
    """Whether every element of ``params`` is finite; one reduction per tensor and one host sync.

    A per-tensor sum is NaN or ±inf when any element is (and far cheaper on CPU than an inf-norm: 0.04 s vs
    0.38 s over 135M fp32 weights). A sum of huge but finite weights can overflow on its own, so a failed sum is
    confirmed element-wise before the weights are called non-finite. Naive equivalent:
    ``all(p.isfinite().all() for p in params)``.
    """
    params = [p.detach() for p in params]
    if not params:
        return True
    if bool(torch.stack([p.sum().float() for p in params]).isfinite().all()):
        return True
    return all(bool(p.isfinite().all()) for p in params)


def step_of(path: Path) -> int | None:
    """N of a ``step-N`` directory name, else None."""
    prefix, _, digits = path.name.partition("-")
    return int(digits) if prefix == "step" and digits.isdigit() else None


def list_checkpoints(run_dir: Path) -> tuple[list[Checkpoint], list[Path]]:
    """(complete checkpoints by step, oldest first; ``step-N`` directories whose state cannot be read)."""
    root = Path(run_dir) / "checkpoints"
    done, broken = [], []
    for path in sorted(root.glob("step-*")) if root.is_dir() else []:
        if not path.is_dir() or step_of(path) is None:
            continue
        try:
            state = json.loads((path / STATE).read_text())
            done.append(Checkpoint(path, int(state["step"]), state))
        except (OSError, ValueError, KeyError, TypeError):
            broken.append(path)
    return sorted(done, key=lambda c: c.step), broken


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, state: dict, keep: int) -> Path:
    """Write ``run_dir/checkpoints/step-{step}`` atomically, then prune this run's (``state["run_id"]``) to the
    newest ``keep`` (0: keep all) and drop its checkpoints past ``step`` (a resumed run's abandoned future)."""
    root = run_dir / "checkpoints"
    final = root / f"step-{step:08d}"
    weights = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    if not parameters_finite(weights.values()):
        raise PreftuneError(f"refusing to write checkpoint {final}: the weights are not finite")
    tmp = temp_dir(root, final.name)
    try:
        torch.save(weights, tmp / "trainable.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=1))
        publish_dir(tmp, final)  # fsync, then rename: the bytes are durable before the name says "complete"
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        error = write_error(e, "checkpoint", final) if isinstance(e, Exception) else None
        if error is None:
            raise
        raise PreftuneError(f"{error}; the previous checkpoint is intact (free space, or lower "
                            "training.save_total_limit)") from None
    prune(run_dir, state.get("run_id"), step, keep)
    return final


def prune(run_dir: Path, run_id: str | None, step: int, keep: int) -> list[Path]:
    """Remove run ``run_id``'s checkpoints past ``step`` and all but its newest ``keep`` up to ``step``, in
    step order; other runs' checkpoints are never touched. Returns the removed directories."""
    mine = [c for c in list_checkpoints(run_dir)[0] if c.state.get("run_id") == run_id]
    upto = [c for c in mine if c.step <= step]
    doomed = [c for c in mine if c.step > step] + (upto[:-keep] if keep > 0 else [])
    for c in doomed:
        shutil.rmtree(c.path, ignore_errors=True)
    return [c.path for c in doomed]


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = list_checkpoints(run_dir)[0]
    return done[-1].path if done else None


def resolve_resume(resume: str | bool | None, run_dir: Path) -> Path | None:
    """``True``/``"latest"``: the newest checkpoint of this run (None if there is none yet); a path: that one.

    The run directory (``rundir.claim``) turns "none yet" into an error for ``--resume``.
    """
    if not resume:
        return None
    if resume is True or resume == "latest":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not (path / STATE).exists():
        raise PreftuneError(f"--resume: {path} is not a checkpoint directory (no {STATE})")
    return path


def read_state(path: Path) -> dict:
    """``trainer_state.json`` of the checkpoint at ``path``."""
    try:
        state = json.loads((path / STATE).read_text())
        int(state["step"])
        return state
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"checkpoint file {path / STATE} is unreadable ({_reason(e)})") from None


def _load(path: Path, name: str, **kwargs):
    try:
        return torch.load(path / name, map_location="cpu", **kwargs)
    except Exception as e:  # EOFError, zip errors, unpickling errors, a missing file: all mean "unreadable"
        raise CorruptCheckpoint(f"checkpoint file {path / name} is unreadable ({_reason(e)})") from None


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG; returns the saved loop state.

    Raises :class:`CorruptCheckpoint` naming the file that cannot be read. Every file is read before anything is
    restored, so a corrupt checkpoint leaves the model and optimizer as they were.
    """
    state = read_state(path)
    weights = _load(path, "trainable.pt")
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise PreftuneError(f"checkpoint {path} does not match the model (unknown parameters: {missing[:3]})")
    optimizer_state = _load(path, "optimizer.pt")
    scheduler_state = _load(path, "scheduler.pt")
    rng = _load(path, "rng.pt", weights_only=False)
    try:
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError) as e:
        raise PreftuneError(f"checkpoint {path}: the optimizer state does not fit this model ({_reason(e)})") from None
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
    scheduler.load_state_dict(scheduler_state)
    set_rng_state(rng)
    return state


def set_peak_learning_rate(optimizer, scheduler, lr: float) -> None:
    """Make a restored ``LambdaLR`` schedule peak at ``lr`` from here on (the saved state brings back the old
    peak: ``base_lrs`` and each group's ``initial_lr``); the current rate is ``lr`` x the schedule's factor."""
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    factors = [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
    for group, factor in zip(optimizer.param_groups, factors):
        group["initial_lr"] = lr
        group["lr"] = lr * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
