"""Two CPU processes under ``accelerate launch`` (gloo) follow the single-process trajectory.

The launch line is the README's CPU recipe, ``accelerate launch --multi_gpu --num_processes 2``: accelerate's
``--cpu --num_processes 2`` starts ONE process unless MPI is set up (its simple launcher only fans out through
mpirun), so it would test nothing. ``--multi_gpu`` uses torch's elastic launcher (no network needed) and the
trainer's ``Accelerator(cpu=True)`` forms the gloo group.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import preftune

SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
import preftune
model_dir, train, evals, out, batch = sys.argv[1:6]
preftune.train({
    "model": model_dir, "data": {"train": train, "eval": evals}, "loss": {"name": "dpo", "beta": 0.1},
    "training": {"output_dir": out, "learning_rate": 1e-3, "max_steps": 5, "per_device_batch_size": int(batch),
                 "max_length": 64, "progress_bar": False, "eval_every": 2, "save_every": 2},
}, log=lambda *a: print(*a, flush=True))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def records(run_dir: Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, saved_model_dir, pairs_jsonl, eval_pairs, write_jsonl):
    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.exists():
        launcher = shutil.which("accelerate")
    assert launcher, "the accelerate command is not installed next to the interpreter"
    evals = write_jsonl(tmp_path / "eval.jsonl", eval_pairs[:9])  # uneven shards: 5 rows on rank 0, 4 on rank 1
    script = tmp_path / "dist.py"
    script.write_text(SCRIPT)
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
         str(script), str(saved_model_dir), str(pairs_jsonl), str(evals), str(two), "2"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "5 steps of 4 (2 x 2 processes x 1 accumulation)" in proc.stdout
    assert proc.stdout.count("training:") == 1  # only the main process logs

    one = tmp_path / "one"
    preftune.train({
        "model": str(saved_model_dir), "data": {"train": str(pairs_jsonl), "eval": str(evals)},
        "loss": {"name": "dpo", "beta": 0.1},
        "training": {"output_dir": str(one), "learning_rate": 1e-3, "max_steps": 5, "per_device_batch_size": 4,
                     "max_length": 64, "progress_bar": False, "eval_every": 2, "save_every": 2},
    }, log=lambda *_: None)

    t2, t1 = records(two, "train"), records(one, "train")
    assert [r["step"] for r in t2] == [r["step"] for r in t1] == [1, 2, 3, 4, 5]
    for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
        assert [r[key] for r in t2] == pytest.approx([r[key] for r in t1], rel=1e-4, abs=1e-6), key
    # At step 1 the policy is the reference and every margin is fp32 rounding noise, so the sign (accuracy) is
    # compared from step 2 on, when margins are real.
    assert [r["rewards/accuracies"] for r in t2[1:]] == [r["rewards/accuracies"] for r in t1[1:]]
    e2, e1 = records(two, "eval"), records(one, "eval")
    assert [r["step"] for r in e2] == [r["step"] for r in e1] == [2, 4, 5]
    assert [r["loss"] for r in e2] == pytest.approx([r["loss"] for r in e1], rel=1e-4)
    assert (two / "final" / "model.safetensors").exists()
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    summary = json.loads((two / "train_summary.json").read_text())
    assert summary["eval_examples"] == 9 and summary["steps"] == 5
