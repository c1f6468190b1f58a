"""The GRPO-family policy loss (preftune/losses/policy.py): hand-computed numbers, the step-global normalizer.

Shared 2-sequence case (ε_low = ε_high = 0.2, so w is clipped to [0.8, 1.2]):
    seq 0: 2 real tokens (third is padding), A = +1, token ratios w = [1.5, 0.9]
    seq 1: 3 real tokens,                      A = −1, token ratios w = [0.5, 1.1, 1.0]
    per-token ℓ = −min(w·A, clip(w)·A):
        seq 0: −min(1.5, 1.2) = −1.2 (clipped high: w > 1.2, A > 0);  −min(0.9, 0.9) = −0.9      Σ = −2.1
        seq 1: −min(−0.5, −0.8) = 0.8 (clipped low: w < 0.8, A < 0);  1.1;  1.0                  Σ = 2.9
    d ℓ / d logp = −w·A where the unclipped branch is taken, 0 where the clipped one is:
        seq 0: [0, −0.9];   seq 1: [0, 1.1, 1.0]
"""

import math

import pytest
import torch

from preftune.losses.policy import grpo_policy_loss

LOGPS = [[-1.0, -2.0, 0.0], [-0.5, -1.5, -1.0]]
RATIOS = [[1.5, 0.9, 1.0], [0.5, 1.1, 1.0]]
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
ADV = torch.tensor([1.0, -1.0])
COUNTS = dict(num_sequences_in_step=2, num_tokens_in_step=5, max_completion_length=4)


def _case():
    logps = torch.tensor(LOGPS, requires_grad=True)
    old = logps.detach() - torch.log(torch.tensor(RATIOS))  # so that exp(logp − old) = RATIOS
    return logps, old


def _run(aggregation, **kw):
    logps, old = _case()
    out = grpo_policy_loss(logps, old, ADV, MASK, aggregation=aggregation, **{**COUNTS, **kw})
    out.losses.sum().backward()
    return out, logps.grad


@pytest.mark.parametrize(
    "aggregation,contributions,grad",
    [
        # grpo: c_i = Σ_i / |o_i| / S:  −2.1/2/2 = −0.525,  2.9/3/2 = 0.483333 (total −0.041667)
        #       grad: seq 0 / (2·2): −0.9/4 = −0.225;  seq 1 / (3·2): 1.1/6 = 0.183333, 1/6 = 0.166667
        ("grpo", [-0.525, 0.483333], [[0.0, -0.225, 0.0], [0.0, 0.183333, 0.166667]]),
        # bnpo = dapo: c_i = Σ_i / N with N = 5:  −2.1/5 = −0.42,  2.9/5 = 0.58 (total 0.16); grad / 5
        ("bnpo", [-0.42, 0.58], [[0.0, -0.18, 0.0], [0.0, 0.22, 0.2]]),
        ("dapo", [-0.42, 0.58], [[0.0, -0.18, 0.0], [0.0, 0.22, 0.2]]),
        # dr_grpo: c_i = Σ_i / (S·L_max) = Σ_i / (2·4):  −2.1/8 = −0.2625,  2.9/8 = 0.3625 (total 0.1); grad / 8
        ("dr_grpo", [-0.2625, 0.3625], [[0.0, -0.1125, 0.0], [0.0, 0.1375, 0.125]]),
    ],
)
def test_two_sequences_by_hand(aggregation, contributions, grad):
    out, g = _run(aggregation)
    assert out.losses.tolist() == pytest.approx(contributions, abs=1e-5)
    assert g.tolist() == [pytest.approx(row, abs=1e-5) for row in grad]
    # clip fractions (token-level, per sequence): seq 0 high 1/2; seq 1 low 1/3
    assert out.metrics["clip_high_frac"].tolist() == pytest.approx([0.5, 0.0])
    assert out.metrics["clip_low_frac"].tolist() == pytest.approx([0.0, 1 / 3])
    # ratio mean over real tokens: (1.5 + 0.9)/2 = 1.2; (0.5 + 1.1 + 1.0)/3 = 0.866667
    assert out.metrics["ratio_mean"].tolist() == pytest.approx([1.2, 0.866667], abs=1e-5)
    assert out.metrics["completion_length"].tolist() == [2.0, 3.0]
    assert out.rewards.tolist() == [1.0, -1.0]
    assert "kl" not in out.metrics  # no reference given


def test_clip_higher_frees_the_upper_side():
    # ε_high = 0.6: w = 1.5 < 1.6 is no longer clipped: ℓ = −1.5, seq 0 Σ = −2.4, dapo c_0 = −2.4/5 = −0.48,
    # and the token gets its gradient back: −1.5/5 = −0.3. The low side (ε_low = 0.2) is unchanged.
    out, g = _run("dapo", epsilon_high=0.6)
    assert out.losses.tolist() == pytest.approx([-0.48, 0.58], abs=1e-5)
    assert g[0].tolist() == pytest.approx([-0.3, -0.18, 0.0], abs=1e-5)
    assert g[1, 0].item() == 0.0
    assert out.metrics["clip_high_frac"].tolist() == [0.0, 0.0]


