"""Hand-computed values for the reference-based pair losses (preftune/losses/dpo.py, margin.py, anchored.py).

Shared case unless a test says otherwise (β = 0.1):
    π_w = −10, π_l = −15, r_w = −11, r_l = −14
    ρ_w = −10 − (−11) = 1,  ρ_l = −15 − (−14) = −1,  h = ρ_w − ρ_l = 2,  β·h = 0.2
Handy constants (−log σ(x) = log(1 + e^−x)):
    −log σ(0.2)  = log(1 + 0.818731) = 0.598139      −log σ(−0.2) = 0.2 + 0.598139 = 0.798139
    −log σ(0.1)  = log(1 + 0.904837) = 0.644397      −log σ(−0.1) = 0.1 + 0.644397 = 0.744397
    σ(0.2) = 0.549834,  σ(−0.2) = 0.450166,  σ(0.1) = 0.524979,  σ(−0.1) = 0.475021
"""

import pytest
import torch

from preftune.losses import (
    aot,
    apo_down,
    apo_zero,
    bco_pair,
    discopop,
    dpo,
    exo_pair,
    hinge,
    ipo,
    nca_pair,
    robust,
    sppo_hard,
)


def _pair(pw, pl, rw, rl):
    """Keyword inputs of a paired reference-based loss; each argument is a list → (B,) float32 tensor."""
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    return dict(
        policy_chosen_logps=t(pw),
        policy_rejected_logps=t(pl),
        reference_chosen_logps=t(rw),
        reference_rejected_logps=t(rl),
    )


CASE = _pair([-10.0], [-15.0], [-11.0], [-14.0])


def _value(out):
    assert out.losses.shape == (1,)
    return out.losses.item()


# --- dpo -------------------------------------------------------------------------------------------------


def test_dpo_worked_example_is_0_598139_not_0_6731():
    # h = (−10 + 11) − (−15 + 14) = 1 − (−1) = 2; β·h = 0.2
    # −log σ(0.2) = log(1 + e^−0.2) = log(1.818731) = 0.598139.
    # A tutorial's worked example with these numbers prints 0.6731, which is wrong: it would need β·h ≈ 0.040
    # (log(1 + e^−0.040) = 0.6731), not 0.2.
    out = dpo(**CASE, beta=0.1)
    assert _value(out) == pytest.approx(0.598139, abs=1e-5)
    assert _value(out) != pytest.approx(0.6731, abs=1e-3)
    # rewards β·ρ: 0.1·1 = 0.1 and 0.1·(−1) = −0.1
    assert out.chosen_rewards.item() == pytest.approx(0.1, abs=1e-6)
    assert out.rejected_rewards.item() == pytest.approx(-0.1, abs=1e-6)


def test_dpo_label_smoothing_cdpo():
    # ε = 0.1: 0.9·(−log σ(0.2)) + 0.1·(−log σ(−0.2)) = 0.9·0.598139 + 0.1·0.798139 = 0.538325 + 0.079814 = 0.618139
    assert _value(dpo(**CASE, beta=0.1, label_smoothing=0.1)) == pytest.approx(0.618139, abs=1e-5)


def test_dpo_mistake_2_averaging_log_probs_gives_a_different_wrong_value():
    # DPO's log-ratios are over whole sequences, so the inputs are SUMS over completion tokens (0.598139 above).
    # The common mistake of dividing by the token count first. With |y_w| = 2, |y_l| = 5:
    #   π_w/2 = −5, π_l/5 = −3, r_w/2 = −5.5, r_l/5 = −2.8
    #   h' = (−5 + 5.5) − (−3 + 2.8) = 0.5 + 0.2 = 0.7;  β·h' = 0.07
    #   −log σ(0.07) = log(1 + e^−0.07) = log(1 + 0.932394) = 0.658760  ≠  0.598139
    summed = _value(dpo(**CASE, beta=0.1))
    averaged = _value(dpo(**_pair([-10.0 / 2], [-15.0 / 5], [-11.0 / 2], [-14.0 / 5]), beta=0.1))
    assert averaged == pytest.approx(0.658760, abs=1e-5)
    assert summed == pytest.approx(0.598139, abs=1e-5)
    assert abs(averaged - summed) > 0.05


# --- ipo -------------------------------------------------------------------------------------------------


