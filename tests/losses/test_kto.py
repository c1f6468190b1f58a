"""Hand-computed values for preftune.losses.kto.

Case: π = −10, r = −11 → ρ = 1; β = 0.1; z0 = 0.5 → β·(ρ − z0) = 0.1·0.5 = 0.05
    σ(0.05) = 1/(1 + e^−0.05) = 1/(1 + 0.951229) = 0.512497,   σ(−0.05) = 1 − 0.512497 = 0.487503
"""

import pytest
import torch

from preftune.losses import kto


def _inputs(policy, reference, labels, kl):
    return dict(
        policy_logps=torch.tensor(policy),
        reference_logps=torch.tensor(reference),
        labels=torch.tensor(labels, dtype=torch.bool),
        kl=torch.tensor(kl),
    )


def test_kto_desirable_and_undesirable():
    # desirable:   λ_D·(1 − σ(β(ρ − z0))) = 1 − σ(0.05) = 0.487503
    # undesirable: λ_U·(1 − σ(β(z0 − ρ))) = 1 − σ(−0.05) = σ(0.05) = 0.512497
    out = kto(**_inputs([-10.0, -10.0], [-11.0, -11.0], [True, False], 0.5), beta=0.1)
    assert out.losses.tolist() == pytest.approx([0.487503, 0.512497], abs=1e-5)
    # rewards β·ρ = 0.1·1 = 0.1 for both, detached; no paired rewards
    assert out.rewards.tolist() == pytest.approx([0.1, 0.1], abs=1e-6)
    assert out.chosen_rewards is None and out.rejected_rewards is None


def test_kto_class_weights():
    # λ_D = 2: 2·0.487503 = 0.975005;  λ_U = 3: 3·0.512497 = 1.537492
    out = kto(
        **_inputs([-10.0, -10.0], [-11.0, -11.0], [True, False], 0.5),
        beta=0.1,
        desirable_weight=2.0,
        undesirable_weight=3.0,
    )
    assert out.losses.tolist() == pytest.approx([0.975005, 1.537492], abs=1e-5)


def test_kto_batch_of_one_and_single_class():
    # B = 1, desirable only: 0.487503
    one = kto(**_inputs([-10.0], [-11.0], [True], 0.5), beta=0.1)
    assert one.losses.shape == (1,)
    assert one.losses.item() == pytest.approx(0.487503, abs=1e-5)
    # B = 3, undesirable only, ρ = [1, 0, −1], z0 = 0: 1 − σ(β(z0 − ρ)) = σ(β(ρ − z0)) = σ(0.1·ρ)
    #   = [σ(0.1), σ(0), σ(−0.1)] = [0.524979, 0.5, 0.475021]
    out = kto(**_inputs([-10.0, -11.0, -12.0], [-11.0, -11.0, -11.0], [False, False, False], 0.0), beta=0.1)
    assert out.losses.tolist() == pytest.approx([0.524979, 0.5, 0.475021], abs=1e-5)


def test_kto_reference_point_is_detached_and_clamped_at_zero():
    # z0 = −1 is clamped to 0: desirable with ρ = 1: 1 − σ(0.1) = 0.475021 (not 1 − σ(0.2) = 0.450166)
    kl = torch.tensor(-1.0, requires_grad=True)
    inputs = _inputs([-10.0], [-11.0], [True], 0.0)
    inputs["kl"] = kl
    inputs["policy_logps"].requires_grad_(True)
    out = kto(**inputs, beta=0.1)
    assert out.losses.item() == pytest.approx(0.475021, abs=1e-5)
    out.losses.sum().backward()
    assert kl.grad is None
    # float z0 works too
    assert kto(**{**inputs, "kl": 0.5}, beta=0.1).losses.item() == pytest.approx(0.487503, abs=1e-5)


def test_kto_accepts_integer_labels():
    out = kto(
        policy_logps=torch.tensor([-10.0, -10.0]),
        reference_logps=torch.tensor([-11.0, -11.0]),
        labels=torch.tensor([1, 0]),
        kl=torch.tensor(0.5),
        beta=0.1,
    )
    assert out.losses.tolist() == pytest.approx([0.487503, 0.512497], abs=1e-5)
