"""The DPO family: losses over the policy/reference log-ratio of chosen and rejected responses.

Notation shared by every function here (all tensors (B,), sequence log-probs summed over completion tokens):
    π_w, π_l   policy log-prob of chosen (w) and rejected (l)
    r_w, r_l   reference log-prob of chosen and rejected
    ρ_w = π_w − r_w,  ρ_l = π_l − r_l      (log-ratios)
    h = ρ_w − ρ_l                           (the preference logit)
Rewards returned for logging are β·ρ, detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from preftune.losses.base import LossOutput, LossSpec, register_loss


def _log_ratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    rho_w = policy_chosen_logps - reference_chosen_logps  # (B,)
    rho_l = policy_rejected_logps - reference_rejected_logps  # (B,)
    return rho_w, rho_l


def dpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Sigmoid DPO, with label smoothing as conservative DPO (cDPO).

        L = −(1 − ε)·log σ(β·h) − ε·log σ(−β·h),   h = (π_w − r_w) − (π_l − r_l)

    β: strength of the implicit KL constraint; ε: label_smoothing, the assumed rate of flipped labels.
    Paper: Rafailov et al., "Direct Preference Optimization", arXiv:2305.18290v3, Eq. 7. cDPO: Mitchell,
    "A note on DPO with noisy preferences" (2023). ``F.logsigmoid`` keeps it finite for |β·h| up to 1e4 and beyond.

    Args:
        policy_chosen_logps: (B,) Σ log π_θ(y_w|x) over completion tokens.
        policy_rejected_logps: (B,) Σ log π_θ(y_l|x).
        reference_chosen_logps: (B,) Σ log π_ref(y_w|x).
        reference_rejected_logps: (B,) Σ log π_ref(y_l|x).
    """
    rho_w, rho_l = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    logits = beta * (rho_w - rho_l)  # (B,)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return LossOutput(losses=losses, chosen_rewards=(beta * rho_w).detach(), rejected_rewards=(beta * rho_l).detach())


register_loss(
    LossSpec(
        name="dpo",
        fn=dpo,
        needs_reference=True,
        hyperparameters=("beta", "label_smoothing"),
        description="Sigmoid DPO (cDPO with label_smoothing > 0).",
    )
)
