"""The DPO family: losses over the policy/reference log-ratio of chosen and rejected responses.

Notation shared by every function here (all tensors (B,), sequence log-probs summed over completion tokens):
    π_w, π_l   policy log-prob of chosen (w) and rejected (l)
    r_w, r_l   reference log-prob of chosen and rejected
    ρ_w = π_w − r_w,  ρ_l = π_l − r_l      (log-ratios)
    h = ρ_w − ρ_l                           (the preference logit)
Rewards returned for logging are β·ρ, detached.
"""

from __future__ import annotations

import math

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


def _rewards(beta, rho_w, rho_l):
    """Detached implicit rewards β·ρ_w, β·ρ_l, each (B,)."""
    return (beta * rho_w).detach(), (beta * rho_l).detach()


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
    authors) so the squared loss does not grow with completion length. We use the inputs as given — whatever
    the spec's ``reduction`` produced, i.e. sums — as the issue asks, so β is not comparable with TRL's IPO
    β on long completions (the target margin 1/(2β) is in summed log-prob units here).

    Args:
        policy_chosen_logps: (B,) Σ log π_θ(y_w|x).
        policy_rejected_logps: (B,) Σ log π_θ(y_l|x).
        reference_chosen_logps: (B,) Σ log π_ref(y_w|x).
        reference_rejected_logps: (B,) Σ log π_ref(y_l|x).
    """
    if not beta > 0:
        raise ValueError(f"ipo needs beta > 0 (the target margin is 1/(2·beta)); got {beta}")
    rho_w, rho_l = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = (rho_w - rho_l - 1.0 / (2.0 * beta)) ** 2  # (B,)
    chosen_rewards, rejected_rewards = _rewards(beta, rho_w, rho_l)
    return LossOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)


register_loss(
    LossSpec(
        name="ipo",
        fn=ipo,
        needs_reference=True,
        hyperparameters=("beta",),
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
    rho_w, rho_l = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = torch.relu(1.0 - beta * (rho_w - rho_l))  # (B,)
    chosen_rewards, rejected_rewards = _rewards(beta, rho_w, rho_l)
    return LossOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)


register_loss(
    LossSpec(
        name="hinge",
        fn=hinge,
        needs_reference=True,
        hyperparameters=("beta",),
        description="Hinge (SLiC / RSO hinge-norm): max(0, 1 − β·h).",
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
    rho_w, rho_l = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    logits = beta * (rho_w - rho_l)  # (B,)
    eps = label_smoothing
    losses = ((1.0 - eps) * -F.logsigmoid(logits) - eps * -F.logsigmoid(-logits)) / (1.0 - 2.0 * eps)
    chosen_rewards, rejected_rewards = _rewards(beta, rho_w, rho_l)
    return LossOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)


register_loss(
    LossSpec(
        name="robust",
        fn=robust,
        needs_reference=True,
        hyperparameters=("beta", "label_smoothing"),
        description="rDPO: DPO de-biased for a known label-flip rate ε < 0.5.",
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
    to the log-ratios. ε must lie in (0, 1) because log ε appears; the default 1e-3 is TRL's (TRL silently
    replaces ε = 0 by 1e-3; we raise instead).

    Args:
        policy_chosen_logps: (B,) Σ log π_θ(y_w|x).
        policy_rejected_logps: (B,) Σ log π_θ(y_l|x).
        reference_chosen_logps: (B,) Σ log π_ref(y_w|x).
        reference_rejected_logps: (B,) Σ log π_ref(y_l|x).
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"exo_pair needs 0 < label_smoothing < 1 (log ε is taken); got {label_smoothing}")
    rho_w, rho_l = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    logits = beta * (rho_w - rho_l)  # (B,)
    log_p_w, log_p_l = math.log1p(-label_smoothing), math.log(label_smoothing)
    losses = torch.sigmoid(logits) * (F.logsigmoid(logits) - log_p_w) + torch.sigmoid(-logits) * (
        F.logsigmoid(-logits) - log_p_l
    )
    chosen_rewards, rejected_rewards = _rewards(beta, rho_w, rho_l)
    return LossOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)


register_loss(
    LossSpec(
        name="exo_pair",
        fn=exo_pair,
        needs_reference=True,
        hyperparameters=("beta", "label_smoothing"),
        description="EXO: KL from the policy’s pair softmax to labels smoothed by ε.",
    )
)


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
    rho_w, rho_l = _log_ratios(
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
        hyperparameters=("beta",),
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
    rho_w, rho_l = _log_ratios(
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
        hyperparameters=("beta", "delta"),
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
    rho_w, rho_l = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    target = 0.5 / beta
    losses = (rho_w - target) ** 2 + (rho_l + target) ** 2  # (B,)
    chosen_rewards, rejected_rewards = _rewards(beta, rho_w, rho_l)
    return LossOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)


register_loss(
    LossSpec(
        name="sppo_hard",
        fn=sppo_hard,
        needs_reference=True,
        hyperparameters=("beta",),
        description="SPPO with hard labels: regress ρ_w onto 1/(2β) and ρ_l onto −1/(2β).",
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
    rho_w, rho_l = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    chosen_rewards, rejected_rewards = _rewards(beta, rho_w, rho_l)
    return LossOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)


register_loss(
    LossSpec(
        name="aot",
        fn=aot,
        needs_reference=True,
        hyperparameters=("beta", "label_smoothing"),
        description="AOT (paired): logistic loss on batch-sorted margins; couples the batch.",
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
    rho_w, rho_l = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = torch.sigmoid(-beta * rho_w) + torch.sigmoid(beta * rho_l)  # (B,)
    chosen_rewards, rejected_rewards = _rewards(beta, rho_w, rho_l)
    return LossOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)


register_loss(
    LossSpec(
        name="apo_zero",
        fn=apo_zero,
        needs_reference=True,
        hyperparameters=("beta",),
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
    rho_w, rho_l = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = torch.sigmoid(beta * rho_w) + torch.sigmoid(-beta * (rho_w - rho_l))  # (B,)
    chosen_rewards, rejected_rewards = _rewards(beta, rho_w, rho_l)
    return LossOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)


register_loss(
    LossSpec(
        name="apo_down",
        fn=apo_down,
        needs_reference=True,
        hyperparameters=("beta",),
        description="APO-down: lower the chosen likelihood and the rejected one more.",
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
    rho_w, rho_l = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    x = beta * (rho_w - rho_l)  # (B,)
    logistic = -F.logsigmoid(x)  # (B,)
    losses = torch.sigmoid(-x / tau) * logistic + torch.exp(F.logsigmoid(x / tau) - x)
    chosen_rewards, rejected_rewards = _rewards(beta, rho_w, rho_l)
    return LossOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)


register_loss(
    LossSpec(
        name="discopop",
        fn=discopop,
        needs_reference=True,
        hyperparameters=("beta", "tau"),
        description="DiscoPOP: logistic/exponential blend modulated by σ(β·h/τ).",
    )
)
