"""The SFT term: mean-token negative log-likelihood of the chosen completion.

Used alone (data="sft") or as the NLL component of a weighted combination (RPO = dpo + α·sft,
MPO = 0.8·dpo + 0.2·bco_pair + 1.0·sft) via :func:`preftune.losses.combine.combine`.
"""

from __future__ import annotations

import torch

from preftune.losses.base import LossOutput, LossSpec, register_loss


def sft(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> LossOutput:
    """Mean-token negative log-likelihood of the chosen completion.

        L = −π_w / |y_w|

    π_w: Σ log π_θ(y_w|x) over completion tokens; |y_w|: their count (clamped to ≥ 1). No hyperparameters.
    RPO: Pang et al., "Iterative Reasoning Preference Optimization", arXiv:2404.19733 (DPO + NLL on the
    winner); MPO: Wang et al., "Enhancing the Reasoning Ability of Multimodal Large Language Models via Mixed
    Preference Optimization", arXiv:2411.10442 (generation-loss term). Versions and equation numbers not
    pinned.

    Departure: this is the per-sequence mean, so the caller's batch mean weights every example equally. TRL's
    ``loss_type="sft"`` takes one token-level mean over the whole batch (long completions weigh more); the two
    agree when all chosen lengths are equal. There is no implicit reward: ``rewards`` and the paired reward
    fields are None.

    Args:
        policy_chosen_logps: (B,) Σ log π_θ(y_w|x) over completion tokens.
        chosen_lengths: (B,) completion token counts |y_w|.
    """
    losses = -policy_chosen_logps / chosen_lengths.clamp(min=1)  # (B,)
    return LossOutput(losses=losses)


register_loss(
    LossSpec(
        name="sft",
        fn=sft,
        needs_reference=False,
        data="sft",
        needs_lengths=True,
        description="SFT term: mean-token NLL of the chosen completion.",
    )
)
