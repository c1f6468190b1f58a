"""Advantage estimators for the on-policy methods: pure functions, torch only.

Shapes: rewards over a generation batch are (P, G) — P prompts × G completions per prompt — and advantages come
back in the same shape. A missing score (a reward function returned ``None``) is given as NaN, or by a
``mask`` (True = scored); it is left out of every mean and standard deviation and its advantage is exactly 0.
Token-level estimators (``gae``, ``whiten`` over tokens) take (B, T) tensors over completion positions with a
(B, T) mask, right-padded.

Each estimator has a naive loop twin in ``tests/test_advantages.py`` that the tests compare it with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SCALES = ("group", "batch", "none")


def _valid(rewards: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(…) bool: scored entries — not NaN and, when a mask is given, inside it."""
    valid = ~torch.isnan(rewards)
    if mask is not None:
        if mask.shape != rewards.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, rewards {tuple(rewards.shape)}; they must match")
        valid = valid & mask.to(torch.bool)
    return valid


def _check_groups(rewards: torch.Tensor, name: str) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"{name} expects rewards of shape (P, G) = (prompts, completions); got {tuple(rewards.shape)}")


def _masked_mean_std(x: torch.Tensor, valid: torch.Tensor, dim, *, unbiased: bool):
    """Mean and std of ``x`` over ``valid`` entries along ``dim`` (kept). Fewer than 2 (unbiased) or 0 entries: std 0."""
    w = valid.to(x.dtype)
    xz = torch.where(valid, x, torch.zeros_like(x))  # NaN-free
    n = w.sum(dim=dim, keepdim=True)
    mean = xz.sum(dim=dim, keepdim=True) / n.clamp(min=1)
    sq = ((xz - mean) ** 2 * w).sum(dim=dim, keepdim=True)
    denom = (n - 1) if unbiased else n
    var = torch.where(denom > 0, sq / denom.clamp(min=1), torch.zeros_like(sq))
    return mean, var.sqrt()


