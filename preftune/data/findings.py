"""What ``preftune data validate`` reports: the finding catalog, the thresholds, and the typed report.

The checks that fill the report live in ``preftune.data.validate``; the JSON schema and every finding name
are documented in docs/data.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np

from preftune.data.load import DataError
from preftune.data.outputs import json_text

Severity = Literal["error", "warning", "info"]
SCHEMA_VERSION = 1


class Check(NamedTuple):
    """A finding's catalog entry."""

    severity: Severity
    """Severity when found (``data validate`` downgrades the dataset statistics to info when healthy)."""
    meaning: str
    """What the finding means: its message unless the check writes a more specific one."""
    total: str | None = "pairs"
    """Denominator of a row finding's percent (a key of ``checks.TOTALS``): "read" (rows read), "usable"
    (usable rows), "pairs" (usable pairs), "pairs_and_exact" (usable pairs and the exactly identical ones the
    loader dropped); None for the dataset statistics, which compute their own."""


# Finding name -> catalog entry, in report order. Structural names are the loader's drop reasons.
CHECKS: dict[str, Check] = {
    "malformed_line": Check("error", "lines that are not a JSON object; the loader drops them", "read"),
    "non_utf8": Check("error", "lines with bytes that are not valid UTF-8; the loader drops them", "read"),
    "row_too_large": Check("error", "rows longer than the reader's byte limit (--max-row-bytes); dropped unread",
                           "read"),
    "missing_field": Check("error", "rows without a required field; the loader drops them", "read"),
    "wrong_type": Check("error", "fields of the wrong type (e.g. a number where text is expected); dropped", "read"),
    "mixed_formats": Check("error", "chosen and rejected mix plain text and messages; dropped", "read"),
    "no_shared_prompt": Check("error", "conversational rows without a prompt whose dialogues share no turn; dropped",
                              "read"),
    "empty_response": Check("error", "empty or whitespace-only responses; dropped", "read"),
    "identical": Check("warning", "chosen and rejected are identical after normalization (no preference signal)",
                       "pairs_and_exact"),
    "near_identical": Check("warning",
                            "chosen and rejected are nearly identical (word similarity ratio >= threshold)"),
    "swapped_rating": Check("warning", "likely swapped: chosen_rating < rejected_rating"),
    "swapped_refusal": Check("warning",
                             "likely swapped: chosen is a refusal, rejected is not (intended in safety data)"),
    "swapped_length": Check("warning", "likely swapped: rejected is far longer than chosen"),
    "contradictions": Check("warning", "the same prompt and responses appear with opposite preference (or label)",
                            "usable"),
    "duplicates": Check("warning", "exact repeats of an earlier row (the first occurrence is not counted)", "usable"),
    "control_characters": Check("warning", "text with control characters other than tab and newline", "usable"),
    "empty_prompt": Check("warning", "rows whose prompt is empty (the model learns responses without context)",
                          "usable"),
    "invalid_rating": Check("warning", "ratings present but not finite numbers; they are ignored"),
    "mixed_kinds": Check("warning", "the file mixes paired and unpaired (KTO) rows", None),
    "length_bias": Check("info", "share of pairs where chosen is longer than rejected", None),
    "truncation": Check("info", "rows whose prompt + longest response exceed --max-length", None),
    "kto_balance": Check("info", "desirable / undesirable counts and the KTO weights they imply", None),
    "leakage": Check("warning", "training prompts that also appear in the evaluation data", "usable"),
}
UNKNOWN_DROP = Check("error", "rows the loader dropped for this reason", "read")
"""The entry of a loader drop reason the catalog does not name (reported under the reason itself)."""
STRUCTURAL = tuple(name for name, check in CHECKS.items() if check.severity == "error")
SWAPPED = ("swapped_rating", "swapped_refusal", "swapped_length")

@dataclass(frozen=True)
class Thresholds:
    """Knobs of the heuristics; the defaults are what ``preftune data validate`` uses."""

    near_identical: float = 0.9
    """A pair is near-identical when difflib's ratio over the words of the normalized responses is >= this."""
    length_bias: float = 0.65
    """Warn when chosen is longer than rejected in more than this share of pairs (the model learns verbosity)."""
    swap_length_ratio: float = 5.0
    """swapped_length: rejected has at least this many times the length of chosen ..."""
    swap_length_min_gap: int = 25
    """... and at least this many more length units (words or tokens), so "Yes." vs "No, it is." is no swap."""
    max_unusable_fraction: float = 0.1
    """The data is unusable when more than this share of rows read would be dropped by the loader."""


DEFAULT_THRESHOLDS = Thresholds()


