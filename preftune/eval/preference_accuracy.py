"""Preference accuracy on held-out pairs, the reward-margin distribution, and perplexity of chosen responses.

With a reference, each pair is ranked by the DPO implicit reward (Rafailov et al., arXiv:2305.18290v3, Eq. 5
without the partition term, which cancels within a pair):

    margin = β · [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]

Without one, by the plain log-prob comparison log π(y_w|x) − log π(y_l|x) (summed over tokens; the
per-token-mean comparison is reported beside it, since the sum favours the shorter response). Accuracy counts a
tie as half, as training does (:func:`preference_accuracy`), so both agree with the trainer's
``eval/rewards/accuracies`` on the same pairs.
Perplexity of chosen responses, exp(−Σ log π(y_w|x) / Σ |y_w|), checks the model still assigns coherent text
high likelihood (it rises when DPO pushes the chosen log-probs down with the rejected ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from preftune.data.prepare import ExampleSet
from preftune.logprobs import sequence_logps


def preference_accuracy(margins: torch.Tensor) -> torch.Tensor:
    """1 where chosen ranks above rejected, 0.5 for an exact tie (a coin flip), 0 otherwise. (B,) -> (B,)

    The one definition: training's ``rewards/accuracies`` and ``preftune eval`` both use it."""
    return (margins > 0).float() + 0.5 * (margins == 0).float()


@dataclass
class PairScores:
    """Summed log-probs and token counts of every pair's chosen and rejected completion, each (n,)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor


@torch.no_grad()
def score_pairs(model, examples: list, pad_id: int, batch_size: int = 8, chunk_size: int = 1024) -> PairScores:
    """Sequence log-probs of all pairs under ``model`` (eval mode for the call), fp32 on the CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    data = ExampleSet(examples)
    parts = []
    try:
        for start in range(0, len(data), batch_size):
            idx = list(range(start, min(start + batch_size, len(data))))
            logps, lengths = sequence_logps(model, data.batch(idx, pad_id, "padded", with_ref=False).to(device),
                                            chunk_size)  # (2B,), (2B,)
            n = len(idx)
            parts.append((logps[:n].float().cpu(), logps[n:].float().cpu(), lengths[:n].cpu(), lengths[n:].cpu()))
    finally:
        model.train(was_training)
    return PairScores(*(torch.cat([p[k] for p in parts]) for k in range(4)))


def distribution(values: torch.Tensor) -> dict[str, float]:
    """Mean, std and quantiles of a 1-D tensor."""
    v = values.double()
    q = torch.quantile(v, torch.tensor([0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0], dtype=torch.float64)).tolist()
    return {"mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0, "min": q[0], "p05": q[1],
            "p25": q[2], "p50": q[3], "p75": q[4], "p95": q[5], "max": q[6]}


def perplexity(logps: torch.Tensor, lengths: torch.Tensor) -> float:
    tokens = float(lengths.sum())
    return math.exp(-float(logps.double().sum()) / tokens) if tokens else math.nan


def preference_metrics(policy: PairScores, reference: PairScores | None, beta: float) -> dict:
    """Accuracies, margin distribution and chosen perplexity (see the module docstring)."""
    logp_margin = policy.chosen - policy.rejected  # (n,)
    per_token = (policy.chosen / policy.chosen_lengths.clamp(min=1)
                 - policy.rejected / policy.rejected_lengths.clamp(min=1))  # (n,)
    out = {
        "pairs": int(policy.chosen.numel()),
        "accuracy_logp": float(preference_accuracy(logp_margin).mean()),
        "accuracy_logp_per_token": float(preference_accuracy(per_token).mean()),
        "chosen_perplexity": perplexity(policy.chosen, policy.chosen_lengths),
    }
    if reference is None:
        out["accuracy_implicit_reward"] = None
        out["margin"] = {"kind": "log-prob margin log π(y_w) − log π(y_l)", **distribution(logp_margin)}
        return out
    margin = beta * ((policy.chosen - reference.chosen) - (policy.rejected - reference.rejected))  # (n,)
    out["accuracy_implicit_reward"] = float(preference_accuracy(margin).mean())
    out["margin"] = {"kind": f"implicit reward margin, beta={beta:g}", **distribution(margin)}
    out["chosen_reward"] = float(beta * (policy.chosen - reference.chosen).mean())
    out["rejected_reward"] = float(beta * (policy.rejected - reference.rejected).mean())
    out["reference_accuracy_logp"] = float(preference_accuracy(reference.chosen - reference.rejected).mean())
    out["reference_chosen_perplexity"] = perplexity(reference.chosen, reference.chosen_lengths)
    return out
