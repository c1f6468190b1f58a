"""Write the rows worth training on, and every other row with its source line and reason: nothing is lost.

    clean(source, out, drop=("identical", "duplicates", "contradictions"))
      -> out                    kept rows, as read (JSON lines; CSV cells stay strings), in input order
      -> out.dropped.jsonl      {"source", "line", "reason", "reasons", "row"} for every dropped row
      kept + dropped == read, always (checked before returning)

Rows the loader cannot use (malformed, non-UTF-8, too large, missing or mistyped fields, empty or exactly
identical responses) are always dropped, with the loader's reason; a malformed line or CSV record is kept as its
text. Everything else is dropped only when its finding is named in ``drop``. Findings come from one ``validate``
pass; a second pass over the same source writes the files, matching rows by their position in read order.
Both files are standard JSON (``data.outputs``: a NaN or Infinity read from the input is written as null and
named under the row's ``"non_finite"`` key), and neither may be the input.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.data.formats import Skip, is_unpaired_row, to_pair, to_unpaired
from preftune.data.load import MAX_ROW_BYTES, read_rows
from preftune.data.outputs import AtomicJsonl, dropped_path_for, refuse_overwrite
from preftune.data.text import CONTROL, RATING_KEYS, read_ratings
from preftune.data.validate import (
    DEFAULT_THRESHOLDS,
    SWAPPED,
    Thresholds,
    ValidationReport,
    finding_for_reason,
    validate,
)
from preftune.errors import PreftuneError

__all__ = ["ALIASES", "DEFAULT_DROP", "DROPPABLE", "FIXABLE", "CleanResult", "clean", "dropped_path_for",
           "parse_names"]

DEFAULT_DROP = ("identical", "duplicates", "contradictions")
DROPPABLE = ("identical", "near_identical", *SWAPPED, "contradictions", "duplicates", "control_characters",
             "empty_prompt", "truncation", "leakage")
ALIASES = {"swapped": SWAPPED, "duplicate": ("duplicates",), "contradiction": ("contradictions",),
           "control": ("control_characters",), "truncated": ("truncation",), "all": DROPPABLE, "none": ()}
FIXABLE = ("swapped_rating", "control_characters")


@dataclass
class CleanResult:
    """Counts of one ``clean`` run; ``read == kept + dropped``."""

    read: int
    kept: int
    dropped: int
    reasons: Counter = field(default_factory=Counter)
    """first reason of each dropped row -> rows"""
    fixed: Counter = field(default_factory=Counter)
    """fix name -> kept rows changed by it"""
    unrated: int = 0
    """rows without ratings, kept whatever --min-margin says"""
    out: Path | None = None
    dropped_path: Path | None = None
    report: ValidationReport | None = None

    def summary(self) -> str:
        lines = [f"read {self.read}, kept {self.kept}, dropped {self.dropped}"]
        if self.reasons:
            lines.append("dropped by reason: " + ", ".join(f"{r}: {n}" for r, n in self.reasons.most_common()))
        if self.fixed:
            lines.append("fixed: " + ", ".join(f"{r}: {n}" for r, n in self.fixed.most_common()))
        if self.unrated:
            lines.append(f"{self.unrated} kept rows have no ratings, so --min-margin did not apply to them")
        lines.append(f"kept rows: {self.out}\ndropped rows: {self.dropped_path}")
        return "\n".join(lines)


def parse_names(spec: str | Iterable[str] | None, allowed: Iterable[str], what: str) -> tuple[str, ...]:
    """"identical,swapped" -> ("identical", "swapped_rating", ...); a PreftuneError names unknown entries."""
    if spec is None:
        return ()
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    allowed = tuple(allowed)
    out: list[str] = []
    for item in items:
        names = ALIASES.get(item, (item,))
        for name in names:
            if name not in allowed:
                raise PreftuneError(f"unknown {what} {item!r}; choose from {', '.join(allowed)} "
                                    f"(or {', '.join(k for k in ALIASES if set(ALIASES[k]) <= set(allowed))})")
            if name not in out:
                out.append(name)
    return tuple(out)


def _structural_reason(row: dict) -> str | None:
    """The loader's drop reason for a parsed row, or None when the loader would use it."""
    try:
        if is_unpaired_row(row):
            to_unpaired(row)
        else:
            to_pair(row)
    except Skip as skip:
        return str(skip)
    return None


def _strip_control(value: Any) -> tuple[Any, bool]:
    if isinstance(value, str):
        new = CONTROL.sub("", value)
        return new, new != value
    if isinstance(value, list):
        changed = False
        out = []
        for m in value:
            if isinstance(m, dict) and isinstance(m.get("content"), str):
                content, ch = _strip_control(m["content"])
                changed |= ch
                m = {**m, "content": content}
            out.append(m)
        return out, changed
    return value, False


def _swap(row: dict) -> dict:
    row = dict(row)
    row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    for kc, kr in RATING_KEYS:
        if kc in row and kr in row:
            row[kc], row[kr] = row[kr], row[kc]
    return row


