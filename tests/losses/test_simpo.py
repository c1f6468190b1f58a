"""Hand-computed values for preftune.losses.simpo.

Case: π_w = −6 over |y_w| = 3 → mean −2;  π_l = −12 over |y_l| = 4 → mean −3;  β = 2, γ = 1
    β·(−2) − β·(−3) − γ = −4 + 6 − 1 = 1;   −log σ(1) = log(1 + e^−1) = log(1.367879) = 0.313262
"""

import pytest
import torch

from preftune.losses import simpo


def _inputs(pw, pl, lw, ll):
    return dict(
        policy_chosen_logps=torch.tensor(pw),
        policy_rejected_logps=torch.tensor(pl),
        chosen_lengths=torch.tensor(lw),
        rejected_lengths=torch.tensor(ll),
    )


def test_simpo_value_and_rewards():
    out = simpo(**_inputs([-6.0], [-12.0], [3], [4]), beta=2.0, gamma=1.0)
    assert out.losses.item() == pytest.approx(0.313262, abs=1e-5)
    # rewards β·π/|y| = 2·(−2) = −4 and 2·(−3) = −6
    assert out.chosen_rewards.item() == pytest.approx(-4.0, abs=1e-6)
    assert out.rejected_rewards.item() == pytest.approx(-6.0, abs=1e-6)


def test_simpo_margin_shifts_the_logit():
    # γ = 0: −log σ(2) = log(1 + e^−2) = log(1.135335) = 0.126928
    assert simpo(**_inputs([-6.0], [-12.0], [3], [4]), beta=2.0, gamma=0.0).losses.item() == pytest.approx(
        0.126928, abs=1e-5
    )


def test_simpo_is_length_normalised_not_summed():
    # The summed log-probs favour the rejected side's length: −6 vs −12; per token it is −2 vs −3. With
    # |y_w| = 1, |y_l| = 12: means −6 and −1 → β·(−6 + 1) − γ = 2·(−5) − 1 = −11; −log σ(−11) = 11 + log(1 + e^−11)
    # = 11.000017
    out = simpo(**_inputs([-6.0], [-12.0], [1], [12]), beta=2.0, gamma=1.0)
    assert out.losses.item() == pytest.approx(11.000017, abs=1e-5)
