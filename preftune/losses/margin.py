"""Other shapes of the preference logit: losses that are a function of h = ρ_w − ρ_l other than DPO's logistic —
squared (IPO), hinge (SLiC / RSO), a KL to smoothed labels (EXO) and a logistic/exponential blend (DiscoPOP).

Notation and shared ranges: :mod:`preftune.losses.pair` (π, r, ρ = π − r, h = ρ_w − ρ_l; rewards β·ρ).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from preftune.losses.base import LossOutput, LossSpec, register_loss
from preftune.losses.pair import BETA, BETA_TYPICAL, implicit_rewards, log_ratios
from preftune.losses.ranges import Range

# EXO's ε is the smoothed label's weight on the rejected side: log ε is taken (ε > 0), and from ε = 0.5 on the
# target distribution no longer prefers the chosen side.
EXO_SMOOTHING = Range(0.0, 0.5, low_open=True, high_open=True,
                      why="the smoothed label (1 − ε, ε): log ε is taken, and from 0.5 on the target stops "
                          "preferring the chosen side")
# DiscoPOP's τ: the blend σ(x/τ) needs τ > 0; above 1 the exponential term grows like e^{|x|(1 − 1/τ)} at
# negative margins instead of vanishing, and overflows in fp32.
DISCOPOP_TAU = Range(0.0, 1.0, low_open=True,
                     why="the modulation σ(β·h/τ) needs tau > 0; above 1 the exponential term grows without "
                         "bound at negative margins (0.05 in the paper)")


def ipo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """Identity preference optimisation (IPO): squared regression of the margin onto 1/(2β).

        L = (h − 1/(2β))²,   h = (π_w − r_w) − (π_l − r_l)

    β: the regulariser, τ in the paper (larger β → smaller target margin, stronger pull to the reference).
    Paper: Azar et al., "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    arXiv:2310.12036v2, Eq. 17.

    Departure (deliberate): TRL length-averages the log-ratios for IPO (h/|y| per side, confirmed with the
    authors) so the squared loss does not grow with completion length. We keep the paper's sequence
    log-ratios, i.e. the inputs as given (sums over completion tokens, as for every loss here), so β is not
    comparable with TRL's IPO β on long completions (the target margin 1/(2β) is in summed log-prob units).

    Args:
        policy_chosen_logps: (B,) Σ log π_θ(y_w|x).
        policy_rejected_logps: (B,) Σ log π_θ(y_l|x).
        reference_chosen_logps: (B,) Σ log π_ref(y_w|x).
        reference_rejected_logps: (B,) Σ log π_ref(y_l|x).
    """
    if not beta > 0:
        raise ValueError(f"ipo needs beta > 0 (the target margin is 1/(2·beta)); got {beta}")
    rho_w, rho_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = (rho_w - rho_l - 1.0 / (2.0 * beta)) ** 2  # (B,)
    chosen_rewards, rejected_rewards = implicit_rewards(beta, rho_w, rho_l)
    return LossOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)


register_loss(
    LossSpec(
        name="ipo",
        fn=ipo,
        needs_reference=True,
        ranges={"beta": BETA},
        typical={"beta": BETA_TYPICAL},
        reward_scale="beta",
        description="IPO: (h − 1/(2β))² on log-ratios as given (sums; TRL length-averages).",
    )
)


def hinge(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """Hinge loss on the scaled margin (SLiC calibration loss, RSO "hinge-norm").

        L = max(0, 1 − β·h),   h = (π_w − r_w) − (π_l − r_l)

    β: scale of the margin (γ in RSO); the hinge is flat (zero loss, zero gradient) once β·h ≥ 1.
    Papers: Liu et al., "Statistical Rejection Sampling Improves Preference Optimization", arXiv:2309.06657,
    the hinge-norm loss (Sec. 3; equation number not re-checked against a pinned version); Zhao et al.,
    "SLiC-HF", arXiv:2305.10425, Sec. 2.

    Departure: SLiC-HF's calibration loss is max(0, δ − log π_θ(y_w|x) + log π_θ(y_l|x)) with no reference
    model; like RSO and TRL we use reference-normalised log-ratios, and the margin is 1 on the β-scaled
    logit (max(0, 1 − β·h) = β·max(0, 1/β − h), i.e. SLiC's δ = 1/β up to the factor β).

    Args:
        policy_chosen_logps: (B,) Σ log π_θ(y_w|x).
        policy_rejected_logps: (B,) Σ log π_θ(y_l|x).
        reference_chosen_logps: (B,) Σ log π_ref(y_w|x).
        reference_rejected_logps: (B,) Σ log π_ref(y_l|x).
    """
    rho_w, rho_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = torch.relu(1.0 - beta * (rho_w - rho_l))  # (B,)
    chosen_rewards, rejected_rewards = implicit_rewards(beta, rho_w, rho_l)
    return LossOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)


register_loss(
    LossSpec(
        name="hinge",
        fn=hinge,
        needs_reference=True,
        ranges={"beta": BETA},
        typical={"beta": BETA_TYPICAL},
        reward_scale="beta",
        description="Hinge (SLiC / RSO hinge-norm): max(0, 1 − β·h).",
    )
)


def exo_pair(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 1e-3,
) -> LossOutput:
    """EXO (pairwise): reverse KL from the model's pair distribution to the smoothed label distribution.

        L = σ(βh)·(log σ(βh) − log(1 − ε)) + σ(−βh)·(log σ(−βh) − log ε),   h = (π_w − r_w) − (π_l − r_l)

    i.e. KL(q ‖ p) with q = (σ(βh), σ(−βh)) the policy's softmax over {y_w, y_l} of β·log-ratios and
    p = (1 − ε, ε) the preference label smoothed by ε. L ≥ 0, minimal (0) at σ(βh) = 1 − ε.
    Paper: Ji et al., "Towards Efficient Exact Optimization of Language Model Alignment", arXiv:2402.00856,
    Eq. 16 (as cited by TRL; version not pinned), K = 2.

    Departure: the paper has two temperatures (β_π on the policy's log-ratios, β_r on the reward); with
    smoothed hard labels the target (1 − ε, ε) involves no reward, so like TRL we expose a single β, applied
    to the log-ratios. ε must lie in (0, 1) because log ε appears, and below 1/2 for the target to prefer the
    chosen side (the spec allows 0 < ε < 0.5). The default 1e-3 is the value the EXO paper recommends; TRL 1.16
    has no EXO-specific default (its ``label_smoothing`` defaults to 0) and raises a ValueError for exo_pair with
    ε = 0, citing that recommendation.

    Args:
        policy_chosen_logps: (B,) Σ log π_θ(y_w|x).
        policy_rejected_logps: (B,) Σ log π_θ(y_l|x).
        reference_chosen_logps: (B,) Σ log π_ref(y_w|x).
        reference_rejected_logps: (B,) Σ log π_ref(y_l|x).
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"exo_pair needs 0 < label_smoothing < 1 (log ε is taken); got {label_smoothing}")
    rho_w, rho_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    logits = beta * (rho_w - rho_l)  # (B,)
    log_p_w, log_p_l = math.log1p(-label_smoothing), math.log(label_smoothing)
    losses = torch.sigmoid(logits) * (F.logsigmoid(logits) - log_p_w) + torch.sigmoid(-logits) * (
        F.logsigmoid(-logits) - log_p_l
    )
    chosen_rewards, rejected_rewards = implicit_rewards(beta, rho_w, rho_l)
    return LossOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)


