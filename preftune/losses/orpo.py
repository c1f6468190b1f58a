"""ORPO: NLL on the chosen response plus an odds-ratio preference term; no reference model.

Notation (all tensors (B,)): π_w, π_l are policy log-probs summed over completion tokens, |y_w|, |y_l| the
token counts, m = π/|y| the mean token log-prob (the paper's log P_θ(y|x), length-normalised), and
log odds(y) = m − log(1 − exp(m)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from preftune.losses.base import LossOutput, LossSpec, register_loss

# Largest mean log-prob we feed to log(1 − exp(m)). At m = 0 (p = 1) the odds are infinite; clamping to −1e-6
# keeps log odds ≤ log(1e6) ≈ 13.8 and its gradient finite, in fp32 and bf16 alike. Only the odds term sees
# the clamp; the NLL term keeps the exact m.
_MAX_MEAN_LOGP = -1e-6


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate everywhere (Mächler, "Accurately computing log(1 − exp(−|a|))").

    Naive equivalent: ``torch.log(1 - torch.exp(x))``, which loses all precision as x → 0⁻ (1 − exp(x)
    cancels) and as x → −∞ (log of 1 − tiny). Near 0 use log(−expm1(x)); below −ln 2 use log1p(−exp(x)).
    Both branches are evaluated by ``torch.where``; each is finite for x < 0, so neither poisons the gradient.
    """
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    lam: float,
) -> LossOutput:
    """Odds-ratio preference optimisation.

        L = −m_w + λ·(−log σ(log odds_w − log odds_l))
        m = π/|y|,   log odds = m − log(1 − exp(m))

    λ: lam, weight of the odds-ratio term (the paper's λ, TRL's ``beta`` for ORPO; 0.1 in the paper).
    Paper: Hong, Lee & Thorne, "ORPO: Monolithic Preference Optimization without Reference Model",
    arXiv:2403.07691 (odds Eq. 4, L_ORPO = L_SFT + λ·L_OR Eq. 6, L_OR Eq. 7, as also cited by TRL; version
    not pinned).

    Departures: (1) the NLL term is the per-sequence mean-token NLL −m_w, so the caller's batch mean weights
    every example equally; TRL takes one token-level cross-entropy over the batch, which weights long chosen
    responses more (the two agree when chosen lengths are equal). (2) m is clamped to ≤ −1e-6 inside the
    odds only (TRL does not clamp: at m = 0 its log-odds is +inf and the gradient NaN). Takes *summed* log-probs plus lengths and
    averages itself, so its spec has reduction="sum" and needs_lengths=True.

    Returns rewards λ·m_w, λ·m_l (as TRL) and per-example metrics, all detached:
        ``nll_loss``        −m_w
        ``log_odds_ratio``  log σ(log odds_w − log odds_l), ≤ 0 — TRL's ``log_odds_ratio`` (it logs the mean);
                            the preference term of the loss is −λ times this
        ``log_odds_chosen`` log odds_w − log odds_l, the raw difference — TRL's ``log_odds_chosen``

    Args:
        policy_chosen_logps: (B,) Σ log π_θ(y_w|x) over completion tokens.
        policy_rejected_logps: (B,) Σ log π_θ(y_l|x).
        chosen_lengths: (B,) completion token counts |y_w| (int or float; clamped to ≥ 1).
        rejected_lengths: (B,) completion token counts |y_l|.
    """
    m_w = policy_chosen_logps / chosen_lengths.clamp(min=1)  # (B,)
    m_l = policy_rejected_logps / rejected_lengths.clamp(min=1)  # (B,)
    c_w, c_l = m_w.clamp(max=_MAX_MEAN_LOGP), m_l.clamp(max=_MAX_MEAN_LOGP)
    log_odds_diff = (c_w - _log1mexp(c_w)) - (c_l - _log1mexp(c_l))  # (B,)
    log_sigma = F.logsigmoid(log_odds_diff)  # (B,)
    nll = -m_w  # (B,)
    losses = nll - lam * log_sigma
    return LossOutput(
        losses=losses,
        chosen_rewards=(lam * m_w).detach(),
        rejected_rewards=(lam * m_l).detach(),
        metrics={
            "nll_loss": nll.detach(),
            "log_odds_ratio": log_sigma.detach(),
            "log_odds_chosen": log_odds_diff.detach(),
        },
    )


register_loss(
    LossSpec(
        name="orpo",
        fn=orpo,
        needs_reference=False,
        needs_lengths=True,
        hyperparameters=("lam",),
        description="ORPO: mean-token NLL on chosen + λ·odds-ratio loss; no reference model.",
    )
)
