"""Typed preference records and the rules that turn a raw row into one, or into a counted drop.

Formats understood:
    standard paired        {"prompt": str, "chosen": str, "rejected": str}
    conversational paired  {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}, or without "prompt":
                           chosen/rejected are full dialogues and the prompt is their longest common prefix
    implicit-prompt text   {"chosen": str, "rejected": str}: the prompt is the longest common prefix, cut
                           back to the last "Assistant:" turn marker or word boundary (HH-RLHF style)
    unpaired (KTO)         {"prompt": str|[msgs], "completion": str|[msgs], "label": bool}
    sft                    {"prompt", "completion"} or {"prompt", "chosen"} or {"messages": [msgs]}
A message is {"role": str, "content": str}. Any conversational row may carry ``tools``: a list of JSON schemas
(or that list as a JSON string), handed to the chat template as ``apply_chat_template(..., tools=tools)``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from preftune.data.load import RawRow
from preftune.data.outputs import AtomicJsonl

Text = str | list[dict[str, str]]
DataKind = Literal["paired", "unpaired", "sft"]


@dataclass
class PairRecord:
    """One usable preference pair. ``prompt`` is text or messages; chosen/rejected are the completions only."""

    prompt: Text
    chosen: Text
    rejected: Text
    source: str = "<memory>"
    line: int = 0
    tools: list | None = None  # JSON schemas for the chat template (conversational rows)
    group: int = 0  # which source of the split (``data.sources``) the row came from


@dataclass
class UnpairedRecord:
    """One completion with a desirable (True) or undesirable (False) label; also used for SFT (label True)."""

    prompt: Text
    completion: Text
    label: bool
    source: str = "<memory>"
    line: int = 0
    tools: list | None = None
    group: int = 0


@dataclass
class DropLog:
    """Rows that could not be used: counted by reason, kept with their source line, written for the user."""

    read: int = 0
    counts: Counter = field(default_factory=Counter)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def drop(self, source: str, line: int, reason: str, row: Any) -> None:
        self.counts[reason] += 1
        self.rows.append({"source": source, "line": line, "reason": reason, "row": row})

    @property
    def dropped(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return f"read {self.read} rows, dropped none"
        parts = ", ".join(f"{reason}: {n}" for reason, n in self.counts.most_common())
        return f"read {self.read} rows, kept {self.read - self.dropped}, dropped {self.dropped} ({parts})"

    def extend(self, other: DropLog) -> None:
        """Add ``other``'s drops (not its reads: the rows were counted where they were read)."""
        self.counts.update(other.counts)
        self.rows.extend(other.rows)

    def copy(self) -> DropLog:
        """A snapshot: later reads and drops (of another file, say) do not change it."""
        return DropLog(self.read, Counter(self.counts), list(self.rows))

    def write(self, path: str | Path) -> None:
        """One JSON line per dropped row (standard JSON: see ``data.outputs``)."""
        with AtomicJsonl(path) as f:
            for rec in self.rows:
                f.write(rec)


class Skip(Exception):
    """A row-level problem: the row is dropped with this reason."""


def is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in value)
    )


def _text_field(row: dict, name: str, *, allow_messages: bool = True) -> Text:
    if name not in row or row[name] is None:
        raise Skip(f"missing_field:{name}")
    value = row[name]
    if isinstance(value, str):
        return value
    if allow_messages and is_messages(value):
        return value
    raise Skip(f"wrong_type:{name}")


def _is_blank(value: Text) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return all(not m["content"].strip() for m in value if m.get("role") == "assistant") or not value


