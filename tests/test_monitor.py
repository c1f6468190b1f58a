"""The in-training monitor: KL estimators and diversity (hand-computed), margin health and alarms on synthetic
histories, then failures planted on the toy task (a learning rate that collapses the policy, a tiny beta that lets
it drift, data whose chosen answers are always longer) next to a healthy run that raises nothing."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

import preftune
from preftune.config import MonitorConfig
from preftune.eval.drift import distinct_n, kl_estimates, self_repetition
from preftune.monitor.health import check_alarms, diagnose
from preftune.monitor.monitor import reward_scale
from preftune.runlog import read_metrics

# ---- estimators ---------------------------------------------------------------------------------------------


def test_kl_estimators_hand_computed():
    # One sequence, log-ratios r = [log 2, 0]: k1 = r, k3 = (e^-r − 1) + r = [(0.5 − 1) + 0.6931, 0] = [0.1931, 0].
    # A second sequence with r = [−0.5]: k1 = −0.5, k3 = (e^0.5 − 1) − 0.5 = 0.1487.
    policy = [torch.tensor([math.log(2.0), -1.0]), torch.tensor([-2.0])]
    reference = [torch.tensor([0.0, -1.0]), torch.tensor([-1.5])]
    kl = kl_estimates(policy, reference)
    k3_a, k3_b = (0.5 - 1) + math.log(2), (math.exp(0.5) - 1) - 0.5
    assert kl["kl/k1_seq"] == pytest.approx((math.log(2) - 0.5) / 2)  # sums per sequence, mean over 2
    assert kl["kl/k1_token"] == pytest.approx((math.log(2) - 0.5) / 3)  # mean over 3 tokens
    assert kl["kl/k3_seq"] == pytest.approx((k3_a + k3_b) / 2)
    assert kl["kl/k3_token"] == pytest.approx((k3_a + k3_b) / 3)
    same = kl_estimates(reference, reference)
    assert all(v == 0.0 for v in same.values())


def test_k3_is_unbiased_and_nonnegative_on_samples():
    """E_{y~p}[k3] = KL(p‖q) for two categorical distributions; every k3 term is ≥ 0, k1 terms are not."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    exact = float((p * (p / q).log()).sum())
    y = torch.multinomial(p, 200_000, replacement=True, generator=g)
    kl = kl_estimates([p.log()[y]], [q.log()[y]])
    assert kl["kl/k3_token"] == pytest.approx(exact, rel=0.02)
    assert kl["kl/k1_token"] == pytest.approx(exact, rel=0.05)
    r = p.log()[y] - q.log()[y]
    assert bool(((torch.expm1(-r) + r) >= 0).all()) and bool((r < 0).any())


def test_distinct_n_and_self_repetition_hand_computed():
    seqs = [[1, 2, 3], [1, 2, 4]]
    assert distinct_n(seqs, 1) == pytest.approx(4 / 6)  # unigrams 1 2 3 1 2 4: four distinct of six
    assert distinct_n(seqs, 2) == pytest.approx(3 / 4)  # bigrams (1,2) (2,3) (1,2) (2,4)
    assert self_repetition([[7] * 7]) == pytest.approx(5 / 6)  # six bigrams, all (7,7): five repeat the first
    assert self_repetition([[1, 2, 3, 4], [5]]) == 0.0
    assert math.isnan(distinct_n([[1]], 2))


# ---- margin health on synthetic histories -----------------------------------------------------------------------


def history(evals: list[tuple], train: list[tuple] = (), every: int = 10) -> list[dict]:
    """eval tuples (margin, accuracy, chosen, rejected), at steps every, 2*every, ...; train tuples
    (accuracy, margin), one per eval window, logged at the eval step."""
    records = []
    for i, (m, acc, c, r) in enumerate(evals):
        step = (i + 1) * every
        if i < len(train):
            records.append({"step": step, "split": "train", "rewards/accuracies": train[i][0],
                            "rewards/margins": train[i][1]})
        records.append({"step": step, "split": "eval", "rewards/margins": m, "rewards/accuracies": acc,
                        "rewards/chosen": c, "rewards/rejected": r})
    return records


