"""Text of one row as the data checks see it: plain text of a field, its normalized form, word counts,
similarity, refusals, control characters and ratings. Shared by ``validate``, ``clean`` and ``synth``."""

from __future__ import annotations

import math
import re
import unicodedata
from difflib import SequenceMatcher

from preftune.data.formats import Text

RATING_KEYS = (("chosen_rating", "rejected_rating"), ("score_chosen", "score_rejected"),
               ("chosen_score", "rejected_score"))

CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
"""Control characters other than tab, newline and carriage return (C0, DEL and C1)."""
# Matched against the first 300 characters of the casefolded, whitespace-collapsed response.
_REFUSAL = re.compile(
    r"\bi(?:'|’| a)?m sorry,? but\b"
    r"|\bi apologi[sz]e,? but\b"
    r"|\bas an ai(?: language model| assistant)?,? i\b"
    r"|\bi (?:cannot|can ?not|can(?:'|’)?t|won(?:'|’)?t|will not|am unable to|am not able to|(?:'|’)?m unable to"
    r"|(?:'|’)?m not able to) (?:help|assist|provide|comply|do that|answer|fulfill|support|create|generate"
    r"|write|engage|share|give)\b"
)


def plain_text(value: Text, roles: bool = False) -> str:
    """Plain text of a field: the string itself, or the messages' contents joined by newlines
    (each as "role: content" with ``roles``, which is how prompts are compared)."""
    if isinstance(value, str):
        return value
    if roles:
        return "\n".join(f"{m.get('role', '')}: {m['content']}" for m in value)
    return "\n".join(m["content"] for m in value)


def normalize_text(text: str) -> str:
    """NFKC, casefold, whitespace collapsed to single spaces: the form compared by identical/duplicate checks."""
    if text.isascii():  # ASCII is NFKC-stable and casefolds to lower(): skip the two slower passes
        return " ".join(text.lower().split())
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def words_of_normalized(norm: str) -> int:
    """Words of a normalized text (single spaces, no ends): spaces + 1, or 0 when empty."""
    return norm.count(" ") + 1 if norm else 0


def word_count(value: Text) -> int:
    """Length in whitespace words of a field's normalized plain text: the unit of ``data validate`` without a
    tokenizer (and of ``preftune judge``'s length-bias check)."""
    return words_of_normalized(normalize_text(plain_text(value)))


def similarity(a: str, b: str) -> float:
    """difflib ratio over the words of two normalized texts: 2 * matched words / (words in a + words in b)."""
    wa, wb = a.split(), b.split()
    if not wa and not wb:
        return 1.0
    return SequenceMatcher(None, wa, wb, autojunk=False).ratio()


def near_identical(a: str, b: str, na: int, nb: int, threshold: float) -> bool:
    """``similarity(a, b) >= threshold`` for normalized texts of ``na`` and ``nb`` words, with two cheap upper
    bounds tried first so most pairs cost O(words).

    Bound 1 (lengths): ratio <= 2 min(na, nb) / (na + nb). Bound 2 (vocabulary): a word of ``a`` that never
    occurs in ``b`` cannot be matched, so matches <= na - |set(a) - set(b)| (and symmetrically for b).
    """
    if na + nb == 0 or 2 * min(na, nb) < threshold * (na + nb):
        return False
    wa, wb = a.split(), b.split()
    sa, sb = set(wa), set(wb)
    if 2 * min(na - len(sa - sb), nb - len(sb - sa)) < threshold * (na + nb):
        return False
    sm = SequenceMatcher(None, wa, wb, autojunk=False)
    return sm.quick_ratio() >= threshold and sm.ratio() >= threshold


def is_refusal(norm: str) -> bool:
    """Whether a normalized response opens with a refusal phrase ("I'm sorry, but", "I can't help", ...)."""
    return _REFUSAL.search(norm, 0, 300) is not None


def read_ratings(row: dict) -> tuple[float, float] | None:
    """(chosen rating, rejected rating) from a row, or None when it has none; ValueError when not finite numbers."""
    for kc, kr in RATING_KEYS:
        if row.get(kc) not in (None, "") and row.get(kr) not in (None, ""):
            c, r = row[kc], row[kr]
            if isinstance(c, bool) or isinstance(r, bool):
                raise ValueError("boolean rating")
            c, r = float(c), float(r)
            if not (math.isfinite(c) and math.isfinite(r)):
                raise ValueError("non-finite rating")
            return c, r
    return None
