"""`preftune iterate` on a tiny untrained toy model: two rounds with their files and lineage, a kill in the
middle of round 2's training and the resume at that step, the round table, the early stop under
`iterate.min_win_rate`, unusable pairs stopping the run with the report, and a resume with other settings refused."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
import yaml

from preftune.cli import main
from preftune.errors import PreftuneError
from preftune.tune.iterate import STEPS, run_iterate

from .helpers import WORDS3, kill_when, start_cli


def iterate_config(out: Path, model: Path, files: dict, **iterate) -> dict:
    return {
        "model": str(model),
        "loss": {"name": "dpo", "beta": 0.1},
        "training": {"output_dir": str(out), "learning_rate": 1e-3, "per_device_batch_size": 2, "max_steps": 60,
                     "save_every": 10, "max_length": 64, "progress_bar": False},
        "monitor": {"enabled": False},
        "iterate": {"rounds": 2, "prompts": str(files["prompts"]), "prompts_per_round": 32,
                    "eval_prompts": str(files["eval"]), "samples_per_prompt": 4, "max_new_tokens": 8,
                    "judge": WORDS3, **iterate},
    }


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, saved_model_dir, toy_files):
    """`preftune iterate` killed once round 2's training has written a checkpoint, then resumed in-process."""
    root = tmp_path_factory.mktemp("iterate")
    out = root / "it"
    cfg = iterate_config(out, saved_model_dir, toy_files)
    path = root / "iterate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.MonkeyPatch.context() as mp:  # module fixtures run before the per-test cache fixture
        mp.setenv("PREFTUNE_CACHE", str(root / "cache"))
        proc = start_cli(["iterate", str(path)], root, root / "first.log")
        kill_when(proc, lambda: any((out / "round-02" / "train" / "checkpoints").glob("step-*")))
        state = json.loads((out / "round-02" / "state.json").read_text())
        mtimes = {f: (out / f).stat().st_mtime_ns for f in ("round-01/generations.jsonl", "round-01/train/final",
                                                              "round-02/generations.jsonl", "round-02/pairs.jsonl")}
        lines: list[str] = []
        table = run_iterate(str(path), log=lambda *a: lines.append(" ".join(map(str, a))))
    return {"out": out, "path": path, "state": state, "mtimes": mtimes, "log": "\n".join(lines), "table": table}


@pytest.mark.slow
def test_resume_continues_at_the_step_where_it_stopped(resumed):
    out, log = resumed["out"], resumed["log"]
    assert resumed["state"]["done"] == ["prompts", "generate", "judge", "validate"]  # killed in "train"
    assert "round 2: generate" not in log and "round 1: train" not in log  # steps done were not redone
    assert "iterate: round 2: train" in log and "resumed from" in log  # training continued from its checkpoint
    for f, mtime in resumed["mtimes"].items():
        assert (out / f).stat().st_mtime_ns == mtime, f
    for k in (1, 2):
        assert json.loads((out / f"round-0{k}" / "state.json").read_text())["done"] == list(STEPS)
    summary = json.loads((out / "round-02" / "train" / "train_summary.json").read_text())
    assert summary["steps"] == 60


