"""The drivers' statistics with hand-worked numbers, and ``score_model`` on tiny toy models."""

from __future__ import annotations

import math

import pytest

from preftune.tune import adapter
from preftune.tune.scoring import (
    bootstrap_ci,
    direction,
    eos_rate,
    greedy_responses,
    pareto_front,
    perplexity,
    score_model,
)

from .helpers import WORDS3


def test_perplexity_pools_tokens():
    # N = 3 tokens, sum of log-probs = 2 log 0.5 + log 0.25 = -4 log 2, PPL = exp(4/3 log 2) = 2^(4/3) = 2.5198
    assert perplexity([[math.log(0.5), math.log(0.5)], [math.log(0.25)]]) == pytest.approx(2 ** (4 / 3))
    assert perplexity([[0.0]]) == 1.0 and math.isnan(perplexity([[], []]))


def test_eos_rate():
    # 2 of 3 responses end with an end token (9 or 7); the third stopped at max_new_tokens
    assert eos_rate([[1, 2, 9], [3, 7], [4, 5, 6]], {7, 9}) == pytest.approx(2 / 3)
    assert math.isnan(eos_rate([], {9}))


def test_pareto_front():
    # (2, 0.5) is dominated by (1, 0.6): less KL and a higher win rate; (3, 0.7) by (2, 0.7): same win, more KL
    assert pareto_front([(1, 0.6), (2, 0.7), (2, 0.5), (3, 0.7)]) == [0, 1]
    assert pareto_front([(0.5, 0.9)]) == [0]
    assert pareto_front([(1, 0.5), (1, 0.5)]) == [0, 1]  # equal points do not dominate each other


def test_bootstrap_ci():
    assert bootstrap_ci([0.75] * 10) == (0.75, 0.75)  # every resample mean is 0.75
    values = [0.0, 1.0] * 50  # mean 0.5, sd of the mean sqrt(0.25 / 100) = 0.05
    lo, hi = bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) == (lo, hi)  # deterministic for a seed
    assert lo < 0.5 < hi and hi - lo == pytest.approx(2 * 1.96 * 0.05, abs=0.03)  # ~ the normal interval
    assert math.isnan(bootstrap_ci([])[0])


def test_direction():
    assert direction("win_rate") == "maximize" and direction("kl") == "minimize"
    assert direction("perplexity") == "minimize" and direction("kl", "maximize") == "maximize"


def test_score_model_against_itself_and_another(make_model, toy_tok, toy_files):
    prompts = adapter.read_prompts(toy_files["eval"])
    judge = adapter.make_judge(WORDS3)
    model, other = make_model(0).eval(), make_model(5).eval()
    same = score_model(model, model, toy_tok, prompts, judge, max_new_tokens=8)
    # the same weights: identical greedy responses (all ties), zero log-ratio on every sampled token
    assert (same["ties"], same["win_rate"], same["kl"], same["kl_k1"]) == (8, 0.5, 0.0, 0.0)
    s = score_model(model, other, toy_tok, prompts, judge, max_new_tokens=8)
    assert s["wins"] + s["losses"] + s["ties"] == s["prompts"] == 8
    assert s["win_rate"] == pytest.approx((s["wins"] + s["ties"] / 2) / 8) and s["kl"] > 0
    # coherence: the policy's greedy responses under the reference, tokens pooled (EOS included when it stopped)
    ids = adapter.encode_prompts(toy_tok, prompts)
    pol_ids, pol_text, _ = greedy_responses(model, toy_tok, ids, max_new_tokens=8)
    expected = perplexity(adapter.token_logps(other, ids, pol_ids, toy_tok.pad_token_id))
    assert s["perplexity"] == pytest.approx(expected)
    assert s["model_score"] == pytest.approx(sum(judge.score(adapter.prompt_text(p), t)
                                                  for p, t in zip(prompts, pol_text)) / 8)
    assert [x["model"] for x in s["samples"]] == pol_text[:5]
