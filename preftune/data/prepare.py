"""From the config's data section to tokenized example sets, with every drop counted and written.

    sources (one, or several with weights: ``data.sources``) -> records (``formats.normalize``; each tagged with
    its source's index) -> held-out split -> tokenized through the on-disk cache (``tokenize_cache``) -> the data
    check, which counts rows that tokenization drops too, so data whose every row would drop (conversational
    rows, no chat template) is never called usable.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from preftune.data.batch import PreferenceBatch
from preftune.data.formats import DropLog, PairRecord, UnpairedRecord, is_unpaired_row, normalize
from preftune.data.layouts import LAYOUTS
from preftune.data.load import DataError, read_rows
from preftune.data.sources import as_sources, mixture_order, weights_of
from preftune.data.tokenize import Tokenization, TokenizedPair, TokenizedSingle
from preftune.data.tokenize_cache import tokenize_records


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
        weights: the mixing weight of each source (examples carry their source's index as ``group``), or None
            when the rows are pooled.
    """

    examples: list
    ref: torch.Tensor | None = None
    kl_examples: list | None = None
    kl_ref: torch.Tensor | None = None
    margins: torch.Tensor | None = None
    weights: list[float] | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def mixture_order(self, seed: int, epoch: int) -> list[int]:
        """One epoch's order drawn by the mixing weights (``data.sources.mixture_order``)."""
        return mixture_order(np.array([e.group for e in self.examples]), self.weights, seed, epoch)

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
    specs = as_sources(source)
    if specs:
        return " + ".join(s.label for s in specs)
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
    rows = list(_rows(source))
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
                out.append(RatedPair(rec.prompt, rec.chosen, rec.rejected, rec.source, rec.line, rec.tools,
                                     rec.group, m))
    return out


def _rows(source):
    """The rows of a split, each tagged with the index of its source (``group``) for a mixture."""
    specs = as_sources(source)
    for group, one in enumerate(specs if specs else [source]):
        for raw in read_rows(one):
            raw.group = group
            yield raw


def _tag(records, raw):
    for rec in records:
        rec.group = getattr(raw, "group", 0)
        yield rec


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
    out = []
    for raw in _rows(source):
        row = raw.data
        if kind != "paired" and isinstance(row, dict) and "chosen" in row and "rejected" in row and \
                not is_unpaired_row(row):
            pair = list(normalize([raw], "paired", DropLog()))
            if pair:
                drops.read += 1
                out.extend(_tag(pair, raw))
                continue
        out.extend(_tag(normalize([raw], kind, drops), raw))
    return out


def _expand(records: list, kind: str) -> list:
    """Pairs as the records an unpaired loss (chosen desirable, rejected undesirable: the KTO paper's recipe)
    or an SFT loss (the chosen side) trains on; other records unchanged."""
    out = []
    for r in records:
        if isinstance(r, PairRecord) and kind == "unpaired":
            out += [UnpairedRecord(r.prompt, r.chosen, True, r.source, r.line, r.tools, r.group),
                    UnpairedRecord(r.prompt, r.rejected, False, r.source, r.line, r.tools, r.group)]
        elif isinstance(r, PairRecord) and kind == "sft":
            out.append(UnpairedRecord(r.prompt, r.chosen, True, r.source, r.line, r.tools, r.group))
        else:
            out.append(r)
    return out


