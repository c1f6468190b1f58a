"""PPO pieces (preftune/losses/ppo.py): hand-computed values, clipping bounds, the step-global normalizer,
and the issue's check that a constant reward gives zero policy gradient after GAE and whitening."""

import math

import pytest
import torch

from preftune.advantages import gae, whiten
from preftune.losses.ppo import (
    AdaptiveKLController,
    entropy_bonus,
    kl_penalty_rewards,
    ppo_policy_loss,
    ppo_value_loss,
)

# Shared policy case (ε = 0.2 → ρ clipped to [0.8, 1.2]); seq 1's third position is padding.
#   seq 0: A = [1, −1, 0.5], ρ = [1.3, 0.7, 1.1]
#       ℓ_0 = −min(1.3, 1.2) = −1.2        clipped (ρ > 1.2, A > 0): gradient 0
#       ℓ_1 = −min(−0.7, −0.8) = 0.8       clipped (ρ < 0.8, A < 0): gradient 0
#       ℓ_2 = −min(0.55, 0.55) = −0.55     d ℓ/d logp = −ρ·A = −0.55                         Σ = −0.95
#   seq 1: A = [−1, 2], ρ = [1.3, 0.7]
#       ℓ_0 = −min(−1.3, −1.2) = 1.3       NOT clipped (ρ > 1.2 but A < 0: the pessimistic min keeps ρ·A): 1.3
#       ℓ_1 = −min(1.4, 1.6) = −1.4        NOT clipped (ρ < 0.8 but A > 0): −1.4              Σ = −0.1
#   N = 5 tokens: c = [−0.95/5, −0.1/5] = [−0.19, −0.02]; gradients / 5
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
RHO = torch.tensor([[1.3, 0.7, 1.1], [1.3, 0.7, 1.0]])
ADV = torch.tensor([[1.0, -1.0, 0.5], [-1.0, 2.0, 0.0]])


def _policy_case():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -7.0]], requires_grad=True)
    return logps, logps.detach() - torch.log(RHO)


def test_ppo_policy_loss_by_hand():
    logps, old = _policy_case()
    out = ppo_policy_loss(logps, old, ADV, MASK, clip_ratio=0.2, num_tokens_in_step=5)
    out.losses.sum().backward()
    assert out.losses.tolist() == pytest.approx([-0.19, -0.02], abs=1e-6)
    assert logps.grad.tolist() == [pytest.approx([0.0, 0.0, -0.11], abs=1e-6), pytest.approx([0.26, -0.28, 0.0], abs=1e-6)]
    assert logps.grad[0, 0].item() == 0.0 and logps.grad[0, 1].item() == 0.0  # exactly 0 on the clipped side
    assert out.metrics["clip_frac"].tolist() == pytest.approx([2 / 3, 0.0])
    # k3 = (ρ − 1) − ln ρ: 1.3 → 0.3 − 0.262364 = 0.037636; 0.7 → −0.3 + 0.356675 = 0.056675; 1.1 → 0.004690
    #   seq 0: (0.037636 + 0.056675 + 0.004690)/3 = 0.033000;  seq 1: (0.037636 + 0.056675)/2 = 0.047156
    # k1 = −ln ρ: seq 0 −(0.262364 − 0.356675 + 0.095310)/3 = −0.000333;  seq 1 −ln(0.91)/2 = 0.047155
    assert out.metrics["approx_kl_k3"].tolist() == pytest.approx([0.033000, 0.047156], abs=1e-5)
    assert out.metrics["approx_kl_k1"].tolist() == pytest.approx([-0.000333, 0.047155], abs=1e-5)
    assert out.metrics["completion_length"].tolist() == [3.0, 2.0]