def test_k3_kl_term_by_hand():
    # ref − logp: seq 0 [ln 2, 0], seq 1 [0, 0, −ln 2]; k3(d) = e^d − d − 1:
    #   k3(ln 2) = 2 − 0.693147 − 1 = 0.306853;  k3(−ln 2) = 0.5 + 0.693147 − 1 = 0.193147;  k3(0) = 0
    # β = 0.1, dapo: loss = 0.16 + 0.1·(0.306853 + 0.193147)/5 = 0.16 + 0.1·0.5/5 = 0.17
    # d k3/d logp = 1 − e^d: seq 0 token 0: 1 − 2 = −1 → 0.1·(−1)/5 = −0.02 (its policy gradient is 0: clipped)
    #                        seq 1 token 2: 1 − 0.5 = 0.5 → 0.1·0.5/5 = 0.01, plus the policy part 0.2 → 0.21
    logps, old = _case()
    d = torch.tensor([[math.log(2), 0.0, 0.0], [0.0, 0.0, -math.log(2)]])
    ref = logps.detach() + d
    out = grpo_policy_loss(logps, old, ADV, MASK, ref, beta=0.1, aggregation="dapo", **COUNTS)
    out.losses.sum().backward()
    assert out.losses.sum().item() == pytest.approx(0.17, abs=1e-5)
    assert logps.grad[0, 0].item() == pytest.approx(-0.02, abs=1e-6)
    assert logps.grad[1, 2].item() == pytest.approx(0.21, abs=1e-6)
    # kl metric = mean k3 per sequence: 0.306853/2 = 0.153426;  0.193147/3 = 0.064382
    assert out.metrics["kl"].tolist() == pytest.approx([0.153426, 0.064382], abs=1e-5)


def test_gspo_sequence_ratio_by_hand():
    # s_i = exp(mean_t log w): s_0 = sqrt(1.5·0.9) = sqrt(1.35) = 1.161895;  s_1 = (0.5·1.1·1.0)^(1/3) = 0.819321
    # ε = 0.2: both inside [0.8, 1.2], nothing clipped. ℓ is constant along a sequence: −s_0 and +s_1.
    # grpo: mean over tokens = −1.161895 and 0.819321; / S = 2 → c = [−0.580948, 0.409660] (total −0.171287)
    # grad: d s_i/d logp_t = s_i/|o_i| for each real token t, and c_i = −A_i·s_i / S (the token mean of a constant), so
    #   d c_0/d logp_t = −1·(1.161895/2)/2 = −0.290474;   d c_1/d logp_t = +1·(0.819321/3)/2 = 0.136553
    logps, old = _case()
    out = grpo_policy_loss(logps, old, ADV, MASK, importance_sampling="sequence", aggregation="grpo", **COUNTS)
    out.losses.sum().backward()
    assert out.losses.tolist() == pytest.approx([-0.580948, 0.409660], abs=1e-5)
    assert logps.grad.tolist() == [
        pytest.approx([-0.290474, -0.290474, 0.0], abs=1e-5),
        pytest.approx([0.136553, 0.136553, 0.136553], abs=1e-5),
    ]
    assert out.metrics["ratio_mean"].tolist() == pytest.approx([1.161895, 0.819321], abs=1e-5)
    # with ε = 0.1 seq 0 (1.1619 > 1.1, A > 0) is clipped as a whole: every one of its tokens, gradient 0
    logps2, old2 = _case()
    out2 = grpo_policy_loss(logps2, old2, ADV, MASK, epsilon=0.1, importance_sampling="sequence", aggregation="grpo", **COUNTS)
    out2.losses.sum().backward()
    assert out2.metrics["clip_high_frac"].tolist() == [1.0, 0.0]
    assert logps2.grad[0].abs().sum().item() == 0.0


# --- the step-global normalizer ----------------------------------------------------------------------------

B, T, D = 7, 6, 3
LENGTHS = [6, 1, 4, 2, 5, 3, 6]
STEP = dict(num_sequences_in_step=B, num_tokens_in_step=sum(LENGTHS), max_completion_length=8)


