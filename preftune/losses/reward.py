"""Reward-model training: the Bradley–Terry pairwise loss, with an optional per-pair margin and reward centering.

Notation (all tensors (B,)): r_w, r_l the reward model's scalar scores of the chosen and rejected response (the
sequence-classification head's logit); m an optional per-pair margin taken from the data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from preftune.losses.base import LossOutput, LossSpec, register_loss
from preftune.losses.ranges import nonnegative, typical


def bradley_terry(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: torch.Tensor | None = None,
    *,
    center_coef: float = 0.0,
) -> LossOutput:
    """Bradley–Terry reward-model loss.

        L = −log σ(r_w − r_l − m) + η·(r_w + r_l)²

    r_w, r_l: scores of chosen and rejected; m: the pair's margin (0 when None); η: ``center_coef``.
    Paper: Ouyang et al., "Training language models to follow instructions with human feedback",
    arXiv:2203.02155v1, Eq. 1 (the pairwise loss without m); the margin term is Touvron et al., "Llama 2",
    arXiv:2307.09288v2, Eq. 2 (m from the annotators' preference rating); the centering term is the auxiliary
    loss of Eisenstein et al., "Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward
    Hacking", arXiv:2312.09244 (version not pinned), as TRL's ``center_rewards_coefficient``.

    Notes: Bradley–Terry only constrains r_w − r_l, so a trained reward is defined up to a constant; centering
    (η ~ 0.01) pulls each pair's scores towards a zero sum, which keeps separately trained models (ensemble
    members, axes of a composite) on a comparable offset. InstructGPT averages over all C(K, 2) pairs of a
    prompt's K ranked responses as one batch element; here every pair is its own example. Rewards returned for
    logging are the raw scores, detached; accuracy (r_w > r_l) ignores the margin.

    Args:
        chosen_scores: (B,) r_w.
        rejected_scores: (B,) r_l.
        margin: (B,) m per pair, or None (every m = 0).
    """
    logits = chosen_scores - rejected_scores  # (B,)
    if margin is not None:
        logits = logits - margin.to(logits.dtype)
    losses = -F.logsigmoid(logits)  # (B,)
    metrics = {}
    if center_coef:
        center = (chosen_scores + rejected_scores) ** 2  # (B,)
        losses = losses + center_coef * center
        metrics["center_loss"] = center.detach()
    return LossOutput(losses=losses, chosen_rewards=chosen_scores.detach(), rejected_rewards=rejected_scores.detach(),
                      metrics=metrics)


register_loss(
    LossSpec(
        name="bradley_terry",
        fn=bradley_terry,
        needs_reference=False,
        data="reward",
        ranges={"center_coef": nonnegative("below 0 the term rewards a large r_w + r_l and is unbounded below")},
        typical={"center_coef": typical(0.0, 0.1, "Eisenstein et al. (2312.09244) and TRL's "
                                                  "center_rewards_coefficient use 0.01")},
        description="Reward model (task: reward): −log σ(r_w − r_l − m) + η·(r_w + r_l)²; scores, not log-probs.",
    )
)
