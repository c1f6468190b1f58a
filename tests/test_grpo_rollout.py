"""GRPO through the trainer, the rollout: masked truncation, the missing-EOS and soft overlong penalties, dynamic
sampling, steps without a learning signal, the metrics (completions table, TensorBoard, the report), bad
reward functions and group settings refused before the first rollout, and the quickstart.

Most runs use a random tiny model and the deterministic reward functions of ``tests/grpo_rewards.py``; the
quickstart starts from the session's SFT model (``toy_sft``). Plots are skipped except in the report test.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from grpo_helpers import REWARDS, built, grpo_config, prompt_rows, records

import preftune
from preftune.config import to_config
from preftune.errors import ConfigError, PreftuneError
from preftune.rewards import soft_overlong_penalty

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    monkeypatch.setattr("preftune.trainer.loop._plots", lambda run_dir, say: None)


@pytest.fixture
def grpo(toy_tok, tmp_path):
    return grpo_config(toy_tok, tmp_path)


# ---- rollout options -------------------------------------------------------------------------------------------


def _truncated(rollout: dict, stop: set[int]) -> torch.Tensor:
    """(P, G) whether each completion of a rollout ran out of tokens (no stop token at its end)."""
    return torch.tensor([[not c or c[-1] not in stop for c in g] for g in rollout["completions"]])


@pytest.mark.parametrize("mask", [False, True])
def test_mask_truncated_completions(grpo, make_model, toy_tok, mask):
    # 3 new tokens at most: a random model ends few samples with EOS, so most are truncated.
    run = built(grpo(make_model(seed=3), prompt_rows(8), rollout={"max_new_tokens": 3,
                                                                 "mask_truncated_completions": mask}))
    batch = next(iter(run.source.micro_batches(0)))
    truncated = _truncated(run.source._rollout, {toy_tok.eos_token_id})  # (P, G)
    assert 0 < truncated.float().mean() < 1
    want = (~truncated).float() if mask else torch.ones_like(truncated, dtype=torch.float)
    assert batch.seq_mask.tolist() == want.T.reshape(-1).tolist()  # sequence u + k·P
    assert batch.step_sequences == want.sum()
    # masked sequences carry no loss-bearing token, and the token normalizer counts only the kept ones
    kept_tokens = sum(len(c) for g, us in zip(run.source._rollout["completions"], want.tolist())
                      for c, u in zip(g, us) if u)
    assert batch.step_tokens == kept_tokens and batch.token_mask().sum() == kept_tokens


def test_missing_eos_penalty(grpo, make_model):
    run = built(grpo(make_model(seed=3), prompt_rows(8), fn=("constant",), rollout={"max_new_tokens": 3},
                     reward={"missing_eos_penalty": 0.25}))
    out = run.source.rollouts.sample([0, 1, 2, 3], [1, 2, 3, 4])
    truncated = np.array([[c.finish_reason == "length" for c in g] for g in out["completions"]])
    assert 0 < truncated.mean() < 1
    assert out["rewards"].tolist() == np.where(truncated, 0.75, 1.0).tolist()  # 1 − 0.25 where cut


def test_soft_overlong_penalty_by_hand():
    # L_max 10, L_cache 4: no penalty up to 6 tokens, then (6 − |y|)/4: 7 → −0.25, 8 → −0.5, 10 → −1; beyond → −1
    got = soft_overlong_penalty([[5, 6, 7], [8, 10, 12]], max_length=10, buffer=4)
    assert got.tolist() == [[0.0, 0.0, -0.25], [-0.5, -1.0, -1.0]]
    half = soft_overlong_penalty([7, 9], max_length=10, buffer=4, factor=0.5)  # 0.5·(−0.25), 0.5·(−0.75)
    assert half.tolist() == [-0.125, -0.375]
    with pytest.raises(ValueError, match="buffer"):
        soft_overlong_penalty([1], max_length=4, buffer=5)


def test_soft_overlong_penalty_in_the_rollout(grpo, make_model):
    run = built(grpo(make_model(seed=3), prompt_rows(8), fn=("constant",), rollout={"max_new_tokens": 6},
                     reward={"overlong_buffer": 4, "overlong_penalty": 0.5}))
    out = run.source.rollouts.sample([0, 1, 2, 3], [1, 2, 3, 4])
    lengths = np.array([[len(c.ids) for c in g] for g in out["completions"]])  # EOS counted
    want = 1.0 + soft_overlong_penalty(lengths, max_length=6, buffer=4, factor=0.5)
    assert len(set(lengths.ravel().tolist())) > 1
    np.testing.assert_allclose(out["rewards"], want)
    with pytest.raises(ConfigError, match="reward.overlong_buffer: 8 exceeds rollout.max_new_tokens 6"):
        to_config(grpo("m", prompt_rows(8), reward={"overlong_buffer": 8}))


def test_dynamic_sampling_refills_zero_spread_groups(grpo, make_model, tmp_path):
    # half_flat: 'repeat' / 'echo' prompts score a constant (zero spread), 'copy' / 'say' prompts vary.
    rows = prompt_rows(64)
    flat = [r["prompt"].split()[0] in ("repeat", "echo") for r in rows]
    plain = built(grpo(make_model(seed=3), rows, fn=("half_flat",),
                       training={"per_device_batch_size": 8, "output_dir": str(tmp_path / "plain")}))
    list(plain.source.micro_batches(0))
    before = plain.source._metrics["rollout/frac_reward_zero_std"]
    assert before > 0
    dyn = built(grpo(make_model(seed=3), rows, fn=("half_flat",),
                     training={"per_device_batch_size": 8, "output_dir": str(tmp_path / "dynamic")},
                     rollout={"dynamic_sampling": True, "max_resample_rounds": 8}))
    list(dyn.source.micro_batches(0))
    m, rollout = dyn.source._metrics, dyn.source._rollout
    assert m["rollout/frac_reward_zero_std"] == before  # as first sampled: the same draw
    assert m["rollout/refilled_groups"] >= before * 8 and m["rollout/frac_reward_zero_std_trained"] == 0
    assert not any(flat[i] for i in rollout["indices"])  # every flat prompt was replaced
    assert len(rollout["completions"]) == 8 and all(len(g) == 4 for g in rollout["completions"])
    # capped: 0 extra rounds keeps the flat groups (their advantages are 0)
    capped = built(grpo(make_model(seed=3), rows, fn=("half_flat",),
                        training={"per_device_batch_size": 8, "output_dir": str(tmp_path / "capped")},
                        rollout={"dynamic_sampling": True, "max_resample_rounds": 0}))
    list(capped.source.micro_batches(0))
    assert capped.source._metrics["rollout/frac_reward_zero_std_trained"] == before


def test_all_rewards_equal_is_said_and_nothing_updates(grpo, make_model, quiet_log, tmp_path):
    model = make_model(seed=3)
    start = copy.deepcopy(model.state_dict())
    preftune.train(grpo(model, prompt_rows(8), fn=("constant",), training={"max_steps": 2}), log=quiet_log)
    assert "all rewards equal: no learning signal" in quiet_log.text()
    for name, value in model.state_dict().items():
        assert torch.equal(value, start[name]), name
    rec = records(tmp_path / "run")
    assert [r["step"] for r in rec] == [1, 2]
    assert all(r["rollout/frac_reward_zero_std"] == 1.0 and "loss" not in r for r in rec)  # no "loss 0" logged


# ---- what a run logs -------------------------------------------------------------------------------------------


def test_metrics_completions_table_tensorboard_and_report(grpo, make_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from preftune.report.html import write_report

    rows = prompt_rows(24)
    cfg = grpo(make_model(seed=3), rows[:16], loss={"beta": 0.04, "epsilon_high": 0.28}, rollout={"max_new_tokens": 5},
               training={"max_steps": 2, "eval_every": 1, "learning_rate": 2e-2}, data={"eval": rows[16:]},
               monitor={"num_prompts": 2})
    preftune.train(cfg, log=lambda *_: None)
    run_dir = tmp_path / "run"
    last = records(run_dir)[-1]
    for key in ("loss", "entropy", "kl", "clip_low_frac", "clip_high_frac", "ratio_mean", "completion_length",
                "completions/mean_length", "completions/max_length", "rollout/truncated_fraction",
                "rollout/eos_rate", "rollout/frac_reward_zero_std", "reward/mean", "reward/std",
                "reward/varied/mean", "reward/varied/std", "advantages/std", "time/generate_s", "time/score_s",
                "time/train_s", "grad_norm"):
        assert key in last, key
    assert 0 < last["entropy"] <= math.log(len(cfg["tokenizer"])) + 1e-6
    assert last["rollout/truncated_fraction"] + last["rollout/eos_rate"] == pytest.approx(1.0)
    assert "reward/mean" in records(run_dir, "eval")[-1]  # held-out greedy samples, scored
    table = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    table = [r for r in table if r.get("kind") == "rollout"]
    assert {r["step"] for r in table} == {1, 2} and len([r for r in table if r["step"] == 2]) == 16  # 4 groups x 4
    row = table[-1]
    assert {"prompt", "completion", "reward", "scores", "advantage", "truncated"} <= set(row)
    group = [r for r in table if r["step"] == 2 and r["group"] == row["group"]]
    rewards = np.array([r["reward"] for r in group])
    want = (rewards - rewards.mean()) / (rewards.std(ddof=1) + 1e-4) if rewards.std() > 0 else 0 * rewards
    np.testing.assert_allclose([r["advantage"] for r in group], want, rtol=1e-5, atol=1e-6)  # GRPO's advantage
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert {"train/entropy", "train/rollout/frac_reward_zero_std", "train/clip_low_frac"} <= set(events.Tags()["scalars"])
    assert any(t.startswith("rollout") for t in events.Tags()["tensors"])  # the completions table (text)
    html = write_report(run_dir).read_text()
    assert "On-policy rollouts" in html and "frac_reward_zero_std" in html and "entropy" in html
    assert row["completion"].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in html


# ---- bad input: one clear line, before the first rollout ------------------------------------------------------


@pytest.mark.parametrize("ref, message", [
    ("no/such/rewards.py:fn", "file no/such/rewards.py not found"),
    (f"{REWARDS}:missing", "has no function 'missing'"),
    ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
    (f"{REWARDS}:wrong_count", "reward function wrong_count returned 2 values for 1 completions"),
    (f"{REWARDS}:not_a_number", "reward function not_a_number returned 'high' (str) for row 0"),
    (f"{REWARDS}:always_raises", "reward function always_raises raised RuntimeError: scorer offline on row 0"),
])
def test_a_broken_reward_function_fails_before_any_generation(grpo, make_model, monkeypatch, ref, message):
    monkeypatch.setattr("preftune.rollout.online.generate", lambda *a, **k: pytest.fail("generated first"))
    cfg = grpo(make_model(seed=3), prompt_rows(8))
    cfg["reward"]["functions"] = [ref]
    with pytest.raises(PreftuneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        preftune.train(cfg, log=lambda *_: None)


def test_a_reward_function_failing_on_real_samples_names_the_row(grpo, make_model):
    with pytest.raises(PreftuneError, match=r"reward function raises_on_long raised ValueError: cannot score long "
                                            r"answers on row \d+ \(prompt '.+', completion '.+'\)"):
        preftune.train(grpo(make_model(seed=3), prompt_rows(8), fn=("raises_on_long",)), log=lambda *_: None)


@pytest.mark.parametrize("change, message", [
    ({"rollout": {"num_generations": 1}}, "rollout.num_generations: 1 makes groups of one completion"),
    ({"rollout": None}, "loss grpo learns from the policy's own samples: add a `rollout:` section"),
    ({"loss": {"name": "dpo", "beta": 0.1}, "rollout": {"num_iterations": 2}},
     "rollout.num_iterations: 2 is a GRPO option"),
])
def test_group_settings_are_refused_when_the_config_is_read(grpo, change, message):
    cfg = grpo("m", prompt_rows(8))
    for key, value in change.items():
        cfg[key] = value if value is None or key == "loss" else {**cfg[key], **value}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        to_config(cfg)


# ---- the quickstart ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_policy_gradient_quickstart_meets_targets(tmp_path, toy_sft, method):
    from preftune.cli import QUICKSTARTS
    from preftune.toy import quickstart_grpo as pq

    assert QUICKSTARTS[method] == f"preftune.toy.quickstart_grpo:run_{method}_quickstart"
    run = {"grpo": pq.run_grpo_quickstart, "rloo": pq.run_rloo_quickstart}[method]
    report = run(tmp_path, seed=0, log=lambda *_: None, sft_dir=toy_sft.run_dir)
    before, after = report["before"]["generation_accuracy"], report["after"]["generation_accuracy"]
    print(f"{method}: generation accuracy {before:.3f} -> {after:.3f}, "
          f"{report['runs'][method]['train_runtime_s']:.0f}s of training")
    assert after >= pq.TARGETS["generation_accuracy"] == 0.90
    assert after - before >= pq.TARGETS["gain"] == 0.25
    assert report["passed"] and report["method"] == method
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["after"]["generation_accuracy"] == after and on_disk["config"][method]["rollout"][
        "advantage_estimator"] == method
    train = records(tmp_path)
    assert train[-1]["reward/mean"] > train[0]["reward/mean"]
    assert any(r.get("kind") == "rollout" for r in map(json.loads, (tmp_path / "samples.jsonl").read_text()
                                                       .splitlines()))