def _problem(seed=0):
    """A shared parameter θ (D,) drives every token's log-prob, as a model's weights do."""
    g = torch.Generator().manual_seed(seed)
    base, feats = torch.randn(B, T, generator=g), torch.randn(B, T, D, generator=g)
    theta = torch.nn.Parameter(torch.randn(D, generator=g))

    def logps_of(rows, t_len):
        return -torch.nn.functional.softplus(base[rows, :t_len] + feats[rows, :t_len] @ theta)  # (b, t_len)

    with torch.no_grad():
        full = logps_of(list(range(B)), T)
    old = full + 0.5 * torch.randn(B, T, generator=g)  # ratios spread around 1: both clip sides get hit
    ref = full + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.tensor([[int(t < n) for t in range(T)] for n in LENGTHS])
    return theta, logps_of, old, ref, adv, mask


def _micro_batch_loss(problem, rows, *, aggregation, importance_sampling, world_size=1, step=STEP):
    theta, logps_of, old, ref, adv, mask = problem
    t_len = max(LENGTHS[r] for r in rows)  # each micro-batch padded only to its own longest completion
    out = grpo_policy_loss(
        logps_of(rows, t_len), old[rows, :t_len], adv[rows], mask[rows, :t_len], ref[rows, :t_len],
        beta=0.05, epsilon=0.2, epsilon_high=0.28, importance_sampling=importance_sampling,
        aggregation=aggregation, world_size=world_size, **step,
    )  # fmt: skip
    return out


def _grad(problem, process_splits, **kw):
    """DDP simulation: each process sums its micro-batches' gradients; the processes' gradients are averaged."""
    theta = problem[0]
    grads, total = [], 0.0
    for micro_batches in process_splits:
        theta.grad = None
        for rows in micro_batches:
            loss = _micro_batch_loss(problem, rows, world_size=len(process_splits), **kw).losses.sum()
            loss.backward()
            total += loss.item() / len(process_splits)
        grads.append(theta.grad.clone())
    return torch.stack(grads).mean(dim=0), total


SPLITS = {
    "1 micro-batch": [[[0, 1, 2, 3, 4, 5, 6]]],
    "2 micro-batches (3 + 4)": [[[0, 1, 2], [3, 4, 5, 6]]],
    "3 micro-batches (1 + 2 + 4)": [[[0], [1, 2], [3, 4, 5, 6]]],
    "2 processes (2 + 2 | 3)": [[[0, 1], [2, 3]], [[4, 5, 6]]],
    "2 processes (1 | 3 + 3)": [[[0]], [[1, 2, 3], [4, 5, 6]]],
}


