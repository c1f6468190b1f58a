"""PPO for language models: clipped policy loss, clipped value loss, entropy bonus, KL-shaped rewards, adaptive KL,
and the registered ``ppo`` loss that combines them (:func:`ppo`).

Notation (B sequences, T completion positions, right-padded, m the (B, T) mask; all per token):
    logp_t, old_t     log π_θ and log π_old of the sampled token (old = the policy that generated the batch)
    ρ_t = exp(logp_t − old_t)           the importance ratio
    A_t               advantage (e.g. GAE, whitened: :mod:`preftune.advantages`)
    V_t, V_old,t, R_t value head now, value head at sampling time, return target (A_t + V_old,t)

Every loss here is token-level over the WHOLE optimizer step, with the same normalizer design as
:mod:`preftune.losses.policy`: the caller passes ``num_tokens_in_step`` (N, every micro-batch on every process)
and ``world_size`` (W), ``losses`` holds per-sequence contributions c_i = W · Σ_t m_it·ℓ_it / N, and the loop
reduces them by SUM and lets DDP average gradients — then micro-batching and process count leave the gradient
unchanged. (Departure from the LossOutput contract: reduce by sum, not mean.)
"""

from __future__ import annotations

import torch

from preftune.losses.base import LossOutput, LossSpec, register_loss
from preftune.losses.policy import step_contributions
from preftune.losses.ranges import Range, nonnegative, positive, typical


def _check_same_shape(**tensors) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"expected (B, T) tensors of one shape; got {shapes}")