def _tokenized(records: list, tokenization: Tokenization, drops: DropLog, data_cfg,
               weights: list[float] | None = None) -> tuple[ExampleSet, DropLog]:
    """(an example set of the records that tokenize, the rows every example of which dropped).

    Tokenized through the on-disk cache (``tokenize_cache``: ``data.cache_dir``, ``data.num_proc``); rated
    pairs keep their margins beside them. The second value counts each source row once (a paired row an
    unpaired loss splits in two is gone only when both halves are), for the data check's usable count.
    """
    local = DropLog()
    examples, kept = tokenize_records(records, tokenization, local, cache_dir=getattr(data_cfg, "cache_dir", None),
                                      num_proc=getattr(data_cfg, "num_proc", None))
    drops.extend(local)
    alive = {(r.source, r.line) for r, k in zip(records, kept) if k}
    gone, reasons = DropLog(), {}
    for d in local.rows:
        reasons.setdefault((d["source"], d["line"]), d)
    for (source, line), d in reasons.items():
        if (source, line) not in alive:
            gone.drop(source, line, d["reason"], d["row"])
    margins = None
    if any(isinstance(r, RatedPair) for r in records):
        margins = torch.tensor([r.margin for r, k in zip(records, kept) if k], dtype=torch.float32)
    return ExampleSet(examples, margins=margins, weights=weights), gone


LENGTH_DROPS = ("prompt_too_long", "identical_after_truncation")
"""Tokenization drops that ``training.max_length`` / ``data.max_prompt_length`` cause, not the rows."""


def unusable_part(gone: DropLog, everything: bool) -> DropLog:
    """The rows tokenization dropped that the data check counts as unusable: those the data itself makes
    unusable (no chat template for conversational rows, a template that breaks the prompt prefix, tools on a
    text prompt), and the length drops too when nothing is left (so the check never calls data usable when
    every row will drop). Length drops alone are the lengths' choice: counted and reported, not held against
    the data."""
    out = DropLog()
    for d in gone.rows:
        if everything or d["reason"] not in LENGTH_DROPS:
            out.drop(d["source"], d["line"], d["reason"], d["row"])
    return out


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
    held_out = False
    if not eval_records and data_cfg.eval_fraction > 0:
        held_out = True
        rng = random.Random(seed if data_cfg.split_seed is None else data_cfg.split_seed)
        order = list(range(len(train_records)))
        rng.shuffle(order)
        n_eval = max(1, int(round(len(order) * data_cfg.eval_fraction)))
        held = set(order[:n_eval])
        eval_records = [r for i, r in enumerate(train_records) if i in held]
        train_records = [r for i, r in enumerate(train_records) if i not in held]
    from preftune.data.validate import validate_records

    eval_checked = eval_records
    if not all(isinstance(r, PairRecord) for r in eval_records):
        eval_records = _expand(eval_records, kind)
    train, gone = _tokenized(_expand(train_records, kind), tokenization, drops, data_cfg,
                             weights_of(as_sources(data_cfg.train)))
    evals, eval_gone = _tokenized(eval_records, tokenization, drops, data_cfg)
    if train.weights is not None:
        empty = [s.label for g, s in enumerate(as_sources(data_cfg.train)) if not any(e.group == g for e in train.examples)]
        if empty:
            raise DataError(f"data.train: no usable training rows in {', '.join(empty)}, which has a mixing weight")
    for part in (gone, eval_gone) if held_out else (gone,):
        train_drops.extend(unusable_part(part, everything=not train.examples))
    report = validate_records(train_records, train_drops, eval_records=eval_checked or None,
                              source=_label(data_cfg.train))
    for line in report.summary().splitlines():
        log(f"data check: {line}")
    report.require_usable(data_cfg.allow_unusable)
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


def prepare_eval(data_cfg, kind: str, tokenization: Tokenization, seed: int, drops: DropLog,
                 kl: bool = False) -> ExampleSet:
    """``data.eval`` alone, tokenized (a streamed run's held-out set: the train split is read as it goes);
    drops go to ``drops``. Pairs stay pairs, so an unpaired or SFT loss can still rank them."""
    records = _records(data_cfg.eval, kind, drops, data_cfg)
    if not all(isinstance(r, PairRecord) for r in records):
        records = _expand(records, kind)
    evals, _ = _tokenized(records, tokenization, drops, data_cfg)
    if kl and len(evals):
        evals.kl_examples = mismatched(evals.examples, seed + 1)
    return evals
