"""`preftune quickstart --method iterative_dpo`: three rounds on the toy task raise the generation accuracy round
over round to the issue's numbers, and the report and the rounds' files are written."""

from __future__ import annotations

import json

import pytest

from preftune.cli import QUICKSTARTS
from preftune.tune.quickstart import TARGETS, run_iterative_quickstart


@pytest.mark.slow
def test_iterative_quickstart_meets_targets(tmp_path, capsys, toy_sft):
    assert QUICKSTARTS["iterative_dpo"] == "preftune.tune.quickstart:run_iterative_quickstart"
    # the session's SFT model (the quickstart's own SFT phase, trained once for every method's tests)
    assert run_iterative_quickstart(tmp_path, sft_dir=toy_sft.run_dir)["passed"]
    report = json.loads((tmp_path / "report.json").read_text())
    before, after = report["before"]["generation_accuracy"], report["after"]["generation_accuracy"]
    assert 0.25 <= before <= 0.75  # the SFT model of the DPO demo: the preferred behaviour on about half
    assert after >= TARGETS["generation_accuracy"] == 0.90 and after - before >= TARGETS["gain"] == 0.25
    per_round = [r["generation_accuracy"] for r in report["rounds"]]
    assert len(per_round) == 4 and per_round[0] == pytest.approx(before, abs=0.01)  # round 0 is the SFT model
    assert all(b >= a for a, b in zip(per_round, per_round[1:])) and per_round[1] > per_round[0]
    assert per_round[-1] == pytest.approx(after, abs=0.01)  # the round table measures what the report measures
    assert report["passed"] and all(report["checks"].values())
    for k in (1, 2, 3):
        lineage = json.loads((tmp_path / "iterate" / f"round-0{k}" / "lineage.json").read_text())
        assert lineage["judge"]["name"] == "toy-verifier" and lineage["metrics"]["pairs"] > 50
    assert (tmp_path / "iterate" / "rounds.png").exists()
    assert "quickstart: PASSED" in capsys.readouterr().out