def test_ipo_squared_distance_to_half_inverse_beta():
    # β = 0.1: 1/(2β) = 5;  (h − 5)² = (2 − 5)² = 9
    assert _value(ipo(**CASE, beta=0.1)) == pytest.approx(9.0, abs=1e-5)
    # β = 0.5: 1/(2β) = 1;  (2 − 1)² = 1
    assert _value(ipo(**CASE, beta=0.5)) == pytest.approx(1.0, abs=1e-5)
    # β = 0.25: 1/(2β) = 2 = h, so the loss is exactly 0
    assert _value(ipo(**CASE, beta=0.25)) == pytest.approx(0.0, abs=1e-6)


def test_ipo_uses_sums_as_given_not_length_averages():
    # Doubling every log-prob (a sequence twice as long, same per-token values) doubles h: (4 − 5)² = 1, not 9.
    doubled = _pair([-20.0], [-30.0], [-22.0], [-28.0])
    assert _value(ipo(**doubled, beta=0.1)) == pytest.approx(1.0, abs=1e-5)


def test_ipo_rejects_nonpositive_beta():
    with pytest.raises(ValueError, match="beta > 0"):
        ipo(**CASE, beta=0.0)


# --- hinge -----------------------------------------------------------------------------------------------


def test_hinge():
    # β = 0.1: max(0, 1 − 0.2) = 0.8
    assert _value(hinge(**CASE, beta=0.1)) == pytest.approx(0.8, abs=1e-6)
    # β = 1: max(0, 1 − 2) = 0 (margin met, flat)
    assert _value(hinge(**CASE, beta=1.0)) == pytest.approx(0.0, abs=1e-6)


# --- robust (rDPO) ---------------------------------------------------------------------------------------


def test_robust_debiased_for_flip_rate():
    # ε = 0.1: (0.9·0.598139 − 0.1·0.798139)/(1 − 0.2) = (0.538325 − 0.079814)/0.8 = 0.458511/0.8 = 0.573139
    assert _value(robust(**CASE, beta=0.1, label_smoothing=0.1)) == pytest.approx(0.573139, abs=1e-5)
    # ε = 0: exactly DPO
    assert _value(robust(**CASE, beta=0.1, label_smoothing=0.0)) == pytest.approx(0.598139, abs=1e-5)


def test_robust_is_unbiased_over_flips():
    # E over a flip with prob ε of rDPO = clean DPO: (1−ε)·L(h) + ε·L(−h) = −log σ(βh).
    # L(h) = 0.573139 (above); L(−h) = (0.9·0.798139 − 0.1·0.598139)/0.8 = (0.718325 − 0.059814)/0.8 = 0.823139
    # 0.9·0.573139 + 0.1·0.823139 = 0.515825 + 0.082314 = 0.598139
    flipped = _pair([-15.0], [-10.0], [-14.0], [-11.0])
    l_h = _value(robust(**CASE, beta=0.1, label_smoothing=0.1))
    l_minus_h = _value(robust(**flipped, beta=0.1, label_smoothing=0.1))
    assert l_minus_h == pytest.approx(0.823139, abs=1e-5)
    assert 0.9 * l_h + 0.1 * l_minus_h == pytest.approx(0.598139, abs=1e-5)


@pytest.mark.parametrize("eps", [0.5, 0.7, -0.1])
def test_robust_rejects_flip_rate_at_or_above_half(eps):
    with pytest.raises(ValueError, match="label_smoothing < 0.5"):
        robust(**CASE, beta=0.1, label_smoothing=eps)


# --- exo_pair --------------------------------------------------------------------------------------------


def test_exo_pair():
    # ε = 1e-3: log(1 − ε) = −0.0010005, log ε = −6.907755
    # σ(0.2)·(log σ(0.2) − log(1−ε)) = 0.549834·(−0.598139 + 0.0010005) = 0.549834·(−0.597138) = −0.328327
    # σ(−0.2)·(log σ(−0.2) − log ε)  = 0.450166·(−0.798139 + 6.907755) = 0.450166·6.109616 = 2.750342
    # sum = 2.422015
    assert _value(exo_pair(**CASE, beta=0.1)) == pytest.approx(2.422015, abs=1e-5)


def test_exo_pair_at_zero_margin_and_minimum():
    # h = 0: 0.5·(log 0.5 − log 0.999) + 0.5·(log 0.5 − log 0.001)
    #      = 0.5·(−0.693147 + 0.001001) + 0.5·(−0.693147 + 6.907755) = −0.346073 + 3.107304 = 2.761231
    zero = _pair([-10.0], [-10.0], [-10.0], [-10.0])
    assert _value(exo_pair(**zero, beta=0.1)) == pytest.approx(2.761231, abs=1e-5)
    # Minimum 0 where σ(βh) = 1 − ε, i.e. βh = log((1 − ε)/ε) = log(999) = 6.906755 → h = 69.06755 at β = 0.1
    at_min = _pair([69.06755], [0.0], [0.0], [0.0])
    assert _value(exo_pair(**at_min, beta=0.1)) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("eps", [0.0, 1.0])