@pytest.mark.parametrize("loss, expected", [
    ({"name": "dpo", "params": {"beta": 0.25}}, 0.25),
    ({"name": "orpo", "params": {"lam": 0.2}}, 0.2),  # ORPO's rewards are λ·m: the spec names lam, not beta
    ({"name": ["sft", "simpo"], "params": {"beta": 2.5, "gamma": 1.0}}, 2.5),  # the SFT term logs no rewards
    ({"name": "orpo", "params": {"lam": 0.0}}, None),  # no scale to divide by
    ({"name": "sft", "params": {}}, None),
    ({"name": "bradley_terry", "params": {}}, None),  # raw scores
])
def test_reward_scale_comes_from_the_loss_spec(loss, expected):
    assert reward_scale(SimpleNamespace(**loss)) == expected


def states(records: list[dict], beta: float | None = 0.1) -> list[str]:
    """The diagnosis at each evaluation, as the monitor computes it while the run goes."""
    out = []
    for i, r in enumerate(records):
        if r["split"] == "eval":
            out.append(diagnose(records[: i + 1], beta).state)
    return out


def test_healthy_margin_grows_then_plateaus():
    recs = history([(0.1, 0.7, 0.02, -0.08), (0.3, 0.8, 0.05, -0.25), (0.5, 0.85, 0.05, -0.45),
                    (0.505, 0.85, 0.05, -0.455)])
    assert states(recs) == ["healthy"] * 4
    assert "growing" in diagnose(recs[:2], 0.1).message and "plateau" in diagnose(recs, 0.1).message


def test_stuck_needs_two_evaluations_of_no_separation():
    # margins 0.001 and 0.002 at beta 0.1 are log-ratio gaps of 0.01 and 0.02 nats; accuracy may already be
    # high (the sign of a tiny step is right), it is the size that says nothing is learned.
    recs = history([(0.001, 0.8, 0.0005, -0.0005), (0.002, 0.8, 0.001, -0.001), (0.2, 0.8, 0.1, -0.1)])
    assert states(recs) == ["healthy", "stuck", "healthy"]
    d = diagnose(recs[:2], 0.1)
    assert "learning_rate" in d.fix and "beta" in d.fix


def test_tiny_beta_is_not_stuck():
    """The same logged margins with beta = 0.001 are log-ratio gaps of 1-2 nats: the policy moves."""
    recs = history([(0.001, 0.8, 0.0005, -0.0005), (0.002, 0.8, 0.001, -0.001)])
    assert states(recs, beta=0.001) == ["healthy", "healthy"]


def test_both_falling_when_chosen_sinks_with_rejected():
    # chosen falls to −0.2 (−2 nats) while rejected falls to −0.5: margin 0.3 grows, the loss would fall.
    recs = history([(0.05, 0.7, 0.0, -0.05), (0.15, 0.75, -0.1, -0.25), (0.3, 0.75, -0.2, -0.5)])
    assert states(recs) == ["healthy", "both_falling", "both_falling"]
    assert "sft" in diagnose(recs, 0.1).fix
    # chosen slightly below the reference but rejected carrying the margin is healthy
    ok = history([(0.1, 0.7, -0.01, -0.11), (0.3, 0.8, -0.02, -0.32)])
    assert states(ok) == ["healthy", "healthy"]


def test_overfitting_when_train_accuracy_saturates_and_eval_accuracy_falls():
    evals = [(0.3, 0.80, 0.1, -0.2), (0.6, 0.82, 0.1, -0.5), (0.9, 0.76, 0.05, -0.85)]
    train = [(0.85, 0.5), (0.97, 1.5), (1.0, 3.0)]
    recs = history(evals, train)
    assert states(recs) == ["healthy", "healthy", "overfitting"]
    # the same eval history with the train margin no longer rising is not overfitting (a noisy eval)
    flat = history(evals, [(0.85, 0.5), (0.97, 3.0), (1.0, 3.0)])
    assert states(flat)[-1] != "overfitting"


