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
    """

    seqs: SequenceBatch
    paired: bool
    ref_logps: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    margin: torch.Tensor | None = None
    kl: PreferenceBatch | None = None

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
                       margin=move(self.margin), kl=None if self.kl is None else self.kl.to(device))
