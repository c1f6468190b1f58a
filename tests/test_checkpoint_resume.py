"""Checkpoints are complete or absent, and a run killed with SIGKILL resumes to the uninterrupted result."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from process_helpers import kill_at_checkpoint

import preftune
from preftune.errors import PreftuneError
from preftune.trainer import checkpoint as ckpt

FILES = {"trainable.pt", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"}
MAX_STEPS = 30  # 32 pairs / 4 per step = 8 steps per epoch: the run crosses three epoch boundaries

SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
import preftune
model_dir, data, out, resume = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
preftune.train({
    "model": model_dir, "data": {"train": data}, "loss": {"name": "dpo", "beta": 0.1},
    "training": {"output_dir": out, "learning_rate": 1e-3, "max_steps": MAX_STEPS, "save_every": 2,
                 "per_device_batch_size": 4, "max_length": 64, "progress_bar": False, "save_total_limit": 2,
                 "warmup_ratio": 0.1, "lr_scheduler": "cosine"},
}, resume=True if resume else None, log=lambda *a: print(*a, flush=True))
""".replace("MAX_STEPS", str(MAX_STEPS))


def start(python, script, model_dir, data, out, resume=False):
    return subprocess.Popen([python, str(script), str(model_dir), str(data), str(out), "1" if resume else "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "final" / "model.safetensors")


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["split"] == "train"]


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, python, saved_model_dir, pairs_jsonl):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    killed_dir, full_dir = tmp_path / "killed", tmp_path / "full"
    full = start(python, script, saved_model_dir, pairs_jsonl, full_dir)  # runs alongside the one we kill
    victim = start(python, script, saved_model_dir, pairs_jsonl, killed_dir)

    target = killed_dir / "checkpoints" / "step-00000004"
    kill_at_checkpoint(victim, target)
    assert victim.returncode == -signal.SIGKILL
    assert not (killed_dir / "final").exists(), "the run finished before it could be killed"

    # Whatever the kill interrupted, every directory that looks like a checkpoint is complete.
    complete = sorted((killed_dir / "checkpoints").glob("step-*"))
    assert complete and target.parent == complete[0].parent
    for d in complete:
        assert FILES <= {f.name for f in d.iterdir()}, d
    latest = ckpt.latest_checkpoint(killed_dir)
    assert latest == complete[-1]
    resumed_from = json.loads((latest / "trainer_state.json").read_text())["step"]
    assert 4 <= resumed_from < MAX_STEPS

    resumed = start(python, script, saved_model_dir, pairs_jsonl, killed_dir, resume=True)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"resumed from {latest} at step {resumed_from}" in out
    out, _ = full.communicate(timeout=300)
    assert full.returncode == 0, out

    a, b = final_weights(killed_dir), final_weights(full_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    losses = train_losses(killed_dir)
    assert [s for s, _ in losses] == list(range(1, MAX_STEPS + 1))  # records past the checkpoint were redone once
    assert losses == train_losses(full_dir)


# ---- checkpoint files, in process ---------------------------------------------------------------------------


@pytest.fixture
def small_run(dpo_config, make_model, train_pairs, tmp_path):
    model = make_model(seed=0)
    cfg = dpo_config(model, train_pairs[:24], training={"max_steps": 6, "save_every": 2, "save_total_limit": 2})
    preftune.train(cfg, log=lambda *_: None)
    return model, tmp_path / "run"


def test_checkpoints_are_complete_and_pruned(small_run):
    model, run_dir = small_run
    dirs = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert dirs == ["step-00000002", "step-00000004"]  # every 2 steps, not at the end, newest 2 kept
    for name in dirs:
        d = run_dir / "checkpoints" / name
        assert {f.name for f in d.iterdir()} == FILES
        state = json.loads((d / "trainer_state.json").read_text())
        assert state["step"] == int(name.split("-")[1])
    weights = torch.load(run_dir / "checkpoints" / "step-00000004" / "trainable.pt")
    assert set(weights) == {n for n, _ in model.named_parameters()}


def test_interrupted_write_leaves_no_checkpoint(tmp_path, make_model, monkeypatch):
    model = make_model(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt.save_checkpoint(tmp_path, 2, model, opt, sched, {}, keep=2)
    real_save = torch.save
    calls = []

    def dying_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:  # weights and optimizer written, then the "kill"
            raise KeyboardInterrupt
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 4, model, opt, sched, {}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000002"]  # no step-4 and no temp dir left
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000002"


def test_temp_dir_from_a_hard_kill_is_never_resumed(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-00000002").mkdir(parents=True)
    (root / "step-00000002" / "trainer_state.json").write_text('{"step": 2}')
    (root / ".step-00000004-abcd").mkdir()  # what SIGKILL during a write leaves behind
    (root / ".step-00000004-abcd" / "trainable.pt").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(tmp_path) == root / "step-00000002"
    assert ckpt.resolve_resume(True, tmp_path) == root / "step-00000002"
    assert ckpt.resolve_resume(None, tmp_path) is None
    assert ckpt.resolve_resume(True, tmp_path / "fresh") is None  # resume=True on a new run starts at 0
    with pytest.raises(PreftuneError, match="is not a checkpoint directory"):
        ckpt.resolve_resume(str(root / ".step-00000004-abcd"), tmp_path)


def test_in_process_resume_from_explicit_checkpoint(small_run, dpo_config, make_model, train_pairs, tmp_path):
    """Resuming from step 4 of the 6-step run reproduces its final weights bitwise."""
    finished, run_dir = small_run
    model = make_model(seed=0)
    cfg = dpo_config(model, train_pairs[:24], training={"max_steps": 6, "save_every": 2, "save_total_limit": 2,
                                                        "output_dir": str(tmp_path / "again")})
    lines: list[str] = []
    preftune.train(cfg, resume=str(run_dir / "checkpoints" / "step-00000004"), log=lines.append)
    assert any("at step 4" in line for line in lines)
    for (name, a), b in zip(finished.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name


def test_lora_resume_reproduces_adapter(dpo_config, make_model, train_pairs, tmp_path):
    """A LoRA checkpoint holds the adapter; resuming from it gives bitwise the same adapter as the full run."""
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    full, resumed = make_model(seed=1), make_model(seed=1)
    common = {"max_steps": 6, "save_every": 2, "learning_rate": 1e-2}
    preftune.train(dpo_config(full, train_pairs[:24], lora=lora, training=common), log=lambda *_: None)
    ckpt_dir = tmp_path / "run" / "checkpoints" / "step-00000004"
    saved = torch.load(ckpt_dir / "trainable.pt")
    assert saved and all("lora_" in name for name in saved)  # the adapter only, never the base weights
    preftune.train(dpo_config(resumed, train_pairs[:24], lora=lora,
                              training={**common, "output_dir": str(tmp_path / "again")}),
                   resume=str(ckpt_dir), log=lambda *_: None)
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