@pytest.mark.slow
def test_round_files_and_lineage(resumed, saved_model_dir):
    out = resumed["out"]
    r2 = out / "round-02"
    for name in ("prompts.jsonl", "generations.jsonl", "pairs.jsonl", "pairs.dropped.jsonl", "verdicts.jsonl",
                 "validation.json", "eval.json", "metrics.json", "lineage.json", "train/final/config.json"):
        assert (r2 / name).exists(), name
    lineage = json.loads((r2 / "lineage.json").read_text())
    assert lineage["parent_model"] == str(out / "round-01" / "train" / "final")
    assert lineage["sft_model"] == str(saved_model_dir) and lineage["model"] == str(r2 / "train" / "final")
    assert lineage["reference_model"].startswith(lineage["parent_model"])  # iterate.reference: previous
    assert lineage["judge"]["name"] == "three-words" and lineage["judge"]["type"] == "VerifierJudge"
    assert lineage["seeds"] == {"generation": 2, "training": 1, "evaluation": 0}
    for name in ("prompts", "generations", "pairs"):
        data = (r2 / f"{name}.jsonl").read_bytes()
        assert lineage["data"][name]["sha256"] == hashlib.sha256(data).hexdigest()
    # round 2 answered the next 32 prompts of the pool, and every pair comes from this round's generations
    prompts = [json.loads(x)["prompt"] for x in (r2 / "prompts.jsonl").read_text().splitlines()]
    first = [json.loads(x)["prompt"] for x in (out / "round-01" / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 32 and not set(prompts) & set(first)
    gens = {json.loads(x)["prompt"]: json.loads(x) for x in (r2 / "generations.jsonl").read_text().splitlines()}
    pairs = [json.loads(x) for x in (r2 / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all({p["chosen"], p["rejected"]} <= {r["text"] for r in gens[p["prompt"]]["responses"]}
                         for p in pairs)
    verdicts = [json.loads(x) for x in (r2 / "verdicts.jsonl").read_text().splitlines()]
    assert len(verdicts) == 32 and sum(v["kept"] for v in verdicts) == len(pairs)
    assert all(v["reason"] for v in verdicts if not v["kept"])


@pytest.mark.slow
def test_round_table_and_plot(resumed):
    out, table = resumed["out"], resumed["table"]
    rows = table["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2] and table["stopped"] is None
    assert rows[0]["win_rate_vs_sft"] == 0.5 and rows[0]["kl_to_sft"] == 0.0
    eval2 = json.loads((out / "round-02" / "eval.json").read_text())
    assert rows[2]["win_rate_vs_previous"] == eval2["vs_previous"]["win_rate"]
    assert rows[2]["win_rate_vs_sft"] == eval2["vs_sft"]["win_rate"] and rows[2]["kl_to_sft"] == eval2["vs_sft"]["kl"]
    assert rows[2]["kl_to_sft"] > 0  # two rounds of DPO moved the policy
    for r in rows[1:]:
        assert 0 <= r["win_rate_vs_previous"] <= 1 and r["length"] > 0 and 0 < r["distinct_2"] <= 1
    assert eval2["vs_previous"]["wins"] + eval2["vs_previous"]["losses"] + eval2["vs_previous"]["ties"] == 8
    assert len(list(csv.DictReader(open(out / "rounds.csv")))) == 3
    assert (out / "rounds.png").stat().st_size > 1000
    assert table["model"] == str(out / "round-02" / "train" / "final")


@pytest.mark.slow
def test_min_win_rate_stops_further_rounds(resumed):
    """Raising iterate.rounds continues a finished run, unless a round fell under iterate.min_win_rate."""
    table = run_iterate(str(resumed["path"]), rounds=3, overrides=["iterate.min_win_rate=1.01"], log=lambda *a: None)
    assert table["stopped"].startswith("round 1: win rate") and "below iterate.min_win_rate 1.01" in table["stopped"]
    assert not (resumed["out"] / "round-03").exists()


def test_unusable_pairs_stop_with_the_report_and_a_changed_config_is_refused(tmp_path, saved_model_dir, toy_files,
                                                                            capsys):
    never = {"type": "verifier", "kind": "regex", "pattern": "^NEVER$"}  # every response fails: all ties
    cfg = iterate_config(tmp_path / "it", saved_model_dir, toy_files, judge=never, prompts_per_round=8)
    path = tmp_path / "iterate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["iterate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    report = tmp_path / "it" / "round-01" / "validation.json"
    assert err[-1:] == [f"error: round 1: the round's pairs are unusable (no rows); stopped. The report: {report}"]
    assert json.loads(report.read_text())["usable"] is False
    assert json.loads((tmp_path / "it" / "round-01" / "state.json").read_text())["done"] == ["prompts", "generate",
                                                                                            "judge"]
    with pytest.raises(PreftuneError, match="holds an iterate run with other settings \\(iterate.samples_per_prompt\\)"):
        run_iterate(str(path), overrides=["iterate.samples_per_prompt=2"], log=lambda *a: None)
