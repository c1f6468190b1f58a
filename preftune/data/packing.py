"""Layouts beyond padding: the shared prompt and packed rows (named in ``preftune.data.layouts``).

    shared_prompt  one row per pair:   [prompt | chosen | rejected | pad]
    packed         several pairs a row: [prompt1 | chosen1 | rejected1 | prompt2 | chosen2 | rejected2 | pad]

Both hand the model a 4-D bool mask (R, 1, T, T), True = may attend, built from three per-token labels:
``unit`` (which pair in the row; -1 for padding), ``part`` (0 prompt, 1 chosen, 2 rejected; for a group of G
completions 1..G) and the row order::

    may_attend[q, k] = unit[q] == unit[k]  and  k <= q  and  (part[k] == prompt  or  part[k] == part[q])

so chosen sees prompt + chosen causally and rejected sees prompt + rejected causally, never chosen. Positions
restart per pair, and rejected restarts at ``len(prompt)``: every sequence sees exactly the positions and
context it has alone in the padded layout, so the log-probs are the same (the naive twin is
``collate_padded``; ``tests/test_engine_parity.py`` checks them to 1e-5). Padding tokens form their own unit
and attend causally among themselves, so no query row is fully masked (a fully masked row is NaN in SDPA).

The first rejected token is predicted by the last prompt token, the same hidden state that predicts the first
chosen token: its ``target_index`` points there, not at the last chosen token just before it in the row.

Singles (unpaired losses, SFT) have no second completion to share a prompt with: ``shared_prompt`` lays them
out as padded rows, ``packed`` packs them like pairs with ``part`` 0 / 1. Groups (GRPO: one prompt, G on-policy
completions) are the same idea with G completions: the prompt runs once for all of them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from preftune.data.collate import SequenceBatch, collate_padded
from preftune.data.tokenize import TokenizedGroup, TokenizedPair, TokenizedSingle

PROMPT, CHOSEN, REJECTED = 0, 1, 2


def _units(examples: Sequence[TokenizedPair | TokenizedSingle | TokenizedGroup]) -> list[tuple[list[int], ...]]:
    """(prompt, chosen, rejected) per pair, (prompt, completion) per single, (prompt, c_1, ..., c_G) per group,
    in example order."""
    units = []
    for e in examples:
        if isinstance(e, TokenizedGroup):
            unit = (e.prompt_ids, *e.completions)
        elif isinstance(e, TokenizedPair):
            unit = (e.prompt_ids, e.chosen_ids, e.rejected_ids)
        else:
            unit = (e.prompt_ids, e.completion_ids)
        if not unit[0]:
            raise ValueError("an empty prompt leaves the first completion token without a predicting position; "
                             "tokenize with a BOS token or a non-empty prompt")
        units.append(unit)
    return units


def _build(units: list[tuple[list[int], ...]], rows: list[list[int]], pad_id: int) -> SequenceBatch:
    """Lay out ``units`` (pairs, singles or groups of one size) as ``rows`` (lists of unit indices, in row order).

    Completion k of unit u is sequence ``u + k·n`` (n units): for pairs, chosen 0..n-1 then rejected n..2n-1.
    """
    per_unit = len(units[0]) - 1  # completions per unit
    n = len(units)
    width = max(sum(sum(len(p) for p in units[u]) for u in row) for row in rows)
    R = len(rows)
    input_ids = torch.full((R, width), pad_id, dtype=torch.long)  # (R, T)
    positions = torch.zeros((R, width), dtype=torch.long)  # (R, T)
    unit_of = torch.full((R, width), -1, dtype=torch.long)  # (R, T) which unit in the row; -1 = padding
    part = torch.zeros((R, width), dtype=torch.long)  # (R, T)
    index, ids, seq_of = [], [], []
    for r, row in enumerate(rows):
        at = 0
        for u in row:
            prompt, *completions = units[u]
            P = len(prompt)
            start = at
            input_ids[r, at : at + P] = torch.tensor(prompt)
            positions[r, at : at + P] = torch.arange(P)
            at += P
            for k, completion in enumerate(completions):
                C = len(completion)
                input_ids[r, at : at + C] = torch.tensor(completion)
                positions[r, at : at + C] = torch.arange(P, P + C)
                part[r, at : at + C] = CHOSEN + k
                # Token j of this completion is predicted at the position before it; for j = 0 that is the last
                # prompt token, whichever completion this is.
                flat = r * width
                index.append(flat + start + P - 1)
                index.extend(range(flat + at, flat + at + C - 1))
                ids.extend(completion)
                seq_of.extend([u + k * n] * C)  # sequence order: chosen 0..B-1, rejected B..2B-1
                at += C
            unit_of[r, start:at] = u
    same = unit_of[:, :, None] == unit_of[:, None, :]  # (R, T, T)
    causal = torch.ones((width, width), dtype=torch.bool).tril()  # (T, T)
    # A completion sees its prompt and itself: never another completion of its unit (rejected never sees chosen).
    own = (part[:, None, :] == PROMPT) | (part[:, :, None] == part[:, None, :])  # (R, T, T) query x key
    mask = (same & causal & own)[:, None]  # (R, 1, T, T)
    real = int((unit_of >= 0).sum())
    return SequenceBatch(
        input_ids, positions, mask,
        torch.tensor(index, dtype=torch.long), torch.tensor(ids, dtype=torch.long),
        torch.tensor(seq_of, dtype=torch.long), n * per_unit, real,
    )


def collate_shared_prompt(examples: Sequence[TokenizedPair | TokenizedSingle], pad_id: int) -> SequenceBatch:
    """One row per pair: prompt, chosen, rejected, with the shared-prompt mask; singles are padded rows.

    The prompt is run once for both responses: a pair costs ``P + C + Rj`` tokens instead of ``2P + C + Rj``.
    """
    units = _units(examples)
    if not units or len(units[0]) == 2:
        return collate_padded(examples, pad_id)
    return _build(units, [[u] for u in range(len(units))], pad_id)


def pack_rows(lengths: Sequence[int], max_row_tokens: int | None = None) -> list[list[int]]:
    """First-fit decreasing: unit indices per row, no row longer than ``max_row_tokens`` (default: the longest
    unit, so packing never makes a row longer than the shared-prompt layout's). A unit longer than the limit gets
    a row of its own."""
    cap = max(max(lengths), max_row_tokens or 0)
    rows: list[list[int]] = []
    room: list[int] = []
    for u in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r in range(len(rows)):
            if lengths[u] <= room[r]:
                rows[r].append(u)
                room[r] -= lengths[u]
                break
        else:
            rows.append([u])
            room.append(cap - lengths[u])
    return rows


def collate_packed(examples: Sequence[TokenizedPair | TokenizedSingle], pad_id: int,
                   max_row_tokens: int | None = None) -> SequenceBatch:
    """Several pairs (or singles) per row, block-diagonal over them, each pair shared-prompt inside its block.

    Rows are filled first-fit by decreasing length up to ``max_row_tokens`` tokens (default: the longest pair in
    the batch). On CPU with SDPA the attention cost of a row grows with the square of its length, so a longer
    limit trades attention work for padding; ``padding_fraction(batch)`` reports what is left.
    """
    units = _units(examples)
    return _build(units, pack_rows([unit_length(e) for e in examples], max_row_tokens), pad_id)


def unit_length(example: TokenizedPair | TokenizedSingle | TokenizedGroup) -> int:
    """Tokens an example occupies in the shared-prompt and packed layouts: P + C + Rj for a pair, P + C alone,
    P + C_1 + ... + C_G for a group."""
    if isinstance(example, TokenizedGroup):
        return len(example.prompt_ids) + sum(len(c) for c in example.completions)
    if isinstance(example, TokenizedPair):
        return len(example.prompt_ids) + len(example.chosen_ids) + len(example.rejected_ids)
    return len(example.prompt_ids) + len(example.completion_ids)


def padding_fraction(batch: SequenceBatch) -> float:
    """Share of the R x T token slots the forward pass spends on padding."""
    slots = batch.input_ids.numel()
    return 1.0 - batch.num_tokens / slots if slots else 0.0


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a function of (seed, epoch) alone, so a resumed run sees the same."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                         group_batches: int = 50) -> list[int]:
    """An epoch order in which each run of ``batch_size`` consecutive examples has similar lengths.

    Shuffle (a function of seed and epoch alone, so a resumed run sees the same order), cut into mega-batches
    of ``batch_size * group_batches``, sort each by length (longest first), cut into batches, shuffle the batches.
    Keeps the randomness of the epoch while padding inside a batch shrinks to the length spread of neighbours.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = max(1, batch_size * group_batches)
    batches = []
    for start in range(0, len(order), span):
        group = sorted(order[start : start + span], key=lambda i: -lengths[i])
        batches.extend(group[k : k + batch_size] for k in range(0, len(group), batch_size))
    tail = batches.pop() if batches and len(batches[-1]) < batch_size else None  # keep a short batch last
    rng.shuffle(batches)
    if tail is not None:
        batches.append(tail)
    return [i for b in batches for i in b]