def _common_prefix_len(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _split_implicit_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Longest common prefix of two strings, cut back to a turn marker or word boundary."""
    n = _common_prefix_len(list(chosen), list(rejected))
    prefix = chosen[:n]
    marker = prefix.rfind("Assistant:")
    if marker >= 0:
        n = marker + len("Assistant:")
    else:
        while n > 0 and not prefix[n - 1].isspace():
            n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def row_tools(row: dict) -> list | None:
    """The row's ``tools``: None when absent, else a list of JSON schemas (a JSON string holding one is read)."""
    value = row.get("tools")
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise Skip("wrong_type:tools") from None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise Skip("wrong_type:tools")
    return value or None


def to_pair(row: dict) -> PairRecord:
    """Interpret a paired row; raise :class:`Skip` with the drop reason when it cannot be used."""
    chosen = _text_field(row, "chosen")
    rejected = _text_field(row, "rejected")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise Skip("mixed_formats")
    if "prompt" in row and row["prompt"] is not None:
        prompt = _text_field(row, "prompt")
        if isinstance(prompt, str) and not isinstance(chosen, str):
            prompt = [{"role": "user", "content": prompt}]
    elif isinstance(chosen, list):
        n = _common_prefix_len(chosen, rejected)
        # The prompt ends at the last non-assistant message the dialogues share.
        while n > 0 and chosen[n - 1].get("role") == "assistant":
            n -= 1
        if n == 0:
            raise Skip("no_shared_prompt")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    else:
        prompt, chosen, rejected = _split_implicit_text(chosen, rejected)
    if _is_blank(chosen) or _is_blank(rejected):
        raise Skip("empty_response")
    if chosen == rejected:
        raise Skip("identical_responses")
    return PairRecord(prompt, chosen, rejected, tools=row_tools(row))


def _to_label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise Skip("wrong_type:label")


def to_unpaired(row: dict) -> UnpairedRecord:
    prompt = _text_field(row, "prompt")
    completion = _text_field(row, "completion")
    if "label" not in row or row["label"] is None:
        raise Skip("missing_field:label")
    label = _to_label(row["label"])
    if isinstance(prompt, str) and isinstance(completion, list):
        prompt = [{"role": "user", "content": prompt}]
    if _is_blank(completion):
        raise Skip("empty_response")
    return UnpairedRecord(prompt, completion, label, tools=row_tools(row))


def to_sft(row: dict) -> UnpairedRecord:
    if "messages" in row and is_messages(row["messages"]):
        msgs = row["messages"]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=-1)
        if last <= 0:
            raise Skip("no_assistant_turn")
        prompt, completion = msgs[:last], msgs[last:]
    else:
        prompt = _text_field(row, "prompt")
        completion = _text_field(row, "completion" if "completion" in row else "chosen")
        if isinstance(prompt, str) and isinstance(completion, list):
            prompt = [{"role": "user", "content": prompt}]
    if _is_blank(completion):
        raise Skip("empty_response")
    return UnpairedRecord(prompt, completion, True, tools=row_tools(row))


def is_unpaired_row(row: dict) -> bool:
    """Whether a row is read as unpaired (KTO): it has a completion and neither chosen nor rejected.

    The one definition the loader, ``data validate``, ``clean`` and ``convert`` share. A missing label does not
    make the row paired: it is an unpaired row dropped as ``missing_field:label``.
    """
    return "completion" in row and "chosen" not in row and "rejected" not in row


def normalize(rows: Iterable[RawRow], kind: DataKind, drops: DropLog) -> Iterator[PairRecord | UnpairedRecord]:
    """Turn raw rows into records of ``kind``; every row is either yielded or recorded in ``drops``.

    Paired rows given to an unpaired loss are split into one desirable and one undesirable record each
    (the KTO paper's recipe for paired data).
    """
    for raw in rows:
        drops.read += 1
        row = raw.data
        try:
            if row is None:
                raise Skip(raw.drop_reason)
            if kind == "paired":
                if is_unpaired_row(row):
                    raise Skip("unpaired_row_for_paired_loss")
                rec = to_pair(row)
                rec.source, rec.line = raw.source, raw.line
                yield rec
            elif kind == "unpaired":
                if is_unpaired_row(row):
                    rec = to_unpaired(row)
                    rec.source, rec.line = raw.source, raw.line
                    yield rec
                else:
                    pair = to_pair(row)
                    yield UnpairedRecord(pair.prompt, pair.chosen, True, raw.source, raw.line, pair.tools)
                    yield UnpairedRecord(pair.prompt, pair.rejected, False, raw.source, raw.line, pair.tools)
            else:
                rec = to_sft(row)
                rec.source, rec.line = raw.source, raw.line
                yield rec
        except Skip as skip:
            drops.drop(raw.source, raw.line, str(skip), row if row is not None else raw.raw)