register_loss(
    LossSpec(
        name="exo_pair",
        fn=exo_pair,
        needs_reference=True,
        ranges={"beta": BETA, "label_smoothing": EXO_SMOOTHING},
        typical={"beta": BETA_TYPICAL},
        reward_scale="beta",
        description="EXO: KL from the policy’s pair softmax to labels smoothed by ε.",
    )
)


def discopop(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    tau: float = 0.05,
) -> LossOutput:
    """DiscoPOP (log-ratio modulated loss): a σ(x/τ)-weighted blend of the logistic and exponential losses.

        x = β·h,   m = σ(x/τ)
        L = (1 − m)·(−log σ(x)) + m·exp(−x),   h = (π_w − r_w) − (π_l − r_l)

    β: temperature; τ: modulation temperature (0.05 in the paper). For x ≪ 0 it is DPO's logistic loss, for
    x ≫ 0 the exponential loss. The loss is not convex and not monotone near x = 0 (with τ = 0.05 its slope at
    x = 0 is positive).
    Paper: Chris Lu et al., "Discovering Preference Optimization Algorithms with and for Large Language
    Models", arXiv:2406.08414, Eq. 5 (as cited by TRL; version not pinned).

    Departure (numerics only): TRL evaluates m·exp(−x) directly, which is 0·inf = NaN once exp(−x) overflows
    (x ≲ −89 in fp32). We evaluate it as exp(log σ(x/τ) − x), finite for every x when τ < 1.

    Args:
        policy_chosen_logps: (B,) Σ log π_θ(y_w|x).
        policy_rejected_logps: (B,) Σ log π_θ(y_l|x).
        reference_chosen_logps: (B,) Σ log π_ref(y_w|x).
        reference_rejected_logps: (B,) Σ log π_ref(y_l|x).
    """
    if not tau > 0:
        raise ValueError(f"discopop needs tau > 0; got {tau}")
    rho_w, rho_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    x = beta * (rho_w - rho_l)  # (B,)
    logistic = -F.logsigmoid(x)  # (B,)
    losses = torch.sigmoid(-x / tau) * logistic + torch.exp(F.logsigmoid(x / tau) - x)
    chosen_rewards, rejected_rewards = implicit_rewards(beta, rho_w, rho_l)
    return LossOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)


register_loss(
    LossSpec(
        name="discopop",
        fn=discopop,
        needs_reference=True,
        ranges={"beta": BETA, "tau": DISCOPOP_TAU},
        typical={"beta": BETA_TYPICAL},
        reward_scale="beta",
        description="DiscoPOP: logistic/exponential blend modulated by σ(β·h/τ).",
    )
)