def group_relative(
    rewards: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: str = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """Group-relative advantages (GRPO outcome supervision, Dr. GRPO, batch-scaled).

        A_ij = (r_ij − mean_j' r_ij') / (σ + eps)       scale="group":  σ = std_j' r_ij'   (std within the group)
                                                         scale="batch":  σ = std_i'j' r_i'j' (std over the batch)
        A_ij =  r_ij − mean_j' r_ij'                     scale="none"   (Dr. GRPO: no division)

    r_ij: reward of completion j of prompt i; means and stds run over scored entries only; eps: keeps a
    zero-variance group finite (its advantages are then exactly 0, since every r_ij equals the mean).

    Papers: GRPO, Shao et al., "DeepSeekMath", arXiv:2402.03300v3, Sec. 4.1.2 "Outcome Supervision RL with GRPO"
    (Â_i,t = r̃_i = (r_i − mean(r)) / std(r), the same for every token of o_i). Dr. GRPO, Liu et al.,
    "Understanding R1-Zero-Like Training", arXiv:2503.20783v1, Sec. 3.1 / Fig. 1 (the std division removed,
    because it up-weights prompts that are nearly always or nearly never solved). "batch": the group mean with the
    batch std, the "Lite PPO" recipe of Liu et al., "Tricks or Traps? A Deep Dive into RL for LLM Reasoning",
    arXiv:2508.08221 — TRL's ``scale_rewards="batch"`` cites it.

    Which std: the sample (Bessel-corrected, n − 1) std, and eps added to the std, not the variance. This is what
    TRL 1.16's GRPOTrainer computes (``trl.trainer.utils.nanstd``: NaN-aware, multiplied by n/(n − 1), i.e.
    ``torch.std``'s unbiased estimate; then ``/(std + 1e-4)``), so first-step advantages agree with TRL. The paper
    does not say which std. A group with a single scored completion has no sample std: its advantage is 0 (TRL
    divides 0 by NaN and maps NaN to 0; same result).

    Pass the whole generation batch (gathered from every process, as TRL does before normalizing): with a
    per-process slice the "batch" std — and, if a group is split across processes, the group statistics — differ.

    Args:
        rewards: (P, G) float; NaN marks a missing score.
        mask: optional (P, G) bool, True where scored.
        scale: "group" | "batch" | "none".
        eps: added to the std before dividing.

    Returns:
        (P, G) advantages; 0 where the score is missing.
    """
    _check_groups(rewards, "group_relative")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {', '.join(SCALES)}")
    valid = _valid(rewards, mask)  # (P, G)
    mean, std = _masked_mean_std(rewards, valid, 1, unbiased=True)  # (P, 1), (P, 1)
    centered = rewards - mean  # (P, G)
    if scale == "batch":
        _, std = _masked_mean_std(rewards, valid, (0, 1), unbiased=True)  # (1, 1)
    if scale != "none":
        centered = centered / (std + eps)
    return torch.where(valid, centered, torch.zeros_like(centered))


def rloo(rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE leave-one-out advantages.

        A_ij = r_ij − 1/(k_i − 1) · Σ_{j' ≠ j} r_ij'  =  k_i/(k_i − 1) · (r_ij − mean_j' r_ij')

    r_ij: reward of completion j of prompt i; k_i: number of scored completions of prompt i (the sum runs over
    scored ones). Each completion's baseline is the mean of the OTHER completions, so it does not depend on the
    completion itself and the estimator stays unbiased.

    Papers: Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs", arXiv:2402.14740v2, Sec. 3 (the REINFORCE Leave-One-Out estimator; equation number not
    cited, not re-checked against the PDF here); Kool, van Hoof & Welling,
    "Buy 4 REINFORCE Samples, Get a Baseline for Free!" (ICLR 2019 DeepRLStructPred workshop).

    Departure: a prompt with fewer than 2 scored completions has no leave-one-out baseline; its advantages are 0
    (no learning signal) rather than an error, so one unscorable completion does not stop a run.

    Args:
        rewards: (P, G) float with G ≥ 2; NaN marks a missing score.
        mask: optional (P, G) bool, True where scored.

    Returns:
        (P, G) advantages; 0 where the score is missing.
    """
    _check_groups(rewards, "rloo")
    if rewards.shape[1] < 2:
        raise ValueError(f"rloo needs at least 2 completions per prompt (G ≥ 2); got G = {rewards.shape[1]}")
    valid = _valid(rewards, mask)  # (P, G)
    w = valid.to(rewards.dtype)
    rz = torch.where(valid, rewards, torch.zeros_like(rewards))
    k = w.sum(dim=1, keepdim=True)  # (P, 1)
    others = (rz.sum(dim=1, keepdim=True) - rz) / (k - 1).clamp(min=1)  # (P, G) mean of the other scored ones
    adv = rz - others
    return torch.where(valid & (k >= 2), adv, torch.zeros_like(adv))


def whiten(
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Masked global whitening (advantage normalization over the whole batch).

        out = (x − μ) / (σ + eps)          shift_mean=True
        out = (x − μ) / (σ + eps) + μ      shift_mean=False (rescale only: the mean is kept)
        μ = Σ m·x / Σ m,   σ = sqrt(Σ m·(x − μ)² / Σ m)

    x: values; m: mask (NaN entries count as masked). One μ and one σ over every unmasked entry of the tensor
    — global, not per row or per group.

    Papers: REINFORCE++, Hu et al., arXiv:2501.03262v9, "global advantage normalization" (normalize over the
    whole batch instead of per prompt, Sec. 3); PPO's advantage normalization (OpenAI baselines ``ppo2``;
    "The N+ Implementation Details of RLHF with PPO", arXiv:2403.17031v1). The textbook seed's
    ``normalize_advantages`` (/work/shared/seeds/001, mistake 5: ``(a − mean) / (np.std(a) + 1e-8)``) is the
    naive twin: population std (numpy's default, ddof 0) and eps on the std, as here. Departure from TRL's old
    ``masked_whiten`` (unbiased variance, ``rsqrt(var + 1e-8)``): we follow the seed, which the tests pin; on a
    batch of N tokens the two differ by a factor sqrt((N − 1)/N).

    Args:
        values: any shape, e.g. (B, T) per-token advantages or (P, G) rewards.
        mask: optional, same shape, True (or 1) where the entry counts.
        shift_mean: False keeps the mean (used to rescale rewards without centering them).
        eps: added to σ.

    Returns:
        same shape as ``values``; 0 at masked entries. No unmasked entry at all: all zeros.
    """
    valid = _valid(values, mask)
    if not bool(valid.any()):
        return torch.zeros_like(values)
    dims = tuple(range(values.dim()))
    mean, std = _masked_mean_std(values, valid, dims, unbiased=False)
    out = (values - mean) / (std + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(valid, out, torch.zeros_like(out))


def _as_reward_tensor(x) -> torch.Tensor:
    """A (P, G) float tensor from a tensor or nested sequences of float | None (None → NaN)."""
    if isinstance(x, torch.Tensor):
        return x.to(torch.float32) if not x.is_floating_point() else x
    rows = [[float("nan") if v is None else float(v) for v in row] for row in x]
    return torch.tensor(rows, dtype=torch.float32)


def combine_rewards(
    per_function: torch.Tensor | Sequence,
    weights: torch.Tensor | Sequence[float] | None = None,
) -> torch.Tensor:
    """Several reward functions into one reward per completion: a weighted sum, missing scores skipped.

        R_ij = Σ_f w_f · r_fij   over the functions f that scored completion (i, j)
        R_ij = NaN               when no function scored it (the completion is unscorable)

    r_fij: score of completion j of prompt i by reward function f (NaN = the function returned None); w_f: the
    function's weight (default 1). Normalize afterwards with :func:`group_relative` or :func:`rloo` ("sum then
    normalize"); an unscorable completion is then masked out of the group statistics and gets advantage 0.

    Decision (matches TRL 1.16, ``multi_objective_aggregation="sum_then_normalize"``): a function returning None
    for a completion contributes 0 to that completion's sum (``nansum`` over functions) — the other functions'
    scores still count; only a completion that every function left unscored is masked. No paper prescribes this.

    Args:
        per_function: (F, P, G) tensor, or a list of F (P, G) tensors / nested lists of float | None.
        weights: (F,) weights, or None for all ones.

    Returns:
        (P, G) float; NaN where no function scored the completion.
    """
    if isinstance(per_function, torch.Tensor):
        stacked = per_function if per_function.is_floating_point() else per_function.to(torch.float32)
    else:
        parts = [_as_reward_tensor(p) for p in per_function]
        if not parts:
            raise ValueError("combine_rewards needs at least one reward function's scores")
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"every reward function must score the same (P, G) completions; got shapes {sorted(shapes)}")
        stacked = torch.stack(parts)
    if stacked.dim() != 3:
        raise ValueError(f"combine_rewards expects (F, P, G) scores; got shape {tuple(stacked.shape)}")
    n_fn = stacked.shape[0]
    if weights is None:
        w = torch.ones(n_fn, dtype=stacked.dtype, device=stacked.device)
    else:
        w = torch.as_tensor(weights, dtype=stacked.dtype, device=stacked.device)
        if w.shape != (n_fn,):
            raise ValueError(f"got {tuple(w.shape)} weights for {n_fn} reward functions; give one weight per function")
    scored = ~torch.isnan(stacked)  # (F, P, G)
    total = torch.where(scored, stacked * w.view(-1, 1, 1), torch.zeros_like(stacked)).sum(dim=0)  # (P, G)
    return torch.where(scored.any(dim=0), total, torch.full_like(total, float("nan")))


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over completion tokens.

        δ_t = r_t + γ·V(s_{t+1}) − V(s_t),      V(s_{L}) = 0 after the last real token (index L − 1)
        A_t = δ_t + γλ·A_{t+1}                   (A_L = 0),   i.e. A_t = Σ_l (γλ)^l δ_{t+l}
        R_t = A_t + V(s_t)                       (the value targets, "returns")

    r_t: per-token reward (e.g. from ``kl_penalty_rewards``: −β·KL per token, the score on the last token);
    V(s_t): the critic's value before emitting token t; γ: discount; λ: GAE's bias/variance trade-off
    (λ = 1: Monte-Carlo return minus V; λ = 0: one-step TD error).

    Paper: Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
    arXiv:1506.02438v6, Eq. 16 (GAE(γ, λ)) with δ from Eq. 10; the value after the final token is 0 because the
    episode ends there (a completion truncated at max_new_tokens is treated as ended too, as in TRL / OpenRLHF).

    Naive equivalent (``naive_gae`` in the tests, one row at a time)::

        a = 0; for t in reversed(real positions): v_next = V[t+1] if t+1 is real else 0
                                                  a = r[t] + γ·v_next − V[t] + γλ·a; A[t] = a

    Args:
        rewards: (B, T) per-token rewards; ignored where ``mask`` is 0.
        values: (B, T) V(s_t); ignored where ``mask`` is 0.
        mask: (B, T) 1 on real completion tokens, right-padded (each row: ones, then zeros).
        gamma: discount γ in [0, 1].
        lam: λ in [0, 1].

    Returns:
        (advantages, returns), each (B, T); 0 at masked positions. Both are detached (they are targets).
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(
            f"gae expects rewards, values and mask of one (B, T) shape; got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)}, {tuple(mask.shape)}"
        )
    m = mask.to(torch.bool)
    if bool((m[:, 1:] & ~m[:, :-1]).any()):
        row = int((m[:, 1:] & ~m[:, :-1]).any(dim=1).nonzero()[0])
        raise ValueError(f"gae needs right-padded masks (ones then zeros); row {row} has a real token after padding")
    mf = m.to(values.dtype)
    r = torch.where(m, rewards, torch.zeros_like(rewards)).detach()  # (B, T)
    v = torch.where(m, values, torch.zeros_like(values)).detach()  # (B, T)
    b, t_len = r.shape
    adv = torch.zeros_like(v)  # (B, T)
    last = torch.zeros(b, dtype=v.dtype, device=v.device)  # (B,) A_{t+1}
    for t in reversed(range(t_len)):
        # Right padding: position t+1 is real iff mask[t+1] = 1, so V(s_{t+1}) and A_{t+1} vanish past the end.
        nxt = mf[:, t + 1] if t + 1 < t_len else torch.zeros_like(last)  # (B,)
        v_next = v[:, t + 1] * nxt if t + 1 < t_len else torch.zeros_like(last)
        delta = r[:, t] + gamma * v_next - v[:, t]
        last = (delta + gamma * lam * nxt * last) * mf[:, t]
        adv[:, t] = last
    returns = (adv + v) * mf
    return adv, returns
