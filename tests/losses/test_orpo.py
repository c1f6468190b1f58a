"""Hand-computed values for preftune.losses.orpo.

Case: π_w = −2 over |y_w| = 4 tokens → m_w = −0.5;  π_l = −6 over |y_l| = 3 → m_l = −2;  λ = 0.1
    log odds(m) = m − log(1 − e^m)
    m_w: e^−0.5 = 0.606531, 1 − 0.606531 = 0.393469, log = −0.932752 → log odds_w = −0.5 + 0.932752 = 0.432752
    m_l: e^−2   = 0.135335, 1 − 0.135335 = 0.864665, log = −0.145413 → log odds_l = −2 + 0.145413 = −1.854587
    difference = 0.432752 + 1.854587 = 2.287339
    −log σ(2.287339) = log(1 + e^−2.287339) = log(1 + 0.101554) = 0.096706
    NLL = −m_w = 0.5;  L = 0.5 + 0.1·0.096706 = 0.509671
"""

import math

import pytest
import torch

from preftune.losses import orpo
from preftune.losses.orpo import _log1mexp


def _inputs(pw, pl, lw, ll):
    return dict(
        policy_chosen_logps=torch.tensor(pw),
        policy_rejected_logps=torch.tensor(pl),
        chosen_lengths=torch.tensor(lw),
        rejected_lengths=torch.tensor(ll),
    )


def test_orpo_value_and_metrics():
    out = orpo(**_inputs([-2.0], [-6.0], [4], [3]), lam=0.1)
    assert out.losses.item() == pytest.approx(0.509671, abs=1e-5)
    assert out.metrics["nll_loss"].item() == pytest.approx(0.5, abs=1e-6)
    # log_odds_ratio is log σ(difference) (TRL's sense, ≤ 0): −0.096706
    assert out.metrics["log_odds_ratio"].item() == pytest.approx(-0.096706, abs=1e-5)
    assert out.metrics["log_odds_chosen"].item() == pytest.approx(2.287339, abs=1e-5)
    # rewards λ·m: 0.1·(−0.5) = −0.05 and 0.1·(−2) = −0.2
    assert out.chosen_rewards.item() == pytest.approx(-0.05, abs=1e-6)
    assert out.rejected_rewards.item() == pytest.approx(-0.2, abs=1e-6)
    assert all(not v.requires_grad for v in out.metrics.values())


def test_orpo_lambda_zero_is_mean_token_nll():
    # λ = 0: L = −m_w = 2/4 = 0.5 whatever the rejected side is
    assert orpo(**_inputs([-2.0], [-0.1], [4], [3]), lam=0.0).losses.item() == pytest.approx(0.5, abs=1e-6)


def test_orpo_stable_when_chosen_probability_tends_to_one():
    # m_w → 0⁻ (p → 1): the odds blow up. Naively log(1 − e^m) = log(0) = −inf at m = 0.
    # The clamp m ≤ −1e-6 bounds log odds_w by −1e-6 − log(1 − e^−1e-6) ≈ −log(1e-6) = 13.8155.
    for pw in (-1e-9, 0.0, 1e-3):
        inputs = _inputs([pw], [-6.0], [1], [3])
        inputs["policy_chosen_logps"].requires_grad_(True)
        out = orpo(**inputs, lam=0.1)
        out.losses.sum().backward()
        assert torch.isfinite(out.losses).all()
        assert torch.isfinite(inputs["policy_chosen_logps"].grad).all()
        assert out.metrics["log_odds_chosen"].item() == pytest.approx(13.8155 + 1.854587, abs=1e-3)


def test_log1mexp_both_branches():
    # x = −1e-5 (log(−expm1) branch): 1 − e^−1e-5 = 9.99995e-6 → log = −11.512930
    # x = −3 (log1p branch): log(1 − 0.049787) = log(0.950213) = −0.051069
    # x = −100: log1p(−3.72e-44) = −3.72e-44 ≈ 0
    x = torch.tensor([-1e-5, -3.0, -100.0], dtype=torch.float64)
    expected = [math.log(-math.expm1(-1e-5)), math.log1p(-math.exp(-3.0)), 0.0]
    assert expected[:2] == pytest.approx([-11.512930, -0.051069], abs=1e-6)
    assert _log1mexp(x).tolist() == pytest.approx(expected, abs=1e-9)
    # fp32 at x = −1e-7: naive log(1 − e^x) rounds 1 − e^x to 1.19e-7 (one ulp) → −15.94; the expm1 branch
    # keeps log(1e-7) = −16.118
    x32 = torch.tensor([-1e-7])
    assert _log1mexp(x32).item() == pytest.approx(math.log(1e-7), abs=1e-4)