def test_exo_pair_rejects_degenerate_smoothing(eps):
    with pytest.raises(ValueError, match="0 < label_smoothing < 1"):
        exo_pair(**CASE, beta=0.1, label_smoothing=eps)


# --- nca_pair --------------------------------------------------------------------------------------------


def test_nca_pair():
    # β·ρ_w = 0.1, β·ρ_l = −0.1
    # −log σ(0.1) − ½·log σ(−0.1) − ½·log σ(0.1) = 0.644397 + ½·0.744397 + ½·0.644397
    #                                             = 0.644397 + 0.372198 + 0.322198 = 1.338793
    assert _value(nca_pair(**CASE, beta=0.1)) == pytest.approx(1.338793, abs=1e-5)


# --- bco_pair --------------------------------------------------------------------------------------------


def test_bco_pair_without_shift():
    # δ = 0: −log σ(0.1) − log σ(−(−0.1)) = 0.644397 + 0.644397 = 1.288793
    assert _value(bco_pair(**CASE, beta=0.1)) == pytest.approx(1.288793, abs=1e-5)


def test_bco_pair_with_running_mean_shift():
    # δ = 0.1: −log σ(0.1 − 0.1) − log σ(−(−0.1 − 0.1)) = log 2 + (−log σ(0.2)) = 0.693147 + 0.598139 = 1.291286
    assert _value(bco_pair(**CASE, beta=0.1, delta=0.1)) == pytest.approx(1.291286, abs=1e-5)
    # a tensor δ works the same and gets no gradient, while the policy does:
    # d/dπ_w = −β·σ(−(β·ρ_w − δ)) = −0.1·σ(0) = −0.05
    delta = torch.tensor(0.1, requires_grad=True)
    inputs = {**CASE, "policy_chosen_logps": CASE["policy_chosen_logps"].clone().requires_grad_(True)}
    out = bco_pair(**inputs, beta=0.1, delta=delta)
    assert _value(out) == pytest.approx(1.291286, abs=1e-5)
    out.losses.sum().backward()
    assert delta.grad is None
    assert inputs["policy_chosen_logps"].grad.item() == pytest.approx(-0.05, abs=1e-6)


# --- sppo_hard -------------------------------------------------------------------------------------------


def test_sppo_hard():
    # β = 0.1: 1/(2β) = 5;  (ρ_w − 5)² + (ρ_l + 5)² = (1 − 5)² + (−1 + 5)² = 16 + 16 = 32
    assert _value(sppo_hard(**CASE, beta=0.1)) == pytest.approx(32.0, abs=1e-4)
    # β = 0.5: 1/(2β) = 1;  (1 − 1)² + (−1 + 1)² = 0
    assert _value(sppo_hard(**CASE, beta=0.5)) == pytest.approx(0.0, abs=1e-6)


# --- aot -------------------------------------------------------------------------------------------------


def test_aot_single_pair_is_dpo():
    # B = 1: sorting does nothing; d = (π_w − π_l) − (r_w − r_l) = 5 − 3 = 2 = h → 0.598139
    assert _value(aot(**CASE, beta=0.1)) == pytest.approx(0.598139, abs=1e-5)


def test_aot_matches_sorted_quantiles_not_examples():
    # Two pairs, β = 1:
    #   A: π_w − π_l = 1, r_w − r_l = 3      B: π_w − π_l = 4, r_w − r_l = 0
    # sorted policy margins u = [1, 4], sorted reference margins v = [0, 3] → d = [1, 1]
    # each quantile: −log σ(1) = log(1 + e^−1) = log(1.367879) = 0.313262
    # (per-example DPO would give A: −log σ(−2) = 2.126928, B: −log σ(4) = 0.018150)
    inputs = _pair([-1.0, -4.0], [-2.0, -8.0], [-1.0, -5.0], [-4.0, -5.0])
    out = aot(**inputs, beta=1.0)
    assert out.losses.tolist() == pytest.approx([0.313262, 0.313262], abs=1e-5)
    assert dpo(**inputs, beta=1.0).losses.tolist() == pytest.approx([2.126928, 0.018150], abs=1e-5)
    # rewards stay per example, unsorted: β·ρ_w = [−1 + 1, −4 + 5] = [0, 1]
    assert out.chosen_rewards.tolist() == pytest.approx([0.0, 1.0], abs=1e-6)