@pytest.mark.parametrize(
    "adv,rho,clipped",
    [
        (1.0, 1.25, True), (1.0, 1.5, True), (1.0, 4.0, True), (1.0, 1.1, False), (1.0, 0.5, False),
        (-1.0, 0.75, True), (-1.0, 0.5, True), (-1.0, 0.05, True), (-1.0, 0.9, False), (-1.0, 2.0, False),
    ],
)  # fmt: skip
def test_ratio_clipping_zeroes_the_gradient_beyond_the_range(adv, rho, clipped):
    # Beyond 1 ± ε on the side the advantage pushes toward, ℓ = −clip(ρ)·A is constant: gradient exactly 0.
    # Otherwise d ℓ/d logp = −ρ·A (one token, N = 1).
    logps = torch.tensor([[-1.0]], requires_grad=True)
    old = logps.detach() - math.log(rho)
    out = ppo_policy_loss(logps, old, torch.tensor([[adv]]), torch.ones(1, 1), clip_ratio=0.2, num_tokens_in_step=1)
    out.losses.sum().backward()
    if clipped:
        assert logps.grad.item() == 0.0
        assert out.losses.item() == pytest.approx(-min(max(rho, 0.8), 1.2) * adv, abs=1e-6)
    else:
        assert logps.grad.item() == pytest.approx(-rho * adv, rel=1e-6)


def test_ppo_policy_loss_is_independent_of_micro_batching_and_processes():
    torch.manual_seed(0)
    b, t_len = 5, 4
    lengths = [4, 1, 3, 2, 4]
    mask = torch.tensor([[int(t < n) for t in range(t_len)] for n in lengths])
    logps = (-torch.rand(b, t_len) * 3).requires_grad_()
    old, adv = logps.detach() + 0.4 * torch.randn(b, t_len), torch.randn(b, t_len)
    n = sum(lengths)

    def grad(processes):
        per_process = []
        for micro_batches in processes:
            logps.grad = None
            for rows in micro_batches:
                t = max(lengths[r] for r in rows)
                ppo_policy_loss(
                    logps[rows, :t], old[rows, :t], adv[rows, :t], mask[rows, :t], num_tokens_in_step=n,
                    world_size=len(processes),
                ).losses.sum().backward()  # fmt: skip
            per_process.append(logps.grad.clone())
        return torch.stack(per_process).mean(dim=0)  # DDP averages

    reference = grad([[[0, 1, 2, 3, 4]]])
    assert torch.allclose(grad([[[0, 1], [2, 3, 4]]]), reference, atol=1e-7)
    assert torch.allclose(grad([[[0]], [[1, 2], [3, 4]]]), reference, atol=1e-7)


def test_ppo_value_loss_by_hand():
    # c = 0.2, V_old = 1 everywhere → clip(V) ∈ [0.8, 1.2]
    #   t0: V = 1.5, R = 2.0: (V − R)² = 0.25; clip → 1.2: (1.2 − 2)² = 0.64 → max 0.64 (clipped term: d/dV = 0)
    #   t1: V = 1.5, R = 1.0: 0.25 vs (1.2 − 1)² = 0.04 → 0.25 (unclipped): d(½·(V − R)²)/dV = V − R = 0.5
    #   t2: V = 0.9, R = 0.0: inside the range, 0.81 either way: d/dV = 0.9
    #   t3: V = 1.1, R = 1.2: 0.01: d/dV = −0.1
    #   ℓ = ½·[0.64, 0.25, 0.81, 0.01] = [0.32, 0.125, 0.405, 0.005], Σ = 0.855, N = 4 → 0.21375
    values = torch.tensor([[1.5, 1.5, 0.9, 1.1]], requires_grad=True)
    old, returns, mask = torch.ones(1, 4), torch.tensor([[2.0, 1.0, 0.0, 1.2]]), torch.ones(1, 4)
    out = ppo_value_loss(values, old, returns, mask, value_clip=0.2, num_tokens_in_step=4)
    out.losses.sum().backward()
    assert out.losses.item() == pytest.approx(0.21375, abs=1e-6)
    assert values.grad.tolist() == [pytest.approx([0.0, 0.125, 0.225, -0.025], abs=1e-6)]
    assert values.grad[0, 0].item() == 0.0
    assert out.metrics["value_clip_frac"].tolist() == [0.25]  # only t0's clipped error is strictly larger
    assert out.metrics["value_error"].tolist() == pytest.approx([0.33], abs=1e-6)  # (0.25+0.25+0.81+0.01)/4
    # value_clip=None: ½·1.32/4 = 0.165, and t0 gets its gradient (V − R)/4 = −0.5/4 = −0.125
    v2 = values.detach().clone().requires_grad_()
    out2 = ppo_value_loss(v2, old, returns, mask, value_clip=None, num_tokens_in_step=4)
    out2.losses.sum().backward()
    assert out2.losses.item() == pytest.approx(0.165, abs=1e-6)
    assert v2.grad[0, 0].item() == pytest.approx(-0.125, abs=1e-6)


