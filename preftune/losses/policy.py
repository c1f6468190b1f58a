"""The GRPO family's policy-gradient loss, over per-token log-probs (torch only).

Notation (B sequences in this micro-batch, T completion positions, right-padded, m the (B, T) mask):
    logp_t = log π_θ(o_t | q, o_<t)       current policy, with grad
    old_t  = log π_old(o_t | …)           the policy that sampled o (= logp.detach() when each batch is used once)
    ref_t  = log π_ref(o_t | …)           the frozen reference (only for the KL term)
    w_t    = exp(logp_t − old_t)          token importance ratio;  GSPO: one ratio per sequence (below)
    ℓ_t    = −min(w_t·A, clip(w_t, 1 − ε_low, 1 + ε_high)·A) + β·k3_t
    k3_t   = exp(ref_t − logp_t) − (ref_t − logp_t) − 1    (≥ 0; unbiased estimate of KL(π_θ ‖ π_ref))

The step-global normalizer (why the counts are arguments)
---------------------------------------------------------
An optimizer step sees S sequences with N tokens, split over micro-batches (gradient accumulation) and over W
processes. The loss of the step is defined on the whole step — e.g. DAPO's Σ ℓ / N — so a micro-batch that
normalizes by its OWN token or sequence count (TRL's ``bnpo``/``dr_grpo``/``grpo`` with unequal micro-batches,
the bug class of TRL issue #5619) weighs tokens differently depending on how the step happens to be split. Here
the caller passes the step's counts (``num_sequences_in_step`` = S, ``num_tokens_in_step`` = N, summed over
every micro-batch of the step on every process) and ``world_size`` = W, and each sequence's contribution is

    c_i = W · (its part of the step loss)        e.g. dapo:  c_i = W · Σ_t m_it·ℓ_it / N

so that, with the loop calling ``losses.sum().backward()`` once per micro-batch (no division by the number
of accumulation steps) and DDP AVERAGING gradients over the W processes, the applied gradient is exactly the
gradient of the full-step loss. If gradients are SUMMED across processes instead (a manual all-reduce SUM),
pass ``world_size=1``. Departure from the LossOutput contract: ``losses`` holds these contributions (B,), to be
reduced by SUM, not mean (the plain mean over sequences would divide by B a second time).
"""

from __future__ import annotations

import torch

from preftune.losses.base import LossOutput

IMPORTANCE_SAMPLING = ("token", "sequence")

# aggregation → (the step counts it needs, the share of one sequence given its token sum, length and the counts).
_AGGREGATIONS = {
    "grpo": (("num_sequences_in_step",), lambda tok, n, c: tok / n.clamp(min=1) / c["num_sequences_in_step"]),
    "bnpo": (("num_tokens_in_step",), lambda tok, n, c: tok / c["num_tokens_in_step"]),
    "dapo": (("num_tokens_in_step",), lambda tok, n, c: tok / c["num_tokens_in_step"]),
    "dr_grpo": (
        ("num_sequences_in_step", "max_completion_length"),
        lambda tok, n, c: tok / (c["num_sequences_in_step"] * c["max_completion_length"]),
    ),
}
AGGREGATIONS = tuple(_AGGREGATIONS)


