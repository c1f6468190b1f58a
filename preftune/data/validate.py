"""Preference-data checks that find problems before a GPU hour is spent: a typed, JSON-able report.

Two entry points share one streaming collector:

    validate(source, ...)            reads a file / directory / hub id with ``read_rows`` and runs every check
    validate_records(records, drops) the trainer's cheap pass over already-loaded records and their DropLog

The report they return, the finding catalog and the thresholds are in ``preftune.data.findings``.

What is checked (finding names; the JSON schema and every name are documented in docs/data.md):

    error    malformed_line, non_utf8, missing_field, wrong_type, mixed_formats, no_shared_prompt,
             empty_response (and any other loader drop reason): rows that cannot be trained on
    warning  identical, near_identical, swapped_rating, swapped_refusal, swapped_length, contradictions,
             duplicates, control_characters, empty_prompt, invalid_rating, mixed_kinds, leakage,
             length_bias (> 65% chosen longer), truncation (> --max-length), kto_balance (weights out of range)
    info     length_bias, truncation, kto_balance when nothing is wrong: the numbers are still reported

Usable (``ValidationReport.usable``): at least one row is usable and at most ``max_unusable_fraction``
(default 10%) of the rows read are unusable, i.e. would be dropped by the loader (malformed, non-UTF-8,
missing or mistyped fields, empty responses, exactly identical responses). Warnings never make data unusable.

Memory: per usable row only fixed-size numbers are kept (64-bit hashes of the normalized texts, lengths and the
row ordinal), never the texts, so a million pairs need ~60 MB on top of the reader. Hashes are Python's
``hash`` of ``str``: stable within one process, which is all the checks need (they are never stored).
"""

from __future__ import annotations

import math
import re
import unicodedata
from array import array
from collections import Counter
from collections.abc import Iterable
from difflib import SequenceMatcher
from typing import Any

import numpy as np

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
    Text,
    UnpairedRecord,
    to_pair,
    to_unpaired,
)
from preftune.data.load import read_rows

__all__ = ["CHECKS", "DEFAULT_THRESHOLDS", "STRUCTURAL", "SWAPPED", "Finding", "Thresholds", "ValidationReport",
           "validate", "validate_records"]  # the report types are re-exported: one import for callers

RATING_KEYS = (("chosen_rating", "rejected_rating"), ("score_chosen", "score_rejected"),
               ("chosen_score", "rejected_score"))

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Matched against the first 300 characters of the casefolded, whitespace-collapsed response.
_REFUSAL = re.compile(
    r"\bi(?:'|’| a)?m sorry,? but\b"
    r"|\bi apologi[sz]e,? but\b"
    r"|\bas an ai(?: language model| assistant)?,? i\b"
    r"|\bi (?:cannot|can ?not|can(?:'|’)?t|won(?:'|’)?t|will not|am unable to|am not able to|(?:'|’)?m unable to"
    r"|(?:'|’)?m not able to) (?:help|assist|provide|comply|do that|answer|fulfill|support|create|generate"
    r"|write|engage|share|give)\b"
)


# ---------------------------------------------------------------------------------------------------------
# Text helpers


def _text(value: Text, roles: bool = False) -> str:
    """Plain text of a field: the string itself, or the messages' contents joined by newlines."""
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


def _words(norm: str) -> int:
    return norm.count(" ") + 1 if norm else 0


def similarity(a: str, b: str) -> float:
    """difflib ratio over the words of two normalized texts: 2 * matched words / (words in a + words in b)."""
    wa, wb = a.split(), b.split()
    if not wa and not wb:
        return 1.0
    return SequenceMatcher(None, wa, wb, autojunk=False).ratio()


