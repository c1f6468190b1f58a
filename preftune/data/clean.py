"""Write the rows worth training on, and every other row with its source line and reason: nothing is lost.

    clean(source, out, drop=("identical", "duplicates", "contradictions"))
      -> out                    kept rows, as read (JSON lines; CSV cells stay strings), in input order
      -> out.dropped.jsonl      {"source", "line", "reason", "reasons", "row"} for every dropped row
      kept + dropped == read, always (checked before returning)

Rows the loader cannot use (malformed, non-UTF-8, missing or mistyped fields, empty or exactly identical
responses) are always dropped, with the loader's reason. Everything else is dropped only when its finding is
named in ``drop``. Findings come from one ``validate`` pass; a second pass over the same source writes the
files, matching rows by their position in read order.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.data.formats import Skip, to_pair, to_unpaired
from preftune.data.load import read_rows
from preftune.data.validate import (
    DEFAULT_THRESHOLDS,
    RATING_KEYS,
    SWAPPED,
    Thresholds,
    ValidationReport,
    finding_for_reason,
    is_unpaired_shape,
    read_ratings,
    validate,
)
from preftune.errors import PreftuneError

DEFAULT_DROP = ("identical", "duplicates", "contradictions")
DROPPABLE = ("identical", "near_identical", *SWAPPED, "contradictions", "duplicates", "control_characters",
             "empty_prompt", "truncation", "leakage")
ALIASES = {"swapped": SWAPPED, "duplicate": ("duplicates",), "contradiction": ("contradictions",),
           "control": ("control_characters",), "truncated": ("truncation",), "all": DROPPABLE, "none": ()}
FIXABLE = ("swapped_rating", "control_characters")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


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


def dropped_path_for(out: str | Path) -> Path:
    """CLEAN.jsonl -> CLEAN.dropped.jsonl (any other name gets .dropped.jsonl appended)."""
    out = Path(out)
    if out.suffix == ".jsonl":
        return out.with_suffix(".dropped.jsonl")
    return out.with_name(out.name + ".dropped.jsonl")


def _structural_reason(row: dict) -> str | None:
    """The loader's drop reason for a parsed row, or None when the loader would use it."""
    try:
        if is_unpaired_shape(row):
            to_unpaired(row)
        else:
            to_pair(row)
    except Skip as skip:
        return str(skip)
    return None


def _strip_control(value: Any) -> tuple[Any, bool]:
    if isinstance(value, str):
        new = _CONTROL.sub("", value)
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


def clean(source: Any, out: str | Path, *, drop: str | Iterable[str] | None = DEFAULT_DROP,
          min_margin: float | None = None, fix: str | Iterable[str] | None = None, eval_source: Any = None,
          tokenizer: Any = None, max_length: int | None = None, split: str = "train",
          thresholds: Thresholds = DEFAULT_THRESHOLDS) -> CleanResult:
    """Validate ``source``, then write kept rows to ``out`` and dropped rows to ``out.dropped.jsonl``.

    Args:
        drop: finding names (or aliases: swapped, all, none) whose rows are dropped; structurally unusable
            rows are always dropped.
        min_margin: drop pairs whose chosen rating - rejected rating is below this (rows without ratings kept).
        fix: repairs applied to kept rows instead of dropping them: ``swapped_rating`` (swap chosen and
            rejected, and their ratings) and ``control_characters`` (delete them from the texts).
        eval_source, tokenizer, max_length: as for ``validate``; needed by ``leakage`` and ``truncation``.
    """
    drop_names = parse_names(drop, DROPPABLE, "finding")
    fixes = parse_names(fix, FIXABLE, "fix")
    tokens = drop.split(",") if isinstance(drop, str) else list(drop or ())
    named = set(parse_names([t for t in tokens if t.strip() != "all"], DROPPABLE, "finding"))
    for name, missing, hint in (("leakage", eval_source is None, "the evaluation data: pass --eval PATH"),
                                ("truncation", max_length is None, "--max-length")):
        if name in drop_names and missing:
            if name in named:
                raise PreftuneError(f"--drop {name} needs {hint}")
            drop_names = tuple(n for n in drop_names if n != name)  # "all" means all that can be checked
    report = validate(source, eval_source=eval_source, tokenizer=tokenizer, max_length=max_length, split=split,
                      thresholds=thresholds)
    marks: dict[int, list[str]] = {}
    for name in drop_names:
        if name in fixes:
            continue
        for o in report.flagged_rows(name):
            marks.setdefault(o, []).append(name)

    swapped = set(report.flagged_rows("swapped_rating")) if "swapped_rating" in fixes else set()
    out = Path(out)
    dropped_path = dropped_path_for(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = CleanResult(0, 0, 0, out=out, dropped_path=dropped_path, report=report)
    tmp_out, tmp_drop = out.with_name(out.name + ".tmp"), dropped_path.with_name(dropped_path.name + ".tmp")
    with open(tmp_out, "w", encoding="utf-8") as fk, open(tmp_drop, "w", encoding="utf-8") as fd:
        for o, raw in enumerate(read_rows(source, split=split, collect_errors=True)):
            res.read += 1
            row = raw.data
            if row is None:
                reasons = [f"malformed_line: {raw.error}"]
            else:
                structural = _structural_reason(row)
                reasons = [structural] if structural else list(marks.get(o, ()))
                if not reasons:
                    if "swapped_rating" in fixes and o in swapped:
                        row = _swap(row)
                        res.fixed["swapped_rating"] += 1
                    if min_margin is not None and not is_unpaired_shape(row):
                        try:
                            ratings = read_ratings(row)
                        except (TypeError, ValueError):
                            ratings = None
                        if ratings is None:
                            res.unrated += 1
                        elif ratings[0] - ratings[1] < min_margin:
                            reasons = [f"margin_below:{min_margin:g}"]
                    if not reasons and "control_characters" in fixes:
                        changed = False
                        for key in ("prompt", "chosen", "rejected", "completion"):
                            if key in row:
                                value, ch = _strip_control(row[key])
                                if ch:
                                    row = {**row, key: value}
                                    changed = True
                        res.fixed["control_characters"] += changed
            if reasons:
                res.dropped += 1
                res.reasons[finding_for_reason(reasons[0])[0]] += 1
                rec = {"source": raw.source, "line": raw.line, "reason": reasons[0], "reasons": reasons,
                       "row": row if row is not None else raw.raw}
                fd.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
            else:
                res.kept += 1
                fk.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    res.fixed = +res.fixed
    if res.kept + res.dropped != res.read or res.read != report.rows_read:
        raise PreftuneError(f"internal error: read {res.read} (validated {report.rows_read}), kept {res.kept}, "
                            f"dropped {res.dropped}; the source changed while it was being cleaned?")
    os.replace(tmp_out, out)
    os.replace(tmp_drop, dropped_path)
    return res
