"""Notation, helpers and hyperparameter ranges shared by the reference-based pair losses (dpo.py, margin.py,
anchored.py).

Notation (all tensors (B,), sequence log-probs summed over completion tokens):
    π_w, π_l   policy log-prob of chosen (w) and rejected (l)
    r_w, r_l   reference log-prob of chosen and rejected
    ρ_w = π_w − r_w,  ρ_l = π_l − r_l      (log-ratios)
    h = ρ_w − ρ_l                           (the preference logit)
Rewards returned for logging are β·ρ, detached.
"""

from __future__ import annotations

import torch

from preftune.losses.ranges import Range, positive, typical

# Every loss of the family scales log-ratios by β: at β = 0 it no longer depends on the policy's preference and
# below 0 it prefers the rejected side (β = −0.5 in DPO is DPO with chosen and rejected swapped).
BETA = positive("at beta = 0 the loss ignores which side the policy prefers (no learning signal) and below 0 "
                "it learns the rejected side")
BETA_TYPICAL = typical(0.01, 0.5, "the DPO paper uses 0.1, and 0.5 for summarization (Rafailov et al., "
                                  "2305.18290v3, App. B); recipes go down to 0.01")
# ε as an assumed rate of flipped labels (cDPO, rDPO, AOT): at 0.5 chosen and rejected weigh the same, above it
# the loss prefers the rejected side.
LABEL_NOISE = Range(0.0, 0.5, high_open=True, why="an assumed label-flip rate; at 0.5 chosen and rejected weigh "
                                                  "the same and above it the rejected side wins")


def log_ratios(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """ρ_w = π_w − r_w and ρ_l = π_l − r_l, each (B,)."""
    rho_w = policy_chosen_logps - reference_chosen_logps  # (B,)
    rho_l = policy_rejected_logps - reference_rejected_logps  # (B,)
    return rho_w, rho_l


def implicit_rewards(beta: float, rho_w: torch.Tensor, rho_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached implicit rewards β·ρ_w, β·ρ_l, each (B,)."""
    return (beta * rho_w).detach(), (beta * rho_l).detach()
