"""The run directory: a used output_dir is refused without --resume / --overwrite, checkpoints are pruned by the
run that wrote them, one live run per directory (lock), interrupted writes cleaned up, final/ and best/ swapped
in atomically, directory modes from the umask."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest
import torch

import preftune
from preftune.errors import PreftuneError
from preftune.trainer import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")


def ckpt_names(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def train_steps(run_dir):
    return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"]


@pytest.fixture
def run_cfg(dpo_config, make_model, train_pairs):
    def make(**training):
        return dpo_config(make_model(seed=0), train_pairs[:24], training={"save_every": 2, **training})

    return make


def test_a_used_output_dir_is_refused_without_resume_or_overwrite(run_cfg, tmp_path):
    run_dir = tmp_path / "run"
    preftune.train(run_cfg(max_steps=6), log=lambda *_: None)
    before = {p.name: (p / "trainable.pt").read_bytes() for p in (run_dir / "checkpoints").iterdir()}
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(PreftuneError, match=r"holds a previous run .*--resume.*--overwrite"):
        preftune.train(run_cfg(max_steps=6), log=lambda *_: None)
    # nothing of the first run was touched
    assert {p.name: (p / "trainable.pt").read_bytes() for p in (run_dir / "checkpoints").iterdir()} == before
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics


def test_cli_names_both_flags_and_exits_2(tmp_path, saved_model_dir, pairs_jsonl, capsys):
    from preftune.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"model": str(saved_model_dir), "data": {"train": str(pairs_jsonl)}, "loss": {"beta": 0.1},
                               "training": {"output_dir": str(tmp_path / "out"), "learning_rate": 1e-3,
                                            "max_steps": 1, "per_device_batch_size": 4, "max_length": 64,
                                            "progress_bar": False, "save_model": False}}))
    assert main(["train", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0] and "--overwrite" in err[0], err
    assert main(["train", str(cfg), "--overwrite"]) == 0


def test_overwrite_replaces_the_previous_run_and_its_checkpoints(run_cfg, tmp_path):
    """Before: the old run's higher-numbered checkpoints stayed, and pruning by name deleted each new one."""
    run_dir = tmp_path / "run"
    preftune.train(run_cfg(max_steps=8), log=lambda *_: None)
    assert ckpt_names(run_dir) == ["step-00000004", "step-00000006"]
    first_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    (run_dir / "notes.txt").write_text("mine")  # not a run file: --overwrite leaves it alone
    lines = []
    preftune.train(run_cfg(max_steps=4), overwrite=True, log=lines.append)
    assert any("--overwrite: removed the previous run" in line for line in lines)
    assert ckpt_names(run_dir) == ["step-00000002"]
    assert train_steps(run_dir) == [1, 2, 3, 4]
    second_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert second_id != first_id
    assert ckpt.read_state(run_dir / "checkpoints" / "step-00000002")["run_id"] == second_id
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_overwrite_that_fails_to_start_loses_nothing(run_cfg, tmp_path):
    """--overwrite removes the previous run only once the new one is built: a missing data file restores it."""
    run_dir = tmp_path / "run"
    preftune.train(run_cfg(max_steps=4), log=lambda *_: None)
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.name != ".preftune.lock")
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    cfg = run_cfg(max_steps=4)
    cfg["data"]["train"] = str(tmp_path / "missing.jsonl")
    lines = []
    with pytest.raises(PreftuneError, match="data file not found"):
        preftune.train(cfg, overwrite=True, log=lines.append)
    assert any("the previous run in" in line and "is back in place" in line for line in lines), lines
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics


def test_pruning_removes_only_this_runs_checkpoints_by_step(tmp_path, make_model):
    model = make_model(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt.save_checkpoint(tmp_path, 99, model, opt, sched, {"run_id": "other"}, keep=2)
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path, step, model, opt, sched, {"run_id": "mine"}, keep=2)
    assert ckpt_names(tmp_path) == ["step-00000004", "step-00000006", "step-00000099"]
    # a resumed run that writes step 4 again supersedes its own later step 6
    ckpt.save_checkpoint(tmp_path, 4, model, opt, sched, {"run_id": "mine"}, keep=2)
    assert ckpt_names(tmp_path) == ["step-00000004", "step-00000099"]


def test_resume_keeps_the_run_id(run_cfg, tmp_path):
    run_dir = tmp_path / "run"
    preftune.train(run_cfg(max_steps=4), log=lambda *_: None)
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    preftune.train(run_cfg(max_steps=4), resume=str(run_dir / "checkpoints" / "step-00000002"), log=lambda *_: None)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["run_id"] == run_id and len(info["history"]) == 2
    assert info["history"][1]["resumed_from"].endswith("step-00000002")


LIVE = """
import sys, time
import preftune
from preftune import toy
tok = toy.build_tokenizer()
rows = toy.pair_rows(toy.split_items(0, 160, 64)[0], 0)[:24]
def slow(*args):
    print(*args, flush=True)
    time.sleep(0.05)
preftune.train({"model": toy.build_model(tok, seed=0, hidden=32, layers=2), "tokenizer": tok,
                "data": {"train": rows}, "loss": {"beta": 0.1},
                "training": {"output_dir": sys.argv[1], "learning_rate": 1e-3,
                "max_steps": 100000, "per_device_batch_size": 4, "max_length": 64, "progress_bar": False,
                "save_model": False, "save_every": 1}}, log=slow)
"""


