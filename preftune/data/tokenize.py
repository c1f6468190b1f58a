"""Records -> token ids: chat template, prompt / completion split, EOS, explicit truncation.

Standard (text) records are tokenized as ``tok(prompt)`` (with the tokenizer's BOS) and
``tok(completion, add_special_tokens=False) + [eos]``. Conversational records go through the chat template:
the prompt is ``template(prompt, add_generation_prompt=True)``, the completion is what the full dialogue's
template adds after it; EOS is appended only where the template did not end the turn with it. A record's
``tools`` go to the template as ``tools=``; a text prompt with tools is dropped (``tools_with_text_prompt``: no
template renders them).

The same rules run in three places: here record by record (``Tokenization.all``), over a whole split through
``datasets.map`` with its on-disk cache (``data.tokenize_cache``), and lazily for a streamed split.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from preftune.data.formats import DropLog, PairRecord, Skip, UnpairedRecord
from preftune.data.load import DataError


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str = "<memory>"
    line: int = 0
    group: int = 0  # the split's source it came from (mixtures)


@dataclass
class TokenizedGroup:
    """G completions of one prompt (an on-policy group: GRPO); completion k of group u is sequence u + k·n."""

    prompt_ids: list[int]
    completions: list[list[int]]


@dataclass
class TokenizedSingle:
    """One completion (unpaired losses, SFT)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool = True
    source: str = "<memory>"
    line: int = 0
    group: int = 0


@dataclass
class TokenizeStats:
    truncated: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        if not self.truncated:
            return "no row truncated"
        return "truncated: " + ", ".join(f"{k} {n}" for k, n in self.truncated.items())


class Tokenization:
    """Tokenizes records with fixed truncation rules; ``fingerprint`` identifies the rules for caching."""

    def __init__(self, tokenizer, *, max_length: int, max_prompt_length: int | None = None,
                 truncation_mode: str = "keep_end"):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token")
        self.tok = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation_mode = truncation_mode
        self.stats = TokenizeStats()

    @property
    def fingerprint(self) -> str:
        tok = self.tok
        return "|".join(map(str, (
            type(tok).__name__, getattr(tok, "name_or_path", ""), len(tok), tok.eos_token_id, tok.bos_token_id,
            getattr(tok, "chat_template", None), self.max_length, self.max_prompt_length, self.truncation_mode,
        )))

    # -- text ---------------------------------------------------------------------------------------------
    def _prompt_text(self, prompt, tools=None) -> tuple[str, bool]:
        """The prompt as text and whether it already carries the special tokens (template output)."""
        if isinstance(prompt, str):
            if tools:
                raise Skip("tools_with_text_prompt")
            return prompt, False
        if not getattr(self.tok, "chat_template", None):
            raise Skip("no_chat_template")
        return self.tok.apply_chat_template(prompt, tools=tools, tokenize=False, add_generation_prompt=True), True

    def _completion_text(self, prompt, completion, tools=None) -> str:
        if isinstance(completion, str):
            return completion
        prompt_text, _ = self._prompt_text(prompt, tools)
        full = self.tok.apply_chat_template(prompt + completion, tools=tools, tokenize=False)
        if not full.startswith(prompt_text):
            raise Skip("chat_template_prefix_mismatch")
        return full[len(prompt_text):]

    def _ids(self, text: str, special: bool) -> list[int]:
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def _prompt_ids(self, prompt, tools=None) -> list[int]:
        text, templated = self._prompt_text(prompt, tools)
        ids = self._ids(text, special=not templated)
        if self.max_prompt_length is not None and len(ids) > self.max_prompt_length:
            self.stats.truncated["prompt"] += 1
            keep = self.max_prompt_length
            ids = ids[-keep:] if self.truncation_mode == "keep_end" else ids[:keep]
        if len(ids) >= self.max_length:
            raise Skip("prompt_too_long")
        return ids

    def _completion_ids(self, prompt, completion, prompt_len: int, tools=None) -> list[int]:
        ids = self._ids(self._completion_text(prompt, completion, tools), special=False)
        eos = self.tok.eos_token_id
        if eos not in ids[-2:]:  # chat templates often end a turn with EOS then a newline
            ids = ids + [eos]
        room = self.max_length - prompt_len
        if len(ids) > room:
            self.stats.truncated["completion"] += 1
            ids = ids[:room]
        return ids

    def prompt_ids(self, prompt, tools=None) -> list[int]:
        """A prompt (text, or messages rendered by the chat template with the generation prompt) as the ids a
        completion is generated after, truncated by the same rules as in training; raises Skip when unusable."""
        return self._prompt_ids(prompt, tools)

    # -- records ------------------------------------------------------------------------------------------
    def pair(self, rec: PairRecord) -> TokenizedPair:
        tools = getattr(rec, "tools", None)
        p = self._prompt_ids(rec.prompt, tools)
        c = self._completion_ids(rec.prompt, rec.chosen, len(p), tools)
        r = self._completion_ids(rec.prompt, rec.rejected, len(p), tools)
        if c == r:
            raise Skip("identical_after_truncation")
        return TokenizedPair(p, c, r, rec.source, rec.line, getattr(rec, "group", 0))

    def single(self, rec: UnpairedRecord) -> TokenizedSingle:
        tools = getattr(rec, "tools", None)
        p = self._prompt_ids(rec.prompt, tools)
        return TokenizedSingle(p, self._completion_ids(rec.prompt, rec.completion, len(p), tools), rec.label,
                               rec.source, rec.line, getattr(rec, "group", 0))

    def all(self, records: Iterable[PairRecord | UnpairedRecord], drops: DropLog) -> list:
        out = []
        for rec in records:
            try:
                out.append(self.pair(rec) if isinstance(rec, PairRecord) else self.single(rec))
            except Skip as skip:
                drops.drop(rec.source, rec.line, str(skip), record_row(rec))
        return out


def record_row(rec) -> dict:
    """A record as the row a user would recognise (for ``dropped.jsonl``)."""
    row = ({"prompt": rec.prompt, "chosen": rec.chosen, "rejected": rec.rejected} if isinstance(rec, PairRecord)
           else {"prompt": rec.prompt, "completion": rec.completion, "label": rec.label})
    if getattr(rec, "tools", None):
        row["tools"] = rec.tools
    return row


def resolve_chat_template(value: str | None) -> str | None:
    """``data.chat_template``: the text of the file it names, or the template string itself; None stays None."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if "{" not in value and len(value) < 4096:
        if not path.is_file():
            raise DataError(f"data.chat_template: {value} is neither a file nor a Jinja template "
                            "(a template holds '{{ ... }}' or '{% ... %}')")
        return path.read_text(encoding="utf-8")
    if len(value) < 4096 and os.path.isfile(path):
        return path.read_text(encoding="utf-8")
    return value
