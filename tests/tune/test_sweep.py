"""`preftune sweep` on tiny toy runs: kill-and-resume (finished trials kept, the interrupted one retried in its
own directory), a failing trial recorded with its error while the sweep goes on, pruning at eval points, the
retry bookkeeping, and the outputs (table, sweep.csv, pareto.png, sweep.html in headless Chromium, best.yaml)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from preftune.tune import adapter
from preftune.tune.sweep import Objective, prepare, recover, run_sweep, run_trial_process

from .helpers import ROOT, WORDS3, kill_when, render, start_cli, wait_gone

CHROMIUM = shutil.which("chromium")


def sweep_config(out: Path, model: Path, files: dict, **sweep) -> dict:
    return {
        "model": str(model), "data": {"train": str(files["pairs"]), "eval": str(files["eval_pairs"])},
        "loss": {"name": "dpo", "beta": 0.1},
        "training": {"output_dir": str(out), "learning_rate": 1e-3, "per_device_batch_size": 4, "max_steps": 12,
                     "eval_every": 4, "save_every": 4, "max_length": 64},
        "monitor": {"enabled": False},
        "sweep": {"judge": WORDS3, "num_prompts": 8, "max_new_tokens": 8, "poll_seconds": 0.1, **sweep},
    }


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, saved_model_dir, toy_files):
    """A 3-point grid (batch size 4 and 8 train; 1000 > the 64 pairs fails), killed while a trial runs after
    another finished, then resumed to the end."""
    root = tmp_path_factory.mktemp("sweep")
    out = root / "sw"
    cfg = sweep_config(out, saved_model_dir, toy_files, sampler="grid",
                       **{"training.per_device_batch_size": [4, 8, 1000]})
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))

    def trial_dirs():
        return sorted((out / "trials").glob("trial-*")) if (out / "trials").exists() else []

    def finished_then_running():
        dirs = trial_dirs()
        done = [d for d in dirs if (d / "scores.json").exists()]
        running = [d for d in dirs if (d / "runner.pid").exists() and not (d / "scores.json").exists()
                   and not (d / "error.txt").exists()]
        return bool(done) and bool(running)

    with pytest.MonkeyPatch.context() as mp:  # module fixtures run before the per-test cache fixture
        mp.setenv("PREFTUNE_CACHE", str(root / "cache"))
        proc = start_cli(["sweep", str(path)], root, root / "first.log")
        kill_when(proc, finished_then_running)
        before = {d.name: {"scores": (d / "scores.json").exists(),
                           "mtime": (d / "scores.json").stat().st_mtime_ns if (d / "scores.json").exists() else None}
                  for d in trial_dirs()}
        for d in trial_dirs():  # the orphaned trial process notices its driver is gone and exits
            wait_gone(d / "runner.pid")
        lines: list[str] = []
        summary = run_sweep(str(path), log=lambda *a: lines.append(" ".join(map(str, a))))
    return {"out": out, "cfg": cfg, "path": path, "before": before, "summary": summary, "log": lines}


def _study(out: Path):
    return optuna.load_study(study_name="sweep", storage=f"sqlite:///{(out / 'sweep.db').resolve()}")


@pytest.mark.slow
def test_kill_and_resume_keeps_finished_trials_and_retries_the_interrupted(killed_and_resumed):
    r = killed_and_resumed
    trials = _study(r["out"]).get_trials()
    states = [t.state.name for t in trials]
    interrupted = [t for t in trials if t.user_attrs.get("interrupted")]
    assert len(interrupted) == 1 and interrupted[0].state.name == "FAIL"
    retry = [t for t in trials if t.user_attrs.get("retry_of") == interrupted[0].number]
    assert len(retry) == 1 and retry[0].params == interrupted[0].params and retry[0].state.name == "COMPLETE"
    # the retry continues in the interrupted trial's directory (its run resumes from its checkpoints)
    assert retry[0].user_attrs["dir"] == interrupted[0].user_attrs["dir"]
    assert f"trial {interrupted[0].number} was interrupted; retrying it" in "\n".join(r["log"])
    # the trial finished before the kill was kept as it was: not run again
    for name, b in r["before"].items():
        if b["scores"]:
            assert (r["out"] / "trials" / name / "scores.json").stat().st_mtime_ns == b["mtime"]
    assert states.count("COMPLETE") == 2 and states.count("FAIL") == 2 and len(trials) == 4
    # the grid's three points were each run to an end exactly once (the retry stands for the interrupted one)
    finished = [t.params["training.per_device_batch_size"] for t in trials if not t.user_attrs.get("interrupted")]
    assert sorted(finished) == [4, 8, 1000]


@pytest.mark.slow
def test_failed_trial_is_recorded_and_the_sweep_goes_on(killed_and_resumed):
    r = killed_and_resumed
    trials = _study(r["out"]).get_trials()
    (failed,) = [t for t in trials if t.user_attrs.get("error")]
    assert failed.params["training.per_device_batch_size"] == 1000
    assert "fewer than one optimizer step" in failed.user_attrs["error"]
    assert (Path(failed.user_attrs["dir"]) / "error.txt").exists()
    rows = list(csv.DictReader(open(r["out"] / "sweep.csv")))
    assert [row["state"] for row in rows] == ["complete", "complete", "failed", "interrupted"]
    assert "fewer than one optimizer step" in rows[2]["error"]


@pytest.mark.slow
def test_outputs_sorted_table_csv_plot_html_best_yaml(killed_and_resumed, tmp_path):
    r = killed_and_resumed
    out, summary = r["out"], r["summary"]
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    wins = [float(row["win_rate"]) for row in rows if row["state"] == "complete"]
    assert wins == sorted(wins, reverse=True) and float(rows[0]["objective"]) == wins[0]
    for row in rows[:2]:
        scores = json.loads((Path(row["dir"]) / "scores.json").read_text())
        assert scores["win_rate"] == pytest.approx(float(row["win_rate"]))
        assert scores["wins"] + scores["losses"] + scores["ties"] == scores["prompts"] == 8
        assert scores["win_rate"] == pytest.approx((scores["wins"] + scores["ties"] / 2) / 8)
        assert float(row["kl"]) >= 0 and float(row["perplexity"]) > 1 and 0 <= float(row["eos_rate"]) <= 1
    assert (out / "pareto.png").stat().st_size > 1000
    page = (out / "sweep.html").read_text()
    assert page.count('<tr class="trial"') == 4 and "fewer than one optimizer step" in page
    assert 'src="data:image/png;base64,' in page and "http" not in page.replace("http://www.w3.org", "")
    # best.yaml: the best trial's config, accepted by `preftune train` as it is
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert "sweep" not in best and best["training"]["per_device_batch_size"] == int(rows[0]["training.per_device_batch_size"])
    assert best["training"]["output_dir"] == str(out / "best")
    adapter.check_train_config(best)
    assert summary["best"]["trial"] == int(rows[0]["trial"])
    # running the finished sweep again runs nothing and reports the same
    again = run_sweep(str(r["path"]), log=lambda *a: None)
    assert [t["trial"] for t in again["trials"]] == [t["trial"] for t in summary["trials"]]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs the Debian package)")
def test_sweep_html_renders_in_headless_chromium(killed_and_resumed, tmp_path):
    attrs, console = render(killed_and_resumed["out"] / "sweep.html", tmp_path / "profile")
    assert console == []
    assert attrs["data-images-total"] == "1" and attrs.get("data-images-visible") == "1"
    assert attrs.get("data-rows") == "4"


def test_pruned_at_an_eval_point(tmp_path, saved_model_dir, toy_files):
    """The driver reports the run's evaluations as they appear and ends the trial process when told to prune."""
    cfg = sweep_config(tmp_path / "sw", saved_model_dir, toy_files, **{"loss.beta": [0.1]})
    cfg["training"].update(max_steps=400, eval_every=2, save_every=0)  # 400 steps: pruned long before the end
    plan = prepare(cfg)
    plan.out.mkdir(parents=True)
    (plan.out / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in plan.prompts))

    class Trial:  # the two calls the driver makes on an Optuna trial
        def __init__(self):
            self.reports = []

        def report(self, value, step):
            self.reports.append((step, value))

        def should_prune(self):
            return len(self.reports) >= 2

    tdir = plan.out / "trials" / "trial-0000"
    tdir.mkdir(parents=True)
    tree = {**cfg, "training": {**cfg["training"], "output_dir": str(tdir / "run")}}
    tree.pop("sweep")
    (tdir / "trial.json").write_text(json.dumps({"config": tree, "score": {
        "reference_model": str(saved_model_dir), "prompts": str(plan.prompts_path), "judge": WORDS3,
        "max_new_tokens": 8, "seed": 0}}))
    trial = Trial()
    with pytest.raises(optuna.TrialPruned, match="eval/rewards/accuracies = .* at step 4"):
        run_trial_process(trial, tdir, plan)
    assert [s for s, _ in trial.reports] == [2, 4] and all(0 <= v <= 1 for _, v in trial.reports)
    wait_gone(tdir / "runner.pid", timeout=10)  # the run was ended, long before its 400 steps
    steps = [json.loads(line)["step"] for line in (tdir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) < 400 and not (tdir / "scores.json").exists()


def test_recover_retries_an_orphaned_running_trial(tmp_path, saved_model_dir, toy_files):
    """A RUNNING trial whose driver process is gone (this host) is failed, marked interrupted and re-enqueued
    with its parameters once; a second recover does not enqueue it again."""
    cfg = sweep_config(tmp_path / "sw", saved_model_dir, toy_files, **{"loss.beta": [0.1, 0.5]})
    plan = prepare(cfg)
    plan.out.mkdir(parents=True)
    from preftune.tune.sweep import open_study

    study, storage = open_study(plan)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial = study.ask()
    trial.suggest_categorical("loss.beta", [0.1, 0.5])
    import socket

    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", dead.pid)
    trial.set_user_attr("dir", "somewhere")
    assert recover(study, storage, 2, lambda *a: None) == [trial.number]
    assert recover(study, storage, 2, lambda *a: None) == []
    old, new = study.get_trials()
    assert old.state.name == "FAIL" and old.user_attrs["interrupted"] is True
    assert new.state.name == "WAITING" and new.params == old.params and new.user_attrs["retry_of"] == old.number
    # the objective reads the original number and so reuses the original's directory
    assert isinstance(Objective(plan, print), Objective)
    alive = study.ask()  # a trial of a live driver (this process) is left alone
    alive.set_user_attr("host", socket.gethostname())
    alive.set_user_attr("pid", os.getpid())
    assert recover(study, storage, 2, lambda *a: None) == []


def test_resume_with_another_space_is_refused(tmp_path, saved_model_dir, toy_files):
    from preftune.errors import PreftuneError
    from preftune.tune.sweep import open_study

    cfg = sweep_config(tmp_path / "sw", saved_model_dir, toy_files, **{"loss.beta": [0.1, 0.5]})
    plan = prepare(cfg)
    plan.out.mkdir(parents=True)
    open_study(plan)
    cfg["sweep"]["loss.beta"] = [0.1, 0.2]
    with pytest.raises(PreftuneError, match="was made with another config \\(space differ"):
        open_study(prepare(cfg))
    assert ROOT.exists()