@pytest.mark.parametrize("importance_sampling", ["token", "sequence"])
@pytest.mark.parametrize("aggregation", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_gradient_is_independent_of_micro_batching_and_process_count(aggregation, importance_sampling):
    problem = _problem()
    kw = dict(aggregation=aggregation, importance_sampling=importance_sampling)
    # the whole step in one call, the reference
    theta = problem[0]
    theta.grad = None
    full = _micro_batch_loss(problem, list(range(B)), **kw)
    full.losses.sum().backward()
    reference = theta.grad.clone()
    # the data really exercises clipping on both sides (token level), so the check is not of a linear loss
    if importance_sampling == "token":
        assert full.metrics["clip_low_frac"].sum() > 0 and full.metrics["clip_high_frac"].sum() > 0
    for name, split in SPLITS.items():
        grad, total = _grad(problem, split, **kw)
        assert torch.allclose(grad, reference, rtol=1e-5, atol=1e-7), name
        assert total == pytest.approx(full.losses.sum().item(), rel=1e-5, abs=1e-7), name


def test_a_micro_batch_local_token_count_would_change_the_gradient():
    # The bug class of TRL #5619: normalizing each micro-batch by its own tokens (and dividing by the number of
    # accumulation steps) re-weights tokens. With micro-batches of 1 and 26 tokens the gradients differ.
    problem = _problem()
    theta = problem[0]
    kw = dict(aggregation="dapo", importance_sampling="token")
    reference, _ = _grad(problem, SPLITS["1 micro-batch"], **kw)
    theta.grad = None
    for rows in ([1], [0, 2, 3, 4, 5, 6]):
        local = dict(STEP, num_tokens_in_step=sum(LENGTHS[r] for r in rows))
        (_micro_batch_loss(problem, rows, step=local, **kw).losses.sum() / 2).backward()
    assert not torch.allclose(theta.grad, reference, rtol=1e-3)


@pytest.mark.parametrize("aggregation", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_on_policy_without_kl_is_reinforce(aggregation):
    # ρ = 1 (old = logps.detach(), μ = 1), β = 0: ℓ_t = −min(1·A, clip(1)·A) = −A, and d ℓ/d logp = −A·ρ = −A.
    # So the gradient is REINFORCE's −A_i·∇ log π(o_it), aggregated the same way:
    #   grpo:   −Σ_i A_i·(1/|o_i|)·Σ_t logp_it / S      bnpo/dapo: −Σ_i A_i·Σ_t logp_it / N
    #   dr_grpo: −Σ_i A_i·Σ_t logp_it / (S·L_max)
    theta, logps_of, _, _, adv, mask = _problem(seed=1)
    rows = list(range(B))
    theta.grad = None
    out = grpo_policy_loss(logps_of(rows, T), None, adv, mask, aggregation=aggregation, **STEP)
    assert out.metrics["clip_low_frac"].sum() == 0 and out.metrics["clip_high_frac"].sum() == 0
    out.losses.sum().backward()
    ours = theta.grad.clone()

    theta.grad = None
    lp = logps_of(rows, T) * mask  # (B, T)
    per_seq = lp.sum(dim=1)  # (B,) Σ_t log π
    lengths = mask.sum(dim=1).float()
    s, n, l_max = STEP["num_sequences_in_step"], STEP["num_tokens_in_step"], STEP["max_completion_length"]
    reinforce = {
        "grpo": -(adv * per_seq / lengths).sum() / s,
        "bnpo": -(adv * per_seq).sum() / n,
        "dapo": -(adv * per_seq).sum() / n,
        "dr_grpo": -(adv * per_seq).sum() / (s * l_max),
    }[aggregation]
    reinforce.backward()
    assert torch.allclose(ours, theta.grad, rtol=1e-5, atol=1e-7)
    # and the loss value is Σ −A·1 aggregated: grpo −Σ A_i / S; bnpo/dapo −Σ A_i·|o_i| / N; dr_grpo −Σ A_i·|o_i| / (S·L_max)
    value = {
        "grpo": -adv.sum() / s,
        "bnpo": -(adv * lengths).sum() / n,
        "dapo": -(adv * lengths).sum() / n,
        "dr_grpo": -(adv * lengths).sum() / (s * l_max),
    }[aggregation]
    assert out.losses.sum().item() == pytest.approx(value.item(), abs=1e-6)


def test_per_token_advantages_and_padding_garbage():
    # A given per token (B, T) equal to the broadcast per-sequence A gives the same loss; inf in padded positions
    # of logps or old_logps changes nothing (they are zeroed before exp).
    logps, old = _case()
    per_token_adv = ADV.unsqueeze(1).expand(2, 3).clone()
    a = grpo_policy_loss(logps, old, per_token_adv, MASK, aggregation="dapo", **COUNTS).losses
    garbage = old.clone()
    garbage[0, 2] = float("inf")
    b = grpo_policy_loss(logps, garbage, ADV, MASK, aggregation="dapo", **COUNTS).losses
    assert torch.allclose(a, b) and torch.isfinite(b).all()
    assert a.tolist() == pytest.approx([-0.42, 0.58], abs=1e-5)


def test_bad_inputs_raise_clear_errors():
    logps, old = _case()
    with pytest.raises(ValueError, match="num_tokens_in_step"):
        grpo_policy_loss(logps, old, ADV, MASK, aggregation="dapo")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_policy_loss(logps, old, ADV, MASK, aggregation="dr_grpo", num_sequences_in_step=2)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_policy_loss(logps, old, ADV, MASK, beta=0.1, **COUNTS)
    with pytest.raises(ValueError, match="unknown aggregation"):
        grpo_policy_loss(logps, old, ADV, MASK, aggregation="token_mean", **COUNTS)
    with pytest.raises(ValueError, match="importance_sampling"):
        grpo_policy_loss(logps, old, ADV, MASK, importance_sampling="seq", **COUNTS)
    with pytest.raises(ValueError, match="advantages"):
        grpo_policy_loss(logps, old, torch.ones(3), MASK, **COUNTS)
    with pytest.raises(ValueError, match="world_size"):
        grpo_policy_loss(logps, old, ADV, MASK, world_size=0, **COUNTS)


@pytest.mark.parametrize("estimator", ["group", "batch", "none", "rloo"])
def test_constant_reward_per_group_gives_zero_gradient(estimator):
    # Every completion of a prompt scores the same (1 for prompt 0, 0 for prompt 1): r − group mean = 0, so
    # A = 0 for every scale and for RLOO, and the loss has exactly zero gradient even off-policy (ρ ≠ 1).
    from preftune.advantages import group_relative, rloo

    scores = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])  # (P, G)
    adv = rloo(scores) if estimator == "rloo" else group_relative(scores, scale=estimator)
    theta, logps_of, old, _, _, _ = _problem(seed=2)
    rows = [0, 1, 2, 3, 4, 5]  # the 6 = P·G completions, one advantage each
    mask = torch.tensor([[int(t < LENGTHS[r]) for t in range(T)] for r in rows])
    theta.grad = None
    out = grpo_policy_loss(logps_of(rows, T), old[rows], adv.reshape(-1), mask, aggregation="dapo", **STEP)
    out.losses.sum().backward()
    assert adv.abs().max().item() == 0.0
    assert theta.grad.abs().max().item() == 0.0