def test_value_clipping_bounds_the_update():
    # Pushing V further past V_old + c in the direction that increases the clipped error changes nothing: the loss
    # is flat there (the clipped error (V_old + c − R)² is the max and does not depend on V).
    old, returns, mask = torch.zeros(1, 1), torch.tensor([[1.0]]), torch.ones(1, 1)
    for v in (-0.3, -1.0, -5.0):  # below V_old − c = −0.2, moving away from R = 1
        values = torch.tensor([[v]], requires_grad=True)
        out = ppo_value_loss(values, old, returns, mask, value_clip=0.2, num_tokens_in_step=1)
        out.losses.sum().backward()
        # max((v − 1)², (−0.2 − 1)²) = (v − 1)² since |v − 1| > 1.2: the UNclipped error, gradient v − 1 ≠ 0
        assert values.grad.item() == pytest.approx(v - 1.0, abs=1e-6)
    for v in (0.5, 0.9):  # past V_old + c = 0.2 toward R = 1: the clipped error (0.2 − 1)² = 0.64 is larger → flat
        values = torch.tensor([[v]], requires_grad=True)
        out = ppo_value_loss(values, old, returns, mask, value_clip=0.2, num_tokens_in_step=1)
        out.losses.sum().backward()
        assert values.grad.item() == 0.0 and out.losses.item() == pytest.approx(0.32, abs=1e-6)


def test_entropy_bonus_by_hand():
    # coef 0.01, N = 5 (padding's 99 ignored): c_0 = −0.01·(1 + 2)/5 = −0.006; c_1 = −0.01·1.5/5 = −0.003
    h = torch.tensor([[1.0, 2.0, 99.0], [0.5, 0.5, 0.5]], requires_grad=True)
    c = entropy_bonus(h, torch.tensor([[1, 1, 0], [1, 1, 1]]), coef=0.01, num_tokens_in_step=5)
    assert c.tolist() == pytest.approx([-0.006, -0.003], abs=1e-7)
    c.sum().backward()
    assert h.grad.tolist() == [pytest.approx([-0.002, -0.002, 0.0]), pytest.approx([-0.002] * 3)]