def test_no_diagnosis_without_margins():
    assert diagnose([{"step": 5, "split": "eval", "loss": 0.5}]) is None
    assert diagnose([{"step": 5, "split": "train", "loss": 0.5}]) is None


# ---- alarms on synthetic monitor records ------------------------------------------------------------------------


def monitor_record(step, kl=None, length=5.0, ref_length=5.0, d1=0.4, d2=0.9, rep=0.0):
    return {"step": step, "split": "monitor", "kl/k3_seq": kl, "length/policy": length,
            "length/reference": ref_length, "length/ratio": length / ref_length, "diversity/distinct_1": d1,
            "diversity/distinct_2": d2, "diversity/repetition": rep, "diversity/reference_distinct_1": 0.4,
            "diversity/reference_distinct_2": 0.9, "diversity/reference_repetition": 0.0}


def first_firing(monitor_records, eval_records, cfg) -> dict[str, int]:
    fired: dict[str, int] = {}
    for i in range(len(monitor_records)):
        for alarm in check_alarms(monitor_records[: i + 1], eval_records[i], cfg):
            fired.setdefault(alarm.name, monitor_records[i]["step"])
    return fired


def test_kl_spike_fires_at_the_first_evaluation_past_ten_times_the_first_value():
    cfg = MonitorConfig()
    kls = [0.8, 2.0, 7.9, 8.1, 12.0]  # the limit is 10 x 0.8 = 8.0: first crossed at step 40
    mons = [monitor_record(10 * (i + 1), kl) for i, kl in enumerate(kls)]
    assert first_firing(mons, [{}] * len(mons), cfg) == {"kl_spike": 40}
    # a first value near 0 is floored at 0.5 nats: 4.9 is not a spike, 5.1 is
    mons = [monitor_record(10, 0.01), monitor_record(20, 4.9), monitor_record(30, 5.1)]
    assert first_firing(mons, [{}] * 3, cfg) == {"kl_spike": 30}
    # null KL (no reference in memory) never alarms
    assert first_firing([monitor_record(10), monitor_record(20)], [{}, {}], cfg) == {}


def test_max_kl_reward_saturation_diversity_and_length_alarms():
    cfg = MonitorConfig(max_kl=10.0)
    assert [a.name for a in check_alarms([monitor_record(10, 10.5)], {}, cfg)] == ["max_kl"]
    # σ(4.5) = 0.9890 < 0.99 < σ(4.7) = 0.9910
    assert check_alarms([monitor_record(10)], {"rewards/margins": 4.5}, cfg) == []
    assert [a.name for a in check_alarms([monitor_record(10)], {"rewards/margins": 4.7}, cfg)] == ["reward_saturated"]
    names = lambda **kw: [a.name for a in check_alarms([monitor_record(10, **kw)], {}, cfg)]  # noqa: E731
    assert names(d1=0.19) == ["diversity_collapse"]  # below 0.5 x reference 0.4
    assert names(d2=0.44) == ["diversity_collapse"]  # below 0.5 x reference 0.9
    assert names(rep=0.6) == ["diversity_collapse"]
    assert names(length=7.6) == ["length_drift"] and names(length=2.4) == ["length_drift"]
    assert names(length=7.4, d1=0.21, rep=0.4) == []


# ---- planted failures on the toy task ---------------------------------------------------------------------------
# A word-level toy Llama (hidden 64) after 300 SFT steps answers the echo prompts with a few words and stops; the
# DPO runs start from copies of it. Pairs prefer the plain echo over a signed-off or corrupted one, so DPO
# pushes towards shorter answers, and too far it collapses to answering nothing.


