"""Token ids -> tensors. A batch holds S sequences laid out in R rows of T tokens, plus the index of every
completion token so the log-prob engine never needs to know the layout.

Sequence order is the contract: for B pairs, sequences 0..B-1 are prompt+chosen and B..2B-1 are
prompt+rejected; for B singles, sequence i is prompt+completion i. Layouts:
    padded         one row per sequence, right-padded (the plain, obviously-correct layout)
    shared_prompt  one row per pair: prompt, chosen, rejected; rejected sees the prompt but never chosen
    packed         several pairs per row, block-diagonal attention, per-sequence positions
(shared_prompt and packed live in ``preftune.data.packing``; ``preftune.data.layouts`` maps the names.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from preftune.data.tokenize import TokenizedGroup, TokenizedPair, TokenizedSingle


@dataclass
class SequenceBatch:
    """Sequences to score, in any layout.

    Attributes:
        input_ids: (R, T) token ids, padding filled with ``pad_id``.
        position_ids: (R, T) position of each token within its own sequence.
        attention_mask: (R, T) 1 for real tokens (padded layout), or (R, 1, T, T) bool, True = may attend.
        target_index: (N,) flat index into R*T of each position whose next-token logits predict a completion
            token.
        target_ids: (N,) the completion token each of those positions predicts.
        target_seq: (N,) which sequence (0..S-1) each target belongs to.
        num_sequences: S.
        num_tokens: real (non-padding) tokens in the batch, for throughput.

    What the sequences *are* (pairs, labels, cached reference log-probs) is the step's business:
    :class:`preftune.data.batch.PreferenceBatch` wraps this.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_index: torch.Tensor
    target_ids: torch.Tensor
    target_seq: torch.Tensor
    num_sequences: int
    num_tokens: int

    def to(self, device) -> SequenceBatch:
        return SequenceBatch(
            self.input_ids.to(device), self.position_ids.to(device), self.attention_mask.to(device),
            self.target_index.to(device), self.target_ids.to(device), self.target_seq.to(device),
            self.num_sequences, self.num_tokens,
        )

    def model_args(self) -> tuple:
        """The positional arguments of ``LogpModel.forward`` (and the reward model's)."""
        return (self.input_ids, self.position_ids, self.attention_mask, self.target_index, self.target_ids,
                self.target_seq, self.num_sequences)


def sequences_of(examples: Sequence[TokenizedPair | TokenizedSingle | TokenizedGroup]) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, completion_ids) per sequence, in the contract's order (completion k of example u is
    sequence u + k·n: pairs give chosen 0..n-1, rejected n..2n-1)."""
    if examples and isinstance(examples[0], TokenizedGroup):
        size = len(examples[0].completions)
        return [(e.prompt_ids, e.completions[k]) for k in range(size) for e in examples]
    if examples and isinstance(examples[0], TokenizedPair):
        return [(e.prompt_ids, e.chosen_ids) for e in examples] + [(e.prompt_ids, e.rejected_ids) for e in examples]
    return [(e.prompt_ids, e.completion_ids) for e in examples]


def collate_padded(examples: Sequence[TokenizedPair | TokenizedSingle | TokenizedGroup], pad_id: int) -> SequenceBatch:
    """One right-padded row per sequence."""
    seqs = sequences_of(examples)
    width = max(len(p) + len(c) for p, c in seqs)
    rows = len(seqs)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)  # (R, T)
    attention = torch.zeros((rows, width), dtype=torch.long)  # (R, T)
    index, ids, seq_of = [], [], []
    for s, (p, c) in enumerate(seqs):
        tokens = p + c
        input_ids[s, : len(tokens)] = torch.tensor(tokens)
        attention[s, : len(tokens)] = 1
        # Completion token j sits at position len(p)+j; the logits predicting it are one position earlier.
        start = s * width + len(p) - 1
        index.extend(range(start, start + len(c)))
        ids.extend(c)
        seq_of.extend([s] * len(c))
    positions = torch.arange(width).expand(rows, width).contiguous()  # (R, T)
    return SequenceBatch(
        input_ids, positions, attention,
        torch.tensor(index, dtype=torch.long), torch.tensor(ids, dtype=torch.long),
        torch.tensor(seq_of, dtype=torch.long), rows, int(attention.sum()),
    )
