"""Preference-data checks that find problems before a GPU hour is spent: a typed, JSON-able report.

Two entry points share one streaming collector (``preftune.data.collector``):

    validate(source, ...)            reads a file / directory / hub id with ``read_rows`` and runs every check
    validate_records(records, drops) the trainer's cheap pass over already-loaded records and their DropLog

The checks over the whole dataset are registered in ``preftune.data.checks``; the report they return, the
finding catalog and the thresholds are in ``preftune.data.findings``.

What is checked (finding names; the JSON schema and every name are documented in docs/data.md):

    error    malformed_line, non_utf8, row_too_large, missing_field, wrong_type, mixed_formats,
             no_shared_prompt, empty_response (and any other loader drop reason): rows that cannot be trained on
    warning  identical, near_identical, swapped_rating, swapped_refusal, swapped_length, contradictions,
             duplicates, control_characters, empty_prompt, invalid_rating, mixed_kinds, leakage,
             length_bias (> 65% chosen longer), truncation (> --max-length), kto_balance (weights out of range)
    info     length_bias, truncation, kto_balance when nothing is wrong: the numbers are still reported

Usable (``ValidationReport.usable``): at least one row is usable and at most ``max_unusable_fraction``
(default 10%) of the rows read are unusable, i.e. would be dropped by the loader (malformed, non-UTF-8, too
large, missing or mistyped fields, empty responses, exactly identical responses). Warnings never make data
unusable.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from typing import Any

import numpy as np

from preftune.data.checks import build_report, kto_weights
from preftune.data.collector import Collector, finding_for_reason
from preftune.data.findings import (
    CHECKS,
    DEFAULT_THRESHOLDS,
    STRUCTURAL,
    SWAPPED,
    Finding,
    Thresholds,
    ValidationReport,
)
from preftune.data.formats import (
    DropLog,
    PairRecord,
    Skip,
    UnpairedRecord,
    is_unpaired_row,
    to_pair,
    to_unpaired,
)
from preftune.data.load import MAX_ROW_BYTES, read_rows
from preftune.data.text import RATING_KEYS, normalize_text, plain_text, read_ratings, similarity

# Re-exported: one import for callers of the data tools.
__all__ = ["CHECKS", "DEFAULT_THRESHOLDS", "RATING_KEYS", "STRUCTURAL", "SWAPPED", "Finding", "Thresholds",
           "ValidationReport", "finding_for_reason", "kto_weights", "load_tokenizer", "normalize_text",
           "read_ratings", "similarity", "validate", "validate_records"]


def _feed_row(c: Collector, o: int, row: dict, hint: list[int]) -> None:
    """Interpret one parsed row exactly as the loader would and hand it to the collector."""
    unpaired = is_unpaired_row(row) or (
        "chosen" not in row and "rejected" not in row and hint[1] > hint[0])
    try:
        if unpaired:
            rec = to_unpaired(row)
            hint[1] += 1
            c.add_unpaired(o, rec.prompt, rec.completion, rec.label)
        else:
            pair = to_pair(row)
            hint[0] += 1
            try:
                ratings = read_ratings(row)
            except (TypeError, ValueError):
                ratings = None
                c.flag("invalid_rating", o)
            c.add_pair(o, pair.prompt, pair.chosen, pair.rejected, ratings)
    except Skip as skip:
        c.drop(o, str(skip))


def _prompt_hashes(prompts: Iterable[tuple[Any, str]]) -> tuple[np.ndarray, list[str]]:
    """(hashes of the non-empty normalized prompts, their "file:line") of (prompt, label) items."""
    hashes, labels = array("q"), []
    for prompt, label in prompts:
        norm = normalize_text(plain_text(prompt, roles=True))
        if norm:
            hashes.append(hash(norm))
            labels.append(label)
    return np.frombuffer(hashes, dtype=np.int64) if hashes else np.zeros(0, np.int64), labels


def _eval_prompts(source: Any, split: str, max_row_bytes: int) -> Iterable[tuple[Any, str]]:
    for raw in read_rows(source, split=split, collect_errors=True, max_row_bytes=max_row_bytes):
        if raw.data is None:
            continue
        try:
            prompt = (to_unpaired(raw.data) if is_unpaired_row(raw.data) else to_pair(raw.data)).prompt
        except Skip:
            continue
        yield prompt, f"{raw.source}:{raw.line}"


def load_tokenizer(name_or_path: str) -> Any:
    """A Hugging Face tokenizer by hub name or local path; a one-line PreftuneError when it cannot be loaded."""
    from preftune.errors import PreftuneError

    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:  # offline, unknown id, no tokenizer files
        raise PreftuneError(f"could not load tokenizer {name_or_path!r}: {type(e).__name__}: {e}") from None


def validate(source: Any, *, eval_source: Any = None, tokenizer: Any = None, max_length: int | None = None,
             max_examples: int = 5, split: str = "train", thresholds: Thresholds = DEFAULT_THRESHOLDS,
             batch_size: int = 1000, max_row_bytes: int = MAX_ROW_BYTES) -> ValidationReport:
    """Read ``source`` (anything ``read_rows`` reads) once, streaming, and run every check.

    Args:
        source: path (.jsonl/.json/.csv/.parquet or a saved dataset), hub id, or list of dicts.
        eval_source: a second dataset; training rows whose prompt appears in it are reported as ``leakage``.
        tokenizer: name or path of a Hugging Face tokenizer, or a tokenizer object; lengths are then counted
            in tokens (batched, ``batch_size`` rows per call) instead of whitespace words.
        max_length: report rows whose prompt + longest response exceed this many tokens (or words).
        max_examples: example rows ("file:line") kept per finding.
        thresholds: heuristic knobs, see :class:`Thresholds`.
        max_row_bytes: JSONL / CSV lines longer than this are dropped unread (``row_too_large``).
    """
    tok, tok_name = tokenizer, None
    if isinstance(tokenizer, str):
        tok, tok_name = load_tokenizer(tokenizer), tokenizer
    elif tokenizer is not None:
        tok_name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    c = Collector(tokenizer=tok, tokenizer_name=tok_name, max_length=max_length, max_examples=max_examples,
                  thresholds=thresholds, batch_size=batch_size)
    hint = [0, 0]  # paired rows, unpaired rows seen so far: decides how a row with neither shape is read
    for raw in read_rows(source, split=split, collect_errors=True, max_row_bytes=max_row_bytes):
        o = c.row(raw.source, raw.line)
        if raw.data is None:
            c.drop(o, raw.drop_reason)
        else:
            _feed_row(c, o, raw.data, hint)
    ev = None if eval_source is None else _prompt_hashes(_eval_prompts(eval_source, split, max_row_bytes))
    cols = c.columns(eval_hashes=ev)
    return build_report(cols, source=_name(source), rows_usable=cols.rows_read - c.dropped,
                        eval_source=None if eval_source is None else _name(eval_source))


def validate_records(records: Iterable[PairRecord | UnpairedRecord], drops: DropLog | None = None, *,
                     eval_records: Iterable[PairRecord | UnpairedRecord] | None = None, max_examples: int = 5,
                     thresholds: Thresholds = DEFAULT_THRESHOLDS, source: str | None = None) -> ValidationReport:
    """The trainer's pre-flight check over records already loaded by ``normalize`` (no second read, no tokenizer).

    ``drops`` supplies the structural findings (its reasons map to finding names) and the read/usable counts
    behind ``report.usable``. Ratings are not part of records, so ``swapped_rating`` is not checked here.
    """
    c = Collector(max_length=None, max_examples=max_examples, thresholds=thresholds)
    if drops is not None:
        for d in drops.rows:
            c.drop(c.row(str(d["source"]), int(d["line"])), str(d["reason"]))
    first = None
    for rec in records:
        first = first or rec.source
        o = c.row(rec.source, rec.line)
        if isinstance(rec, PairRecord):
            c.add_pair(o, rec.prompt, rec.chosen, rec.rejected)
        else:
            c.add_unpaired(o, rec.prompt, rec.completion, rec.label)
    ev = None
    if eval_records is not None:
        ev = _prompt_hashes((rec.prompt, f"{rec.source}:{rec.line}") for rec in eval_records)
    rows_read = rows_usable = None
    if drops is not None and drops.read:
        rows_read, rows_usable = drops.read, drops.read - drops.dropped
    name = source or first or (c.sources[0] if c.sources else "<records>")
    cols = c.columns(rows_read=rows_read, eval_hashes=ev)
    return build_report(cols, source=name, rows_usable=cols.rows_read - c.dropped if rows_usable is None else rows_usable,
                        eval_source=None if eval_records is None else "<eval records>")


def _name(source: Any) -> str:
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        return str(source)
    return "<memory>" if isinstance(source, list) else "<dataset>"
