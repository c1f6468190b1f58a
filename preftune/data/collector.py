"""The streaming half of ``data validate``: rows arrive one at a time and leave only fixed-size numbers behind.

Per usable row the collector keeps 64-bit hashes of the normalized texts, lengths and the row ordinal, never the
texts, so a million pairs need ~60 MB on top of the reader. Hashes are Python's ``hash`` of ``str``: stable
within one process, which is all the checks need (they are never stored). Row-level checks that need only the
row itself (control characters, empty prompt, identical, near-identical, swapped rating and refusal) flag rows
here; the checks over the whole dataset run on :meth:`Collector.columns` (``preftune.data.checks``).
"""

from __future__ import annotations

from array import array
from collections import Counter
from typing import Any

import numpy as np

from preftune.data.checks import Columns
from preftune.data.findings import Thresholds
from preftune.data.formats import Text
from preftune.data.lengths import WORDS, token_counts
from preftune.data.text import (
    CONTROL,
    is_refusal,
    near_identical,
    normalize_text,
    plain_text,
    words_of_normalized,
)


def finding_for_reason(reason: str) -> tuple[str, str]:
    """A loader drop reason -> (finding name, detail): "missing_field:chosen" -> ("missing_field", "chosen")."""
    if reason.startswith("malformed_line"):
        detail = reason.partition(":")[2].strip()
        return ("non_utf8" if detail.startswith("not valid UTF-8") else "malformed_line"), detail
    if reason == "identical_responses":
        return "identical", ""
    name, _, detail = reason.partition(":")
    return name.strip(), detail.strip()


# Findings whose detail (the field named in the loader's reason) is counted per value; and those whose errors
# ("file:line: why") are kept as examples.
_BY_FIELD = ("missing_field", "wrong_type")
_WITH_ERRORS = ("malformed_line", "non_utf8")


def _np(a: array, dtype: Any = np.int64) -> np.ndarray:
    return np.frombuffer(a, dtype=dtype) if len(a) else np.zeros(0, dtype)


