"""The typed batch a training step consumes: sequences laid out for the engine, plus per-example tensors.

The engine (``preftune.logprobs``) sees only :class:`~preftune.data.collate.SequenceBatch`; a step sees a
:class:`PreferenceBatch`, whose fields say what the examples are instead of string keys in a dict.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from preftune.data.collate import SequenceBatch


@dataclass
class PreferenceBatch:
    """B examples of one kind laid out as S sequences.

    Attributes:
        seqs: the sequences in the engine's layout. Pairs: S = 2B, sequences 0..B-1 prompt+chosen and B..2B-1
            prompt+rejected; singles: S = B, sequence i is prompt+completion i.
        paired: True for pairs, False for singles (unpaired or SFT examples).
        ref_logps: (S,) reference log-probs of the sequences, summed over completion tokens, when precomputed;
            None when the reference is scored live (or there is none).
        labels: (B,) bool, desirable (True) or undesirable: singles of an unpaired loss; None for pairs.
        margin: (B,) the Bradley–Terry margin of each pair (reward models with ``data.reward_margin``), or None.
        kl: KTO's mismatched sequences (example i's prompt with another example's completion), a batch of B
            singles with its own ``ref_logps``, scored without gradients; None when the loss needs none.
        weights: (B,) per-example weight in the optimizer step's loss, or None (static data: every example 1).
            On-policy sources give padding examples weight 0 (a process with fewer usable pairs still runs
            its micro-batches, so collectives line up) and say how many examples the step has.
        step_examples: with ``weights``: the weighted examples of the whole optimizer step, divided by the
            number of processes (gradients are averaged across processes), so the step's loss is the mean
            over its examples however they fall into micro-batches and processes.
    """

    seqs: SequenceBatch
    paired: bool
    ref_logps: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    margin: torch.Tensor | None = None
    kl: PreferenceBatch | None = None
    weights: torch.Tensor | None = None
    step_examples: float | None = None

    def reduce(self, losses: torch.Tensor, accumulation: int) -> torch.Tensor:
        """This micro-batch's share of the optimizer step's loss, from per-example ``losses`` (B,).

        Static data: the micro-batch mean over ``accumulation`` equal micro-batches (so the step's loss is the
        mean over its examples). Weighted: Σ_i w_i·loss_i / step_examples (the same mean when micro-batches
        hold different numbers of examples).
        """
        if self.weights is None:
            return losses.float().mean() / accumulation
        return (losses.float() * self.weights).sum() / self.step_examples

    def kept(self, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-example metrics (B,) without the weight-0 padding examples (other shapes unchanged)."""
        if self.weights is None:
            return metrics
        keep = self.weights > 0
        return {k: v[keep] if v.dim() == 1 and v.shape[0] == keep.shape[0] else v for k, v in metrics.items()}

    @property
    def num_examples(self) -> int:
        """B: pairs or singles in the batch."""
        return self.seqs.num_sequences // 2 if self.paired else self.seqs.num_sequences

    @property
    def num_tokens(self) -> int:
        return self.seqs.num_tokens

    def model_args(self) -> tuple:
        return self.seqs.model_args()

    def to(self, device) -> PreferenceBatch:
        def move(t):
            return None if t is None else t.to(device)

        return replace(self, seqs=self.seqs.to(device), ref_logps=move(self.ref_logps), labels=move(self.labels),
                       margin=move(self.margin), kl=None if self.kl is None else self.kl.to(device),
                       weights=move(self.weights))