def test_a_second_live_run_into_the_same_directory_is_refused(tmp_path, run_cfg, python):
    run_dir = tmp_path / "run"
    script = tmp_path / "live.py"
    script.write_text(LIVE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    live = subprocess.Popen([python, str(script), str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while ckpt.latest_checkpoint(run_dir) is None:
            assert live.poll() is None, live.stdout.read()
            assert time.monotonic() < deadline, "the live run wrote no checkpoint"
            time.sleep(0.05)
        with pytest.raises(PreftuneError, match=rf"in use by another run \(pid {live.pid} on host"):
            preftune.train(run_cfg(max_steps=2), resume=True, log=lambda *_: None)
    finally:
        live.kill()
        live.wait()
        live.stdout.close()
    # the live run is dead now: its lock is stale and the next run takes it over
    lines = []
    preftune.train(run_cfg(max_steps=2), overwrite=True, log=lines.append)
    assert any(f"took over the stale lock of pid {live.pid}" in line for line in lines), lines


def test_a_lock_file_of_a_dead_process_is_taken_over(tmp_path, run_cfg):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / ".preftune.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                        "run_id": "x"}))
    lines = []
    preftune.train(run_cfg(max_steps=2), log=lines.append)
    assert any(f"took over the stale lock of pid {dead.pid}" in line for line in lines), lines
    assert not (run_dir / ".preftune.lock").exists()  # released at the end


def test_leftovers_of_interrupted_writes_are_cleaned_at_start(run_cfg, tmp_path):
    run_dir = tmp_path / "run"
    preftune.train(run_cfg(max_steps=4, save_model=True), log=lambda *_: None)
    root = run_dir / "checkpoints"
    for orphan in (root / ".step-00000006-abcd", root / ".step-00000008.tmp-0123", run_dir / ".final.tmp-4567",
                   run_dir / ".best-89ab"):
        orphan.mkdir()
        (orphan / "trainable.pt").write_bytes(b"partial")
    # a replacement of final/ that died between its two renames: final/ is missing, the old one aside
    os.rename(run_dir / "final", run_dir / ".final.old-cdef")
    lines = []
    preftune.train(run_cfg(max_steps=4, save_model=True), resume=True, log=lines.append)
    assert ckpt_names(run_dir) == ["step-00000002"]
    left = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("."))
    assert left == [], left
    assert any("restored final/" in line for line in lines), lines
    assert (run_dir / "final" / "model.safetensors").exists()


def test_final_is_replaced_atomically(run_cfg, tmp_path, monkeypatch):
    """A save of final/ that fails half-way leaves the previous final/ whole (before: its files were mixed)."""
    run_dir = tmp_path / "run"
    preftune.train(run_cfg(max_steps=4, save_model=True), log=lambda *_: None)
    before = {p.name: p.read_bytes() for p in (run_dir / "final").iterdir()}
    from preftune.trainer import loop

    def dying_save(model, tokenizer, out):
        (out / "model.safetensors").write_bytes(b"half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loop, "save_pretrained", dying_save)
    with pytest.raises(PreftuneError, match=r"could not write the model \(final/\) to .*final: no space left"):
        preftune.train(run_cfg(max_steps=4, save_model=True), resume=str(run_dir / "checkpoints" / "step-00000002"),
                       log=lambda *_: None)
    assert {p.name: p.read_bytes() for p in (run_dir / "final").iterdir()} == before
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".final")]


def test_directories_get_the_umask_mode(dpo_config, make_model, train_pairs, eval_pairs, tmp_path):
    """Before: checkpoints/step-N and best/ were 0700 (tempfile.mkdtemp), unreadable to the group."""
    old = os.umask(0o022)
    try:
        cfg = dpo_config(make_model(seed=0), train_pairs[:24], eval=eval_pairs[:8],
                         training={"max_steps": 4, "save_every": 2, "eval_every": 2, "save_model": True},
                         monitor={"num_prompts": 0})
        preftune.train(cfg, log=lambda *_: None)
    finally:
        os.umask(old)
    run_dir = tmp_path / "run"
    for d in (run_dir / "checkpoints" / "step-00000002", run_dir / "best", run_dir / "final"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d


def test_quickstart_style_rerun_with_overwrite_keeps_other_files(run_cfg, tmp_path):
    """``overwrite`` removes only what a run writes: a sibling run's directory inside output_dir survives."""
    run_dir = tmp_path / "run"
    (run_dir / "sft" / "final").mkdir(parents=True)
    (run_dir / "sft" / "final" / "config.json").write_text("{}")
    preftune.train(run_cfg(max_steps=2), log=lambda *_: None)
    preftune.train(run_cfg(max_steps=2), overwrite=True, log=lambda *_: None)
    assert (run_dir / "sft" / "final" / "config.json").exists()
