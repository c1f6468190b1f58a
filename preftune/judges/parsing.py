"""Lenient parsing of judge output: a JSON object wherever it sits in the text, and its fields in any case.

Chat models wrap JSON in code fences, add a sentence before or after it, or capitalize keys and values
("Winner": "Response A"). Rejecting those would turn formatting noise into ties, so the parser looks for the
object first as the whole text, then inside code fences, then embedded anywhere in the text, and matches keys
and winner values case-insensitively. What still fails returns ``None`` with the reason; the caller retries.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from preftune.judges.base import Verdict, Winner

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", re.DOTALL)

_WINNER_ALIASES: dict[str, Winner] = {
    "a": "A", "response a": "A", "response_a": "A", "assistant a": "A", "[[a]]": "A", "1": "A",
    "b": "B", "response b": "B", "response_b": "B", "assistant b": "B", "[[b]]": "B", "2": "B",
    "tie": "tie", "draw": "tie", "equal": "tie", "both": "tie", "neither": "tie", "none": "tie", "[[c]]": "tie",
}  # fmt: skip


def json_values(text: str) -> Iterator[Any]:
    """JSON values found in ``text``, most likely first: the whole text, code-fence bodies, embedded objects.

    Embedded objects are found by trying ``raw_decode`` at every ``{``, which also copes with braces inside
    strings and with an unmatched ``{`` in the surrounding prose.
    """
    decoder = json.JSONDecoder()
    for cand in [text.strip(), *(body.strip() for body in _FENCE.findall(text))]:
        try:
            yield json.loads(cand)
        except ValueError:
            pass
    start = text.find("{")
    while start != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            start = text.find("{", start + 1)
            continue
        yield value
        start = text.find("{", end)


def extract_json_object(text: str, key: str | None = None) -> dict[str, Any] | None:
    """The first JSON object in ``text`` (see :func:`json_values`) having ``key`` (any case), or None.

    With ``key`` None, the first object of any shape. Asking for the key skips objects a model quoted in its
    prose before giving its answer.
    """
    for value in json_values(text):
        if isinstance(value, dict) and (key is None or key in _lower_keys(value)):
            return value
    return None


def _lower_keys(obj: dict[str, Any]) -> dict[str, Any]:
    return {str(k).strip().lower(): v for k, v in obj.items()}


def parse_winner(value: Any) -> Winner | None:
    """Map a model's winner field (``"A"``, ``"response b"``, ``"TIE"``, ...) to a canonical winner."""
    if not isinstance(value, str | int) or isinstance(value, bool):
        return None
    return _WINNER_ALIASES.get(str(value).strip().strip(".").lower())


def parse_confidence(value: Any, default: float = 0.5) -> float | None:
    """A confidence in [0, 1] from a number, a numeric string, or a percentage ("85%" or 85)."""
    if value is None:
        return default
    if isinstance(value, str):
        s = value.strip()
        pct = s.endswith("%")
        try:
            value = float(s.rstrip("%").strip()) / (100.0 if pct else 1.0)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    if 1.0 < value <= 100.0:  # a percentage written without the sign
        value /= 100.0
    return value if 0.0 <= value <= 1.0 else None


def parse_verdict(text: str) -> tuple[Verdict | None, str | None]:
    """``(verdict, None)`` from judge output, or ``(None, reason)`` when it has no usable verdict.

    Expects ``{"winner": "A"|"B"|"tie", "confidence": 0..1, "rationale": "..."}``; a missing confidence
    defaults to 0.5 and a missing rationale to "".
    """
    obj = extract_json_object(text, "winner")
    if obj is None:
        return None, "no JSON object with a winner in judge output"
    fields = _lower_keys(obj)
    winner = parse_winner(fields.get("winner"))
    if winner is None:
        return None, f"winner field missing or not A/B/tie: {fields.get('winner')!r}"
    conf = parse_confidence(fields.get("confidence"))
    if conf is None:
        return None, f"confidence not a number in [0, 1]: {fields.get('confidence')!r}"
    rationale = fields.get("rationale", fields.get("reason", fields.get("explanation", "")))
    return Verdict(winner, conf, str(rationale)), None


def parse_score(text: str, low: float = 1.0, high: float = 10.0) -> tuple[float | None, str | None]:
    """``(score, None)`` from ``{"score": n}`` output with ``low <= n <= high``, or ``(None, reason)``."""
    obj = extract_json_object(text, "score")
    if obj is None:
        return None, "no JSON object with a score in judge output"
    value = _lower_keys(obj).get("score")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None, f"score not a number: {value!r}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None, f"score missing or not a number: {value!r}"
    if not low <= float(value) <= high:
        return None, f"score {value} outside [{low:g}, {high:g}]"
    return float(value), None
