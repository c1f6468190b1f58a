"""SimPO: a reference-free, length-normalised Bradley-Terry loss with a target margin.

Notation (all tensors (B,)): π_w, π_l policy log-probs summed over completion tokens; |y_w|, |y_l| their
token counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from preftune.losses.base import LossOutput, LossSpec, register_loss
from preftune.losses.ranges import nonnegative, positive, typical

# SimPO γ: the paper searches 0.3-1.6 at β 2-2.5; its later β = 10 recipes keep γ/β at 0.3-0.5.
GAMMA_TYPICAL = (0.3, 1.6)
GAMMA_OVER_BETA_TYPICAL = (0.3, 0.5)


def simpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float,
    gamma: float,
) -> LossOutput:
    """Simple preference optimisation.

        L = −log σ(β·π_w/|y_w| − β·π_l/|y_l| − γ)

    β: reward scale (2 to 10 in the paper, far larger than DPO's); γ: target reward margin, in reward units.
    Paper: Meng, Xia & Chen, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    arXiv:2405.14734, Eq. 6 (version not pinned).

    Note: γ is the paper's margin. TRL's CPOTrainer (loss_type="simpo") instead takes ``simpo_gamma`` ≡ γ and
    ``cpo_alpha``; the official SimPO repo and some configs use ``gamma_beta_ratio`` = γ/β. Convert before
    comparing. Takes *summed* log-probs plus lengths and averages itself (its spec has
    needs_lengths=True); lengths are clamped to ≥ 1. Rewards are β·π/|y|, detached.

    Args:
        policy_chosen_logps: (B,) Σ log π_θ(y_w|x) over completion tokens.
        policy_rejected_logps: (B,) Σ log π_θ(y_l|x).
        chosen_lengths: (B,) completion token counts |y_w|.
        rejected_lengths: (B,) completion token counts |y_l|.
    """
    r_w = beta * policy_chosen_logps / chosen_lengths.clamp(min=1)  # (B,)
    r_l = beta * policy_rejected_logps / rejected_lengths.clamp(min=1)  # (B,)
    losses = -F.logsigmoid(r_w - r_l - gamma)
    return LossOutput(losses=losses, chosen_rewards=r_w.detach(), rejected_rewards=r_l.detach())


def _gamma_warnings(values: dict[str, float]) -> list[str]:
    """γ outside 0.3-1.6 is unusual unless γ/β is in 0.3-0.5 (the paper's β = 10 recipes)."""
    gamma, beta = values.get("gamma"), values.get("beta")
    if gamma is None:
        return []
    ratio_ok = bool(beta) and GAMMA_OVER_BETA_TYPICAL[0] <= gamma / beta <= GAMMA_OVER_BETA_TYPICAL[1]
    if GAMMA_TYPICAL[0] <= gamma <= GAMMA_TYPICAL[1] or ratio_ok:
        return []
    return [f"loss.gamma = {gamma:g} is outside the usual range for simpo: 0.3-1.6 at β 2-2.5, or γ/β 0.3-0.5 "
            "at β 10 (Meng et al., 2405.14734)"]


register_loss(
    LossSpec(
        name="simpo",
        fn=simpo,
        needs_reference=False,
        needs_lengths=True,
        description="SimPO: length-normalised log σ(β·Δ(mean logp) − γ); no reference model.",
        ranges={"beta": positive("at beta = 0 the loss ignores the policy and below 0 it learns the rejected side"),
                "gamma": nonnegative("a target margin in reward units (Meng et al., Eq. 6: γ > 0; γ = 0 is the "
                                     "paper's no-margin ablation)")},
        typical={"beta": typical(2.0, 10.0, "SimPO uses 2-10 (Meng et al., 2405.14734), far above DPO's")},
        extra_warnings=_gamma_warnings,
        reward_scale="beta",
    )
)
