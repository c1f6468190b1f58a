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
from preftune.losses.ranges import nonnegative, typical

_LN2 = math.log(2.0)
# Largest mean log-prob fed to the log-odds: m = 0 (p = 1 to float precision) has infinite odds. The smallest
# normal float32 keeps every m a float32 can hold exact (subnormals aside) while log odds stays ≤ 87.3.
_MAX_MEAN_LOGP = -torch.finfo(torch.float32).tiny


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate everywhere (Mächler, "Accurately computing log(1 − exp(−|a|))").

    Naive equivalent: ``torch.log(1 - torch.exp(x))``, which loses all precision as x → 0⁻ (1 − exp(x)
    cancels) and as x → −∞ (log of 1 − tiny). Above −ln 2 use log(−expm1(x)), below it log1p(−exp(x)).
    ``torch.where`` differentiates both branches and multiplies the unused one's gradient by 0, and 0·inf is
    NaN; so each branch is fed its own input only where it is used and a harmless −ln 2 elsewhere.
    """
    near = x > -_LN2  # (B,)
    safe = torch.full_like(x, -_LN2)
    x_near, x_far = torch.where(near, x, safe), torch.where(near, safe, x)
    return torch.where(near, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def _log_odds(m: torch.Tensor) -> torch.Tensor:
    """log odds = m − log(1 − exp(m)) of a float32 mean log-prob m (B,); exact for m ≤ −1.2e-38."""
    c = m.clamp(max=_MAX_MEAN_LOGP)  # (B,)
    return c - _log1mexp(c)


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

    Where it differs from TRL (the paper's definitions are kept; only the m = 0 cap below departs from the
    paper): (1) the NLL term is the per-sequence mean-token NLL −m_w over the chosen *completion* tokens, the
    paper's L_SFT; the caller's batch mean then weights every example equally. TRL 1.16's ORPOTrainer
    (``trl.experimental.orpo``) differs twice: its NLL labels are the whole chosen input ids ("orpo chosen nll
    loss is computed over the full prompt and response"), so prompt tokens are trained too, and it takes one
    token-level cross-entropy over the batch, which weights long sequences more. Its odds term, like ours,
    uses completion tokens only. (2) Numerics: computed in float32 whatever the input dtype; log(1 − e^m)
    uses the two-branch log1mexp with no NaN in either branch's backward, so values and gradients are exact
    up to float32 rounding for every m ≤ −1.2e-38. (TRL also casts to float32, but its ``torch.where`` still
    differentiates the unused log1p(−exp(m)) branch: NaN gradient once exp(m) rounds to 1, |m| ≲ 6e-8, and
    +inf log-odds at m = 0; evaluated in bf16 / fp16 the same happens for |m| ≲ 2e-3.) Only m = 0 exactly
    (p = 1 to float precision, infinite odds) and float32 subnormals are clamped to −1.2e-38: log odds is
    capped at 87.3 and the odds term has no gradient there.
    Takes *summed* log-probs plus lengths and averages itself (its spec has needs_lengths=True).

    Returns float32 losses, rewards λ·m_w, λ·m_l (as TRL) and per-example metrics, all detached:
        ``nll_loss``        −m_w
        ``log_odds_ratio``  log σ(log odds_w − log odds_l), ≤ 0 — TRL's ``log_odds_ratio`` (it logs the mean);
                            the preference term of the loss is −λ times this
        ``log_odds_chosen`` log odds_w − log odds_l, the raw difference — TRL's ``log_odds_chosen``

    Args:
        policy_chosen_logps: (B,) Σ log π_θ(y_w|x) over completion tokens, any float dtype.
        policy_rejected_logps: (B,) Σ log π_θ(y_l|x).
        chosen_lengths: (B,) completion token counts |y_w| (int or float; clamped to ≥ 1).
        rejected_lengths: (B,) completion token counts |y_l|.
    """
    m_w = policy_chosen_logps.float() / chosen_lengths.clamp(min=1)  # (B,) float32
    m_l = policy_rejected_logps.float() / rejected_lengths.clamp(min=1)  # (B,)
    log_odds_diff = _log_odds(m_w) - _log_odds(m_l)  # (B,)
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
        description="ORPO: mean-token NLL on chosen + λ·odds-ratio loss; no reference model.",
        ranges={"lam": nonnegative("λ = 0 is the NLL term alone; below 0 the odds term favours the rejected side")},
        typical={"lam": typical(0.05, 1.0, "ORPO uses λ 0.1-1.0, 0.1 in the main runs (Hong et al., 2403.07691)")},
        reward_scale="lam",
    )
)
