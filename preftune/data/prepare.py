"""From the config's data section to tokenized example sets, with every drop counted and written."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from preftune.data.batch import PreferenceBatch
from preftune.data.formats import DropLog, PairRecord, UnpairedRecord, is_unpaired_row, normalize
from preftune.data.layouts import LAYOUTS
from preftune.data.load import DataError, read_rows
from preftune.data.tokenize import Tokenization, TokenizedPair, TokenizedSingle


@dataclass
class ExampleSet:
    """Tokenized examples and, once computed, their reference log-probs.

    Attributes:
        examples: TokenizedPair or TokenizedSingle, one kind per set.
        ref: (n, 2) [chosen, rejected] reference log-probs of pairs, or (n,) of singles.
        kl_examples: for losses with a KL reference point (KTO): example i's prompt with the completion of
            another example, ``mismatched(examples)``; None when the loss needs none.
        kl_ref: (n,) reference log-probs of ``kl_examples``.
        margins: (n,) per-pair margins of a reward model's Bradley–Terry loss (``data.reward_margin``), or None.
    """

    examples: list
    ref: torch.Tensor | None = None
    kl_examples: list | None = None
    kl_ref: torch.Tensor | None = None
    margins: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def paired(self) -> bool:
        return bool(self.examples) and isinstance(self.examples[0], TokenizedPair)

    def batch(self, indices: list[int], pad_id: int, layout: str = "padded", with_ref: bool = True) -> PreferenceBatch:
        """The examples at ``indices`` as a :class:`PreferenceBatch`, with what the set knows about them.

        Cached reference log-probs and (for KTO) the mismatched KL batch are attached unless ``with_ref`` is
        False (the reference pass itself); labels for singles; margins when the set has them.
        """
        chosen = [self.examples[i] for i in indices]
        idx = torch.tensor(indices, dtype=torch.long)
        batch = PreferenceBatch(LAYOUTS[layout](chosen, pad_id), paired=self.paired)
        if with_ref and self.ref is not None:
            ref = self.ref[idx]
            batch.ref_logps = torch.cat([ref[:, 0], ref[:, 1]]) if self.paired else ref  # (S,)
        if not self.paired:
            batch.labels = torch.tensor([e.label for e in chosen], dtype=torch.bool)  # (B,)
        if self.margins is not None:
            batch.margin = self.margins[idx]  # (B,)
        if self.kl_examples is not None and with_ref:
            kl = [self.kl_examples[i] for i in indices]
            batch.kl = PreferenceBatch(LAYOUTS[layout](kl, pad_id), paired=False,
                                       ref_logps=None if self.kl_ref is None else self.kl_ref[idx])
        return batch

    def tokens(self) -> int:
        if self.paired:
            return sum(len(e.prompt_ids) * 2 + len(e.chosen_ids) + len(e.rejected_ids) for e in self.examples)
        return sum(len(e.prompt_ids) + len(e.completion_ids) for e in self.examples)


def mismatched(examples: list, seed: int) -> list[TokenizedSingle]:
    """Example i's prompt with the completion of example σ(i), for a fixed derangement σ: KTO's KL sequences.

    σ never maps an example to one with the same prompt (paired rows given to KTO become two examples sharing
    a prompt; pairing them would not be a mismatch): prompts are grouped, the groups shuffled and laid out in a
    row, and each position takes the completion ``m`` places further on (cyclically), m the largest group size.
    A group of size g ≤ m then never reaches itself when n ≥ 2m. Smaller sets fall back to a shift of one
    (a same-prompt match is possible, but still never the example itself when n ≥ 2).
    Fixed once per set rather than drawn per batch, so the reference log-probs of these sequences are
    precomputed and cached like the others, and any batch size works, B = 1 included (TRL mismatches within the
    micro-batch, which needs B ≥ 2). For pairs (held-out pairs scored by an unpaired loss) the completion is
    the chosen one for even i and the rejected one for odd i, so both kinds enter the estimate.
    """
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        groups[tuple(e.prompt_ids)].append(i)
    blocks = list(groups.values())
    random.Random(seed).shuffle(blocks)
    order = [i for block in blocks for i in block]
    n, m = len(order), max((len(b) for b in blocks), default=1)
    shift = m if n >= 2 * m else min(1, n - 1)
    partner = {order[k]: order[(k + shift) % n] for k in range(n)}

    def completion(e, i):
        if isinstance(e, TokenizedPair):
            return e.chosen_ids if i % 2 == 0 else e.rejected_ids
        return e.completion_ids

    return [TokenizedSingle(e.prompt_ids, completion(examples[partner[i]], i), source=e.source, line=e.line)
            for i, e in enumerate(examples)]


def _label(source) -> str:
    """How a data source is named in messages: its path or id, or a short description of in-memory rows."""
    if isinstance(source, (str, Path)):
        return str(source)
    try:
        return f"<memory: {len(source)} rows>"
    except TypeError:
        return "<memory>"


@dataclass
class RatedPair(PairRecord):
    """A pair with the margin m of a reward model's Bradley–Terry loss, −log σ(r_w − r_l − m)."""

    margin: float = 0.0


