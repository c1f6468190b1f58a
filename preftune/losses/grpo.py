"""The registered GRPO loss: :func:`preftune.losses.policy.grpo_policy_loss` under the trainer's contract.

Tensor inputs (per token, (S, T) right-padded, from the trainer's ``policy_step``) and the step's global
counts are positional-or-keyword; the hyperparameters (config ``loss.*``) are keyword-only, so the spec reads
them from the signature.
"""

from __future__ import annotations

from typing import Literal

import torch

from preftune.losses.base import LossOutput, LossSpec, register_loss
from preftune.losses.policy import grpo_policy_loss
from preftune.losses.ranges import Range, nonnegative, typical


def grpo(logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor,
         ref_logps: torch.Tensor | None = None, num_sequences_in_step: float | None = None,
         num_tokens_in_step: float | None = None, max_completion_length: int | None = None, world_size: int = 1, *,
         beta: float = 0.0, epsilon: float = 0.2, epsilon_high: float | None = None,
         importance_sampling: Literal["token", "sequence"] = "token",
         aggregation: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo") -> LossOutput:
    """GRPO's clipped policy-gradient loss with a k3 KL to the reference at ``beta`` (Shao et al.,
    arXiv:2402.03300v3, Eq. 3-4; clip-higher ``epsilon_high``: DAPO arXiv:2503.14476v1 Sec. 3.1; sequence-level
    ratio ``importance_sampling: sequence``: GSPO arXiv:2507.18071v2 Eq. 5, 7).

        ℓ_it = −min(w_it·A_i, clip(w_it, 1 − ε, 1 + ε_high)·A_i) + β·(exp(ref_it − logp_it) − (ref_it − logp_it) − 1)

    aggregated over the whole optimizer step by ``aggregation`` (``grpo``: token mean per sequence, then mean
    over the step's sequences; ``bnpo`` / ``dapo``: mean over the step's tokens; ``dr_grpo``: sum over
    (sequences · max_completion_length)). The formula, the departures (the normalizer is global over the step;
    TRL's is per micro-batch for grpo / bnpo / dr_grpo) and the shapes are documented at
    :func:`preftune.losses.policy.grpo_policy_loss`; ``losses`` are per-sequence contributions reduced by SUM.
    β = 0 (the default, as in TRL, Dr. GRPO and DAPO) loads no reference model; the monitor still measures KL.
    """
    return grpo_policy_loss(logps, old_logps, advantages, mask, ref_logps, beta=beta, epsilon=epsilon,
                            epsilon_high=epsilon_high, importance_sampling=importance_sampling,
                            aggregation=aggregation, num_sequences_in_step=num_sequences_in_step,
                            num_tokens_in_step=num_tokens_in_step, max_completion_length=max_completion_length,
                            world_size=world_size)


register_loss(
    LossSpec(
        name="grpo",
        fn=grpo,
        needs_reference=True,
        reference_if="beta",
        data="policy",
        description="GRPO (and DAPO / Dr. GRPO / GSPO options): clipped policy gradient on group-relative "
                    "advantages of on-policy samples, k3 KL at beta.",
        ranges={"beta": nonnegative("β < 0 would reward moving away from the reference"),
                "epsilon": Range(0.0, 1.0, low_open=True, why="the clip range 1 ± ε must keep the ratio positive"),
                "epsilon_high": Range(0.0, None, low_open=True, why="the upper clip 1 + ε_high"),
                "importance_sampling": Range(why="token or sequence"),
                "aggregation": Range(why="grpo, bnpo, dr_grpo or dapo")},
        typical={"beta": typical(0.0, 0.1, "GRPO used 0.04 (2402.03300); DAPO and Dr. GRPO drop the KL (0)"),
                 "epsilon": typical(0.1, 0.3, "PPO and GRPO clip at 0.2"),
                 "epsilon_high": typical(0.2, 0.4, "DAPO's clip-higher uses 0.28")},
    )
)