def _per_seq_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(B,) detached mean of x over each row's real tokens (0 for an empty row)."""
    x = torch.where(m, x, torch.zeros_like(x)).detach()
    return x.sum(dim=1) / m.sum(dim=1).clamp(min=1).to(x.dtype)


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_ratio: float = 0.2,
    num_tokens_in_step: float,
    world_size: int = 1,
) -> LossOutput:
    """PPO's clipped surrogate, per token, as a token mean over the optimizer step.

        ℓ_t = −min(ρ_t·A_t, clip(ρ_t, 1 − ε, 1 + ε)·A_t),      L_step = Σ_{step} m_t·ℓ_t / N

    ε: ``clip_ratio``; N: ``num_tokens_in_step``. Where the clipped branch is taken (ρ > 1 + ε with A > 0, or
    ρ < 1 − ε with A < 0) ℓ is constant in θ and the gradient is exactly 0 — the proximal bound.

    Paper: Schulman et al., "Proximal Policy Optimization Algorithms", arXiv:1707.06347v2, Eq. 7 (L^CLIP); per
    token for LMs as in Ouyang et al. (InstructGPT) and "The N+ Implementation Details of RLHF with PPO",
    arXiv:2403.17031v1. Departure: the paper's expectation is a mean over the minibatch's timesteps; here the
    mean runs over the optimizer step's tokens with a step-global N (see the module docstring), so splitting a
    step into micro-batches or processes does not re-weight tokens.

    Args:
        logps: (B, T) log π_θ, with grad.
        old_logps: (B, T) log π_old (detached here).
        advantages: (B, T) per-token advantages (detached here).
        mask: (B, T) 1 on real completion tokens.
        num_tokens_in_step: N, real tokens of the whole step (all micro-batches, all processes).
        world_size: W processes whose gradients DDP averages (1 when gradients are summed).

    Returns:
        LossOutput: ``losses`` (B,) contributions to reduce by SUM; ``rewards`` (B,) token-mean advantage;
        ``metrics`` (B,) per-sequence token means, detached: ``clip_frac`` (tokens on the clipped branch),
        ``approx_kl_k1`` (old − logp, unbiased for KL(π_old ‖ π_θ) on tokens sampled from π_old), ``approx_kl_k3``
        ((ρ − 1) − log ρ ≥ 0, the low-variance estimator of the same KL; Schulman, "Approximating KL Divergence",
        2020), ``ratio_mean``, ``completion_length``.
    """
    _check_same_shape(logps=logps, old_logps=old_logps, advantages=advantages, mask=mask)
    if not clip_ratio >= 0:
        raise ValueError(f"clip_ratio must be ≥ 0; got {clip_ratio}")
    m = mask.to(torch.bool)
    lp = logps.float()
    zero = torch.zeros_like(lp)
    log_ratio = torch.where(m, lp - old_logps.detach().float(), zero)  # (B, T), 0 on padding before exp
    ratio = torch.exp(log_ratio)  # (B, T)
    adv = torch.where(m, advantages.detach().float(), zero)  # (B, T)
    clipped = torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    per_token = -torch.min(ratio * adv, clipped * adv)  # (B, T)
    losses = step_contributions(
        per_token, m, aggregation="dapo", num_tokens_in_step=num_tokens_in_step, world_size=world_size
    )
    on_clip = ((ratio > 1.0 + clip_ratio) & (adv > 0)) | ((ratio < 1.0 - clip_ratio) & (adv < 0))
    metrics = {
        "clip_frac": _per_seq_mean(on_clip.to(lp.dtype), m),
        "approx_kl_k1": _per_seq_mean(-log_ratio, m),
        "approx_kl_k3": _per_seq_mean((ratio - 1.0) - log_ratio, m),
        "ratio_mean": _per_seq_mean(ratio, m),
        "completion_length": m.sum(dim=1).to(lp.dtype),
    }
    return LossOutput(losses=losses, rewards=_per_seq_mean(adv, m), metrics=metrics)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    value_clip: float | None,
    num_tokens_in_step: float,
    world_size: int = 1,
) -> LossOutput:
    """PPO's clipped value loss, per token, as a token mean over the optimizer step.

        ℓ_t = ½·max((V_t − R_t)², (clip(V_t, V_old,t − c, V_old,t + c) − R_t)²),    L_step = Σ_{step} m_t·ℓ_t / N

    c: ``value_clip`` (None: no clipping, ℓ_t = ½·(V_t − R_t)²); R_t: return targets (``gae``'s returns).
    Taking the max makes the clip pessimistic: once V has moved more than c from V_old in the direction that the
    clipped error prefers, the clipped term is the larger one and its gradient w.r.t. V is exactly 0.

    Source: OpenAI baselines ``ppo2`` (``vf_losses = max(vf_losses1, vf_losses2)``, ``0.5 * mean``) as documented
    in "The N+ Implementation Details of RLHF with PPO", Huang et al., arXiv:2403.17031v1 (value clipping);
    not an equation of the PPO paper (arXiv:1707.06347v2 Eq. 9 has an unclipped squared error). Departure: the
    mean is over the step's tokens with a step-global N (module docstring).

    Args:
        values: (B, T) V_θ(s_t), with grad.
        old_values: (B, T) V at sampling time (detached here).
        returns: (B, T) targets R_t (detached here).
        mask: (B, T) 1 on real completion tokens.
        value_clip: c > 0, or None for an unclipped loss.
        num_tokens_in_step, world_size: as in :func:`ppo_policy_loss`.

    Returns:
        LossOutput: ``losses`` (B,) contributions to reduce by SUM; ``metrics`` (B,), detached:
        ``value_clip_frac`` (tokens where the clipped term is strictly larger), ``value_error`` (mean (V − R)²).
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    if value_clip is not None and not value_clip > 0:
        raise ValueError(f"value_clip must be > 0 (or None to switch clipping off); got {value_clip}")
    m = mask.to(torch.bool)
    v = values.float()
    zero = torch.zeros_like(v)
    r = torch.where(m, returns.detach().float(), zero)
    err = torch.where(m, (v - r) ** 2, zero)  # (B, T)
    if value_clip is None:
        per_token = 0.5 * err
        clip_frac = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    else:
        v_old = old_values.detach().float()
        v_clipped = torch.maximum(torch.minimum(v, v_old + value_clip), v_old - value_clip)  # clip(V, V_old ± c)
        err_clipped = torch.where(m, (v_clipped - r) ** 2, zero)
        per_token = 0.5 * torch.maximum(err, err_clipped)
        clip_frac = _per_seq_mean((err_clipped > err).to(v.dtype), m)
    losses = step_contributions(
        per_token, m, aggregation="dapo", num_tokens_in_step=num_tokens_in_step, world_size=world_size
    )
    return LossOutput(losses=losses, metrics={"value_clip_frac": clip_frac, "value_error": _per_seq_mean(err, m)})


def entropy_bonus(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    *,
    coef: float,
    num_tokens_in_step: float,
    world_size: int = 1,
) -> torch.Tensor:
    """The entropy bonus as a loss term (to ADD to the loss): minus coef times the step's mean token entropy.

        L_step = −coef · Σ_{step} m_t·H_t / N,      H_t = −Σ_v π_θ(v | s_t)·log π_θ(v | s_t)

    coef: the entropy coefficient (c_2 of the paper); H_t: the policy's entropy at position t, computed by the
    caller from the logits (a pure function over sampled-token log-probs cannot see the full distribution).

    Paper: Schulman et al., arXiv:1707.06347v2, Eq. 9 (the + c_2·S[π_θ](s_t) term of L^{CLIP+VF+S}). Departure:
    step-global token mean, as for the other terms here.

    Args:
        entropy: (B, T) per-token entropy H_t, with grad if the bonus should train the policy.
        mask: (B, T) 1 on real completion tokens.
        coef, num_tokens_in_step, world_size: as above.

    Returns:
        (B,) per-sequence contributions, to be reduced by SUM together with the other losses.
    """
    _check_same_shape(entropy=entropy, mask=mask)
    return step_contributions(
        -coef * entropy.float(), mask, aggregation="dapo", num_tokens_in_step=num_tokens_in_step, world_size=world_size
    )


def kl_penalty_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
) -> torch.Tensor:
    """Per-token PPO rewards: a KL penalty on every token, the sequence's score added on its last real token.

        r_t = −β·(logp_t − ref_t) + [t = L − 1]·score,      0 on padding

    β: ``kl_coef``; logp_t − ref_t: the k1 estimate of the per-token KL(π_θ ‖ π_ref) on sampled tokens; L: the
    sequence's number of real tokens; score: the reward model's (or verifier's) scalar for the whole completion.

    Papers: Ziegler et al., "Fine-Tuning Language Models from Human Preferences", arXiv:1909.08593v2, Sec. 2.2
    (R(x, y) = r(x, y) − β·log(π(y|x)/ρ(y|x)), spread over tokens); Huang et al., "The N+ Implementation Details
    of RLHF with PPO", arXiv:2403.17031v1 (the score on the last token, the KL penalty on each token).

    Args:
        scores: (B,) scalar score per sequence.
        logps: (B, T) log π of the sampled tokens at sampling time (detached here).
        ref_logps: (B, T) log π_ref of the same tokens.
        mask: (B, T) 1 on real completion tokens.
        kl_coef: β ≥ 0.

    Returns:
        (B, T) detached per-token rewards, the input of :func:`preftune.advantages.gae`.
    """
    _check_same_shape(logps=logps, ref_logps=ref_logps, mask=mask)
    if scores.shape != logps.shape[:1]:
        raise ValueError(f"scores must be (B,) = ({logps.shape[0]},); got {tuple(scores.shape)}")
    m = mask.to(torch.bool)
    lengths = m.sum(dim=1)  # (B,)
    if bool((lengths == 0).any()):
        row = int((lengths == 0).nonzero()[0])
        raise ValueError(f"sequence {row} has no completion token to carry its score (an empty completion)")
    lp = logps.detach().float()
    zero = torch.zeros_like(lp)
    rewards = torch.where(m, -kl_coef * (lp - ref_logps.detach().float()), zero)  # (B, T)
    t_len = m.shape[1]
    last = t_len - 1 - torch.flip(m, dims=[1]).to(torch.int64).argmax(dim=1)  # (B,) index of the last real token
    rows = torch.arange(m.shape[0], device=m.device)
    rewards[rows, last] += scores.detach().float()
    return rewards


class AdaptiveKLController:
    """The KL coefficient that steers the measured KL toward a target (proportional control).

        e = clip((KL − KL_target) / KL_target, −0.2, 0.2),      β ← β·(1 + e·n_steps / horizon)

    KL: the KL measured over the last batch (e.g. mean per-sequence Σ_t (logp_t − ref_t)); n_steps: samples (or
    steps) since the last update; horizon: how many of them it takes to move β by the clipped error.

    Paper: Ziegler et al., arXiv:1909.08593v2, Sec. 2.2 (e_t and β_{t+1} = β_t(1 + K_β·e_t)); K_β = n_steps/horizon
    as in the authors' lm-human-preferences code (``AdaptiveKLController``, horizon 10000), which TRL copied.

    Plain Python; ``state_dict`` / ``load_state_dict`` make it checkpointable.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if not init_kl_coef >= 0:
            raise ValueError(f"init_kl_coef must be ≥ 0; got {init_kl_coef}")
        if not target > 0:
            raise ValueError(f"the KL target must be > 0; got {target}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0; got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move β toward the target after ``n_steps`` samples with measured ``current_kl``; returns the new β."""
        error = min(max((float(current_kl) - self.target) / self.target, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


# ---- the registered loss ------------------------------------------------------------------------------------


def ppo(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
        values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, entropy: torch.Tensor | None = None,
        num_tokens_in_step: float | None = None, world_size: int = 1, *, clip_ratio: float = 0.2,
        value_clip: float | None = 0.2, vf_coef: float = 0.1, entropy_coef: float = 0.0, kl_coef: float = 0.05,
        target_kl: float | None = None, kl_horizon: float = 10000.0) -> LossOutput:
    """PPO's objective for one minibatch step: clipped surrogate + vf_coef · clipped value loss − entropy bonus.

        L = Σ_t m_t·[ −min(ρ_t·A_t, clip(ρ_t, 1 ± ε)·A_t)
                      + c_v·½·max((V_t − R_t)², (clip(V_t, V_old,t ± c) − R_t)²)
                      − c_H·H_t ] / N

    on rewards shaped per token r_t = −β·(log π_old − log π_ref)_t + [t last]·score, with A_t = GAE(r, V_old)
    (whitened over the rollout) and R_t = A_t + V_old,t (unwhitened). ε: ``clip_ratio``; c: ``value_clip``
    (None: no value clipping); c_v: ``vf_coef``; c_H: ``entropy_coef``; β: ``kl_coef``; N: the step's tokens.

    ``kl_coef``, ``target_kl`` and ``kl_horizon`` are read by the experience source, which shapes the rewards
    before GAE (``preftune.rollout.ppo``: :func:`kl_penalty_rewards`; with ``target_kl`` the coefficient adapts,
    :class:`AdaptiveKLController`, starting at ``kl_coef``); they are declared here so that one spec checks
    every PPO hyperparameter, warns outside the usual ranges and loads a reference model only when β ≠ 0.

    Papers: Schulman et al., arXiv:1707.06347v2, Eq. 7 and 9 (L^{CLIP+VF+S}); the LM recipe of Ziegler et al.,
    arXiv:1909.08593v2, Sec. 2.2, and Huang et al., arXiv:2403.17031v1 (per-token KL penalty, score on the last
    token, value clipping, advantage whitening). Departures: every term is a token mean over the WHOLE optimizer
    step with a step-global N (module docstring); value clipping is the ppo2 form, not the paper's Eq. 9.

    Args:
        logps, old_logps, advantages, mask: (B, T) as in :func:`ppo_policy_loss`.
        values, old_values, returns: (B, T) as in :func:`ppo_value_loss`.
        entropy: (B, T) per-token entropy H_t (with grad for the bonus), or None when ``entropy_coef`` is 0.
        num_tokens_in_step, world_size: the step-global normalizer (module docstring).

    Returns:
        LossOutput: ``losses`` (B,) per-sequence contributions to reduce by SUM; ``rewards`` (B,) token-mean
        advantage; ``metrics`` (B,), detached: ``loss/policy``, ``loss/value`` (and ``loss/entropy``) as
        contributions like ``losses``; ``policy/approx_kl_k1``, ``policy/approx_kl_k3``, ``policy/clip_frac``,
        ``policy/ratio_mean``, ``value/clip_frac``, ``value/error`` (mean (V − R)²), ``value/mean``, ``entropy``
        (per-sequence token means) and ``completion_length``.
    """
    if num_tokens_in_step is None:
        raise ValueError("ppo needs num_tokens_in_step: the loss-bearing tokens of the WHOLE optimizer step")
    common = dict(num_tokens_in_step=num_tokens_in_step, world_size=world_size)
    policy = ppo_policy_loss(logps, old_logps, advantages, mask, clip_ratio=clip_ratio, **common)
    value = ppo_value_loss(values, old_values, returns, mask, value_clip=value_clip, **common)
    losses = policy.losses + vf_coef * value.losses  # (B,)
    m = mask.to(torch.bool)
    pm = policy.metrics
    metrics = {"loss/policy": policy.losses.detach(), "loss/value": value.losses.detach(),
               "policy/approx_kl_k1": pm["approx_kl_k1"], "policy/approx_kl_k3": pm["approx_kl_k3"],
               "policy/clip_frac": pm["clip_frac"], "policy/ratio_mean": pm["ratio_mean"],
               "value/clip_frac": value.metrics["value_clip_frac"], "value/error": value.metrics["value_error"],
               "value/mean": _per_seq_mean(values.float(), m), "completion_length": pm["completion_length"]}
    if entropy is not None:
        metrics["entropy"] = _per_seq_mean(entropy.float(), m)
    if entropy_coef:
        if entropy is None:
            raise ValueError(f"entropy_coef = {entropy_coef} needs the per-token entropy")
        bonus = entropy_bonus(entropy, mask, coef=entropy_coef, **common)  # (B,)
        losses = losses + bonus
        metrics["loss/entropy"] = bonus.detach()
    return LossOutput(losses=losses, rewards=policy.rewards, metrics=metrics)


register_loss(
    LossSpec(
        name="ppo",
        fn=ppo,
        needs_reference=True,
        reference_if="kl_coef",
        data="ppo",
        description="PPO with a critic and GAE: clipped surrogate on KL-shaped rewards, clipped value loss, "
                    "optional entropy bonus and adaptive KL.",
        ranges={"clip_ratio": Range(0.0, 1.0, low_open=True, high_open=True,
                                    why="the ratio window 1 ± ε must stay positive; 0 would freeze the policy"),
                "value_clip": positive("the value window V_old ± c; None (null) switches value clipping off"),
                "vf_coef": nonnegative("a negative weight would train the critic away from the returns"),
                "entropy_coef": nonnegative("a negative bonus would reward collapsing the distribution"),
                "kl_coef": nonnegative("β < 0 would reward moving away from the reference"),
                "target_kl": positive("the KL the adaptive coefficient steers toward, in nats per sequence"),
                "kl_horizon": positive("samples over which the adaptive coefficient moves by its clipped error")},
        typical={"clip_ratio": typical(0.1, 0.3, "PPO clips at 0.2 (arXiv:1707.06347; seed 001 #7)"),
                 "kl_coef": typical(0.01, 0.2, "0.01-0.2 keeps the policy near the reference without freezing it "
                                               "(seed 001 #4; InstructGPT 0.02, TRL 0.05)"),
                 "vf_coef": typical(0.05, 1.0, "TRL uses 0.1, the PPO paper 0.5-1"),
                 "entropy_coef": typical(0.0, 0.05, "RLHF recipes mostly use 0; Atari PPO 0.01")},
    )
)
