"""KTO: a prospect-theoretic loss on unpaired data (one completion and a desirable/undesirable label).

Notation (all tensors (B,), sequence log-probs summed over completion tokens):
    π, r      policy and reference log-prob of the completion
    ρ = π − r the log-ratio;  β·ρ is the implicit reward returned for logging (detached)
    z0        the reference point: a detached, batch-level estimate of KL(π_θ ‖ π_ref), clamped at 0
"""

from __future__ import annotations

import torch

from preftune.losses.base import LossOutput, LossSpec, register_loss
from preftune.losses.pair import BETA, BETA_TYPICAL
from preftune.losses.ranges import positive

# A class weight scales that class's loss: 0 discards the class, below 0 it is trained the wrong way.
CLASS_WEIGHT = positive("a class weight; 0 would discard the class and below 0 it is trained the wrong way")


def kto(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor | float,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """Kahneman-Tversky Optimization.

        L = λ_D·(1 − σ(β·(ρ − z0)))   if y is desirable
        L = λ_U·(1 − σ(β·(z0 − ρ)))   if y is undesirable,        ρ = π − r

    β: risk-aversion / KL strength; λ_D, λ_U: desirable_weight, undesirable_weight (loss aversion: raise λ_U,
    or rebalance classes so that λ_D·n_D / (λ_U·n_U) lies in [1, 4/3] as the paper recommends); z0: ``kl``.
    Paper: Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv:2402.01306v4,
    Eq. 8 (L = E[λ_y − v(x, y)]).

    The reference point is estimated by the loop, not here: the paper (and TRL) take the mean log-ratio of
    mismatched (prompt, completion) pairs in the batch, detached, clamped at 0. We detach and clamp again
    (idempotent) so a raw estimate cannot carry gradient or go negative. 1 − σ(x) is computed as σ(−x), the
    same value without cancellation. Works for B = 1 and for batches holding one class only (no per-class means
    are taken here; the caller's reduction decides how classes are averaged).

    Args:
        policy_logps: (B,) Σ log π_θ(y|x) over completion tokens.
        reference_logps: (B,) Σ log π_ref(y|x).
        labels: (B,) bool, True where y is desirable.
        kl: 0-dim tensor or float, the reference point z0 (treated as a constant).
    """
    rho = policy_logps - reference_logps  # (B,)
    z0 = torch.as_tensor(kl, dtype=rho.dtype, device=rho.device).detach().clamp(min=0)  # ()
    desirable = desirable_weight * torch.sigmoid(-beta * (rho - z0))  # (B,)
    undesirable = undesirable_weight * torch.sigmoid(-beta * (z0 - rho))  # (B,)
    losses = torch.where(labels.to(torch.bool), desirable, undesirable)  # (B,)
    return LossOutput(losses=losses, rewards=(beta * rho).detach())


register_loss(
    LossSpec(
        name="kto",
        fn=kto,
        needs_reference=True,
        data="unpaired",
        needs_kl=True,
        ranges={"beta": BETA, "desirable_weight": CLASS_WEIGHT, "undesirable_weight": CLASS_WEIGHT},
        typical={"beta": BETA_TYPICAL},
        reward_scale="beta",
        auto=("desirable_weight", "undesirable_weight"),
        description="KTO: prospect-theoretic loss on unpaired desirable/undesirable completions.",
    )
)


def balanced_weights(n_d: int, n_u: int, desirable: float | str = "auto",
                     undesirable: float | str = "auto") -> tuple[float, float]:
    """Class weights λ_D, λ_U with λ_D·n_D / (λ_U·n_U) in [1, 4/3], the range Ethayarajh et al. advise
    (arXiv:2402.01306v4, Sec. 4.2, "the ratio ... should be in [1, 4/3]").

    A number is kept as given; an ``"auto"`` weight is 1.0 when the ratio is already in range, else it moves
    the ratio to the middle of the range, 7/6 (not to an end, so the rounding to 4 decimals cannot leave the
    range). Both ``"auto"``: the majority class keeps 1.0 and the minority's weight rises. Example: 30
    desirable, 90 undesirable -> λ_D = 7/6 · 90/30 = 3.5, λ_U = 1.0 (ratio 3.5·30 / 90 = 7/6).
    """
    d = 1.0 if desirable == "auto" else float(desirable)
    u = 1.0 if undesirable == "auto" else float(undesirable)
    ratio = d * n_d / (u * n_u)
    if 1.0 <= ratio <= 4.0 / 3.0:
        return d, u
    raise_d = desirable == "auto" and (undesirable != "auto" or ratio < 1.0)
    if raise_d:
        d = round(7.0 / 6.0 * u * n_u / n_d, 4)
    elif undesirable == "auto":
        u = round(d * n_d / (7.0 / 6.0 * n_u), 4)
    return d, u