def _near_identical(a: str, b: str, na: int, nb: int, threshold: float) -> bool:
    """``similarity(a, b) >= threshold``, with two cheap upper bounds tried first so most pairs cost O(words).

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
    """(chosen rating, rejected rating) from a row, or None when it has none; ValueError when not numbers."""
    for kc, kr in RATING_KEYS:
        if row.get(kc) not in (None, "") and row.get(kr) not in (None, ""):
            c, r = row[kc], row[kr]
            if isinstance(c, bool) or isinstance(r, bool):
                raise ValueError("boolean rating")
            c, r = float(c), float(r)
            if math.isnan(c) or math.isnan(r):
                raise ValueError("NaN rating")
            return c, r
    return None


def is_unpaired_shape(row: dict) -> bool:
    """A row read as unpaired (KTO): it has a completion and no chosen/rejected."""
    return "completion" in row and "chosen" not in row and "rejected" not in row


def kto_weights(n_desirable: int, n_undesirable: int) -> dict[str, Any]:
    """Desirable weight range for undesirable weight 1 so that the KTO balance condition holds.

    λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3]   (Ethayarajh et al., KTO, arXiv:2402.01306v4, §4 "hyperparameters")
    With λ_U = 1 (TRL's default) this is λ_D ∈ [n_U/n_D, 4/3 · n_U/n_D]; the suggested λ_D is 1 when 1 lies in
    the range (the defaults are fine) and the nearest end of the range otherwise.
    """
    if n_desirable == 0 or n_undesirable == 0:
        return {"n_desirable": n_desirable, "n_undesirable": n_undesirable, "ratio": None,
                "desirable_weight_range": None, "desirable_weight": None, "undesirable_weight": 1.0,
                "defaults_in_range": False}
    lo = n_undesirable / n_desirable
    hi = 4.0 / 3.0 * lo
    suggested = min(max(1.0, lo), hi)
    return {"n_desirable": n_desirable, "n_undesirable": n_undesirable,
            "ratio": round(n_desirable / n_undesirable, 6),
            "desirable_weight_range": [round(lo, 6), round(hi, 6)],
            "desirable_weight": round(suggested, 6), "undesirable_weight": 1.0,
            "defaults_in_range": lo <= 1.0 <= hi}


def finding_for_reason(reason: str) -> tuple[str, str]:
    """A loader drop reason -> (finding name, detail): "missing_field:chosen" -> ("missing_field", "chosen")."""
    if reason.startswith("malformed_line"):
        detail = reason.partition(":")[2].strip()
        return ("non_utf8" if detail.startswith("not valid UTF-8") else "malformed_line"), detail
    if reason == "identical_responses":
        return "identical", ""
    name, _, detail = reason.partition(":")
    return name.strip(), detail.strip()


# ---------------------------------------------------------------------------------------------------------
# The collector


class _Collector:
    """Receives rows one at a time; keeps only fixed-size numbers per row; ``finish`` builds the report."""

    def __init__(self, *, tokenizer: Any = None, tokenizer_name: str | None = None, max_length: int | None,
                 max_examples: int, thresholds: Thresholds, batch_size: int = 1000):
        self.tok = tokenizer
        self.tok_name = tokenizer_name
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
        self.dropped = array("q")  # ordinals of rows the loader would drop (each row at most once)
        self.errors: dict[str, list[str]] = {}  # first parse errors per finding, "file:line: why"
        self._batch: list[tuple[str, int, tuple[str, ...]]] = []

    # -- rows ------------------------------------------------------------------------------------------
    def row(self, source: str, line: int) -> int:
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
        self.dropped.append(ordinal)
        name, detail = finding_for_reason(reason)
        if name == "identical":
            self.flag(name, ordinal, "exact")
        elif name in ("malformed_line", "non_utf8"):
            self.flag(name, ordinal)
            errors = self.errors.setdefault(name, [])
            if len(errors) < self.max_examples:
                errors.append(f"{self.label(ordinal)}: {detail}")
        else:
            self.flag(name, ordinal, detail if name in ("missing_field", "wrong_type") else "")

    def label(self, ordinal: int) -> str:
        return f"{self.sources[self.row_src[ordinal]]}:{self.row_line[ordinal]}"

    # -- records ---------------------------------------------------------------------------------------
    def add_pair(self, o: int, prompt: Text, chosen: Text, rejected: Text,
                 ratings: tuple[float, float] | None = None) -> None:
        p, c, r = _text(prompt, roles=True), _text(chosen), _text(rejected)
        if _CONTROL.search(p) or _CONTROL.search(c) or _CONTROL.search(r):
            self.flag("control_characters", o)
        np_, nc, nr = normalize_text(p), normalize_text(c), normalize_text(r)
        if not np_:
            self.flag("empty_prompt", o)
        wp, wc, wr = _words(np_), _words(nc), _words(nr)
        same = nc == nr
        if same:
            self.flag("identical", o, "normalized")
        elif _near_identical(nc, nr, wc, wr, self.th.near_identical):
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
        p, c = _text(prompt, roles=True), _text(completion)
        if _CONTROL.search(p) or _CONTROL.search(c):
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
            self.u_lp.append(_words(np_))
            self.u_lc.append(_words(nc))
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
        flat = [t for _, _, texts in self._batch for t in texts]
        ids = self.tok(flat, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        lengths = [len(x) for x in ids]
        k = 0
        for kind, i, texts in self._batch:
            n = lengths[k:k + len(texts)]
            k += len(texts)
            if kind == "p":
                self.p_lp[i], self.p_lc[i], self.p_lr[i] = n
            else:
                self.u_lp[i], self.u_lc[i] = n
        self._batch.clear()

    # -- report ----------------------------------------------------------------------------------------
    def finish(self, source: str, *, rows_read: int | None = None, rows_usable: int | None = None,
               eval_hashes: tuple[np.ndarray, list[str]] | None = None,
               eval_source: str | None = None) -> ValidationReport:
        self._flush()
        n_rows = len(self.row_line)
        n_pairs, n_unp = len(self.p_ord), len(self.u_ord)
        post: dict[str, np.ndarray] = {}
        details: dict[str, dict[str, Any]] = {}
        stats: dict[str, Any] = {}
        findings: list[Finding] = []

        # Duplicates and contradictions: sort the hashes instead of holding a dict of a million keys.
        p_ord = np.frombuffer(self.p_ord, dtype=np.int64) if n_pairs else np.zeros(0, np.int64)
        u_ord = np.frombuffer(self.u_ord, dtype=np.int64) if n_unp else np.zeros(0, np.int64)
        dup = np.concatenate([_repeats(_np(self.p_dup)), _repeats(_np(self.u_dup))])
        post["duplicates"] = np.sort(np.concatenate([p_ord, u_ord])[dup]) if dup.size else dup.astype(np.int64)
        fwd, rev = _np(self.p_fwd), _np(self.p_rev)
        proper = _np(self.p_self, np.int8) == 0
        contra_p = proper & np.isin(rev, fwd[proper]) if n_pairs else np.zeros(0, bool)
        ukey, ulab = _np(self.u_key), _np(self.u_label, np.int8).astype(bool)
        both = np.intersect1d(ukey[ulab], ukey[~ulab]) if n_unp else ukey
        contra_u = np.isin(ukey, both)
        post["contradictions"] = np.sort(np.concatenate([p_ord[contra_p], u_ord[contra_u]]))
        if post["contradictions"].size:
            groups = np.unique(np.concatenate([np.minimum(fwd, rev)[contra_p], ukey[contra_u]]))
            details["contradictions"] = {"groups": int(groups.size)}

        # Lengths: per pair in words or tokens.
        lp, lc, lr = _np(self.p_lp, np.int32), _np(self.p_lc, np.int32), _np(self.p_lr, np.int32)
        unit = f"tokens ({self.tok_name})" if self.tok is not None else "whitespace words"
        swapped_len = (lr >= self.th.swap_length_ratio * lc) & (lr - lc >= self.th.swap_length_min_gap)
        post["swapped_length"] = p_ord[swapped_len]

        # Leakage: train rows whose normalized prompt appears in the eval data.
        if eval_hashes is not None:
            ev_h, ev_labels = eval_hashes
            train_h = np.concatenate([_np(self.p_hp), _np(self.u_hp)])
            train_o = np.concatenate([p_ord, u_ord])
            leak = np.isin(train_h, ev_h) & (train_h != 0)
            post["leakage"] = np.sort(train_o[leak])
            ev_leak = np.flatnonzero(np.isin(ev_h, train_h[leak]))
            details["leakage"] = {"distinct_prompts": int(np.unique(train_h[leak]).size),
                                  "eval_rows": int(ev_leak.size),
                                  "eval_example_rows": [ev_labels[i] for i in ev_leak[:self.max_examples]]}

        flagged: dict[str, np.ndarray] = {k: np.frombuffer(v, dtype=np.int64).copy() for k, v in self.flags.items()}
        for k, v in post.items():
            if v.size:
                flagged[k] = v
        for k, errs in self.errors.items():
            details.setdefault(k, {})["errors"] = errs
        for k, c in self.flag_details.items():
            if c:
                details.setdefault(k, {})["by_field" if k != "identical" else "kind"] = dict(c)

        rows_read = n_rows if rows_read is None else rows_read
        if rows_usable is None:
            rows_usable = rows_read - len(self.dropped)
        usable_total = n_pairs + n_unp

        # Row-level findings, in CHECKS order (unknown loader reasons after them).
        names = [n for n in CHECKS if n in flagged] + sorted(n for n in flagged if n not in CHECKS)
        for name in names:
            rows = flagged[name]
            severity, meaning = CHECKS.get(name, ("error", "rows the loader dropped for this reason"))
            if name in STRUCTURAL or name not in CHECKS:
                total = rows_read
            elif name in ("duplicates", "contradictions", "control_characters", "empty_prompt", "leakage"):
                total = usable_total
            elif name == "identical":  # exactly identical pairs were dropped before reaching add_pair
                total = n_pairs + self.flag_details["identical"]["exact"]
            else:
                total = n_pairs
            d = details.get(name, {})
            msg = meaning
            if "by_field" in d:
                msg += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(d["by_field"].items())) + ")"
            if name == "near_identical":
                d["threshold"] = self.th.near_identical
            if name == "swapped_length":
                d.update(ratio=self.th.swap_length_ratio, min_gap=self.th.swap_length_min_gap, unit=unit)
                msg = (f"likely swapped: rejected >= {self.th.swap_length_ratio:g}x as long as chosen "
                       f"and >= {self.th.swap_length_min_gap} {unit} longer")
            if name == "leakage":
                msg = (f"{d['distinct_prompts']} distinct prompts of the eval data appear in training "
                       f"({d['eval_rows']} eval rows)")
            findings.append(Finding(name, severity, int(rows.size), int(total), msg,
                                    [self.label(int(o)) for o in rows[:self.max_examples]], d))

        if n_unp and n_pairs:
            findings.append(Finding("mixed_kinds", "warning", min(n_pairs, n_unp), usable_total,
                                    f"{n_pairs} paired and {n_unp} unpaired rows in one dataset"))

        # Length bias (paired).
        if n_pairs:
            diff = lc.astype(np.int64) - lr
            longer = int((diff > 0).sum())
            share = longer / n_pairs
            length = {
                "unit": unit, "pairs": n_pairs,
                "chosen_longer": longer, "rejected_longer": int((diff < 0).sum()), "ties": int((diff == 0).sum()),
                "share_chosen_longer": round(share, 6),
                "mean_difference": round(float(diff.mean()), 4), "median_difference": float(np.median(diff)),
                "chosen_mean": round(float(lc.mean()), 4), "rejected_mean": round(float(lr.mean()), 4),
                "prompt_mean": round(float(lp.mean()), 4),
                "histogram": _histogram(diff),
            }
            stats["length"] = length
            biased = share > self.th.length_bias
            msg = (f"chosen longer in {100 * share:.1f}% of pairs; difference chosen - rejected: mean "
                   f"{length['mean_difference']:+.1f}, median {length['median_difference']:+g} {unit}")
            if biased:
                msg += f" (> {100 * self.th.length_bias:g}%: the model would learn verbosity)"
            findings.append(Finding("length_bias", "warning" if biased else "info", longer, n_pairs, msg,
                                    details={"threshold": self.th.length_bias,
                                             **{k: v for k, v in length.items() if k != "histogram"}}))

        # Truncation.
        if self.max_length is not None and usable_total:
            seq = np.concatenate([lp.astype(np.int64) + np.maximum(lc, lr),
                                  _np(self.u_lp, np.int32).astype(np.int64) + _np(self.u_lc, np.int32)])
            prompt_only = np.concatenate([lp, _np(self.u_lp, np.int32)]) > self.max_length
            over = seq > self.max_length
            rows = np.sort(np.concatenate([p_ord, u_ord])[over])
            if rows.size:
                flagged["truncation"] = rows
            t = {"max_length": self.max_length, "unit": unit, "rows_over": int(over.sum()),
                 "prompt_alone_over": int(prompt_only.sum()), "max_seen": int(seq.max())}
            stats["truncation"] = t
            findings.append(Finding(
                "truncation", "warning" if rows.size else "info", int(rows.size), usable_total,
                f"{int(rows.size)} rows have prompt + longest response > {self.max_length} {unit} "
                f"({t['prompt_alone_over']} already in the prompt); longest is {t['max_seen']}",
                [self.label(int(o)) for o in rows[:self.max_examples]], t))

        # KTO class balance (unpaired rows only: paired data split for KTO is balanced by construction).
        if n_unp:
            n_d = int(ulab.sum())
            kto = kto_weights(n_d, n_unp - n_d)
            stats["kto"] = kto
            if kto["ratio"] is None:
                msg = f"only one class present ({n_d} desirable, {n_unp - n_d} undesirable): KTO needs both"
            else:
                lo, hi = kto["desirable_weight_range"]
                msg = (f"{n_d} desirable / {n_unp - n_d} undesirable; with undesirable_weight=1 choose "
                       f"desirable_weight in [{lo:.3g}, {hi:.3g}] (suggested {kto['desirable_weight']:.3g})")
            findings.append(Finding("kto_balance", "info" if kto["defaults_in_range"] else "warning", n_d, n_unp,
                                    msg, details=kto))

        if self.rated:
            stats["ratings"] = {"pairs_with_ratings": self.rated}
        kind = "empty" if not usable_total else "mixed" if n_pairs and n_unp else "paired" if n_pairs else "unpaired"
        return ValidationReport(
            source=source, kind=kind, rows_read=rows_read, rows_usable=rows_usable, pairs=n_pairs,
            unpaired=n_unp, length_unit=unit, findings=findings, stats=stats,
            max_unusable_fraction=self.th.max_unusable_fraction, eval_source=eval_source, flagged=flagged)


def _np(a: array, dtype: Any = np.int64) -> np.ndarray:
    return np.frombuffer(a, dtype=dtype) if len(a) else np.zeros(0, dtype)


def _repeats(keys: np.ndarray) -> np.ndarray:
    """Boolean mask of positions whose key occurred at an earlier position."""
    if keys.size == 0:
        return np.zeros(0, bool)
    order = np.argsort(keys, kind="stable")
    s = keys[order]
    rep = np.zeros(keys.size, bool)
    rep[order[1:]] = s[1:] == s[:-1]
    return rep


def _histogram(diff: np.ndarray, bins: int = 40) -> dict[str, Any]:
    """Histogram of chosen - rejected lengths over [1st, 99th] percentile (values outside go to the end bins)."""
    lo, hi = (float(x) for x in np.percentile(diff, [1, 99]))
    lo, hi = math.floor(min(lo, 0)), math.ceil(max(hi, 0))
    if hi == lo:
        hi = lo + 1
    width = max(1, math.ceil((hi - lo) / bins))
    edges = np.arange(lo, hi + width + 1, width)
    if edges.size < 2:
        edges = np.array([lo, lo + width])
    counts, _ = np.histogram(np.clip(diff, edges[0], edges[-1] - 1e-9), bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist(),
            "below": int((diff < lo).sum()), "above": int((diff > hi).sum())}


# ---------------------------------------------------------------------------------------------------------
# Entry points


def _feed_row(c: _Collector, o: int, row: dict, hint: list[int]) -> None:
    """Interpret one parsed row exactly as the loader would and hand it to the collector."""
    unpaired = is_unpaired_shape(row) or (
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


def _eval_prompt_hashes(source: Any, split: str) -> tuple[np.ndarray, list[str]]:
    hashes, labels = array("q"), []
    for raw in read_rows(source, split=split, collect_errors=True):
        if raw.data is None:
            continue
        try:
            prompt = (to_unpaired(raw.data) if is_unpaired_shape(raw.data) else to_pair(raw.data)).prompt
        except Skip:
            continue
        norm = normalize_text(_text(prompt, roles=True))
        if norm:
            hashes.append(hash(norm))
            labels.append(f"{raw.source}:{raw.line}")
    return _np(hashes), labels


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
             batch_size: int = 1000) -> ValidationReport:
    """Read ``source`` (anything ``read_rows`` reads) once, streaming, and run every check.

    Args:
        source: path (.jsonl/.json/.csv/.parquet or a saved dataset), hub id, or list of dicts.
        eval_source: a second dataset; training rows whose prompt appears in it are reported as ``leakage``.
        tokenizer: name or path of a Hugging Face tokenizer, or a tokenizer object; lengths are then counted
            in tokens (batched, ``batch_size`` rows per call) instead of whitespace words.
        max_length: report rows whose prompt + longest response exceed this many tokens (or words).
        max_examples: example rows ("file:line") kept per finding.
        thresholds: heuristic knobs, see :class:`Thresholds`.
    """
    tok, tok_name = tokenizer, None
    if isinstance(tokenizer, str):
        tok, tok_name = load_tokenizer(tokenizer), tokenizer
    elif tokenizer is not None:
        tok_name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    c = _Collector(tokenizer=tok, tokenizer_name=tok_name, max_length=max_length, max_examples=max_examples,
                   thresholds=thresholds, batch_size=batch_size)
    hint = [0, 0]  # paired rows, unpaired rows seen so far: decides how a row with neither shape is read
    for raw in read_rows(source, split=split, collect_errors=True):
        o = c.row(raw.source, raw.line)
        if raw.data is None:
            c.drop(o, f"malformed_line: {raw.error}")
        else:
            _feed_row(c, o, raw.data, hint)
    ev = _eval_prompt_hashes(eval_source, split) if eval_source is not None else None
    return c.finish(_name(source), eval_hashes=ev, eval_source=None if eval_source is None else _name(eval_source))


def validate_records(records: Iterable[PairRecord | UnpairedRecord], drops: DropLog | None = None, *,
                     eval_records: Iterable[PairRecord | UnpairedRecord] | None = None, max_examples: int = 5,
                     thresholds: Thresholds = DEFAULT_THRESHOLDS, source: str | None = None) -> ValidationReport:
    """The trainer's pre-flight check over records already loaded by ``normalize`` (no second read, no tokenizer).

    ``drops`` supplies the structural findings (its reasons map to finding names) and the read/usable counts
    behind ``report.usable``. Ratings are not part of records, so ``swapped_rating`` is not checked here.
    """
    c = _Collector(max_length=None, max_examples=max_examples, thresholds=thresholds)
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
        hashes, labels = array("q"), []
        for rec in eval_records:
            norm = normalize_text(_text(rec.prompt, roles=True))
            if norm:
                hashes.append(hash(norm))
                labels.append(f"{rec.source}:{rec.line}")
        ev = (_np(hashes), labels)
    rows_read = rows_usable = None
    if drops is not None and drops.read:
        rows_read, rows_usable = drops.read, drops.read - drops.dropped
    name = source or first or (c.sources[0] if c.sources else "<records>")
    return c.finish(name, rows_read=rows_read, rows_usable=rows_usable, eval_hashes=ev,
                    eval_source=None if eval_records is None else "<eval records>")


def _name(source: Any) -> str:
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        return str(source)
    return "<memory>" if isinstance(source, list) else "<dataset>"
