"""The offline quickstart meets the issue's numbers and writes every promised file."""

import json

import pytest

from preftune import toy
from preftune.cli import main
from preftune.toy.quickstart import DPO, HELD_OUT, MAX_LENGTH, MAX_NEW_TOKENS, SFT, TARGETS, run_quickstart


@pytest.mark.slow
def test_quickstart_meets_targets_and_writes_its_files(tmp_path, toy_sft):
    # the session's SFT model (the quickstart's own SFT phase, trained once for every method's tests)
    report = run_quickstart(tmp_path, seed=0, log=lambda *_: None, sft_dir=toy_sft.run_dir)
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

    # `preftune eval` on the quickstart's own models agrees with its report: the same held-out pairs (rebuilt
    # from the seeds the report names), the DPO model against its SFT reference, the verifier as judge.
    _, held_out = toy.split_items(0, n_train=SFT["steps"] * SFT["batch_size"] + DPO["pairs"], n_test=HELD_OUT)
    pairs = tmp_path / "held_out_pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in toy.pair_rows(held_out, seed=report["seeds"]["held_out_pairs"])))
    out = tmp_path / "eval.json"
    rc = main(["eval", str(tmp_path / "final"), "--reference", report["runs"]["sft"]["model"], "--data", str(pairs),
               "--judge", "toy-verifier", "--beta", str(DPO["beta"]), "--num-prompts", str(HELD_OUT),
               "--max-new-tokens", str(MAX_NEW_TOKENS), "--max-length", str(MAX_LENGTH), "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["preference"]["accuracy_implicit_reward"] == pytest.approx(after["preference_accuracy"], abs=1e-6)
    assert res["judge"]["model_score"] == pytest.approx(after["generation_accuracy"], abs=0.01)
    assert res["judge"]["reference_score"] == pytest.approx(before["generation_accuracy"], abs=0.01)