@dataclass
class Finding:
    """One kind of problem (or statistic) with its size and where to look.

    Attributes:
        name: a key of ``CHECKS``.
        severity: "error" (rows that cannot be trained on), "warning" (rows that can, but probably should not),
            or "info" (a statistic that is within its healthy range).
        count: rows (or pairs) concerned.
        total: the denominator of ``percent``: rows read for structural findings, usable pairs or rows otherwise.
        message: one readable line with the numbers.
        example_rows: up to ``max_examples`` rows as "file:line", in file order.
        details: finding-specific numbers (documented in docs/data.md).
    """

    name: str
    severity: Severity
    count: int
    total: int
    message: str
    example_rows: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def percent(self) -> float:
        return 100.0 * self.count / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "severity": self.severity, "count": self.count, "total": self.total,
                "percent": round(self.percent, 4), "message": self.message, "example_rows": self.example_rows,
                "details": self.details}


@dataclass
class ValidationReport:
    """What ``validate`` found. ``usable`` decides the CLI exit code and whether the trainer starts."""

    source: str
    kind: str  # "paired" | "unpaired" | "mixed" | "empty"
    rows_read: int
    rows_usable: int
    pairs: int
    unpaired: int
    length_unit: str
    findings: list[Finding]
    stats: dict[str, Any]
    max_unusable_fraction: float = 0.1
    eval_source: str | None = None
    flagged: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    """Finding name -> 0-based ordinals (position in read order) of every flagged row; not serialized."""

    @property
    def rows_unusable(self) -> int:
        return self.rows_read - self.rows_usable

    @property
    def unusable_reasons(self) -> list[str]:
        reasons = []
        if self.rows_usable == 0:
            reasons.append("no usable rows" if self.rows_read else "no rows")
        elif self.rows_unusable > self.max_unusable_fraction * self.rows_read:
            reasons.append(f"{self.rows_unusable} of {self.rows_read} rows "
                           f"({100 * self.rows_unusable / self.rows_read:.1f}%) cannot be used, more than the "
                           f"{100 * self.max_unusable_fraction:g}% allowed")
        return reasons

    @property
    def usable(self) -> bool:
        return not self.unusable_reasons

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def require_usable(self, allow_unusable: bool = False) -> None:
        """Raise a one-line ``DataError`` when the data is unusable (the trainer's gate), unless allowed."""
        if not self.usable and not allow_unusable:
            raise DataError(f"{self.source}: training data is unusable: {'; '.join(self.unusable_reasons)}. "
                            "Run `preftune data validate` on it for details, `preftune data clean` to fix it, "
                            "or set data.allow_unusable: true to train anyway")

    def finding(self, name: str) -> Finding | None:
        return next((f for f in self.findings if f.name == name), None)

    def flagged_rows(self, name: str) -> list[int]:
        """0-based ordinals (in read order) of every row flagged by finding ``name``; [] when none."""
        rows = self.flagged.get(name)
        return [] if rows is None else rows.tolist()

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "source": self.source,
            "eval_source": self.eval_source,
            "kind": self.kind,
            "usable": self.usable,
            "unusable_reasons": self.unusable_reasons,
            "max_unusable_fraction": self.max_unusable_fraction,
            "rows_read": self.rows_read,
            "rows_usable": self.rows_usable,
            "rows_unusable": self.rows_unusable,
            "pairs": self.pairs,
            "unpaired": self.unpaired,
            "length_unit": self.length_unit,
            "findings": [f.to_dict() for f in self.findings],
            "stats": self.stats,
        }

    def to_json(self, indent: int | None = 2) -> str:
        """Standard JSON (a non-finite number is written as null and listed under ``"non_finite"``)."""
        return json_text(self.to_dict(), indent=indent)

    def summary(self, *, examples: int = 3) -> str:
        """A terminal table: one line per finding, examples indented under it, then the verdict."""
        head = (f"{self.source}: {self.rows_read} rows read, {self.rows_usable} usable "
                f"({self.kind}; lengths in {self.length_unit})")
        lines = [head, f"{'severity':<8}  {'finding':<18} {'count':>9} {'%':>7}  message"]
        order = {"error": 0, "warning": 1, "info": 2}
        for f in sorted(self.findings, key=lambda f: order[f.severity]):
            lines.append(f"{f.severity:<8}  {f.name:<18} {f.count:>9} {f.percent:>6.1f}%  {f.message}")
            if f.example_rows and examples:
                more = "" if len(f.example_rows) <= examples else ", ..."
                lines.append(f"{'':<30}rows: {', '.join(f.example_rows[:examples])}{more}")
        if not self.findings:
            lines.append("(no findings)")
        if self.usable:
            lines.append(f"USABLE: {len(self.errors)} error and {len(self.warnings)} warning findings; "
                         f"{self.rows_unusable} rows would be dropped")
        else:
            lines.append("UNUSABLE: " + "; ".join(self.unusable_reasons))
        return "\n".join(lines)
