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
    # m_w = −1e-9 is exact: log odds = −1e-9 − log(−expm1(−1e-9)) = −log(1e-9) + O(1e-9) = 20.723266;
    #   + 1.854587 (−log odds_l, the case above) = 22.577853
    # m_w = 0 (p = 1 to float precision) and m_w > 0 (no log-prob; treated as 0) are clamped to −1.175494e-38,
    #   the smallest normal float32: log odds = −log(1.175494e-38) = 87.336544; + 1.854587 = 89.191131
    for pw, expected in ((-1e-9, 22.577853), (0.0, 89.191131), (1e-3, 89.191131)):
        inputs = _inputs([pw], [-6.0], [1], [3])
        inputs["policy_chosen_logps"].requires_grad_(True)
        out = orpo(**inputs, lam=0.1)
        out.losses.sum().backward()
        assert torch.isfinite(out.losses).all()
        assert torch.isfinite(inputs["policy_chosen_logps"].grad).all()
        assert out.metrics["log_odds_chosen"].item() == pytest.approx(expected, abs=1e-4)


def _orpo64(pw, pl, lw, ll, lam):
    """The ORPO loss in float64 with the one-branch log(−expm1(m)), exact to ~1e-15 for every m < 0."""
    m_w, m_l = pw / lw, pl / ll
    lo_w = m_w - torch.log(-torch.expm1(m_w))
    lo_l = m_l - torch.log(-torch.expm1(m_l))
    return -m_w - lam * torch.nn.functional.logsigmoid(lo_w - lo_l)


@pytest.mark.parametrize("side", ["chosen", "rejected"])
@pytest.mark.parametrize("x", [-9e-7, -1e-5, -1e-3, -0.5, -5.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_orpo_gradient_matches_float64_near_probability_one(dtype, x, side):
    # One side has mean token log-prob x over 10 tokens (π = 10·x), the other m = −0.5 (π = −5); λ = 0.1.
    # Worked case, rejected at x = −9e-7: log odds_l = −9e-7 − log(1 − e^−9e-7) = −9e-7 − log(8.999996e-7)
    #   = 13.920871; log odds_w = 0.432752 (above); σ(−(0.432752 − 13.920871)) = σ(13.488) = 0.9999986;
    #   d log odds/dm = 1/(1 − e^m) = 1111111.6, so dL/dπ_l = λ·0.9999986·1111111.6/10 = 11111.1 — not the 0
    #   a clamp at m ≤ −1e-6 gives, and not the NaN that torch.where's unused log1p(−exp(m)) branch gives in
    #   bf16/fp16 (exp(m) rounds to 1 there).
    # The reference takes the same (rounded) inputs in float64. A gradient w.r.t. a bf16 input is itself bf16
    # (8 significant bits), so the tolerance is the dtype's epsilon where that is coarser than 1e-3; and a
    # gradient below fp16's smallest normal (6.1e-5; e.g. 3.9e-7 for the rejected side when the chosen one is
    # at x = −9e-7) is a subnormal, exact only to its spacing, 2^−24 = 6.0e-8.
    sides = {"chosen": [10.0 * x], "rejected": [-5.0]}
    if side == "rejected":
        sides = {"chosen": [-5.0], "rejected": [10.0 * x]}
    pw = torch.tensor(sides["chosen"], dtype=dtype, requires_grad=True)
    pl = torch.tensor(sides["rejected"], dtype=dtype, requires_grad=True)
    lengths = torch.tensor([10])
    out = orpo(policy_chosen_logps=pw, policy_rejected_logps=pl, chosen_lengths=lengths, rejected_lengths=lengths,
               lam=0.1)
    assert out.losses.dtype == torch.float32  # computed in float32 whatever the input dtype
    out.losses.sum().backward()

    pw64 = pw.detach().double().requires_grad_(True)
    pl64 = pl.detach().double().requires_grad_(True)
    ref = _orpo64(pw64, pl64, 10.0, 10.0, 0.1)
    ref.sum().backward()
    rtol, atol = max(1e-3, torch.finfo(dtype).eps), torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    assert out.losses.item() == pytest.approx(ref.item(), rel=1e-5)
    for got, want in ((pw.grad, pw64.grad), (pl.grad, pl64.grad)):
        assert torch.isfinite(got).all()
        assert got.double().item() == pytest.approx(want.item(), rel=rtol, abs=atol), (got, want)
    if side == "rejected" and x == -9e-7:
        assert pl64.grad.item() == pytest.approx(11111.1, rel=1e-4)


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


def test_log1mexp_gradient_is_finite_in_both_branches():
    # d/dx log(1 − e^x) = −e^x/(1 − e^x) = 1/(1 − e^−x)·(−1)... written as −1/(e^−x − 1):
    #   x = −1e-8: −1/(1e-8) = −1e8 (exp(x) rounds to 1 in float32, so an unguarded log1p(−exp(x)) branch,
    #   unused by torch.where, still back-propagates 0·inf = NaN);  x = −3: −1/(e^3 − 1) = −0.052396
    x = torch.tensor([-1e-8, -3.0], requires_grad=True)
    _log1mexp(x).sum().backward()
    assert x.grad.tolist() == pytest.approx([-1e8, -0.052396], rel=1e-5)
