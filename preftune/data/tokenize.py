"""Records -> token ids: chat template, prompt / completion split, EOS, explicit truncation.

Standard (text) records are tokenized as ``tok(prompt)`` (with the tokenizer's BOS) and
``tok(completion, add_special_tokens=False) + [eos]``. Conversational records go through the chat template:
the prompt is ``template(prompt, add_generation_prompt=True)``, the completion is what the full dialogue's
template adds after it; EOS is appended only where the template did not end the turn with it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from preftune.data.formats import DropLog, PairRecord, Skip, UnpairedRecord


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str = "<memory>"
    line: int = 0


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
    def _prompt_text(self, prompt) -> tuple[str, bool]:
        """The prompt as text and whether it already carries the special tokens (template output)."""
        if isinstance(prompt, str):
            return prompt, False
        if not getattr(self.tok, "chat_template", None):
            raise Skip("no_chat_template")
        return self.tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), True

    def _completion_text(self, prompt, completion) -> str:
        if isinstance(completion, str):
            return completion
        prompt_text, _ = self._prompt_text(prompt)
        full = self.tok.apply_chat_template(prompt + completion, tokenize=False)
        if not full.startswith(prompt_text):
            raise Skip("chat_template_prefix_mismatch")
        return full[len(prompt_text):]

    def _ids(self, text: str, special: bool) -> list[int]:
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def _prompt_ids(self, prompt) -> list[int]:
        text, templated = self._prompt_text(prompt)
        ids = self._ids(text, special=not templated)
        if self.max_prompt_length is not None and len(ids) > self.max_prompt_length:
            self.stats.truncated["prompt"] += 1
            keep = self.max_prompt_length
            ids = ids[-keep:] if self.truncation_mode == "keep_end" else ids[:keep]
        if len(ids) >= self.max_length:
            raise Skip("prompt_too_long")
        return ids

    def _completion_ids(self, prompt, completion, prompt_len: int) -> list[int]:
        ids = self._ids(self._completion_text(prompt, completion), special=False)
        eos = self.tok.eos_token_id
        if eos not in ids[-2:]:  # chat templates often end a turn with EOS then a newline
            ids = ids + [eos]
        room = self.max_length - prompt_len
        if len(ids) > room:
            self.stats.truncated["completion"] += 1
            ids = ids[:room]
        return ids

    def prompt_ids(self, prompt) -> list[int]:
        """A prompt (text, or messages rendered by the chat template with the generation prompt) as the ids a
        completion is generated after, truncated by the same rules as in training; raises Skip when unusable."""
        return self._prompt_ids(prompt)

    # -- records ------------------------------------------------------------------------------------------
    def pair(self, rec: PairRecord) -> TokenizedPair:
        p = self._prompt_ids(rec.prompt)
        c = self._completion_ids(rec.prompt, rec.chosen, len(p))
        r = self._completion_ids(rec.prompt, rec.rejected, len(p))
        if c == r:
            raise Skip("identical_after_truncation")
        return TokenizedPair(p, c, r, rec.source, rec.line)

    def single(self, rec: UnpairedRecord) -> TokenizedSingle:
        p = self._prompt_ids(rec.prompt)
        return TokenizedSingle(p, self._completion_ids(rec.prompt, rec.completion, len(p)), rec.label,
                               rec.source, rec.line)

    def all(self, records: Iterable[PairRecord | UnpairedRecord], drops: DropLog) -> list:
        out = []
        for rec in records:
            try:
                out.append(self.pair(rec) if isinstance(rec, PairRecord) else self.single(rec))
            except Skip as skip:
                drops.drop(rec.source, rec.line, str(skip), _record_row(rec))
        return out


def _record_row(rec) -> dict:
    if isinstance(rec, PairRecord):
        return {"prompt": rec.prompt, "chosen": rec.chosen, "rejected": rec.rejected}
    return {"prompt": rec.prompt, "completion": rec.completion, "label": rec.label}
