"""`preftune quickstart --method ppo` meets the issue's numbers: from the quickstart's SFT model, with the toy
verifier as reward, held-out generation accuracy >= 0.90 after PPO and a gain >= 0.25."""

import json

import pytest

from preftune.cli import QUICKSTARTS
from preftune.toy.quickstart_ppo import TARGETS, run_ppo_quickstart


@pytest.mark.slow
def test_ppo_quickstart_meets_targets_and_writes_its_files(tmp_path, toy_sft):
    assert QUICKSTARTS["ppo"] == "preftune.toy.quickstart_ppo:run_ppo_quickstart"  # `quickstart --method ppo`
    run_ppo_quickstart(tmp_path, seed=0, log=lambda *_: None, sft_dir=toy_sft.run_dir)
    report = json.loads((tmp_path / "report.json").read_text())
    before, after = report["before"]["generation_accuracy"], report["after"]["generation_accuracy"]
    assert 0.25 <= before <= 0.75  # the SFT model signs off on about half of the held-out prompts
    assert after >= TARGETS["generation_accuracy"] == 0.90
    assert after - before >= TARGETS["gain"] == 0.25
    assert report["passed"] and report["method"] == "ppo"
    assert report["final"]["train/value/error"] is not None
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert {"policy/approx_kl_k3", "ppo/explained_variance", "ppo/kl_ref", "value/error"} <= set(train[-1])
    assert train[-1]["value/error"] < train[0]["value/error"]  # the critic learned
    assert any(r["split"] == "eval" and "reward/mean" in r for r in records)
    assert (tmp_path / "final" / "model.safetensors").exists() and (tmp_path / "report.html").exists()