def test_kl_penalty_rewards_by_hand():
    # β = 0.1; log π − log π_ref: seq 0 [0.5, −0.2, 0.1] (3 real), seq 1 [0.3] (1 real, then padding)
    #   seq 0: [−0.05, 0.02, −0.01 + 2.0] = [−0.05, 0.02, 1.99];   seq 1: [−0.03 + (−1.0), 0, 0] = [−1.03, 0, 0]
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0]])
    ref = logps - torch.tensor([[0.5, -0.2, 0.1], [0.3, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    r = kl_penalty_rewards(torch.tensor([2.0, -1.0]), logps, ref, mask, kl_coef=0.1)
    assert r.tolist() == [pytest.approx([-0.05, 0.02, 1.99], abs=1e-6), pytest.approx([-1.03, 0.0, 0.0], abs=1e-6)]
    with pytest.raises(ValueError, match="sequence 1 has no completion token"):
        kl_penalty_rewards(torch.tensor([2.0, -1.0]), logps, ref, torch.tensor([[1, 1, 1], [0, 0, 0]]), kl_coef=0.1)


def test_adaptive_kl_controller_by_hand_and_state_dict():
    # β = 0.1, target 6, horizon 10000
    #   KL = 9:   e = clip(3/6 = 0.5, ±0.2) = 0.2;  β·(1 + 0.2·256/10000) = 0.1·1.00512 = 0.100512
    #   KL = 5.7: e = −0.3/6 = −0.05;               0.100512·(1 − 0.05·0.0256) = 0.100512·0.99872 = 0.100383
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(9.0, n_steps=256) == pytest.approx(0.100512, abs=1e-9)
    assert ctl.update(5.7, n_steps=256) == pytest.approx(0.100383, abs=1e-6)
    restored = AdaptiveKLController(1.0, target=1.0, horizon=1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.update(3.0, 100) == ctl.update(3.0, 100)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


# --- constant reward → zero policy gradient --------------------------------------------------------------


def _rollout(scores, gamma, values=None):
    """Per-token rewards from KL-free scores, GAE with γ, λ = 1 and the given critic (default V = 0)."""
    lengths = [4, 2, 3]
    mask = torch.tensor([[int(t < n) for t in range(4)] for n in lengths])
    logps = -torch.rand(3, 4)
    rewards = kl_penalty_rewards(scores, logps, logps, mask, kl_coef=0.1)  # log π = log π_ref: KL term 0
    values = torch.zeros(3, 4) if values is None else values
    adv, _ = gae(rewards, values, mask, gamma=gamma, lam=1.0)
    return logps, mask, adv


def _policy_grad(logps, mask, adv):
    logps = logps.clone().requires_grad_()
    old = logps.detach() + 0.1  # off-policy ratios (0.905): the gradient must vanish for every ρ, not only ρ = 1
    ppo_policy_loss(logps, old, adv, mask, num_tokens_in_step=int(mask.sum())).losses.sum().backward()
    return logps.grad


def test_constant_reward_gives_zero_policy_gradient_after_gae_and_whitening():
    # Every sequence scores 1, V = 0, γ = λ = 1: A_t = Σ_{t'≥t} r_t' − V_t = 1 on every real token;
    # whitening subtracts the global mean 1 → 0 everywhere → the policy gradient is exactly 0.
    logps, mask, adv = _rollout(torch.ones(3), gamma=1.0)
    assert adv[mask.bool()].tolist() == [1.0] * 9
    white = whiten(adv, mask)
    assert white.abs().max().item() == 0.0
    assert _policy_grad(logps, mask, white).abs().max().item() == 0.0
    # without whitening the same constant reward DOES push (A = 1): the check above is not vacuous
    assert _policy_grad(logps, mask, adv).abs().max().item() > 0


def test_constant_reward_with_a_perfect_critic_gives_zero_advantage():
    # γ = 0.9, score 2 on the last token, V_t = 2·γ^(L−1−t) (the exact return): every δ_t = 0 → A = 0 → no gradient
    lengths = [4, 2, 3]
    values = torch.tensor([[2.0 * 0.9 ** (n - 1 - t) if t < n else 0.0 for t in range(4)] for n in lengths])
    logps, mask, adv = _rollout(torch.full((3,), 2.0), gamma=0.9, values=values)
    assert adv.abs().max().item() < 1e-6
    assert _policy_grad(logps, mask, adv).abs().max().item() < 1e-7


def test_registered_ppo_loss_adds_its_terms_by_hand():
    from preftune.losses import get_loss

    # The shared policy case (contributions [−0.19, −0.02], N = 5) plus, on the same mask:
    #   value: V_old = 0, V = 0.1 (inside V_old ± 0.2), R = 1 on seq 0 and 0 on seq 1
    #          ½(V − R)²: seq 0 3·½·0.81 = 1.215, seq 1 2·½·0.01 = 0.01 → /5 = [0.243, 0.002], × vf_coef 0.5
    #   entropy: H = [[1, 2, 3], [0.5, 0.5, ·]] → −0.01·[6, 1]/5 = [−0.012, −0.002]
    #   total: [−0.19 + 0.1215 − 0.012, −0.02 + 0.001 − 0.002] = [−0.0805, −0.021]
    logps, old = _policy_case()
    values = torch.full((2, 3), 0.1)
    returns = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    entropy = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 99.0]])  # 99: padding
    spec = get_loss("ppo")
    out = spec.fn(logps, old, ADV, MASK, values, torch.zeros(2, 3), returns, entropy, num_tokens_in_step=5,
                  vf_coef=0.5, entropy_coef=0.01)
    assert out.losses.tolist() == pytest.approx([-0.0805, -0.021], abs=1e-6)
    assert out.metrics["loss/policy"].tolist() == pytest.approx([-0.19, -0.02], abs=1e-6)
    assert out.metrics["loss/value"].tolist() == pytest.approx([0.243, 0.002], abs=1e-6)
    assert out.metrics["loss/entropy"].tolist() == pytest.approx([-0.012, -0.002], abs=1e-7)
    assert out.metrics["entropy"].tolist() == pytest.approx([2.0, 0.5])
    # the hyperparameters the source reads are the spec's too: a reference only when kl_coef ≠ 0
    assert spec.uses_reference({"kl_coef": 0.05}) and not spec.uses_reference({"kl_coef": 0})
    assert spec.data == "ppo" and spec.defaults["clip_ratio"] == 0.2