def _margin(row: dict, mode: str, scale: float) -> float | None:
    """The margin of one row: its ``margin`` (mode "margin"), or scale × (score_chosen − score_rejected)."""
    def number(key):
        value = row.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    if mode == "margin":
        return number("margin")
    sc, sr = number("score_chosen"), number("score_rejected")
    return None if sc is None or sr is None else scale * (sc - sr)


def _rated(source, data_cfg, drops: DropLog) -> list:
    """Pairs for a reward model: :class:`RatedPair` when ``data.reward_margin`` gives margins (a row without
    one is dropped as ``missing_margin`` / ``missing_ratings``), else plain pairs."""
    mode = data_cfg.reward_margin
    rows = list(read_rows(source))
    if mode == "auto":
        mode = "margin" if any(isinstance(r.data, dict) and "margin" in r.data for r in rows) else "none"
    if mode == "none":
        return list(normalize(rows, "paired", drops))
    out = []
    for raw in rows:
        for rec in normalize([raw], "paired", drops):
            m = _margin(raw.data, mode, data_cfg.ratings_scale)
            if m is None:
                drops.drop(raw.source, raw.line, f"missing_{'margin' if mode == 'margin' else 'ratings'}", raw.data)
            else:
                out.append(RatedPair(rec.prompt, rec.chosen, rec.rejected, rec.source, rec.line, m))
    return out


def _records(source, kind: str, drops: DropLog, data_cfg: Any = None) -> list:
    """Records for a loss of ``kind``. For unpaired and SFT losses a paired row stays a :class:`PairRecord`
    (expanded by :func:`_expand` after the held-out split), so held-out pairs can still be ranked and a pair's
    two halves never straddle train and eval. A paired row that does not make a usable pair gets the kind's
    own treatment (``normalize``), so rows are kept or dropped exactly as before. Reward models take pairs,
    with margins (:func:`_rated`)."""
    if source is None:
        return []
    if kind == "reward":
        return _rated(source, data_cfg, drops)
    if kind == "paired":
        return list(normalize(read_rows(source), kind, drops))
    out = []
    for raw in read_rows(source):
        row = raw.data
        if isinstance(row, dict) and "chosen" in row and "rejected" in row and not is_unpaired_row(row):
            pair = list(normalize([raw], "paired", DropLog()))
            if pair:
                drops.read += 1
                out.extend(pair)
                continue
        out.extend(normalize([raw], kind, drops))
    return out


