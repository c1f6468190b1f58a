"""Resumable checkpoints, written atomically.

A checkpoint directory holds the trainable weights (all of them, or the LoRA adapter), optimizer, scheduler,
every RNG state and the loop's position. It is written under a temporary name and renamed into place, so a run
killed mid-write leaves the previous checkpoint intact and never a half-written one that looks complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from preftune.errors import PreftuneError

STATE = "trainer_state.json"


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


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, state: dict, keep: int) -> Path:
    """Write ``run_dir/checkpoints/step-{step}`` atomically and prune to the newest ``keep``."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:08d}-", dir=root))
    try:
        weights = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(weights, tmp / "trainable.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=1))
        for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = run_dir / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if (p / STATE).exists()) if root.exists() else []
    return done[-1] if done else None


def resolve_resume(resume: str | bool | None, run_dir: Path) -> Path | None:
    """``True``/``"latest"``: the newest checkpoint of this run (None if there is none yet); a path: that one."""
    if not resume:
        return None
    if resume is True or resume == "latest":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not (path / STATE).exists():
        raise PreftuneError(f"--resume: {path} is not a checkpoint directory (no {STATE})")
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG; returns the saved loop state."""
    weights = torch.load(path / "trainable.pt", map_location="cpu")
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise PreftuneError(f"checkpoint {path} does not match the model (unknown parameters: {missing[:3]})")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt"))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / STATE).read_text())
