"""The typed batches a training step consumes: sequences laid out for the engine, plus per-example tensors.

The engine (``preftune.logprobs``) sees only :class:`~preftune.data.collate.SequenceBatch`; a step sees a
:class:`PreferenceBatch` (pairs or singles: offline data, online DPO), a :class:`GroupBatch` (on-policy
groups: GRPO) or a :class:`PPOBatch` (PPO minibatches), whose fields say what the examples are. Each batch says
how its per-example losses become the optimizer step's loss (``reduce``) and which metrics it logs (``kept``).
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

    def model_kwargs(self) -> dict:
        return {}

    def to(self, device) -> PreferenceBatch:
        def move(t):
            return None if t is None else t.to(device)

        return replace(self, seqs=self.seqs.to(device), ref_logps=move(self.ref_logps), labels=move(self.labels),
                       margin=move(self.margin), kl=None if self.kl is None else self.kl.to(device),
                       weights=move(self.weights))


def token_positions(target_seq: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Position of each completion token within its own sequence, (N,), from ``target_seq`` (N,).

    A sequence's targets are contiguous and in order in every layout, so the position is the running count."""
    starts = torch.zeros(num_sequences + 1, dtype=torch.long, device=target_seq.device)
    starts[1:] = torch.bincount(target_seq, minlength=num_sequences).cumsum(0)
    first = torch.full((num_sequences,), -1, dtype=torch.long, device=target_seq.device)
    idx = torch.arange(target_seq.shape[0], device=target_seq.device)
    first = first.scatter_reduce(0, target_seq, idx, reduce="amin", include_self=False)  # (S,) first flat index
    return idx - first[target_seq]


def padded(values: torch.Tensor, target_seq: torch.Tensor, num_sequences: int, width: int | None = None,
           fill: float = 0.0) -> torch.Tensor:
    """Per-token values (N,) in target order -> (S, T) right-padded per sequence (T the longest, or ``width``)."""
    pos = token_positions(target_seq, num_sequences)  # (N,)
    width = int(pos.max()) + 1 if width is None and pos.numel() else (width or 0)
    out = values.new_full((num_sequences, width), fill)
    return out.index_put((target_seq, pos), values)