# --- apo_zero / apo_down ---------------------------------------------------------------------------------


def test_apo_zero():
    # (1 − σ(0.1)) + σ(−0.1) = 0.475021 + 0.475021 = 0.950042
    assert _value(apo_zero(**CASE, beta=0.1)) == pytest.approx(0.950042, abs=1e-5)


def test_apo_down():
    # σ(β·ρ_w) + (1 − σ(β·h)) = σ(0.1) + 1 − σ(0.2) = 0.524979 + 1 − 0.549834 = 0.975145
    assert _value(apo_down(**CASE, beta=0.1)) == pytest.approx(0.975145, abs=1e-5)


def test_apo_down_pushes_chosen_likelihood_down():
    # By design: raising π_w alone by 1 at ρ_l = 0 leaves σ(βρ_w) + 1 − σ(βρ_w) = 1 unchanged — and with
    # ρ_l = −1 (the case) it *increases* the loss, unlike every other pair loss:
    #   ρ_w = 2: σ(0.2) + 1 − σ(0.3) = 0.549834 + 1 − 0.574443 = 0.975391 > 0.975145
    raised = _pair([-9.0], [-15.0], [-11.0], [-14.0])
    assert _value(apo_down(**raised, beta=0.1)) == pytest.approx(0.975391, abs=1e-5)


# --- discopop --------------------------------------------------------------------------------------------


def test_discopop():
    # x = β·h = 0.2; m = σ(x/τ) = σ(0.2/0.05) = σ(4) = 0.982014
    # (1 − m)·(−log σ(0.2)) + m·e^−0.2 = 0.017986·0.598139 + 0.982014·0.818731 = 0.010758 + 0.804005 = 0.814763
    assert _value(discopop(**CASE, beta=0.1)) == pytest.approx(0.814763, abs=1e-5)


def test_discopop_limits():
    # x ≪ 0 → m → 0: logistic loss. h = −200, β = 0.1 → x = −20: −log σ(−20) = 20 + log(1 + e^−20) ≈ 20.000000
    # x ≫ 0 → m → 1: exponential loss. h = 200 → x = 20: e^−20 = 2.061e-9
    neg = _pair([-200.0], [0.0], [0.0], [0.0])
    pos = _pair([200.0], [0.0], [0.0], [0.0])
    assert _value(discopop(**neg, beta=0.1)) == pytest.approx(20.0, abs=1e-4)
    assert _value(discopop(**pos, beta=0.1)) == pytest.approx(2.061e-9, abs=1e-9)


def test_discopop_no_nan_where_exp_overflows():
    # x = 0.1·(−2000) = −200: exp(200) overflows fp32 (max ≈ e^88.7); TRL's m·exp(−x) gives 0·inf = NaN.
    # Here m·e^−x = exp(log σ(−4000) + 200) = exp(−3800) = 0, and the loss is −log σ(−200) = 200.
    far = _pair([-2000.0], [0.0], [0.0], [0.0])
    far["policy_chosen_logps"].requires_grad_(True)
    out = discopop(**far, beta=0.1)
    assert _value(out) == pytest.approx(200.0, rel=1e-6)
    out.losses.sum().backward()
    # d/dπ_w = β·d/dx(−log σ(x)) = 0.1·(σ(x) − 1) = 0.1·(−1) = −0.1
    assert far["policy_chosen_logps"].grad.item() == pytest.approx(-0.1, abs=1e-6)


def test_discopop_rises_just_above_zero_margin():
    # Documented non-monotonicity (τ = 0.05, β = 1):
    #   x = 0:    m = σ(0) = 0.5;  0.5·log 2 + 0.5·e^0 = 0.346574 + 0.5 = 0.846574
    #   x = 0.05: m = σ(1) = 0.731059;  (1 − m)·log(1 + e^−0.05) + m·e^−0.05
    #             = 0.268941·0.668460 + 0.731059·0.951229 = 0.179778 + 0.695405 = 0.875181  (> 0.846574)
    #   x = 0.2:  0.814763 (test_discopop)
    at = lambda h: _value(discopop(**_pair([h], [0.0], [0.0], [0.0]), beta=1.0))  # noqa: E731
    assert at(0.0) == pytest.approx(0.846574, abs=1e-5)
    assert at(0.05) == pytest.approx(0.875181, abs=1e-5)
    assert at(0.2) == pytest.approx(0.814763, abs=1e-5)


def test_discopop_rejects_nonpositive_tau():
    with pytest.raises(ValueError, match="tau > 0"):
        discopop(**CASE, beta=0.1, tau=0.0)
