"""A killed online DPO run resumes to the weights of an uninterrupted one; two processes follow one. Both start
subprocesses (slow); the shared parts live in ``online_helpers.py``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from online_helpers import prompt_rows, train_records

import preftune
from preftune.runlog import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread", "no_plots")

RESUME_SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
import preftune
config, resume = json.loads(sys.argv[1]), sys.argv[2] == "1"
preftune.train(config, resume=True if resume else None, log=lambda *a: print(*a, flush=True))
"""
RESUME_STEPS = 16  # 12 prompts / 4 per step: the run crosses five epoch boundaries


def resume_config(model_dir, train, evals, rewards, out) -> dict:
    return {
        "model": str(model_dir), "data": {"train": str(train), "eval": str(evals)},
        "loss": {"name": "dpo", "beta": 0.1}, "rollout": {"num_generations": 4, "max_new_tokens": 8},
        "reward": {"functions": [f"{rewards}:overlap"]},
        "training": {"output_dir": str(out), "learning_rate": 1e-2, "max_steps": RESUME_STEPS, "save_every": 2,
                     "eval_every": 4, "per_device_batch_size": 4, "max_length": 64, "progress_bar": False,
                     "lr_scheduler": "cosine", "warmup_ratio": 0.1},
        "monitor": {"num_prompts": 2},
    }


def _comparable(run_dir: Path) -> list[dict]:
    """Train, eval and monitor records without the wall-clock ones."""
    return [{k: v for k, v in r.items() if not k.startswith("time/") and "per_second" not in k}
            for r in read_metrics(run_dir) if r["split"] in ("train", "eval", "monitor")]


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, python, saved_model_dir, online_rewards, write_jsonl):
    from safetensors.torch import load_file

    from preftune.trainer import checkpoint as ckpt

    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)
    rows = prompt_rows(16)
    train, evals = write_jsonl(tmp_path / "train.jsonl", rows[:12]), write_jsonl(tmp_path / "eval.jsonl", rows[12:])
    killed_dir, full_dir = tmp_path / "killed", tmp_path / "full"
    killed_cfg = json.dumps(resume_config(saved_model_dir, train, evals, online_rewards, killed_dir))

    def start(resume=False):
        return subprocess.Popen([python, str(script), killed_cfg, "1" if resume else "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    victim = start()
    # the uninterrupted run, in this process while the victim starts (the same config, another directory)
    preftune.train(resume_config(saved_model_dir, train, evals, online_rewards, full_dir), log=lambda *_: None)
    target = killed_dir / "checkpoints" / "step-00000004"
    deadline = time.monotonic() + 240
    while not target.exists():
        if victim.poll() is not None:
            pytest.fail(f"the run ended before its step-4 checkpoint:\n{victim.stdout.read()}")
        assert time.monotonic() < deadline, "no step-4 checkpoint within 240 s"
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    victim.stdout.close()
    assert not (killed_dir / "final").exists(), "the run finished before it could be killed"
    latest = ckpt.latest_checkpoint(killed_dir)
    resumed_from = json.loads((latest / "trainer_state.json").read_text())["step"]
    assert 4 <= resumed_from < RESUME_STEPS

    resumed = start(resume=True)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"resumed from {latest} at step {resumed_from}" in out

    a, b = load_file(killed_dir / "final" / "model.safetensors"), load_file(full_dir / "final" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    records = _comparable(killed_dir)
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, RESUME_STEPS + 1))
    assert any(r.get("rollout/pairs") for r in records)  # the rewards did split some prompts' samples
    assert records == _comparable(full_dir)  # same samples, rewards, pairs and losses at every step
    killed, full = ((d / "samples.jsonl").read_text().splitlines() for d in (killed_dir, full_dir))
    assert killed == full and any('"kind": "rollout"' in line for line in killed)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, python, saved_model_dir, online_rewards, write_jsonl):
    """2 processes x 2 prompts sample the prompts (and seeds) 1 process x 4 samples; each process trains on its
    own pairs, weighted so that the step's loss is still the mean over all of them (ties leave rank 1 with
    fewer pairs than rank 0 at some steps)."""
    import shutil
    import socket
    import sys

    launcher = Path(sys.executable).with_name("accelerate")
    launcher = launcher if launcher.exists() else shutil.which("accelerate")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    train = write_jsonl(tmp_path / "train.jsonl", prompt_rows(8, [1, 0, 2, 0, 1, 1, 0, 3]))
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)

    def config(out, micro):
        cfg = resume_config(saved_model_dir, train, train, online_rewards, out)
        cfg["reward"]["functions"] = [f"{online_rewards}:by_column"]
        cfg["data"].pop("eval")
        cfg["training"].update(max_steps=4, per_device_batch_size=micro, save_every=0, eval_every=0)
        return cfg

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                           str(script), json.dumps(config(tmp_path / "two", 2)), "0"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "4 steps of 4 (2 x 2 processes x 1 accumulation)" in proc.stdout
    preftune.train(config(tmp_path / "one", 4), log=lambda *_: None)
    two, one = train_records(tmp_path / "two"), train_records(tmp_path / "one")
    assert [r["rollout/pairs"] for r in two] == [r["rollout/pairs"] for r in one]  # counted over both processes
    for key in ("loss", "rewards/margins", "grad_norm"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-4, abs=1e-6), key