class GlobalStepBatch:
    """What the on-policy batches (:class:`GroupBatch`, :class:`PPOBatch`) share: S sequences of ``seqs`` whose
    per-sequence loss contributions are normalized over the whole optimizer step (``step_sequences`` over
    ``world_size`` processes), so they are summed, never averaged."""

    paired = False

    @property
    def num_examples(self) -> int:
        return self.seqs.num_sequences

    @property
    def num_tokens(self) -> int:
        return self.seqs.num_tokens

    def model_args(self) -> tuple:
        return self.seqs.model_args()

    def reduce(self, losses: torch.Tensor, accumulation: int) -> torch.Tensor:
        """The per-sequence contributions (S,) of a globally normalized loss already add up to the step's
        loss over micro-batches and processes (``losses.policy``, ``losses.ppo``): they are summed."""
        return losses.float().sum()

    def kept(self, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-sequence metrics of the loss-bearing sequences; the loss terms (``loss``, ``loss/...``) rescaled
        so that their mean over the step's sequences (what the loop logs) is the step's term."""
        keep = self.seq_mask > 0
        out = {k: v[keep] if v.dim() == 1 and v.shape[0] == keep.shape[0] else v for k, v in metrics.items()}
        for k in out:
            if k == "loss" or k.startswith("loss/"):
                out[k] = out[k] * (self.step_sequences / self.world_size)
        return out


@dataclass
class GroupBatch(GlobalStepBatch):
    """P prompts x G on-policy completions each, laid out for the engine: completion k of prompt u is
    sequence s = u + k·P (S = P·G), every prompt run once for its G completions (``TokenizedGroup``).

    Attributes:
        seqs: the sequences; the engine returns per-token log-probs (N,) in target order with ``per_token``.
        advantages: (S,) advantage of each sequence (the same for all its tokens).
        seq_mask: (S,) 1.0 for a sequence that takes part in the loss, 0.0 for one that does not
            (``mask_truncated_completions``, a padding group of a process that has fewer).
        old_logps: (N,) per-token log-probs under π_old (the policy that sampled), when the rollout is reused
            (``rollout.num_iterations`` > 1); None: π_old is the current policy (ratio 1, gradient intact).
        ref_logps: (N,) reference per-token log-probs when already computed, else None (scored live).
        step_sequences / step_tokens: loss-bearing sequences and tokens of the whole optimizer step, summed
            over micro-batches and processes: the global normalizers of the policy-gradient aggregations.
        max_length: the longest a completion may be (``rollout.max_new_tokens``; Dr. GRPO's constant).
        world_size: processes whose gradients are averaged.
        temperature: the sampling temperature; the training pass divides its logits by it too.
        with_entropy: the engine also returns each position's entropy, detached (the training pass asks for it:
            a metric, taken from the log-prob pass's own chunks; π_old and reference passes do not).
    """

    seqs: SequenceBatch
    advantages: torch.Tensor
    seq_mask: torch.Tensor
    step_sequences: float
    step_tokens: float
    max_length: int
    world_size: int = 1
    temperature: float = 1.0
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    with_entropy: bool = False

    def model_kwargs(self) -> dict:
        return {"per_token": True, "temperature": self.temperature, "entropy": self.with_entropy,
                "entropy_grad": False}

    def token_mask(self) -> torch.Tensor:
        """(S, T) 1.0 on the loss-bearing completion tokens."""
        ones = torch.ones_like(self.seqs.target_seq, dtype=torch.float32)
        return padded(ones, self.seqs.target_seq, self.seqs.num_sequences) * self.seq_mask[:, None]

    def to(self, device) -> GroupBatch:
        def move(t):
            return None if t is None else t.to(device)

        return replace(self, seqs=self.seqs.to(device), advantages=self.advantages.to(device),
                       seq_mask=self.seq_mask.to(device), old_logps=move(self.old_logps),
                       ref_logps=move(self.ref_logps))


@dataclass
class PPOBatch(GlobalStepBatch):
    """One micro-batch of a PPO minibatch: P prompts x G on-policy completions in the grouped layout
    (completion k of prompt u is sequence s = u + k·P, as :class:`GroupBatch`), with the rollout's per-token
    quantities laid out (S, T) per sequence, right-padded (T: the longest completion in the micro-batch).

    Attributes:
        seqs: the sequences; the engine returns per-token log-probs and values V(s_t) (N,) in target order.
        old_logps: (S, T) log π_old of each sampled token (the policy that sampled, from the training engine).
        old_values: (S, T) V_old(s_t), the critic at sampling time (the value clip's centre).
        advantages: (S, T) GAE advantages (whitened over the rollout when ``rollout.whiten_advantages``).
        returns: (S, T) value targets R_t = A_t + V_old(s_t) (before whitening).
        mask: (S, T) 1.0 on the loss-bearing completion tokens (a sequence without a score has none).
        seq_mask: (S,) 1.0 for a sequence that takes part in the loss.
        step_sequences / step_tokens: loss-bearing sequences and tokens of the whole optimizer step (this
            minibatch, every micro-batch on every process): the global normalizers.
        world_size: processes whose gradients are averaged.
        temperature: the sampling temperature; the training pass divides its logits by it too.
        with_values / with_entropy: what the engine returns besides the log-probs (the reference pass asks for
            neither).
    """

    seqs: SequenceBatch
    old_logps: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    mask: torch.Tensor
    seq_mask: torch.Tensor
    step_sequences: float
    step_tokens: float
    world_size: int = 1
    temperature: float = 1.0
    with_values: bool = True
    with_entropy: bool = True

    def model_kwargs(self) -> dict:
        return {"per_token": True, "temperature": self.temperature, "entropy": self.with_entropy,
                "values": self.with_values}

    def to(self, device) -> PPOBatch:
        return replace(self, seqs=self.seqs.to(device), old_logps=self.old_logps.to(device),
                       old_values=self.old_values.to(device), advantages=self.advantages.to(device),
                       returns=self.returns.to(device), mask=self.mask.to(device), seq_mask=self.seq_mask.to(device))
