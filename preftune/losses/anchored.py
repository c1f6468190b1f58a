"""Anchored pair losses: each side's log-ratio ρ_w, ρ_l enters on its own, not only through their difference, so
the loss says where each likelihood should go (NCA, BCO, SPPO with hard labels, APO-zero, APO-down).

Notation and shared ranges: :mod:`preftune.losses.pair` (π, r, ρ = π − r, h = ρ_w − ρ_l; rewards β·ρ).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from preftune.losses.base import LossOutput, LossSpec, register_loss
from preftune.losses.pair import BETA, BETA_TYPICAL, implicit_rewards, log_ratios
from preftune.losses.ranges import typical

SPPO_BETA_TYPICAL = typical(0.001, 0.5, "SPPO uses η = 1/β = 1e3, i.e. beta = 0.001 (Wu et al., 2405.00675); "
                                        "DPO-like values also work")


def nca_pair(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """NCA (pairwise): noise-contrastive alignment on absolute, not relative, rewards.

        L = −log σ(β·ρ_w) − ½·log σ(−β·ρ_w) − ½·log σ(−β·ρ_l),   ρ = π − r

    β: reward scale (α in the paper's experiments). Unlike DPO the loss acts on each log-ratio on its own,
    so it pushes the rejected likelihood down without letting the chosen one fall with it (the chosen term
    is minimised at σ(βρ_w) = 2/3, not at +∞).
    Paper: Chen et al., "Noise Contrastive Alignment of Language Models with Explicit Rewards",
    arXiv:2402.05369, Sec. 4.1 (NCA with K = 2 responses; equation number not re-checked against a pinned
    version). Same formula as TRL's ``loss_type="nca_pair"``.

    Args:
        policy_chosen_logps: (B,) Σ log π_θ(y_w|x).
        policy_rejected_logps: (B,) Σ log π_θ(y_l|x).
        reference_chosen_logps: (B,) Σ log π_ref(y_w|x).
        reference_rejected_logps: (B,) Σ log π_ref(y_l|x).
    """
    rho_w, rho_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    r_w, r_l = beta * rho_w, beta * rho_l  # (B,)
    losses = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    return LossOutput(losses=losses, chosen_rewards=r_w.detach(), rejected_rewards=r_l.detach())


register_loss(
    LossSpec(
        name="nca_pair",
        fn=nca_pair,
        needs_reference=True,
        ranges={"beta": BETA},
        typical={"beta": BETA_TYPICAL},
        reward_scale="beta",
        description="NCA: noise-contrastive loss on absolute rewards β·ρ_w, β·ρ_l.",
    )
)


def bco_pair(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    delta: float | torch.Tensor = 0.0,
) -> LossOutput:
    """BCO (pairwise): a binary classifier with logit β·ρ − δ, chosen labelled 1 and rejected 0.

        L = −log σ(β·ρ_w − δ) − log σ(−(β·ρ_l − δ)),   ρ = π − r

    β: reward scale; δ: the reward shift, a running mean of the rewards β·ρ over both sides of past batches.
    Paper: Jung et al., "Binary Classifier Optimization for Large Language Model Alignment",
    arXiv:2404.04656, Sec. 4 (reward shift δ; equation number not re-checked against a pinned version).

    δ is state, not a hyperparameter to tune: a pure function cannot keep a running mean, so the trainer
    maintains it (e.g. an exponential or cumulative mean of ``cat(chosen_rewards, rejected_rewards).mean()``,
    both returned here) and passes it in; it is detached here. With the default δ = 0 this equals TRL 1.x's
    ``loss_type="bco_pair"``, which dropped the running mean that older TRL versions and the paper use.

    Args:
        policy_chosen_logps: (B,) Σ log π_θ(y_w|x).
        policy_rejected_logps: (B,) Σ log π_θ(y_l|x).
        reference_chosen_logps: (B,) Σ log π_ref(y_w|x).
        reference_rejected_logps: (B,) Σ log π_ref(y_l|x).
        delta: float or 0-dim tensor, the running-mean reward shift (detached).
    """
    if isinstance(delta, torch.Tensor):
        delta = delta.detach()
    rho_w, rho_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    r_w, r_l = beta * rho_w, beta * rho_l  # (B,)
    losses = -F.logsigmoid(r_w - delta) - F.logsigmoid(-(r_l - delta))
    return LossOutput(losses=losses, chosen_rewards=r_w.detach(), rejected_rewards=r_l.detach())


register_loss(
    LossSpec(
        name="bco_pair",
        fn=bco_pair,
        needs_reference=True,
        ranges={"beta": BETA},
        typical={"beta": BETA_TYPICAL},
        reward_scale="beta",
        description="BCO: binary classifier on β·ρ − δ; δ is the trainer’s running-mean reward.",
    )
)


def sppo_hard(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """SPPO with hard win probabilities: regress each log-ratio onto ±1/(2β).

        L = (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))²,   ρ = π − r

    β: inverse of the paper's η. The paper regresses log(π_θ/π_t) onto η·(P(y ≻ π_t | x) − ½) with P estimated
    by a preference model; "hard" sets P = 1 for the chosen and 0 for the rejected response (targets ±η/2).
    Paper: Wu et al., "Self-Play Preference Optimization for Language Model Alignment", arXiv:2405.00675,
    Sec. 3 / Algorithm 1 (the update TRL cites as Eq. 4.7; version not pinned).

    Departure: π_ref here is whatever reference the loop supplies (the paper's π_t is the previous
    self-play iterate); we follow TRL's mapping η = 1/β so a larger β keeps the policy closer, as in DPO.

    Args:
        policy_chosen_logps: (B,) Σ log π_θ(y_w|x).
        policy_rejected_logps: (B,) Σ log π_θ(y_l|x).
        reference_chosen_logps: (B,) Σ log π_ref(y_w|x).
        reference_rejected_logps: (B,) Σ log π_ref(y_l|x).
    """
    if not beta > 0:
        raise ValueError(f"sppo_hard needs beta > 0 (the targets are ±1/(2·beta)); got {beta}")
    rho_w, rho_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    target = 0.5 / beta
    losses = (rho_w - target) ** 2 + (rho_l + target) ** 2  # (B,)
    chosen_rewards, rejected_rewards = implicit_rewards(beta, rho_w, rho_l)
    return LossOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)


register_loss(
    LossSpec(
        name="sppo_hard",
        fn=sppo_hard,
        needs_reference=True,
        ranges={"beta": BETA},
        typical={"beta": SPPO_BETA_TYPICAL},
        reward_scale="beta",
        description="SPPO with hard labels: regress ρ_w onto 1/(2β) and ρ_l onto −1/(2β).",
    )
)


def apo_zero(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """APO-zero: anchored objective that raises the chosen and lowers the rejected likelihood.

        L = (1 − σ(β·ρ_w)) + σ(β·ρ_l),   ρ = π − r

    β: temperature. Use when the chosen responses are better than what the model currently produces.
    Paper: D'Oosterlinck et al., "Anchored Preference Optimization and Contrastive Revisions",
    arXiv:2408.06266, Eq. 7 (as cited by TRL; version not pinned). Computed as σ(−βρ_w) + σ(βρ_l), which is
    the same value without the cancellation of 1 − σ(x) for large x.

    Args:
        policy_chosen_logps: (B,) Σ log π_θ(y_w|x).
        policy_rejected_logps: (B,) Σ log π_θ(y_l|x).
        reference_chosen_logps: (B,) Σ log π_ref(y_w|x).
        reference_rejected_logps: (B,) Σ log π_ref(y_l|x).
    """
    rho_w, rho_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = torch.sigmoid(-beta * rho_w) + torch.sigmoid(beta * rho_l)  # (B,)
    chosen_rewards, rejected_rewards = implicit_rewards(beta, rho_w, rho_l)
    return LossOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)


register_loss(
    LossSpec(
        name="apo_zero",
        fn=apo_zero,
        needs_reference=True,
        ranges={"beta": BETA},
        typical={"beta": BETA_TYPICAL},
        reward_scale="beta",
        description="APO-zero: raise the chosen and lower the rejected likelihood.",
    )
)


def apo_down(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """APO-down: anchored objective that lowers the chosen likelihood and the rejected one more.

        L = σ(β·ρ_w) + (1 − σ(β·(ρ_w − ρ_l))),   ρ = π − r

    β: temperature. Use when even the chosen responses are worse than what the model currently produces.
    By design L does *not* decrease when π_w alone rises (the first term pushes ρ_w down); only the margin
    ρ_w − ρ_l is pushed up. Paper: D'Oosterlinck et al., "Anchored Preference Optimization and Contrastive
    Revisions", arXiv:2408.06266, Eq. 8 (as cited by TRL; version not pinned). The second term is computed
    as σ(−β·(ρ_w − ρ_l)), same value, no cancellation.

    Args:
        policy_chosen_logps: (B,) Σ log π_θ(y_w|x).
        policy_rejected_logps: (B,) Σ log π_θ(y_l|x).
        reference_chosen_logps: (B,) Σ log π_ref(y_w|x).
        reference_rejected_logps: (B,) Σ log π_ref(y_l|x).
    """
    rho_w, rho_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = torch.sigmoid(beta * rho_w) + torch.sigmoid(-beta * (rho_w - rho_l))  # (B,)
    chosen_rewards, rejected_rewards = implicit_rewards(beta, rho_w, rho_l)
    return LossOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)


register_loss(
    LossSpec(
        name="apo_down",
        fn=apo_down,
        needs_reference=True,
        ranges={"beta": BETA},
        typical={"beta": BETA_TYPICAL},
        reward_scale="beta",
        description="APO-down: lower the chosen likelihood and the rejected one more.",
    )
)