def _expand(records: list, kind: str) -> list:
    """Pairs as the records an unpaired loss (chosen desirable, rejected undesirable: the KTO paper's recipe)
    or an SFT loss (the chosen side) trains on; other records unchanged."""
    out = []
    for r in records:
        if isinstance(r, PairRecord) and kind == "unpaired":
            out += [UnpairedRecord(r.prompt, r.chosen, True, r.source, r.line),
                    UnpairedRecord(r.prompt, r.rejected, False, r.source, r.line)]
        elif isinstance(r, PairRecord) and kind == "sft":
            out.append(UnpairedRecord(r.prompt, r.chosen, True, r.source, r.line))
        else:
            out.append(r)
    return out


def _tokenized(records: list, tokenization: Tokenization, drops: DropLog) -> ExampleSet:
    """An example set of the records that tokenize; rated pairs keep their margins beside them."""
    if not any(isinstance(r, RatedPair) for r in records):
        return ExampleSet(tokenization.all(records, drops))
    examples, margins = [], []
    for rec in records:
        done = tokenization.all([rec], drops)  # [] when the row is dropped (counted in drops)
        examples += done
        margins += [rec.margin] * len(done)
    return ExampleSet(examples, margins=torch.tensor(margins, dtype=torch.float32))


def prepare_data(data_cfg, kind: str, tokenization: Tokenization, seed: int, out_dir: Path | None,
                 log=print, kl: bool = False) -> tuple[ExampleSet, ExampleSet, DropLog]:
    """Load, interpret, tokenize; hold out ``eval_fraction`` of the rows when no eval set is given.

    ``kind`` is the loss's data kind. For unpaired and SFT losses, training pairs are expanded to the kind's
    records, while an eval set made only of pairs stays paired, so evaluation can rank chosen against rejected
    (``steps.unpaired_step`` / ``steps.sft_step``). Reward models (``"reward"``) take pairs, with per-pair
    margins when ``data.reward_margin`` gives them (``ExampleSet.margins``). ``kl``: also build each set's
    mismatched sequences (:func:`mismatched`). Dropped rows are counted by reason, printed, and written to
    ``out_dir/dropped.jsonl``. The held-out rows are drawn with ``data.split_seed`` (default ``seed``).
    """
    if data_cfg.train is None:
        raise DataError("data.train is not set")
    drops = DropLog()
    train_records = _records(data_cfg.train, kind, drops, data_cfg)
    train_drops = drops.copy()  # the pre-flight check judges the train file alone, not train + eval rows
    eval_records = _records(data_cfg.eval, kind, drops, data_cfg)
    if not eval_records and data_cfg.eval_fraction > 0:
        rng = random.Random(seed if data_cfg.split_seed is None else data_cfg.split_seed)
        order = list(range(len(train_records)))
        rng.shuffle(order)
        n_eval = max(1, int(round(len(order) * data_cfg.eval_fraction)))
        held = set(order[:n_eval])
        eval_records = [r for i, r in enumerate(train_records) if i in held]
        train_records = [r for i, r in enumerate(train_records) if i not in held]
    from preftune.data.validate import validate_records

    report = validate_records(train_records, train_drops, eval_records=eval_records or None, source=_label(data_cfg.train))
    for line in report.summary().splitlines():
        log(f"data check: {line}")
    report.require_usable(data_cfg.allow_unusable)
    if not all(isinstance(r, PairRecord) for r in eval_records):
        eval_records = _expand(eval_records, kind)
    train = _tokenized(_expand(train_records, kind), tokenization, drops)
    evals = _tokenized(eval_records, tokenization, drops)
    if kl:
        for i, dataset in enumerate((train, evals)):
            dataset.kl_examples = mismatched(dataset.examples, seed + i) if len(dataset) else None
    log(f"data: {drops.summary()}; {tokenization.stats.summary()}; train {len(train)}, eval {len(evals)}")
    if out_dir is not None and drops.dropped:
        drops.write(out_dir / "dropped.jsonl")
        log(f"data: dropped rows written to {out_dir / 'dropped.jsonl'}")
    if not train.examples:
        raise DataError(f"no usable training rows ({drops.summary()})")
    return train, evals, drops