class Collector:
    """Receives rows one at a time; keeps only fixed-size numbers per row (see the module docstring)."""

    def __init__(self, *, tokenizer: Any = None, tokenizer_name: str | None = None, max_length: int | None,
                 max_examples: int, thresholds: Thresholds, batch_size: int = 1000):
        self.tok = tokenizer
        self.unit = f"tokens ({tokenizer_name})" if tokenizer is not None else WORDS
        self.max_length = max_length
        self.max_examples = max_examples
        self.th = thresholds
        self.batch_size = batch_size
        self.sources: list[str] = []
        self._source_ix: dict[str, int] = {}
        self.row_src = array("I")
        self.row_line = array("q")
        self.flags: dict[str, array] = {}
        self.flag_details: dict[str, Counter] = {}
        # paired rows
        self.p_ord, self.p_hp, self.p_fwd, self.p_rev, self.p_dup = (array("q") for _ in range(5))
        self.p_lp, self.p_lc, self.p_lr = array("i"), array("i"), array("i")
        self.p_self = array("b")  # 1 when chosen == rejected after normalization (excluded from contradictions)
        # unpaired rows
        self.u_ord, self.u_hp, self.u_key, self.u_dup = (array("q") for _ in range(4))
        self.u_label = array("b")
        self.u_lp, self.u_lc = array("i"), array("i")
        self.rated = 0
        self.dropped = 0  # rows the loader would drop (each row at most once)
        self.errors: dict[str, list[str]] = {}  # first parse errors per finding, "file:line: why"
        self._batch: list[tuple[str, int, tuple[str, ...]]] = []

    # -- rows ------------------------------------------------------------------------------------------
    def row(self, source: str, line: int) -> int:
        """Register a row read from ``source`` at ``line``; returns its ordinal (0-based, in read order)."""
        ix = self._source_ix.get(source)
        if ix is None:
            ix = self._source_ix[source] = len(self.sources)
            self.sources.append(source)
        self.row_src.append(ix)
        self.row_line.append(line)
        return len(self.row_line) - 1

    def flag(self, name: str, ordinal: int, detail: str = "") -> None:
        rows = self.flags.get(name)
        if rows is None:
            rows = self.flags[name] = array("q")
            self.flag_details[name] = Counter()
        rows.append(ordinal)
        if detail:
            self.flag_details[name][detail] += 1

    def drop(self, ordinal: int, reason: str) -> None:
        """A row the loader would drop, with the loader's reason."""
        self.dropped += 1
        name, detail = finding_for_reason(reason)
        if name == "identical":
            detail = "exact"
        elif name in _WITH_ERRORS:
            errors = self.errors.setdefault(name, [])
            if len(errors) < self.max_examples:
                errors.append(f"{self.label(ordinal)}: {detail}")
        self.flag(name, ordinal, detail if name in _BY_FIELD or name == "identical" else "")

    def label(self, ordinal: int) -> str:
        return f"{self.sources[self.row_src[ordinal]]}:{self.row_line[ordinal]}"

    # -- records ---------------------------------------------------------------------------------------
    def add_pair(self, o: int, prompt: Text, chosen: Text, rejected: Text,
                 ratings: tuple[float, float] | None = None) -> None:
        p, c, r = plain_text(prompt, roles=True), plain_text(chosen), plain_text(rejected)
        if CONTROL.search(p) or CONTROL.search(c) or CONTROL.search(r):
            self.flag("control_characters", o)
        np_, nc, nr = normalize_text(p), normalize_text(c), normalize_text(r)
        if not np_:
            self.flag("empty_prompt", o)
        wp, wc, wr = words_of_normalized(np_), words_of_normalized(nc), words_of_normalized(nr)
        same = nc == nr
        if same:
            self.flag("identical", o, "normalized")
        elif near_identical(nc, nr, wc, wr, self.th.near_identical):
            self.flag("near_identical", o)
        if ratings is not None:
            self.rated += 1
            if ratings[0] < ratings[1]:
                self.flag("swapped_rating", o)
        if is_refusal(nc) and not is_refusal(nr):
            self.flag("swapped_refusal", o)
        hp, hc, hr = hash(np_), hash(nc), hash(nr)
        self.p_ord.append(o)
        self.p_hp.append(hp if np_ else 0)
        self.p_fwd.append(hash((hp, hc, hr)))
        self.p_rev.append(hash((hp, hr, hc)))
        self.p_dup.append(hash((p, c, r)))
        self.p_self.append(same)
        if self.tok is None:
            self.p_lp.append(wp)
            self.p_lc.append(wc)
            self.p_lr.append(wr)
        else:
            self.p_lp.append(-1)
            self.p_lc.append(-1)
            self.p_lr.append(-1)
            self._queue("p", len(self.p_ord) - 1, (p, c, r))

    def add_unpaired(self, o: int, prompt: Text, completion: Text, label: bool) -> None:
        p, c = plain_text(prompt, roles=True), plain_text(completion)
        if CONTROL.search(p) or CONTROL.search(c):
            self.flag("control_characters", o)
        np_, nc = normalize_text(p), normalize_text(c)
        if not np_:
            self.flag("empty_prompt", o)
        hp, hc = hash(np_), hash(nc)
        self.u_ord.append(o)
        self.u_hp.append(hp if np_ else 0)
        self.u_key.append(hash((hp, hc)))
        self.u_dup.append(hash((p, c, label)))
        self.u_label.append(bool(label))
        if self.tok is None:
            self.u_lp.append(words_of_normalized(np_))
            self.u_lc.append(words_of_normalized(nc))
        else:
            self.u_lp.append(-1)
            self.u_lc.append(-1)
            self._queue("u", len(self.u_ord) - 1, (p, c))

    # -- batched token counts ------------------------------------------------------------------------------
    def _queue(self, kind: str, index: int, texts: tuple[str, ...]) -> None:
        self._batch.append((kind, index, texts))
        if len(self._batch) >= self.batch_size:
            self._flush()

    def _flush(self) -> None:
        if not self._batch:
            return
        lengths = token_counts(self.tok, [t for _, _, texts in self._batch for t in texts])
        k = 0
        for kind, i, texts in self._batch:
            n = lengths[k:k + len(texts)]
            k += len(texts)
            if kind == "p":
                self.p_lp[i], self.p_lc[i], self.p_lr[i] = n
            else:
                self.u_lp[i], self.u_lc[i] = n
        self._batch.clear()

    # -- hand-over -----------------------------------------------------------------------------------------
    def columns(self, *, rows_read: int | None = None,
                eval_hashes: tuple[np.ndarray, list[str]] | None = None) -> Columns:
        """Everything collected, as numpy views for the dataset-level checks."""
        self._flush()
        return Columns(
            p_ord=_np(self.p_ord), u_ord=_np(self.u_ord),
            lp=_np(self.p_lp, np.int32), lc=_np(self.p_lc, np.int32), lr=_np(self.p_lr, np.int32),
            ulp=_np(self.u_lp, np.int32), ulc=_np(self.u_lc, np.int32),
            p_hp=_np(self.p_hp), p_fwd=_np(self.p_fwd), p_rev=_np(self.p_rev), p_dup=_np(self.p_dup),
            p_self=_np(self.p_self, np.int8).astype(bool),
            u_hp=_np(self.u_hp), u_key=_np(self.u_key), u_dup=_np(self.u_dup),
            u_label=_np(self.u_label, np.int8).astype(bool),
            flags={k: np.frombuffer(v, dtype=np.int64).copy() for k, v in self.flags.items()},
            flag_details={k: dict(c) for k, c in self.flag_details.items() if c},
            errors=dict(self.errors), rated=self.rated,
            rows_read=len(self.row_line) if rows_read is None else rows_read,
            unit=self.unit, th=self.th, max_length=self.max_length, max_examples=self.max_examples,
            label=self.label, eval_hashes=eval_hashes)