@pytest.fixture(scope="module")
def toy(toy_tok, tmp_path_factory):
    from preftune import toy as toy_task

    train_items, test_items = toy_task.split_items(0, 400, 64)
    model = toy_task.build_model(toy_tok, seed=0, hidden=64)
    preftune.train({
        "model": model, "tokenizer": toy_tok, "data": {"train": toy_task.sft_rows(train_items, 0)},
        "loss": {"name": "sft"}, "monitor": {"enabled": False},
        "training": {"output_dir": str(tmp_path_factory.mktemp("sft")), "learning_rate": 3e-3, "max_steps": 300,
                     "per_device_batch_size": 16, "max_length": 64, "warmup_ratio": 0.1, "progress_bar": False,
                     "save_model": False},
    }, log=lambda *_: None)
    state = copy.deepcopy(model.state_dict())

    def run(name, *, train=None, eval=None, loss=None, training=None, monitor=None, resume=None, out=None,
            **sections):
        policy = toy_task.build_model(toy_tok, seed=0, hidden=64)
        policy.load_state_dict(state)
        out = out or tmp_path_factory.mktemp(name)
        lines: list[str] = []
        cfg = {
            "model": policy, "tokenizer": toy_tok,
            "data": {"train": train or toy_task.pair_rows(train_items, 0),
                     "eval": eval or toy_task.pair_rows(test_items, 1)},
            "loss": {"name": "dpo", "beta": 0.1, **(loss or {})},
            "reference": {"precompute": False},  # full fine-tuning keeps a frozen reference: KL is measured
            "monitor": {"max_kl": 3.0, **(monitor or {})},
            "training": {"output_dir": str(out), "learning_rate": 3e-4, "max_steps": 30, "eval_every": 5,
                         "per_device_batch_size": 8, "max_length": 64, "progress_bar": False, "save_model": False,
                         **(training or {})},
            **sections,
        }
        summary = preftune.train(cfg, log=lines.append, resume=resume)
        records = read_metrics(out)
        split = lambda s: [r for r in records if r["split"] == s]  # noqa: E731
        return SimpleNamespace(summary=summary, dir=out, lines=lines, records=records, split=split,
                               alarms={r["name"]: r["step"] for r in reversed(split("alarm"))})

    return SimpleNamespace(run=run, items=(train_items, test_items), task=toy_task)


@pytest.fixture(scope="module")
def healthy(toy):
    return toy.run("healthy")


def test_healthy_run_raises_nothing(healthy):
    """Learning rate 3e-4, beta 0.1: the margin grows, KL stays near 1 nat, no alarm, no stop."""
    assert healthy.alarms == {}
    assert {r["state"] for r in healthy.split("health")} == {"healthy"}
    assert healthy.summary["stopped"] is None and healthy.summary["steps"] == 30
    monitors = healthy.split("monitor")
    assert [r["step"] for r in monitors] == [5, 10, 15, 20, 25, 30]  # every eval, the final one included
    assert all(r["kl/k3_seq"] is not None and 0 <= r["kl/k3_seq"] < 3.0 for r in monitors)
    assert healthy.split("eval")[-1]["rewards/margins"] > healthy.split("eval")[0]["rewards/margins"] > 0


