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
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import preftune
from preftune import toy
from preftune.config import to_config
from preftune.errors import PreftuneError
from preftune.rollout.scoring import RewardError, RewardFunction
from preftune.runlog import read_metrics
from preftune.trainer.build import build_run
from preftune.trainer.loop import finish, run_steps

pytestmark = pytest.mark.usefixtures("one_thread")

REWARDS = '''
import math


def by_column(prompts, completions, spread, n=4, **_):
    """Sample j of a prompt scores spread * j (the samples of a prompt are consecutive)."""
    return [float(s) * (i % n) for i, s in enumerate(spread)]


def none_first(prompts, completions, spread, n=4, **_):
    """by_column, but no score (None) for sample 0 of every prompt."""
    return [None if i % n == 0 else float(s) * (i % n) for i, s in enumerate(spread)]


def constant(prompts, completions, **_):
    return [1.0] * len(completions)


def zero(prompts, completions, **_):
    return [0.0] * len(completions)


def boom(prompts, completions, explode, **_):
    for e in explode:
        if e:
            raise ValueError("cannot score this one")
    return [0.0] * len(completions)


def short(prompts, completions, **_):
    return [1.0] * (len(completions) - 1)


def text(prompts, completions, **_):
    return ["good"] * len(completions)


def overlap(prompts, completions, **_):
    """Words of the completion that occur in the prompt: content-dependent, so a resumed run that sampled
    differently would score differently."""
    return [float(sum(w in p.split() for w in c.split())) for p, c in zip(prompts, completions)]
'''

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
'''


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    monkeypatch.setattr("preftune.trainer.loop._plots", lambda run_dir, say: None)


@pytest.fixture(scope="module")
def rewards_py(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rewards") / "my_rewards.py"
    path.write_text(REWARDS)
    return path


def prompt_rows(n: int, spread=1.0, **columns) -> list[dict]:
    """n toy prompts with a ``spread`` column (a number for all, or one per row) and other columns."""
    items = toy.split_items(0, n, 0)[0]
    spreads = spread if isinstance(spread, list) else [spread] * n
    return [{"prompt": it.prompt, "spread": s, **{k: v[i] for k, v in columns.items()}}
            for i, (it, s) in enumerate(zip(items, spreads))]


@pytest.fixture
def online(toy_tok, tmp_path, rewards_py):
    """Factory: an online DPO config dict; ``fn`` names reward functions of REWARDS; sections merge in."""

    def make(model, train, *, fn=("by_column",), eval=None, reward=None, rollout=None, training=None, **sections):
        cfg = {
            "model": model, "tokenizer": toy_tok, "data": {"train": train, "eval": eval},
            "loss": {"name": "dpo", "beta": 0.1},
            "rollout": {"num_generations": 4, "max_new_tokens": 6, **(rollout or {})},
            "reward": {"functions": [f"{rewards_py}:{f}" for f in fn], **(reward or {})},
            "training": {"output_dir": str(tmp_path / "run"), "learning_rate": 1e-3, "per_device_batch_size": 4,
                         "max_steps": 1, "max_length": 64, "progress_bar": False, "save_model": False,
                         **(training or {})},
        }
        for key, value in sections.items():
            cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
        return cfg

    return make


def train_records(run_dir: Path, split: str = "train") -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["split"] == split]


# ---- pairs: ties, margins, None, penalties -------------------------------------------------------------------


def test_ties_are_skipped_and_counted(online, make_model, tmp_path):
    # spreads 0, 0, 1, 2: the first two prompts tie (every sample 0); the others give sample 3 vs sample 0
    preftune.train(online(make_model(0), prompt_rows(4, [0, 0, 1, 2])), log=lambda *_: None)
    (r,) = train_records(tmp_path / "run")
    assert r["rollout/skipped_fraction"] == 0.5 and r["rollout/pairs"] == 2
    assert r["reward/chosen"] == pytest.approx((3 * 1 + 3 * 2) / 2)  # best = sample 3: 3s, over the 2 pairs
    assert r["reward/rejected"] == 0.0  # worst = sample 0
    # every sample is scored, tied or not: mean over 16 rewards s·j = (0+0+6+12)/16
    assert r["reward/mean"] == pytest.approx(18 / 16)
    assert math.isfinite(r["loss"])


def test_min_margin_skips_small_spreads(online, make_model, tmp_path):
    # best - worst = 3s: 0, 0.6, 3, 6. min_margin 1.0 keeps 3 and 6; 0.5 would also keep 0.6
    for margin, kept, chosen in ((1.0, 2, (3 + 6) / 2), (0.5, 3, (0.6 + 3 + 6) / 3)):
        cfg = online(make_model(0), prompt_rows(4, [0, 0.2, 1, 2]), reward={"min_margin": margin},
                     training={"output_dir": str(tmp_path / f"m{margin}")})
        preftune.train(cfg, log=lambda *_: None)
        (r,) = train_records(tmp_path / f"m{margin}")
        assert r["rollout/pairs"] == kept and r["rollout/skipped_fraction"] == 1 - kept / 4
        assert r["reward/chosen"] == pytest.approx(chosen)


def test_none_scores_are_masked(online, make_model, tmp_path):
    # sample 0 has no score: the worst SCORED sample is sample 1 (reward s·1), not a None read as 0
    preftune.train(online(make_model(0), prompt_rows(4, 2.0), fn=("none_first",)), log=lambda *_: None)
    (r,) = train_records(tmp_path / "run")
    assert r["rollout/pairs"] == 4
    assert r["reward/rejected"] == pytest.approx(2.0) and r["reward/chosen"] == pytest.approx(6.0)
    assert r["reward/none_first/mean"] == pytest.approx((2 + 4 + 6) / 3)  # over the 12 scored samples


def test_weighted_functions_sum_over_the_scored_ones(online, make_model, tmp_path):
    # none_first (weight 1) and by_column (weight 2), s = 1: sample j scores j + 2j = 3j, except sample 0,
    # scored by by_column alone: 2·0 = 0. Rewards 0, 3, 6, 9.
    cfg = online(make_model(0), prompt_rows(4, 1.0), fn=("none_first", "by_column"), reward={"weights": [1.0, 2.0]})
    preftune.train(cfg, log=lambda *_: None)
    (r,) = train_records(tmp_path / "run")
    assert r["reward/mean"] == pytest.approx((0 + 3 + 6 + 9) / 4)
    assert (r["reward/chosen"], r["reward/rejected"]) == (pytest.approx(9.0), pytest.approx(0.0))
    assert r["reward/by_column/mean"] == pytest.approx(1.5) and r["reward/none_first/mean"] == pytest.approx(2.0)


def test_constant_reward_warns_once_and_never_updates(online, make_model, tmp_path, quiet_log):
    model = make_model(0)
    before = copy.deepcopy(model.state_dict())
    cfg = online(model, prompt_rows(8), fn=("constant",), training={"max_steps": 3, "save_model": True})
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


def test_missing_eos_penalty(online, toy_sft, tmp_path):
    # The SFT model answers 3-5 words then EOS; with 5 new tokens some samples stop and some are cut.
    # reward 0 for all, minus 1 for a completion without EOS: stopped samples beat cut ones.
    cfg = online(str(toy_sft.model_dir), prompt_rows(8), fn=("zero",), reward={"missing_eos_penalty": 1.0},
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


def test_reward_function_that_raises_names_function_and_row(online, make_model):
    rows = prompt_rows(4, explode=[False, False, True, False])
    with pytest.raises(RewardError) as err:
        preftune.train(online(make_model(0), rows, fn=("boom",)), log=lambda *_: None)
    message = str(err.value)
    assert "reward function boom raised ValueError: cannot score this one" in message
    assert f"(prompt {rows[2]['prompt']!r}" in message  # the exploding prompt's row is named
    row = int(message.split(" on row ")[1].split()[0])
    assert row % 4 == 0  # the first of that prompt's 4 completions


@pytest.mark.parametrize("fn, expected", [
    ("short", "reward function short returned 0 values for 1 completions"),
    ("text", "reward function text returned 'good' (str) for row 0"),
])
def test_wrong_count_or_non_number_fails_before_sampling(online, make_model, fn, expected):
    with pytest.raises(RewardError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        preftune.train(online(make_model(0), prompt_rows(4), fn=(fn,)), log=lambda *_: None)


def test_reward_function_results_are_checked_per_call():
    f = RewardFunction("f", lambda prompts, completions, **_: [1, None, 2.5])
    assert f(["p"] * 3, ["a", "b", "c"], {})[1] != f(["p"] * 3, ["a", "b", "c"], {})[1]  # NaN for None
    assert f(["p"] * 3, ["a", "b", "c"], {})[::2] == [1.0, 2.5]
    with pytest.raises(RewardError, match="returned 3 values for 2 completions"):
        f(["p"] * 2, ["a", "b"], {})
    g = RewardFunction("g", lambda prompts, completions, **_: [float("nan"), "x"])
    with pytest.raises(RewardError, match=r"returned 'x' \(str\) for row 1 \(prompt 'q'\)"):
        g(["p", "q"], ["a", "b"], {})


def test_trl_reward_file_with_conversational_prompts(online, make_model, tmp_path):
    path = tmp_path / "trl_rewards.py"
    path.write_text(TRL_REWARD)
    rows = [{"prompt": [{"role": "user", "content": it.prompt}], "answer": " ".join(it.words)}
            for it in toy.split_items(0, 8, 0)[0]]
    cfg = online(make_model(0), rows, training={"max_steps": 2})
    cfg["reward"] = {"functions": [f"{path}:reward"]}
    preftune.train(cfg, log=lambda *_: None)
    records = train_records(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["reward/reward/mean"] <= 0 and "reward/reward/std" in r for r in records)


# ---- judges as reward functions -------------------------------------------------------------------------------


def test_toy_verifier_judge_as_reward(online, toy_sft, tmp_path):
    prompts = [{"prompt": it.prompt} for it in toy_sft.items[:8]]
    cfg = online(str(toy_sft.model_dir), prompts, fn=(), reward={"judge": "toy-verifier"},
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


def test_pairwise_only_judge_ranks_by_wins(online, make_model, tmp_path):
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
    cfg = online(make_model(0), prompt_rows(4), fn=(), reward={"judge": {"type": "test_fewer_words"}},
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