def step_contributions(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    *,
    aggregation: str,
    num_sequences_in_step: float | None = None,
    num_tokens_in_step: float | None = None,
    max_completion_length: int | None = None,
    world_size: int = 1,
) -> torch.Tensor:
    """Each sequence's share of the step loss: (B, T) per-token losses → (B,) contributions.

    The SUM of the contributions is this micro-batch's term of the step loss (times W, see below).

        grpo:     c_i = W · (1/|o_i|)·Σ_t ℓ_it / S           (mean over a sequence's tokens, then over the step's S sequences)
        bnpo:     c_i = W · Σ_t ℓ_it / N                     (N: tokens of the whole step)
        dapo:     c_i = W · Σ_t ℓ_it / N                     (same number as bnpo; see below)
        dr_grpo:  c_i = W · Σ_t ℓ_it / (S · L_max)           (Dr. GRPO's constant, L_max = max_completion_length)

    ℓ_it: per-token loss (masked); |o_i| = Σ_t m_it; S, N: ``num_sequences_in_step``, ``num_tokens_in_step``;
    W: ``world_size`` (DDP averages gradients over W processes; see the module docstring).

    Papers: "grpo" is the 1/G Σ_i 1/|o_i| Σ_t of DeepSeekMath's Eq. 3 (arXiv:2402.03300v3); "dapo" is DAPO's
    token-level loss 1/Σ_i|o_i| · Σ_i Σ_t (arXiv:2503.14476v1, Sec. 3.3); "dr_grpo" is Dr. GRPO's
    length-unbiased sum over tokens with a constant normalizer (arXiv:2503.20783v1, Sec. 3.1; its code divides by
    the generation budget, max_new_tokens — so Σ over a group / (G·L_max), then a mean over prompts = / (S·L_max)).

    Departures: (1) every normalizer is the STEP's, never the micro-batch's — TRL normalizes "grpo", "bnpo" and
    "dr_grpo" per micro-batch and divides by the accumulation steps, which equals the step loss only when all
    micro-batches have the same size and token count; (2) hence "bnpo" (TRL: tokens of the local batch) and "dapo"
    (TRL: tokens of the global batch) coincide here; both names are kept so TRL configs map onto them.
    S counts every sequence row, empty completions included (they add 0 to the sum), as TRL's mean does.

    Args:
        per_token: (B, T) per-token loss ℓ; masked positions are ignored.
        mask: (B, T) 1 on real completion tokens.
    """
    if aggregation not in _AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {', '.join(AGGREGATIONS)}")
    needs, share_of = _AGGREGATIONS[aggregation]
    given = {
        "num_sequences_in_step": num_sequences_in_step,
        "num_tokens_in_step": num_tokens_in_step,
        "max_completion_length": max_completion_length,
    }
    for name in needs:
        if given[name] is None:
            raise ValueError(
                f"aggregation {aggregation!r} needs {name} (a count over the WHOLE optimizer step, every micro-batch "
                "on every process); a micro-batch-local count would make the loss depend on how the step is split"
            )
        if not float(given[name]) > 0:
            raise ValueError(f"{name} must be > 0; got {given[name]}")
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size must be an integer ≥ 1; got {world_size!r}")
    m = mask.to(torch.bool)
    token_sum = torch.where(m, per_token, torch.zeros_like(per_token)).sum(dim=1)  # (B,)
    lengths = m.sum(dim=1).to(per_token.dtype)  # (B,)
    counts = {name: float(given[name]) for name in needs}
    return world_size * share_of(token_sum, lengths, counts)  # (B,)


def _per_seq_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(B,) mean of x over each row's real tokens (0 for an empty row), detached."""
    x = torch.where(m, x, torch.zeros_like(x)).detach()
    return x.sum(dim=1) / m.sum(dim=1).clamp(min=1).to(x.dtype)