def _drop_names(drop: str | Iterable[str] | None, eval_source: Any, max_length: int | None) -> tuple[str, ...]:
    """The findings to drop; ``all`` leaves out what cannot be checked, naming one without its input is an error."""
    drop_names = parse_names(drop, DROPPABLE, "finding")
    tokens = drop.split(",") if isinstance(drop, str) else list(drop or ())
    named = set(parse_names([t for t in tokens if t.strip() != "all"], DROPPABLE, "finding"))
    for name, missing, hint in (("leakage", eval_source is None, "the evaluation data: pass --eval PATH"),
                                ("truncation", max_length is None, "--max-length")):
        if name in drop_names and missing:
            if name in named:
                raise PreftuneError(f"--drop {name} needs {hint}")
            drop_names = tuple(n for n in drop_names if n != name)
    return drop_names


def _repair(row: dict, o: int, res: CleanResult, fixes: tuple[str, ...], swapped: set[int],
            min_margin: float | None) -> tuple[dict, list[str]]:
    """A usable row after the fixes, and the reasons to drop it anyway (its rating margin)."""
    if "swapped_rating" in fixes and o in swapped:
        row = _swap(row)
        res.fixed["swapped_rating"] += 1
    if min_margin is not None and not is_unpaired_row(row):
        try:
            ratings = read_ratings(row)
        except (TypeError, ValueError):
            ratings = None
        if ratings is None:
            res.unrated += 1
        elif ratings[0] - ratings[1] < min_margin:
            return row, [f"margin_below:{min_margin:g}"]
    if "control_characters" in fixes:
        changed = False
        for key in ("prompt", "chosen", "rejected", "completion"):
            if key in row:
                value, ch = _strip_control(row[key])
                if ch:
                    row = {**row, key: value}
                    changed = True
        res.fixed["control_characters"] += changed
    return row, []


def clean(source: Any, out: str | Path, *, drop: str | Iterable[str] | None = DEFAULT_DROP,
          min_margin: float | None = None, fix: str | Iterable[str] | None = None, eval_source: Any = None,
          tokenizer: Any = None, max_length: int | None = None, split: str = "train",
          thresholds: Thresholds = DEFAULT_THRESHOLDS, max_row_bytes: int = MAX_ROW_BYTES) -> CleanResult:
    """Validate ``source``, then write kept rows to ``out`` and dropped rows to ``out.dropped.jsonl``.

    Args:
        drop: finding names (or aliases: swapped, all, none) whose rows are dropped; structurally unusable
            rows are always dropped.
        min_margin: drop pairs whose chosen rating - rejected rating is below this (rows without ratings kept).
        fix: repairs applied to kept rows instead of dropping them: ``swapped_rating`` (swap chosen and
            rejected, and their ratings) and ``control_characters`` (delete them from the texts).
        eval_source, tokenizer, max_length, max_row_bytes: as for ``validate``; ``leakage`` needs the first,
            ``truncation`` the third.

    ``out`` (or its dropped file) may not be ``source`` or ``eval_source``, also not under another name
    (a symlink or hard link): the input is read twice, and the outputs replace their files at the end.
    """
    out = Path(out)
    dropped_path = dropped_path_for(out)
    refuse_overwrite([source, eval_source], [out, dropped_path])
    drop_names = _drop_names(drop, eval_source, max_length)
    fixes = parse_names(fix, FIXABLE, "fix")
    report = validate(source, eval_source=eval_source, tokenizer=tokenizer, max_length=max_length, split=split,
                      thresholds=thresholds, max_row_bytes=max_row_bytes)
    marks: dict[int, list[str]] = {}
    for name in drop_names:
        if name not in fixes:
            for o in report.flagged_rows(name):
                marks.setdefault(o, []).append(name)
    swapped = set(report.flagged_rows("swapped_rating")) if "swapped_rating" in fixes else set()
    res = CleanResult(0, 0, 0, out=out, dropped_path=dropped_path, report=report)
    with AtomicJsonl(out) as kept, AtomicJsonl(dropped_path) as dropped:
        rows = read_rows(source, split=split, collect_errors=True, max_row_bytes=max_row_bytes)
        for o, raw in enumerate(rows):
            res.read += 1
            row = raw.data
            if row is None:
                reasons = [raw.drop_reason]
            else:
                structural = _structural_reason(row)
                reasons = [structural] if structural else list(marks.get(o, ()))
                if not reasons:
                    row, reasons = _repair(row, o, res, fixes, swapped, min_margin)
            if reasons:
                res.dropped += 1
                res.reasons[finding_for_reason(reasons[0])[0]] += 1
                dropped.write({"source": raw.source, "line": raw.line, "reason": reasons[0], "reasons": reasons,
                               "row": row if row is not None else raw.raw})
            else:
                res.kept += 1
                kept.write(row)
        if res.kept + res.dropped != res.read or res.read != report.rows_read:  # inside: no file is renamed
            raise PreftuneError(f"internal error: read {res.read} (validated {report.rows_read}), kept {res.kept}, "
                                f"dropped {res.dropped}; the source changed while it was being cleaned?")
    res.fixed = +res.fixed
    return res
