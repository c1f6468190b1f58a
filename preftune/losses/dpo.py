"""The DPO family proper: the logistic loss −log σ(·) on the β-scaled preference logit, with or without label
noise (sigmoid DPO / cDPO, rDPO) and on batch quantiles (AOT).

Notation and shared ranges: :mod:`preftune.losses.pair` (π, r, ρ = π − r, h = ρ_w − ρ_l; rewards β·ρ).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from preftune.losses.base import LossOutput, LossSpec, register_loss
from preftune.losses.pair import BETA, BETA_TYPICAL, LABEL_NOISE, implicit_rewards, log_ratios


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
    rho_w, rho_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    logits = beta * (rho_w - rho_l)  # (B,)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    chosen_rewards, rejected_rewards = implicit_rewards(beta, rho_w, rho_l)
    return LossOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)


register_loss(
    LossSpec(
        name="dpo",
        fn=dpo,
        needs_reference=True,
        description="Sigmoid DPO (cDPO with label_smoothing > 0).",
        ranges={"beta": BETA, "label_smoothing": LABEL_NOISE},
        typical={"beta": BETA_TYPICAL},
        reward_scale="beta",
    )
)


def robust(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float,
) -> LossOutput:
    """Robust DPO (rDPO): the DPO loss de-biased for labels flipped at a known rate ε.

        L = [ (1 − ε)·(−log σ(β·h)) − ε·(−log σ(−β·h)) ] / (1 − 2ε),   h = (π_w − r_w) − (π_l − r_l)

    β: DPO temperature; ε: label_smoothing, the assumed flip rate, 0 ≤ ε < 1/2.
    Paper: Chowdhury, Kini & Natarajan, "Provably Robust DPO: Aligning Language Models with Noisy Feedback",
    arXiv:2403.00409, Sec. 3.1 (the rDPO loss; equation number not re-checked against a pinned version).

    Unlike cDPO (``dpo`` with label_smoothing) the flipped term is *subtracted*: in expectation over flips
    this equals the clean DPO loss. The price: L is unbounded below as β·h → +∞ (it keeps pushing the margin),
    and each example's loss can be negative. Same formula as TRL's ``loss_type="robust"``.

    Args:
        policy_chosen_logps: (B,) Σ log π_θ(y_w|x).
        policy_rejected_logps: (B,) Σ log π_θ(y_l|x).
        reference_chosen_logps: (B,) Σ log π_ref(y_w|x).
        reference_rejected_logps: (B,) Σ log π_ref(y_l|x).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust needs 0 <= label_smoothing < 0.5 (a flip rate); got {label_smoothing}")
    rho_w, rho_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    logits = beta * (rho_w - rho_l)  # (B,)
    eps = label_smoothing
    losses = ((1.0 - eps) * -F.logsigmoid(logits) - eps * -F.logsigmoid(-logits)) / (1.0 - 2.0 * eps)
    chosen_rewards, rejected_rewards = implicit_rewards(beta, rho_w, rho_l)
    return LossOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)


register_loss(
    LossSpec(
        name="robust",
        fn=robust,
        needs_reference=True,
        description="rDPO: DPO de-biased for a known label-flip rate ε < 0.5.",
        ranges={"beta": BETA, "label_smoothing": LABEL_NOISE},
        typical={"beta": BETA_TYPICAL},
        reward_scale="beta",
    )
)


def aot(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """AOT (paired): DPO's logistic loss on batch quantiles, so the policy's margins dominate the reference's.

        u = sort_B(π_w − π_l),   v = sort_B(r_w − r_l),   d = u − v
        L_i = −(1 − ε)·log σ(β·d_i) − ε·log σ(−β·d_i)

    β: temperature; ε: label_smoothing as in cDPO. sort_B sorts over the batch (ascending); in one dimension
    optimal transport between two empirical distributions is matching sorted samples.
    Paper: Melnyk et al., "Distributional Preference Alignment of LLMs via Optimal Transport",
    arXiv:2406.05882, Sec. 3 (paired setting, logistic relaxation of first-order stochastic dominance;
    equation number not re-checked against a pinned version). Same as TRL's ``loss_type="aot"`` (TRL's
    ``"aot_unpaired"`` sorts ρ_w and ρ_l instead and is not provided here).

    Caution: loss i belongs to the i-th quantile, not to example i; the losses couple the whole batch, so the
    result depends on the (micro-)batch composition, and B = 1 reduces exactly to ``dpo``. Rewards are the
    unsorted per-example β·ρ.

    Args:
        policy_chosen_logps: (B,) Σ log π_θ(y_w|x).
        policy_rejected_logps: (B,) Σ log π_θ(y_l|x).
        reference_chosen_logps: (B,) Σ log π_ref(y_w|x).
        reference_rejected_logps: (B,) Σ log π_ref(y_l|x).
    """
    u = torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0).values  # (B,)
    v = torch.sort(reference_chosen_logps - reference_rejected_logps, dim=0).values  # (B,)
    logits = beta * (u - v)  # (B,) per quantile
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    rho_w, rho_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    chosen_rewards, rejected_rewards = implicit_rewards(beta, rho_w, rho_l)
    return LossOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)


register_loss(
    LossSpec(
        name="aot",
        fn=aot,
        needs_reference=True,
        description="AOT (paired): logistic loss on batch-sorted margins; couples the batch.",
        ranges={"beta": BETA, "label_smoothing": LABEL_NOISE},
        typical={"beta": BETA_TYPICAL},
        reward_scale="beta",
    )
)