def grpo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    importance_sampling: str = "token",
    aggregation: str = "dapo",
    num_sequences_in_step: float | None = None,
    num_tokens_in_step: float | None = None,
    max_completion_length: int | None = None,
    world_size: int = 1,
) -> LossOutput:
    """GRPO-family clipped policy-gradient loss with an optional k3 KL penalty; one micro-batch's share of a step.

        ℓ_it = −min(w_it·A_i, clip(w_it, 1 − ε_low, 1 + ε_high)·A_i) + β·[exp(ref_it − logp_it) − (ref_it − logp_it) − 1]
        w_it = exp(logp_it − old_it)                                   importance_sampling="token"
        w_it = s_i = exp((1/|o_i|)·Σ_t (logp_it − old_it))              importance_sampling="sequence" (GSPO)
        L_step = aggregation of ℓ over the step (see :func:`step_contributions`)

    A_i: advantage of sequence i (e.g. :func:`preftune.advantages.group_relative`), or A_it per token; ε_low:
    ``epsilon``; ε_high: ``epsilon_high`` (DAPO's clip-higher; defaults to ε_low); β: KL coefficient (β = 0: no
    reference needed); |o_i| = Σ_t m_it.

    Papers: GRPO, Shao et al., "DeepSeekMath", arXiv:2402.03300v3, Eq. 3 (objective; the KL term inside the
    token sum) and Eq. 4 (the k3 estimator). Clip-higher: Yu et al., "DAPO", arXiv:2503.14476v1, Sec. 3.1.
    GSPO: Zheng et al., "Group Sequence Policy Optimization", arXiv:2507.18071v2, Eq. 5 (objective, clipping s_i)
    with s_i from Eq. 7 (the length-normalized sequence ratio).

    Departures and choices: (1) the normalizer is global over the optimizer step (module docstring) — TRL's is
    per micro-batch for grpo/bnpo/dr_grpo. (2) The KL term is aggregated like the policy term (TRL does the same).
    (3) With "sequence" and a token-sum aggregation (bnpo/dapo/dr_grpo) each sequence's constant per-token loss is
    summed over its tokens, weighting sequences by length; GSPO's paper objective is "grpo" aggregation (TRL warns
    about the same combination). (4) Per-token math runs in float32 whatever the input dtype, and masked
    positions are zeroed before ``exp`` so padding garbage cannot turn into inf or NaN.

    Args:
        logps: (B, T) log π_θ of the sampled tokens, with grad.
        old_logps: (B, T) log π_old at sampling time, or None for logps.detach() (one update per batch, μ = 1).
        advantages: (B,) per sequence, or (B, T) per token.
        mask: (B, T) 1 on real completion tokens (right-padded).
        ref_logps: (B, T) log π_ref, needed when beta ≠ 0; when given with beta = 0 it only feeds the ``kl`` metric.
        num_sequences_in_step, num_tokens_in_step, max_completion_length: counts over the WHOLE optimizer step
            (every micro-batch on every process); which ones are needed depends on ``aggregation`` — see
            :func:`step_contributions`.
        world_size: W, the number of processes whose gradients DDP averages (1 when gradients are summed).

    Returns:
        LossOutput with ``losses`` (B,): per-sequence contributions c_i, to be reduced by SUM; ``rewards``: the
        per-sequence advantage (token mean when A is (B, T)), detached; ``metrics`` (each (B,), detached,
        per-sequence token means — weight by ``completion_length`` for a token-level mean): ``clip_low_frac``
        (tokens with w < 1 − ε_low and A < 0: the clipped branch is taken, the gradient is 0), ``clip_high_frac``
        (w > 1 + ε_high and A > 0), ``ratio_mean``, ``kl`` (mean k3; only when ``ref_logps`` is given) and
        ``completion_length`` (|o_i|).
    """
    if importance_sampling not in IMPORTANCE_SAMPLING:
        raise ValueError(
            f"unknown importance_sampling {importance_sampling!r}; expected one of {', '.join(IMPORTANCE_SAMPLING)}"
        )
    if logps.dim() != 2 or mask.shape != logps.shape:
        raise ValueError(f"logps and mask must both be (B, T); got {tuple(logps.shape)} and {tuple(mask.shape)}")
    if old_logps is None:
        old_logps = logps.detach()
    for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if t is not None and t.shape != logps.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; logps has {tuple(logps.shape)}")
    if advantages.shape not in (logps.shape[:1], logps.shape):
        raise ValueError(f"advantages must be (B,) or (B, T) = {tuple(logps.shape)}; got {tuple(advantages.shape)}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError(f"beta = {beta} needs ref_logps (the k3 KL term); pass beta=0 to train without a reference")
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high
    if not (eps_low >= 0 and eps_high >= 0):
        raise ValueError(f"epsilon and epsilon_high must be ≥ 0; got {eps_low}, {eps_high}")

    m = mask.to(torch.bool)
    lp = logps.float()
    zero = torch.zeros_like(lp)
    log_ratio = torch.where(m, lp - old_logps.detach().float(), zero)  # (B, T)
    if importance_sampling == "sequence":
        lengths = m.sum(dim=1, keepdim=True).clamp(min=1).to(lp.dtype)  # (B, 1)
        log_w = log_ratio.sum(dim=1, keepdim=True) / lengths  # (B, 1), broadcast over tokens below
        log_w = log_w.expand_as(lp)  # (B, T)
    else:
        log_w = log_ratio  # (B, T)
    ratio = torch.exp(log_w)  # (B, T)
    adv = advantages.detach().float()
    adv = adv.unsqueeze(1).expand_as(lp) if adv.dim() == 1 else adv  # (B, T)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)  # (B, T)
    per_token = -torch.min(ratio * adv, clipped * adv)  # (B, T)

    metrics = {}
    if ref_logps is not None:
        d = torch.where(m, ref_logps.detach().float() - lp, zero)  # (B, T) ref − logp
        k3 = torch.exp(d) - d - 1.0  # (B, T)
        if beta != 0.0:
            per_token = per_token + beta * k3
        metrics["kl"] = _per_seq_mean(k3, m)

    losses = step_contributions(
        per_token,
        m,
        aggregation=aggregation,
        num_sequences_in_step=num_sequences_in_step,
        num_tokens_in_step=num_tokens_in_step,
        max_completion_length=max_completion_length,
        world_size=world_size,
    )
    low = ((ratio < 1.0 - eps_low) & (adv < 0)).to(lp.dtype)  # (B, T) clipped branch, gradient 0
    high = ((ratio > 1.0 + eps_high) & (adv > 0)).to(lp.dtype)
    metrics["clip_low_frac"] = _per_seq_mean(low, m)
    metrics["clip_high_frac"] = _per_seq_mean(high, m)
    metrics["ratio_mean"] = _per_seq_mean(ratio, m)
    metrics["completion_length"] = m.sum(dim=1).to(lp.dtype)
    rewards = advantages.detach().float() if advantages.dim() == 1 else _per_seq_mean(adv, m)  # (B,)
    return LossOutput(losses=losses, rewards=rewards, metrics=metrics)
