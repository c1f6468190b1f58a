"""Prompt sets for on-policy training: rows with a ``prompt`` (text or messages); every other column is kept
and handed to the reward functions. Unusable rows are dropped with their reason, like any other data."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.data.formats import DropLog, Skip, is_messages, row_tools
from preftune.data.load import DataError, read_rows
from preftune.data.tokenize import Tokenization, TokenizedSingle


@dataclass
class PromptSet:
    """Tokenized prompts and their rows.

    Attributes:
        prompts: each row's prompt as given (text or a message list): what reward functions receive.
        prompt_ids: the token ids generation starts from (chat template applied, truncated as in training).
        columns: the rows' other fields, by name, one value per prompt (None where a row lacks the field).
    """

    prompts: list[Any] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)
    columns: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def columns_of(self, indices: list[int]) -> dict[str, list[Any]]:
        return {k: [v[i] for i in indices] for k, v in self.columns.items()}

    @property
    def examples(self) -> list[TokenizedSingle]:
        """The prompts as completion-less singles (what the monitor reads its held-out prompts from)."""
        return [TokenizedSingle(p, []) for p in self.prompt_ids]


def _prompt_of(row: Any) -> Any:
    if not isinstance(row, dict):
        raise Skip("not_a_mapping")
    prompt = row.get("prompt")
    if prompt is None and is_messages(row.get("messages")):  # a dialogue: everything up to the last user turn
        messages = row["messages"]
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None:
            raise Skip("no_user_turn")
        prompt = messages[: last_user + 1]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise Skip("empty_prompt")
        return prompt
    if is_messages(prompt):
        return prompt
    raise Skip("missing_prompt")


def load_prompts(source: Any, tokenization: Tokenization, drops: DropLog) -> PromptSet:
    """Every usable prompt row of ``source`` (anything ``read_rows`` reads); drops counted in ``drops``."""
    out = PromptSet()
    rows = []
    for raw in read_rows(source):
        drops.read += 1
        try:
            prompt = _prompt_of(raw.data)
            ids = tokenization.prompt_ids(prompt, row_tools(raw.data))
        except Skip as skip:
            drops.drop(raw.source, raw.line, str(skip), raw.data)
            continue
        out.prompts.append(prompt)
        out.prompt_ids.append(ids)
        rows.append(raw.data)
    keys = sorted({k for r in rows for k in r} - {"prompt", "messages"})
    out.columns = {k: [r.get(k) for r in rows] for k in keys}
    return out


def prepare_prompts(data_cfg, tokenization: Tokenization, seed: int, out_dir: Path | None,
                    log=print) -> tuple[PromptSet, PromptSet, DropLog]:
    """(train prompts, held-out prompts, drops): ``data.eval`` or ``data.eval_fraction`` of the train rows."""
    if data_cfg.train is None:
        raise DataError("data.train is not set")
    drops = DropLog()
    train = load_prompts(data_cfg.train, tokenization, drops)
    evals = load_prompts(data_cfg.eval, tokenization, drops) if data_cfg.eval is not None else PromptSet()
    if not len(evals) and data_cfg.eval_fraction > 0 and len(train) > 1:
        order = list(range(len(train)))
        random.Random(seed if data_cfg.split_seed is None else data_cfg.split_seed).shuffle(order)
        held = set(order[: max(1, int(round(len(order) * data_cfg.eval_fraction)))])
        train, evals = _subset(train, [i for i in range(len(train)) if i not in held]), _subset(train, sorted(held))
    log(f"data: prompts: {drops.summary()}; train {len(train)}, eval {len(evals)}")
    if out_dir is not None and drops.dropped:
        drops.write(out_dir / "dropped.jsonl")
        log(f"data: dropped rows written to {out_dir / 'dropped.jsonl'}")
    if not len(train):
        raise DataError(f"no usable prompts in data.train ({drops.summary()})")
    return train, evals, drops


def _subset(ps: PromptSet, idx: list[int]) -> PromptSet:
    return PromptSet([ps.prompts[i] for i in idx], [ps.prompt_ids[i] for i in idx], ps.columns_of(idx))
