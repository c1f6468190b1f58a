"""SimPO: a reference-free, length-normalised Bradley-Terry loss with a target margin.

Notation (all tensors (B,)): π_w, π_l policy log-probs summed over completion tokens; |y_w|, |y_l| their
token counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from preftune.losses.base import LossOutput, LossSpec, register_loss


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
    comparing. Takes *summed* log-probs plus lengths and averages itself (reduction="sum",
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


register_loss(
    LossSpec(
        name="simpo",
        fn=simpo,
        needs_reference=False,
        needs_lengths=True,
        hyperparameters=("beta", "gamma"),
        description="SimPO: length-normalised log σ(β·Δ(mean logp) − γ); no reference model.",
    )
)
