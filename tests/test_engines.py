"""FSDP2 and DeepSpeed ZeRO through ``accelerate launch`` with the shipped configs, on 2 CPU processes (gloo):
the loss trajectory, gradient norms and evaluations of one process, the full model gathered into ``final/``,
sharded checkpoints that resume exactly, and the reference handled under each (precomputed, the LoRA
adapter-disabled policy through the engine, a frozen copy sharded like the policy).

accelerate itself never picks FSDP or DeepSpeed on a CPU-only machine (``trainer/parallel.py`` says why and
what preftune does about it); these runs are what shows that the same launch line works here. The DeepSpeed
runs need ``pip install deepspeed`` (not a dependency of preftune) and are skipped without it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import preftune

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "accelerate"

SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
import preftune
model_dir, train, evals, out, extra, resume = sys.argv[1:7]
cfg = {"model": model_dir, "data": {"train": train, "eval": evals}, "loss": {"name": "dpo", "beta": 0.1},
       "training": {"output_dir": out, "learning_rate": 1e-3, "max_steps": 5, "per_device_batch_size": 2,
                    "max_length": 64, "progress_bar": False, "eval_every": 2, "save_every": 2}}
for key, value in json.loads(extra).items():  # sections are merged into the ones above
    cfg[key] = {**cfg.get(key, {}), **value}
preftune.train(cfg, resume=resume or None, log=lambda *a: print(*a, flush=True))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def records(run_dir: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def launch(tmp_path, config: str, model_dir, train, evals, out: Path, extra: dict, resume: str = "") -> str:
    launcher = Path(sys.executable).with_name("accelerate")
    launcher = str(launcher) if launcher.exists() else shutil.which("accelerate")
    script = tmp_path / "engine_run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [launcher, "launch", "--config_file", str(CONFIGS / config), "--num_processes", "2", "--mixed_precision",
         "no", "--main_process_port", str(_free_port()), str(script), str(model_dir), str(train), str(evals),
         str(out), json.dumps(extra), resume],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def one_process(model_dir, train, evals, out: Path, extra: dict) -> None:
    """The same run in this process, with the same global batch: twice the per-device batch of 2 processes."""
    cfg = {"model": str(model_dir), "data": {"train": str(train), "eval": str(evals)},
           "loss": {"name": "dpo", "beta": 0.1},
           "training": {"output_dir": str(out), "learning_rate": 1e-3, "max_steps": 5, "per_device_batch_size": 2,
                        "max_length": 64, "progress_bar": False, "eval_every": 2, "save_every": 2}}
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    cfg["training"]["per_device_batch_size"] *= 2
    preftune.train(cfg, log=lambda *_: None)


def same_run(two: Path, one: Path) -> None:
    t2, t1 = records(two, "train"), records(one, "train")
    assert [r["step"] for r in t2] == [r["step"] for r in t1] == [1, 2, 3, 4, 5]
    for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
        assert [r[key] for r in t2] == pytest.approx([r[key] for r in t1], rel=1e-4, abs=1e-6), key
    e2, e1 = records(two, "eval"), records(one, "eval")
    assert [r["step"] for r in e2] == [2, 4, 5]
    assert [r["loss"] for r in e2] == pytest.approx([r["loss"] for r in e1], rel=1e-4)


def same_weights(a: Path, b: Path, loader) -> None:
    ma, mb = loader(a), loader(b)
    for (name, p), (_, q) in zip(ma.named_parameters(), mb.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=name)


def causal_lm(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path))


@pytest.fixture
def evals(tmp_path, eval_pairs, write_jsonl):
    return write_jsonl(tmp_path / "eval.jsonl", eval_pairs[:9])  # uneven shards: 5 rows on rank 0, 4 on rank 1


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_matches_one_and_resumes(tmp_path, saved_model_dir, pairs_jsonl, evals):
    """Full fine-tuning, reference precomputed: same trajectory, a full model in final/ (tied weights once),
    sharded checkpoints (engine/ beside the schedule and position) that resume to the same weights."""
    two, one = tmp_path / "two", tmp_path / "one"
    out = launch(tmp_path, "fsdp2.yaml", saved_model_dir, pairs_jsonl, evals, two, {})
    assert "under FSDP2" in out and "5 steps of 4 (2 x 2 processes x 1 accumulation)" in out
    one_process(saved_model_dir, pairs_jsonl, evals, one, {})
    same_run(two, one)
    same_weights(two / "final", one / "final", causal_lm)
    ckpt = two / "checkpoints" / "step-00000002"
    assert (ckpt / "engine").is_dir() and not (ckpt / "trainable.pt").exists()
    assert json.loads((ckpt / "trainer_state.json").read_text())["engine"] == "FSDP2"

    resumed = tmp_path / "resumed"  # the checkpoint of step 2 and the records up to it, in a fresh directory
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, resumed / "checkpoints" / ckpt.name)
    shutil.copy(two / "metrics.jsonl", resumed / "metrics.jsonl")
    out = launch(tmp_path, "fsdp2.yaml", saved_model_dir, pairs_jsonl, evals, resumed, {},
                 resume=str(resumed / "checkpoints" / ckpt.name))
    assert "resumed from" in out
    same_run(resumed, one)
    same_weights(resumed / "final", one / "final", causal_lm)


@pytest.mark.slow
def test_fsdp2_lora_reference_is_the_adapter_disabled_engine(tmp_path, saved_model_dir, pairs_jsonl, evals):
    """LoRA with the reference scored live: the adapter-disabled policy runs through the sharded engine."""
    extra = {"lora": {"r": 4, "alpha": 8}, "reference": {"precompute": False}}
    two, one = tmp_path / "two", tmp_path / "one"
    launch(tmp_path, "fsdp2.yaml", saved_model_dir, pairs_jsonl, evals, two, extra)
    one_process(saved_model_dir, pairs_jsonl, evals, one, extra)
    same_run(two, one)
    from peft import PeftModel

    def adapter(path):
        return PeftModel.from_pretrained(causal_lm(saved_model_dir), str(path))

    same_weights(two / "final", one / "final", adapter)


@pytest.mark.slow
@pytest.mark.parametrize("stage, extra", [
    (2, {"training": {"gradient_accumulation_steps": 2, "per_device_batch_size": 1}}),  # DeepSpeed's window
    (3, {"reference": {"precompute": False}}),  # a frozen copy, partitioned by DeepSpeed like the policy
    (3, {"lora": {"r": 4, "alpha": 8}}),  # precomputed through the engine (the weights load partitioned)
], ids=["zero2", "zero3-frozen-copy", "zero3-lora"])
def test_deepspeed_on_two_cpu_processes_matches_one(tmp_path, saved_model_dir, pairs_jsonl, evals, stage, extra):
    pytest.importorskip("deepspeed")
    two, one = tmp_path / "two", tmp_path / "one"
    out = launch(tmp_path, f"deepspeed_zero{stage}.yaml", saved_model_dir, pairs_jsonl, evals, two, extra)
    assert "5 steps of 4 (" in out and (f"under DeepSpeed ZeRO-{stage}" in out or stage == 2)
    one_process(saved_model_dir, pairs_jsonl, evals, one, extra)
    same_run(two, one)
    assert (two / "checkpoints" / "step-00000004" / "engine").is_dir()
    if "lora" not in extra:
        same_weights(two / "final", one / "final", causal_lm)
