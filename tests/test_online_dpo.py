"""Online DPO: every step the policy samples, reward functions (or judges) score, DPO learns best vs worst.

Most runs use a random tiny model (its samples are distinct garbage, ideal for controlled rewards) and reward
functions driven by prompt columns, so the numbers are hand-computable: ``by_column`` gives sample j of a
prompt with column ``spread`` = s the reward s·j, so the prompt's best is sample 3 (3s), its worst sample 0
(0), and s = 0 is a tie. Runs that need sensible generations start from the quickstart's SFT model
(``toy_sft``, trained once per session). Plots are skipped (they cost seconds per run); the report test
draws them itself.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from online_helpers import prompt_rows, train_records

import preftune
from preftune import toy
from preftune.config import to_config
from preftune.errors import PreftuneError
from preftune.rollout.scoring import RewardError, RewardFunction
from preftune.trainer.build import build_run
from preftune.trainer.loop import run_steps

pytestmark = pytest.mark.usefixtures("one_thread", "no_plots")

# A reward function file exactly as TRL's GRPOTrainer documentation writes them: completions first, prompts
# only through **kwargs, conversational completions as [{"role": "assistant", "content": ...}].
TRL_REWARD = '''
def reward(completions, **kwargs):
    prompts = kwargs["prompts"]
    assert all(isinstance(p, list) and p[-1]["role"] == "user" for p in prompts), prompts[0]
    assert all(isinstance(c, list) and c[0]["role"] == "assistant" for c in completions), completions[0]
    assert len(kwargs["answer"]) == len(completions) and len(kwargs["completion_ids"]) == len(completions)
    contents = [c[0]["content"] for c in completions]
    return [-abs(3 - len(text.split())) for text in contents]


def reward_words(completions, **kwargs):
    """Text prompts: completions are plain strings."""
    assert all(isinstance(c, str) for c in completions) and all(isinstance(p, str) for p in kwargs["prompts"])
    return [-abs(3 - len(c.split())) for c in completions]
'''


# ---- pairs: ties, margins, None, penalties -------------------------------------------------------------------


def test_ties_are_skipped_and_counted(online_config, make_model, tmp_path):
    # spreads 0, 0, 1, 2: the first two prompts tie (every sample 0); the others give sample 3 vs sample 0
    preftune.train(online_config(make_model(0), prompt_rows(4, [0, 0, 1, 2])), log=lambda *_: None)
    (r,) = train_records(tmp_path / "run")
    assert r["rollout/skipped_fraction"] == 0.5 and r["rollout/pairs"] == 2
    assert r["reward/chosen"] == pytest.approx((3 * 1 + 3 * 2) / 2)  # best = sample 3: 3s, over the 2 pairs
    assert r["reward/rejected"] == 0.0  # worst = sample 0
    # every sample is scored, tied or not: mean over 16 rewards s·j = (0+0+6+12)/16
    assert r["reward/mean"] == pytest.approx(18 / 16)
    assert math.isfinite(r["loss"])


def test_min_margin_skips_small_spreads(online_config, make_model, tmp_path):
    # best - worst = 3s: 0, 0.6, 3, 6. min_margin 1.0 keeps 3 and 6; 0.5 would also keep 0.6
    for margin, kept, chosen in ((1.0, 2, (3 + 6) / 2), (0.5, 3, (0.6 + 3 + 6) / 3)):
        cfg = online_config(make_model(0), prompt_rows(4, [0, 0.2, 1, 2]), reward={"min_margin": margin},
                     training={"output_dir": str(tmp_path / f"m{margin}")})
        preftune.train(cfg, log=lambda *_: None)
        (r,) = train_records(tmp_path / f"m{margin}")
        assert r["rollout/pairs"] == kept and r["rollout/skipped_fraction"] == 1 - kept / 4
        assert r["reward/chosen"] == pytest.approx(chosen)


def test_none_scores_are_masked(online_config, make_model, tmp_path):
    # sample 0 has no score: the worst SCORED sample is sample 1 (reward s·1), not a None read as 0
    preftune.train(online_config(make_model(0), prompt_rows(4, 2.0), fn=("none_first",)), log=lambda *_: None)
    (r,) = train_records(tmp_path / "run")
    assert r["rollout/pairs"] == 4
    assert r["reward/rejected"] == pytest.approx(2.0) and r["reward/chosen"] == pytest.approx(6.0)
    assert r["reward/none_first/mean"] == pytest.approx((2 + 4 + 6) / 3)  # over the 12 scored samples


def test_weighted_functions_sum_over_the_scored_ones(online_config, make_model, tmp_path):
    # none_first (weight 1) and by_column (weight 2), s = 1: sample j scores j + 2j = 3j, except sample 0,
    # scored by by_column alone: 2·0 = 0. Rewards 0, 3, 6, 9.
    cfg = online_config(make_model(0), prompt_rows(4, 1.0), fn=("none_first", "by_column"), reward={"weights": [1.0, 2.0]})
    preftune.train(cfg, log=lambda *_: None)
    (r,) = train_records(tmp_path / "run")
    assert r["reward/mean"] == pytest.approx((0 + 3 + 6 + 9) / 4)
    assert (r["reward/chosen"], r["reward/rejected"]) == (pytest.approx(9.0), pytest.approx(0.0))
    assert r["reward/by_column/mean"] == pytest.approx(1.5) and r["reward/none_first/mean"] == pytest.approx(2.0)


def test_constant_reward_warns_once_and_never_updates(online_config, make_model, tmp_path, quiet_log):
    model = make_model(0)
    before = copy.deepcopy(model.state_dict())
    cfg = online_config(model, prompt_rows(8), fn=("constant",), training={"max_steps": 3, "save_model": True})
    summary = preftune.train(cfg, log=quiet_log)
    warnings = [line for line in quiet_log if "no learning signal" in line]
    assert len(warnings) == 1, quiet_log.text()  # once, not at every step
    assert "all rewards equal within each prompt's samples" in warnings[0]
    assert summary["no_signal_steps"] == 3
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed without a learning signal"
    records = train_records(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["rollout/pairs"] == 0 and r["rollout/skipped_fraction"] == 1.0 for r in records)
    assert (tmp_path / "run" / "final").is_dir()  # the run finished normally


def test_missing_eos_penalty(online_config, toy_sft, tmp_path):
    # The SFT model answers 3-5 words then EOS; with 5 new tokens some samples stop and some are cut.
    # reward 0 for all, minus 1 for a completion without EOS: stopped samples beat cut ones.
    cfg = online_config(str(toy_sft.model_dir), prompt_rows(8), fn=("zero",), reward={"missing_eos_penalty": 1.0},
                 rollout={"max_new_tokens": 5}, training={"per_device_batch_size": 8})
    run = build_run(to_config(cfg), None, lambda *_: None)
    out = run.source.rollouts.sample(list(range(8)), list(range(8)))
    cut = torch.tensor([[c.finish_reason == "length" for c in g] for g in out["completions"]])  # (P, N)
    assert 0 < cut.sum() < cut.numel(), "the test needs both stopped and cut samples"
    assert torch.equal(torch.as_tensor(out["rewards"]), -1.0 * cut.double())
    totals = run_steps(run)
    r = totals["last_train"]
    assert r["reward/chosen"] == 0.0 and r["reward/rejected"] == -1.0
    assert 0 < r["rollout/eos_rate"] < 1


# ---- reward functions: errors name the function and the row ---------------------------------------------------


def test_reward_function_that_raises_names_function_and_row(online_config, make_model):
    rows = prompt_rows(4, explode=[False, False, True, False])
    with pytest.raises(RewardError) as err:
        preftune.train(online_config(make_model(0), rows, fn=("boom",)), log=lambda *_: None)
    message = str(err.value)
    assert "reward function boom raised ValueError: cannot score this one" in message
    assert f"(prompt {rows[2]['prompt']!r}" in message  # the exploding prompt's row is named
    row = int(message.split(" on row ")[1].split()[0])
    assert row % 4 == 0  # the first of that prompt's 4 completions


@pytest.mark.parametrize("fn, expected", [
    ("short", "reward function short returned 0 values for 1 completions"),
    ("text", "reward function text returned 'good' (str) for row 0"),
])
def test_wrong_count_or_non_number_fails_before_sampling(online_config, make_model, fn, expected):
    with pytest.raises(RewardError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        preftune.train(online_config(make_model(0), prompt_rows(4), fn=(fn,)), log=lambda *_: None)


def test_reward_function_results_are_checked_per_call():
    f = RewardFunction("f", lambda prompts, completions, **_: [1, None, 2.5])
    assert f(["p"] * 3, ["a", "b", "c"], {})[1] != f(["p"] * 3, ["a", "b", "c"], {})[1]  # NaN for None
    assert f(["p"] * 3, ["a", "b", "c"], {})[::2] == [1.0, 2.5]
    with pytest.raises(RewardError, match="returned 3 values for 2 completions"):
        f(["p"] * 2, ["a", "b"], {})
    g = RewardFunction("g", lambda prompts, completions, **_: [float("nan"), "x"])
    with pytest.raises(RewardError, match=r"returned 'x' \(str\) for row 1 \(prompt 'q'\)"):
        g(["p", "q"], ["a", "b"], {})


def test_trl_reward_file_works_unchanged_text_and_conversational(online_config, make_model, tmp_path):
    path = tmp_path / "trl_rewards.py"
    path.write_text(TRL_REWARD)
    rows = [{"prompt": [{"role": "user", "content": it.prompt}], "answer": " ".join(it.words)}
            for it in toy.split_items(0, 8, 0)[0]]
    cfg = online_config(make_model(0), rows, training={"max_steps": 2})
    cfg["reward"] = {"functions": [f"{path}:reward"]}
    preftune.train(cfg, log=lambda *_: None)
    records = train_records(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["reward/reward/mean"] <= 0 and "reward/reward/std" in r for r in records)
    assert all(r["rollout/pairs"] > 0 for r in records)  # the scores varied: the run trained on them

    text = online_config(make_model(0), prompt_rows(8), training={"output_dir": str(tmp_path / "text")})
    text["reward"] = {"functions": [f"{path}:reward_words"]}
    preftune.train(text, log=lambda *_: None)
    (r,) = train_records(tmp_path / "text")
    assert r["reward/reward_words/mean"] <= 0 and r["rollout/pairs"] > 0


# ---- judges as reward functions -------------------------------------------------------------------------------


def test_toy_verifier_judge_as_reward(online_config, toy_sft, tmp_path):
    prompts = [{"prompt": it.prompt} for it in toy_sft.items[:8]]
    cfg = online_config(str(toy_sft.model_dir), prompts, fn=(), reward={"judge": "toy-verifier"},
                 rollout={"max_new_tokens": 16}, training={"per_device_batch_size": 8, "max_steps": 1},
                 data={"eval": [{"prompt": it.prompt} for it in toy_sft.held_out[:8]]}, monitor={"num_prompts": 2})
    preftune.train(cfg, log=lambda *_: None)
    (r,) = train_records(tmp_path / "run")
    assert "reward/judge:toy-verifier/mean" in r
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    rollout = [row for row in rows if row.get("kind") == "rollout"]
    assert len(rollout) == r["rollout/pairs"] > 0  # the final evaluation wrote the last step's pairs
    for row in rollout:  # the verifier's score: 1 for an exact echo, 0 otherwise
        assert toy.verify(row["prompt"], row["chosen"]) and not toy.verify(row["prompt"], row["rejected"])
        assert max(row["rewards"]) == 1.0 and min(row["rewards"]) == 0.0


def test_pairwise_only_judge_ranks_by_wins(online_config, make_model, tmp_path):
    from preftune.judges.base import Judge, Verdict
    from preftune.judges.registry import build_judge, register_judge, registered_judge_types

    calls = []

    class Fewer(Judge):
        """Prefers the response with fewer distinct words; no score of its own."""

        def _judge_ordered(self, prompt, first, second):
            calls.append((first, second))
            a, b = len(set(first.split())), len(set(second.split()))
            return Verdict("A" if a < b else "B" if b < a else "tie", 1.0)

    if "test_fewer_words" not in registered_judge_types():
        register_judge("test_fewer_words", lambda name=None: Fewer(name))
    assert not build_judge({"type": "test_fewer_words"}).supports_score
    cfg = online_config(make_model(0), prompt_rows(4), fn=(), reward={"judge": {"type": "test_fewer_words"}},
                 data={"eval": [{"prompt": "repeat : cat dog"}, {"prompt": "say : owl bee"}]},
                 monitor={"num_prompts": 0})
    preftune.train(cfg, log=lambda *_: None)
    # the step: 4 prompts x 6 pairs of samples, each asked in both orders. The held-out greedy samples, one
    # per prompt, have nothing to be compared with (never with another prompt's): no score, no call.
    assert len(calls) == 4 * 6 * 2
    (e,) = train_records(tmp_path / "run", "eval")
    assert e["reward/mean"] is None
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    for row in (row for row in rows if row.get("kind") == "rollout"):
        assert sum(row["rewards"]) == 6  # one win per comparison, a tie split in halves
        assert len(set(row["chosen"].split())) < len(set(row["rejected"].split()))


def test_all_none_scores_give_no_pair_and_say_why(online_config, make_model, quiet_log, tmp_path):
    rows = prompt_rows(4)
    path = tmp_path / "only_first.py"  # one scored sample per prompt: nothing to compare it with
    path.write_text("def f(prompts, completions, **_):\n    return [1.0 if i % 4 == 0 else None "
                    "for i in range(len(completions))]\n")
    cfg = online_config(make_model(0), rows)
    cfg["reward"] = {"functions": [f"{path}:f"]}
    summary = preftune.train(cfg, log=quiet_log)
    assert summary["no_signal_steps"] == 1
    assert "no prompt has two scored samples" in quiet_log.text()


def test_judge_mode_pairwise_counts_wins_in_both_orders():
    from preftune.judges.spec import make_judge
    from preftune.rollout.scoring import judge_function

    verifier = make_judge("toy-verifier")  # scores; judge_mode pairwise compares its scores instead
    wins = judge_function(verifier, 4, "pairwise")
    p, q = "say : cat dog", "copy : owl bee fox"
    out = wins(prompts=[p] * 4 + [q], completions=["cat dog", "cat", "cat dog", "dog cat", "owl bee fox"])
    # prompt p: each right answer beats the 2 wrong ones and ties the other right one (0.5): 2.5; each wrong
    # answer ties the other wrong one: 0.5. 6 comparisons, 6 wins in all. q's lone sample: nothing to compare.
    assert out == [2.5, 0.5, 2.5, 0.5, None]
    assert judge_function(verifier, 4, "auto")(prompts=[p], completions=["cat dog"]) == [1.0]


def test_rollout_and_reward_come_together(online_config, make_model):
    cfg = online_config(make_model(0), prompt_rows(4))
    no_rollout = {k: v for k, v in cfg.items() if k != "rollout"}
    with pytest.raises(PreftuneError, match="reward: scores on-policy samples, but there is no `rollout:` section"):
        preftune.train(no_rollout, log=lambda *_: None)
    with pytest.raises(PreftuneError, match=r"an on-policy run \(a `rollout:` section\) needs `reward.functions`"):
        preftune.train({k: v for k, v in cfg.items() if k != "reward"}, log=lambda *_: None)
    from preftune.rollout.scoring import judge_function

    class PairwiseOnly:
        name, supports_score, supports_pairwise = "pairwise-only", False, True

    with pytest.raises(PreftuneError, match="judge_mode: score, but judge pairwise-only does not score single"):
        judge_function(PairwiseOnly(), 4, "score")


# ---- the step's loss: the mean over its pairs, however they fall into micro-batches -------------------------


@pytest.mark.parametrize("micro, accum", [(4, 2), (1, 8)])
def test_step_gradient_is_the_mean_over_pairs_whatever_the_micro_batching(online_config, make_model, tmp_path,
                                                                          monkeypatch, micro, accum):
    # 8 prompts, 3 of them ties: 5 pairs. One micro-batch of 8 prompts is the plain mean over the 5 pairs;
    # micro-batches of 4 prompts hold 3 + 2 pairs (a mean of micro-batch means would weigh them 1/6 and 1/4
    # instead of 1/5), of 1 prompt 8 micro-batches, 3 of them weight-0 padding.
    rows = prompt_rows(8, [0, 1, 0, 2, 1, 0, 3, 1])
    grads = {}

    def capture(key):
        real = torch.nn.utils.clip_grad_norm_

        def clip(params, max_norm, *args, **kwargs):
            params = list(params)
            grads.setdefault(key, [p.grad.detach().clone() for p in params])
            return real(params, max_norm, *args, **kwargs)

        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)

    for key, (m, a) in {"one": (8, 1), "split": (micro, accum)}.items():
        capture(key)
        cfg = online_config(make_model(0), rows, training={"per_device_batch_size": m, "gradient_accumulation_steps": a,
                                                    "output_dir": str(tmp_path / key)})
        preftune.train(cfg, log=lambda *_: None)
    (one,), (split,) = train_records(tmp_path / "one"), train_records(tmp_path / "split")
    assert one["rollout/pairs"] == split["rollout/pairs"] == 5
    assert split["loss"] == pytest.approx(one["loss"], abs=1e-6)  # the logged loss: mean over the same 5 pairs
    for a, b in zip(grads["one"], grads["split"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


# ---- metrics: metrics.jsonl, TensorBoard, report --------------------------------------------------------------

ROLLOUT_METRICS = ("reward/mean", "reward/std", "reward/by_column/mean", "reward/by_column/std", "reward/chosen",
                   "reward/rejected", "rollout/skipped_fraction", "rollout/pairs", "rollout/eos_rate",
                   "completions/mean_length", "completions/max_length", "rollout/tokens_per_second",
                   "time/generate_s", "time/score_s", "time/train_s")


def test_rollout_metrics_reach_metrics_tensorboard_and_report(online_config, make_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from preftune.report.html import write_report
    from preftune.report.plots import ROLLOUT_PANELS, plot_run

    cfg = online_config(make_model(0), prompt_rows(8, [0, 1, 2, 1, 0, 1, 1, 1]), training={"max_steps": 2},
                 data={"eval": prompt_rows(12)[8:]}, monitor={"num_prompts": 2})
    preftune.train(cfg, log=lambda *_: None)
    run_dir = tmp_path / "run"
    train = train_records(run_dir)
    for r in train:
        missing = [k for k in (*ROLLOUT_METRICS, "loss", "rewards/margins", "grad_norm") if k not in r]
        assert not missing, missing
        assert r["time/generate_s"] > 0 and r["time/train_s"] > 0
        assert 0 < r["completions/mean_length"] <= 6 and 0 <= r["rollout/eos_rate"] <= 1
    (ev,) = train_records(run_dir, "eval")
    assert {"reward/mean", "reward/by_column/mean", "completions/mean_length", "rollout/eos_rate"} <= set(ev)

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"train/{k}" for k in ROLLOUT_METRICS} <= tags
    assert "eval/reward/mean" in tags
    assert [e.value for e in events.Scalars("train/rollout/pairs")] == [r["rollout/pairs"] for r in train]

    drawn = {p.stem for p in plot_run(run_dir)}
    assert set(ROLLOUT_PANELS) <= drawn
    html = write_report(run_dir).read_text()
    assert "<h2>On-policy rollouts</h2>" in html and "reward/by_column/mean" in html
    assert "rollout/skipped_fraction" in html and "Time over the 2 logged steps: generate" in html
    rollout = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    rollout = [r for r in rollout if r.get("kind") == "rollout"]
    assert len(rollout) == train[-1]["rollout/pairs"]
    for row in rollout:
        assert f"<pre>{row['rejected']}</pre>" in html
    for panel in ROLLOUT_PANELS:
        assert f'alt="{panel}"' in html


# ---- the reference: live and frozen ---------------------------------------------------------------------------


def _logps(run, batch):
    with torch.no_grad():
        return run.logp_fn(batch)[0], run.reference_fn(batch)[0]


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}])
def test_reference_is_live_and_frozen(online_config, make_model, monkeypatch, lora):
    def no_precompute(*_, **__):
        raise AssertionError("an on-policy run precomputed reference log-probs")

    monkeypatch.setattr("preftune.trainer.build.reference_logps", no_precompute)
    initial = make_model(0)
    cfg = online_config(make_model(0), prompt_rows(8), training={"max_steps": 3, "learning_rate": 1e-2},
                 data={"eval": prompt_rows(10)[8:]}, monitor={"num_prompts": 2},
                 **({"lora": lora} if lora else {}))
    assert to_config(cfg).reference.precompute  # on by default, and still not used on-policy
    run = build_run(to_config(cfg), None, lambda *_: None)
    assert not run.source.static and run.reference_fn is not None
    batch = next(iter(run.source.micro_batches(0)))
    policy0, ref0 = _logps(run, batch)
    torch.testing.assert_close(policy0, ref0)  # before the first step the policy is the reference
    ref = run.monitor.kl_ref
    if lora:
        assert ref is run.policy  # the adapter-disabled policy: no second copy
    else:
        assert ref is not run.policy and not any(p.requires_grad for p in ref.parameters()) and not ref.training
    run_steps(run)
    policy1, ref1 = _logps(run, batch)
    assert torch.equal(ref1, ref0)  # frozen
    assert (policy1 - policy0).abs().max() > 1e-3  # the policy learned
    if not lora:
        for (name, a), b in zip(ref.state_dict().items(), initial.state_dict().values()):
            assert torch.equal(a, b), name


# ---- the monitor on an online run -------------------------------------------------------------------------------


def test_early_stopping_on_held_out_reward_keeps_the_best_model(online_config, make_model, tmp_path):
    # learning rate 0: the policy never changes, so eval/reward/mean (the default metric on-policy) never
    # improves after the first evaluation; with patience 2 the run stops at the third. KL to the frozen copy: 0.
    cfg = online_config(make_model(0), prompt_rows(8, [1, 2, 3, 4, 1, 2, 3, 4]),
                 training={"max_steps": 6, "learning_rate": 0.0, "eval_every": 1, "save_model": True},
                 data={"eval": prompt_rows(12)[8:]}, monitor={"num_prompts": 2, "patience": 2})
    summary = preftune.train(cfg, log=lambda *_: None)
    assert summary["steps"] == 3 and summary["stopped"].startswith("early stopping: eval/reward/mean")
    assert summary["best"]["step"] == 1 and summary["best"]["metric"] == "eval/reward/mean"
    assert json.loads((tmp_path / "run" / "best" / "best.json").read_text())["step"] == 1
    monitors = train_records(tmp_path / "run", "monitor")
    assert [m["step"] for m in monitors] == [1, 2, 3] and all(m["kl/k3_seq"] == 0.0 for m in monitors)
    events = [r["name"] for r in train_records(tmp_path / "run", "event")]
    assert events == ["best", "early_stopping"]


def test_max_kl_alarm_stops_an_online_run(online_config, make_model, tmp_path):
    cfg = online_config(make_model(0), prompt_rows(8, [1, 2, 3, 4, 1, 2, 3, 4]),
                 training={"max_steps": 6, "learning_rate": 3e-2, "eval_every": 2},
                 data={"eval": prompt_rows(12)[8:]}, monitor={"num_prompts": 4, "max_kl": 1e-4})
    summary = preftune.train(cfg, log=lambda *_: None)
    assert summary["stopped"].startswith("max_kl") and summary["steps"] == 2
    (alarm,) = train_records(tmp_path / "run", "alarm")
    assert alarm["name"] == "max_kl" and alarm["step"] == 2
    (monitor,) = train_records(tmp_path / "run", "monitor")
    assert monitor["kl/k3_seq"] > 1e-4


# ---- the demo -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_online_quickstart_meets_targets(tmp_path, toy_sft):
    from preftune.cli import QUICKSTARTS
    from preftune.toy.quickstart import ONLINE, ONLINE_TARGETS, run_online_dpo_quickstart

    assert QUICKSTARTS["online_dpo"] == "preftune.toy.quickstart:run_online_dpo_quickstart"
    report = run_online_dpo_quickstart(tmp_path, seed=0, log=lambda *_: None, sft_dir=toy_sft.run_dir)
    before, after = report["before"]["generation_accuracy"], report["after"]["generation_accuracy"]
    assert 0.25 <= before <= 0.75  # the SFT model answers plainly on about half of the held-out prompts
    assert after >= ONLINE_TARGETS["generation_accuracy"] == 0.90
    assert after - before >= ONLINE_TARGETS["gain"] == 0.25
    assert report["passed"] and report["runs"]["online_dpo"]["steps"] == ONLINE["steps"]
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["after"]["generation_accuracy"] == after and on_disk["method"] == "online_dpo"
    train = train_records(tmp_path)
    assert len(train) == ONLINE["steps"] // 5 and all("rollout/skipped_fraction" in r for r in train)
    assert "On-policy rollouts" in (tmp_path / "report.html").read_text()
    assert (tmp_path / "plots" / "rewards.png").stat().st_size > 1000


def test_quickstart_lists_online_dpo_among_its_methods(capsys, tmp_path):
    from preftune.cli import main

    with pytest.raises(SystemExit):
        main(["quickstart", "--method", "ppo_maybe", "--out", str(tmp_path)])
    assert "online_dpo" in capsys.readouterr().err  # argparse's "invalid choice ... (choose from ...)"


@pytest.mark.parametrize("loss", [{"name": "ipo", "beta": 0.1}, {"name": "simpo", "beta": 2.0, "gamma": 0.5}])
def test_other_paired_losses_train_online(online_config, make_model, tmp_path, loss):
    model = make_model(0)
    before = copy.deepcopy(model.state_dict())
    preftune.train(online_config(model, prompt_rows(4), loss=loss), log=lambda *_: None)
    (r,) = train_records(tmp_path / "run")
    assert r["rollout/pairs"] == 4 and math.isfinite(r["loss"])
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_examples_parse_and_their_reward_functions_work(monkeypatch):
    from preftune.rollout.scoring import build_reward_functions

    root = Path(__file__).resolve().parents[1]
    for name in ("online_dpo_verifiable", "online_dpo_reward_model", "online_dpo_llm_judge"):
        cfg = to_config(str(root / "examples" / f"{name}.yaml"))
        assert cfg.rollout is not None and cfg.reward is not None, name
    cfg = to_config(str(root / "examples" / "online_dpo_verifiable.yaml"))
    monkeypatch.chdir(root)  # the example's paths are relative to the repository root
    functions = build_reward_functions(cfg.reward, cfg.rollout.num_generations)
    chat = [{"role": "user", "content": "2+2?"}]
    completions = [[{"role": "assistant", "content": c}] for c in ("So 4.\nAnswer: 4", "it is 5", "4,000")]
    scores = [f([chat] * 3, completions, {"answer": ["4", "4", None]}) for f in functions]
    assert scores[0][:2] == [1.0, 0.0] and math.isnan(scores[0][2])  # correct_answer; None without an answer
    assert scores[1] == [0.2, 0.0, 0.0]  # states_answer: the format reward
