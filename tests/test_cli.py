"""The `preftune` command line, run as a user would: one readable error line, tracebacks only with --debug."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

# The cases share one fixture that starts a dozen interpreters (each imports torch): ~40 s on 2 cores.
SLOW = pytest.mark.slow


def cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "preftune.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=300)


def config(model, train, out="out", **training) -> dict:
    return {
        "model": str(model), "data": {"train": str(train)}, "loss": {"name": "dpo", "beta": 0.1},
        "training": {"output_dir": str(out), "learning_rate": 1e-3, "max_steps": 2, "per_device_batch_size": 4,
                     "max_length": 64, "progress_bar": False, **training},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, saved_model_dir, pairs_jsonl):
    """Every CLI case, run in parallel once (each is a fresh interpreter importing torch)."""
    root = tmp_path_factory.mktemp("cli")
    cache = str(root / "cache")  # module fixtures run before the per-test PREFTUNE_CACHE fixture

    def write(name, tree_or_text):
        text = tree_or_text if isinstance(tree_or_text, str) else yaml.safe_dump(tree_or_text)
        (root / name).write_text(text)
        return name

    good = config(saved_model_dir, pairs_jsonl)
    unknown = config(saved_model_dir, pairs_jsonl)
    unknown["training"]["learning_rat"] = unknown["training"].pop("learning_rate")
    cases = {
        "missing_config": ["train", "nope.yaml"],
        # each failing run has its own output_dir: two runs at once into one directory are refused (its lock)
        "missing_data": ["train", write("missing_data.yaml", config(saved_model_dir, root / "absent.jsonl",
                                                                    out="out-missing-data"))],
        "bad_yaml": ["train", write("bad.yaml", "model: m\ntraining:\n  output_dir: out: x\n  learning_rate: 1\n")],
        "unknown_key": ["train", write("unknown.yaml", unknown)],
        "unknown_key_debug": ["--debug", "train", "unknown.yaml"],
        "unknown_key_debug_last": ["train", "unknown.yaml", "--debug"],
        "no_model_path": ["train", write("nomodel.yaml", config(root / "no" / "such" / "model", pairs_jsonl,
                                                                out="out-no-model"))],
        "hub_offline": ["train", write("hub.yaml", config("nonexistent-org-xyz/nonexistent-model", pairs_jsonl,
                                                          out="out-hub"))],
        "bad_override": ["train", write("good.yaml", good), "--set", "training.max_stepz=3"],
        "losses": ["losses"],
        "config_doc": ["config-doc"],
        "train": ["train", "good.yaml", "--set", "training.max_steps=3", "--set", "training.output_dir=e2e"],
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(cli, *args, cwd=root, env={"PREFTUNE_CACHE": cache})
                   for name, args in cases.items()}
        results = {name: f.result() for name, f in futures.items()}
    return root, results


ERRORS = {
    "missing_config": "error: config file not found: nope.yaml",
    "missing_data": "error: data file not found:",
    "bad_yaml": "error: bad.yaml:3:",
    "unknown_key": "error: unknown key 'training.learning_rat'. Did you mean 'training.learning_rate'?",
    "no_model_path": "error: model path does not exist:",
    "hub_offline": "error: could not load model 'nonexistent-org-xyz/nonexistent-model'",
    "bad_override": "error: unknown key 'training.max_stepz'. Did you mean 'training.max_steps'?",
}


@SLOW
@pytest.mark.parametrize("case", sorted(ERRORS))
def test_user_error_is_one_line_without_traceback(runs, case):
    _, results = runs
    proc = results[case]
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(ERRORS[case]), lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


@SLOW
def test_bad_yaml_names_line_and_says_yaml(runs):
    _, results = runs
    assert "invalid YAML" in results["bad_yaml"].stderr


@SLOW
@pytest.mark.parametrize("case", ["unknown_key_debug", "unknown_key_debug_last"])
def test_debug_shows_traceback(runs, case):
    _, results = runs
    proc = results[case]
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "ConfigError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown key 'training.learning_rat'")


@SLOW
def test_losses_lists_dpo(runs):
    _, results = runs
    proc = results["losses"]
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:] if line.strip()}
    assert rows["dpo"][1:3] == ["yes", "paired"]  # needs a reference, paired data
    assert rows["simpo"][1] == "no"
    assert {"kto", "orpo", "sft", "ipo"} <= set(rows)


@SLOW
def test_config_doc_is_a_markdown_table(runs):
    _, results = runs
    proc = results["config_doc"]
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "| key | type | default | meaning |" and lines[1] == "|---|---|---|---|"
    row = next(line for line in lines if line.startswith("| `training.learning_rate` |"))
    assert "| required |" in row and "Peak learning rate" in row
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    assert any(line.startswith("| `loss.name` |") for line in lines)


@SLOW
def test_train_end_to_end(runs):
    root, results = runs
    proc = results["train"]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    out = root / "e2e"
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3  # the --set override was applied
    assert {"train_runtime_s", "samples_per_second", "tokens_per_second", "peak_rss_mb", "final_loss"} <= set(summary)
    assert "summary: train_runtime_s=" in proc.stdout
    assert "wrote e2e/train_summary.json" in proc.stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert (out / "final" / "model.safetensors").exists() and (out / "final" / "tokenizer.json").exists()
    assert not (root / "out" / "train_summary.json").exists()  # output_dir came from --set, not the YAML


def test_no_command_prints_help():
    proc = subprocess.run([sys.executable, "-m", "preftune.cli"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "usage: preftune" in proc.stdout
