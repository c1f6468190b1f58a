"""From the config's data section to tokenized example sets, with every drop counted and written."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from preftune.data.collate import LAYOUTS
from preftune.data.formats import DropLog, normalize
from preftune.data.load import DataError, read_rows
from preftune.data.tokenize import Tokenization, TokenizedPair


@dataclass
class ExampleSet:
    """Tokenized examples and, once computed, their reference log-probs ((n, 2) pairs or (n,) singles)."""

    examples: list
    ref: torch.Tensor | None = None
    kl_ref: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def paired(self) -> bool:
        return bool(self.examples) and isinstance(self.examples[0], TokenizedPair)

    def batch(self, indices: list[int], pad_id: int, layout: str = "padded", with_ref: bool = True):
        """Collate the examples at ``indices``; attach cached reference log-probs and labels as extras."""
        chosen = [self.examples[i] for i in indices]
        batch = LAYOUTS[layout](chosen, pad_id)
        idx = torch.tensor(indices, dtype=torch.long)
        if with_ref and self.ref is not None:
            ref = self.ref[idx]
            batch.extras["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]]) if self.paired else ref
        if not self.paired:
            batch.extras["labels"] = torch.tensor([e.label for e in chosen], dtype=torch.bool)
        batch.extras["num_examples"] = torch.tensor(len(indices))
        return batch

    def tokens(self) -> int:
        if self.paired:
            return sum(len(e.prompt_ids) * 2 + len(e.chosen_ids) + len(e.rejected_ids) for e in self.examples)
        return sum(len(e.prompt_ids) + len(e.completion_ids) for e in self.examples)


def _records(source, kind: str, drops: DropLog) -> list:
    if source is None:
        return []
    return list(normalize(read_rows(source), kind, drops))


def prepare_data(data_cfg, kind: str, tokenization: Tokenization, seed: int, out_dir: Path | None,
                 log=print) -> tuple[ExampleSet, ExampleSet, DropLog]:
    """Load, interpret, tokenize; hold out ``eval_fraction`` when no eval set is given.

    Dropped rows are counted by reason, printed, and written to ``out_dir/dropped.jsonl``.
    """
    if data_cfg.train is None:
        raise DataError("data.train is not set")
    drops = DropLog()
    train_records = _records(data_cfg.train, kind, drops)
    eval_records = _records(data_cfg.eval, kind, drops)
    if not eval_records and data_cfg.eval_fraction > 0:
        rng = random.Random(seed)
        order = list(range(len(train_records)))
        rng.shuffle(order)
        n_eval = max(1, int(round(len(order) * data_cfg.eval_fraction)))
        held = set(order[:n_eval])
        eval_records = [r for i, r in enumerate(train_records) if i in held]
        train_records = [r for i, r in enumerate(train_records) if i not in held]
    from preftune.data.validate import validate_records

    report = validate_records(train_records, drops, eval_records=eval_records or None, source=str(data_cfg.train))
    for line in report.summary().splitlines():
        log(f"data check: {line}")
    report.require_usable(data_cfg.allow_unusable)
    train = ExampleSet(tokenization.all(train_records, drops))
    evals = ExampleSet(tokenization.all(eval_records, drops))
    log(f"data: {drops.summary()}; {tokenization.stats.summary()}; train {len(train)}, eval {len(evals)}")
    if out_dir is not None and drops.dropped:
        drops.write(out_dir / "dropped.jsonl")
        log(f"data: dropped rows written to {out_dir / 'dropped.jsonl'}")
    if not train.examples:
        raise DataError(f"no usable training rows ({drops.summary()})")
    return train, evals, drops