def test_samples_and_report_are_written(healthy):
    rows = [json.loads(line) for line in (healthy.dir / "samples.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {5, 10, 15, 20, 25, 30} and len(rows) == 6 * 16
    assert all(set(r) >= {"prompt", "policy", "reference"} for r in rows)
    assert rows[0]["prompt"].split(":")[0].strip() in {"repeat", "echo", "copy", "say"}
    assert sum(line.startswith("sample @ 5") for line in healthy.lines) == 2  # monitor.print_samples
    html = (healthy.dir / "report.html").read_text()
    assert 'alt="kl"' in html and 'alt="diversity"' in html and "No alarms." in html
    assert any(line.startswith("report: ") for line in healthy.lines)


def test_high_learning_rate_collapse(toy, healthy):
    """lr 5e-2: both log-probs crash at once, outputs turn into repeated tokens. The diagnosis says so at the
    first evaluation, and the diversity alarm fires exactly where distinct-n first fell below half the
    reference's."""
    run = toy.run("high-lr", training={"learning_rate": 5e-2, "max_steps": 10, "eval_every": 2},
                  monitor={"max_kl": None})
    first = run.split("health")[0]
    assert first["state"] == "both_falling" and first["step"] == 2
    assert any("both_falling" in line and "likely fix" in line for line in run.lines)
    crossed = [r["step"] for r in run.split("monitor")
               if r["diversity/distinct_1"] < 0.5 * r["diversity/reference_distinct_1"]
               or r["diversity/distinct_2"] < 0.5 * r["diversity/reference_distinct_2"]
               or r["diversity/repetition"] > 0.5]
    assert crossed and run.alarms["diversity_collapse"] == crossed[0]
    assert "diversity_collapse" not in healthy.alarms


def test_tiny_beta_drifts_until_max_kl_stops_the_run(toy):
    """beta 0.001: the implicit reward hardly moves (the loss stays at log 2) while the policy walks away from
    the reference; monitor.max_kl = 3 stops the run at the first evaluation past 3 nats, and the best model
    (on eval loss) is kept in output_dir/best."""
    run = toy.run("tiny-beta", loss={"beta": 0.001},
                  training={"learning_rate": 1e-3, "max_steps": 40, "eval_every": 4, "warmup_ratio": 0.1,
                            "save_model": True})
    monitors = run.split("monitor")
    past = [r["step"] for r in monitors if r["kl/k3_seq"] > 3.0]
    assert past and run.alarms["max_kl"] == past[0] == monitors[-1]["step"]  # stopped right there
    assert run.summary["stopped"].startswith("max_kl") and run.summary["steps"] == past[0] < 40
    assert max(r["step"] for r in run.records) == past[0]  # nothing trained or evaluated after the stop
    assert all(r["loss"] > 0.66 for r in run.split("eval"))  # the loss says "nothing happens"
    best = json.loads((run.dir / "best" / "best.json").read_text())
    assert best["metric"] == "eval/loss" and best["step"] <= past[0]
    assert best == run.summary["best"] and best["path"] == str(run.dir / "best")
    assert (run.dir / "best" / "config.json").exists() and (run.dir / "final" / "config.json").exists()


def test_chosen_always_longer_drifts_length(toy, healthy):
    """Pairs whose chosen answer is the echo plus a sign-off and whose rejected is the plain echo, on prompts
    the SFT model answers plainly: outputs get longer and the length alarm fires where the ratio first passes
    1.5. Full fine-tuning with precomputed reference log-probs: no reference model is kept, yet KL is measured
    (from the reference weights snapshot to the run directory, removed at the end)."""
    train_items, test_items = toy.items
    task = toy.task

    def longer(items):
        return [{"prompt": it.prompt, "chosen": task.signed(it), "rejected": task.plain(it)}
                for it in items if it.words[0] in task.ANSWERED]

    # max_kl off: KL is measured now (it passes 3 nats by the first evaluation), and this run is about length
    run = toy.run("longer", train=longer(train_items), eval=longer(test_items), reference={"precompute": True},
                  training={"learning_rate": 1e-3, "max_steps": 20}, monitor={"max_kl": None})
    ratios = [(r["step"], r["length/ratio"]) for r in run.split("monitor")]
    crossed = [s for s, ratio in ratios if ratio > 1.5]
    assert crossed and run.alarms["length_drift"] == crossed[0]
    kls = [r["kl/k3_seq"] for r in run.split("monitor")]
    assert all(kl is not None and kl > 1.0 for kl in kls)  # far from the reference, as the lengths say
    assert any("reference weights for KL saved to" in line for line in run.lines)
    assert not (run.dir / ".reference-weights.pt").exists()
    assert "length_drift" not in healthy.alarms


def test_kl_from_the_weights_snapshot_equals_kl_from_a_reference_in_memory(toy, healthy):
    """The healthy run keeps a frozen reference in memory (precompute off); the same run with precomputed
    reference log-probs keeps none and scores the monitor's samples under the snapshot instead. Same seeds,
    same steps: the KL records agree to float noise (the precomputed and live reference log-probs differ in
    the last bits, so the trajectories do too), and max_kl can fire in the default configuration."""
    run = toy.run("snapshot", reference={"precompute": True})
    live = [r["kl/k3_seq"] for r in healthy.split("monitor")]
    snap = [r["kl/k3_seq"] for r in run.split("monitor")]
    assert len(snap) == len(live) == 6 and live[-1] > 0.05
    assert snap == pytest.approx(live, rel=1e-3, abs=1e-5)
    assert [r["kl/k1_token"] for r in run.split("monitor")] == pytest.approx(
        [r["kl/k1_token"] for r in healthy.split("monitor")], rel=1e-3, abs=1e-5)


def test_early_stopping_over_several_epochs(toy):
    """24 training pairs, batch 8: 3 steps per epoch, up to 10 epochs. With patience 2 on eval accuracy the
    run stops two evaluations after the best one; epochs past the first are fine."""
    train_items, test_items = toy.items
    run = toy.run("early", train=toy.task.pair_rows(train_items[:24], 0),
                  monitor={"early_stopping_metric": "eval/rewards/accuracies", "patience": 2, "max_kl": None},
                  training={"learning_rate": 1e-3, "num_epochs": 10, "max_steps": None, "eval_every": 3})
    evals = run.split("eval")
    acc = [r["rewards/accuracies"] for r in evals]
    best_i = max(range(len(acc)), key=lambda i: (acc[i], -i))  # first of the best
    assert run.summary["stopped"].startswith("early stopping")
    assert len(evals) == best_i + 3 and run.summary["steps"] == evals[-1]["step"] < 30
    assert run.summary["best"]["step"] == evals[best_i]["step"] and run.summary["best"]["path"] is None
    events = run.split("event")
    assert events[-1]["name"] == "early_stopping" and events[-1]["step"] == evals[-1]["step"]


def test_monitor_off_and_bad_metric(toy, dpo_config, make_model, train_pairs, eval_pairs):
    from preftune.errors import ConfigError

    cfg = dpo_config(make_model(0), train_pairs[:8], eval=eval_pairs[:8], monitor={"enabled": False},
                     training={"eval_every": 1, "max_steps": 2})
    preftune.train(cfg, log=lambda *_: None)
    splits = {r["split"] for r in read_metrics(cfg["training"]["output_dir"])}
    assert splits == {"train", "eval"}
    bad = dpo_config(make_model(0), train_pairs[:8], monitor={"early_stopping_metric": "loss"})
    with pytest.raises(ConfigError, match="early_stopping_metric"):  # overwrite: the same output_dir again
        preftune.train(bad, overwrite=True, log=lambda *_: None)


def test_resumed_run_keeps_the_monitor_history(toy):
    """Resuming from the step-20 checkpoint of a 30-step run redoes steps 21-30 with the history rebuilt from
    metrics.jsonl: the same monitor, health, alarm and event records as the uninterrupted run, no repeated
    announcement of a state or alarm, and samples.jsonl cut back to the checkpoint before being appended to."""
    settings = dict(loss={"beta": 0.001}, training={"learning_rate": 1e-3, "max_steps": 30, "save_every": 20},
                    monitor={"max_kl": None, "early_stopping_metric": "eval/rewards/accuracies"})
    whole = toy.run("whole", **settings)
    watched = ("monitor", "health", "alarm", "event")
    assert whole.split("alarm")[0]["step"] < 20 and whole.split("health")[0]["step"] < 20  # carried over
    resumed = toy.run("resumed", out=whole.dir, resume=str(whole.dir / "checkpoints" / "step-00000020"),
                      **settings)
    for split in watched:
        a, b = resumed.split(split), whole.split(split)
        assert [sorted(r) for r in a] == [sorted(r) for r in b], split
        for x, y in zip(a, b):  # floats up to the last bits (a resumed run is reproduced to ~1e-7, not bitwise)
            assert all(x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6) if isinstance(y[k], float) else x[k] == y[k]
                       for k in y), (split, x, y)
    assert not any(line.startswith("monitor: ALARM") for line in resumed.lines)  # active ones stay quiet
    assert resumed.summary["best"] == whole.summary["best"]
    steps = [json.loads(line)["step"] for line in (whole.dir / "samples.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(20) == steps.count(30) == 16
