"""The offline quickstart meets the issue's numbers and writes every promised file."""

import json

import pytest

from preftune.toy.quickstart import TARGETS, run_quickstart


@pytest.mark.slow
def test_quickstart_meets_targets_and_writes_its_files(tmp_path):
    report = run_quickstart(tmp_path, seed=0, log=lambda *_: None)
    before, after = report["before"], report["after"]
    # the SFT reference shows the preferred behaviour on roughly half of held-out prompts
    assert 0.25 <= before["generation_accuracy"] <= 0.75
    # before DPO the policy is the reference: every margin is 0, a tie counts 0.5
    assert before["preference_accuracy"] == pytest.approx(0.5)
    assert after["preference_accuracy"] >= TARGETS["preference_accuracy"] == 0.95
    assert after["generation_accuracy"] >= TARGETS["generation_accuracy"] == 0.90
    assert after["preference_accuracy"] - before["preference_accuracy"] >= 0.30
    assert after["generation_accuracy"] - before["generation_accuracy"] >= 0.30
    assert report["passed"]

    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert set(on_disk) >= {"before", "after"}
    assert on_disk["after"]["generation_accuracy"] == after["generation_accuracy"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "train" and "rewards/margins" in r for r in records)
    assert any(r["split"] == "eval" and "rewards/accuracies" in r for r in records)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    for name in ("loss", "margins", "accuracies"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000
