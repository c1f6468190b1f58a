"""The dataset-level half of ``data validate``: checks over the collector's columns, registered by name.

Three tables, each entry a small function:

    ROW_CHECKS   name -> fn(columns) -> flagged ordinals (+ details): checks that compare rows with each other
                 (duplicates, contradictions, leakage) or need every length (swapped_length)
    MESSAGES     name -> fn(columns, details) -> message: row findings whose message says more than the
                 catalog's meaning (the default, with per-field counts)
    STATISTICS   fn(columns) -> Outcome | None, in report order: findings about the whole dataset that are
                 reported even when healthy (mixed_kinds, length_bias, truncation, kto_balance)

Each row finding's percent is over ``TOTALS[CHECKS[name].total]``. A new check is one registered function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from preftune.data.findings import CHECKS, UNKNOWN_DROP, Finding, Thresholds, ValidationReport
from preftune.data.lengths import length_bias


@dataclass
class Columns:
    """What the collector hands over: per-row numbers as numpy arrays, P pairs and U unpaired rows.

    Ordinals are 0-based positions in read order; hashes are of normalized texts (0 for an empty prompt).
    """

    p_ord: np.ndarray  # (P,) int64 ordinal of each pair
    u_ord: np.ndarray  # (U,) int64
    lp: np.ndarray  # (P,) int32 prompt length (words or tokens)
    lc: np.ndarray  # (P,) chosen length
    lr: np.ndarray  # (P,) rejected length
    ulp: np.ndarray  # (U,) prompt length
    ulc: np.ndarray  # (U,) completion length
    p_hp: np.ndarray  # (P,) prompt hash
    p_fwd: np.ndarray  # (P,) hash of (prompt, chosen, rejected), normalized
    p_rev: np.ndarray  # (P,) hash of (prompt, rejected, chosen), normalized
    p_dup: np.ndarray  # (P,) hash of the raw texts (exact repeats)
    p_self: np.ndarray  # (P,) bool: chosen == rejected after normalization
    u_hp: np.ndarray  # (U,) prompt hash
    u_key: np.ndarray  # (U,) hash of (prompt, completion), normalized
    u_dup: np.ndarray  # (U,) hash of the raw texts and label
    u_label: np.ndarray  # (U,) bool: desirable
    flags: dict[str, np.ndarray]  # name -> ordinals flagged while streaming
    flag_details: dict[str, dict[str, int]]  # name -> detail -> count
    errors: dict[str, list[str]]  # name -> first "file:line: why"
    rated: int  # pairs with ratings
    rows_read: int
    unit: str
    th: Thresholds
    max_length: int | None
    max_examples: int
    label: Callable[[int], str]  # ordinal -> "file:line"
    eval_hashes: tuple[np.ndarray, list[str]] | None = None  # eval prompt hashes and their "file:line"
    details: dict[str, dict[str, Any]] = field(default_factory=dict)  # filled by the row checks

    @property
    def n_pairs(self) -> int:
        return int(self.p_ord.size)

    @property
    def n_unpaired(self) -> int:
        return int(self.u_ord.size)

    @property
    def usable(self) -> int:
        return self.n_pairs + self.n_unpaired

    def examples(self, rows: np.ndarray) -> list[str]:
        return [self.label(int(o)) for o in rows[:self.max_examples]]


TOTALS: dict[str, Callable[[Columns], int]] = {
    "read": lambda c: c.rows_read,
    "usable": lambda c: c.usable,
    "pairs": lambda c: c.n_pairs,
    "pairs_and_exact": lambda c: c.n_pairs + c.flag_details.get("identical", {}).get("exact", 0),
}


# ---------------------------------------------------------------------------------------------------------
# Row checks over the whole dataset

ROW_CHECKS: dict[str, Callable[[Columns], np.ndarray | None]] = {}


def row_check(name: str):
    def register(fn: Callable[[Columns], np.ndarray | None]):
        ROW_CHECKS[name] = fn
        return fn
    return register


def _repeats(keys: np.ndarray) -> np.ndarray:
    """Boolean mask of positions whose key occurred at an earlier position (sorting, not a dict of keys)."""
    if keys.size == 0:
        return np.zeros(0, bool)
    order = np.argsort(keys, kind="stable")
    s = keys[order]
    rep = np.zeros(keys.size, bool)
    rep[order[1:]] = s[1:] == s[:-1]
    return rep


@row_check("duplicates")
def _duplicates(c: Columns) -> np.ndarray:
    dup = np.concatenate([_repeats(c.p_dup), _repeats(c.u_dup)])
    return np.sort(np.concatenate([c.p_ord, c.u_ord])[dup])


@row_check("contradictions")
def _contradictions(c: Columns) -> np.ndarray:
    proper = ~c.p_self
    pairs = proper & np.isin(c.p_rev, c.p_fwd[proper])  # (P,) the reversed pair occurs too
    both = np.intersect1d(c.u_key[c.u_label], c.u_key[~c.u_label])
    unpaired = np.isin(c.u_key, both)  # (U,) the same completion is labelled both ways
    rows = np.sort(np.concatenate([c.p_ord[pairs], c.u_ord[unpaired]]))
    if rows.size:
        groups = np.unique(np.concatenate([np.minimum(c.p_fwd, c.p_rev)[pairs], c.u_key[unpaired]]))
        c.details["contradictions"] = {"groups": int(groups.size)}
    return rows


@row_check("swapped_length")
def _swapped_length(c: Columns) -> np.ndarray:
    th = c.th
    return c.p_ord[(c.lr >= th.swap_length_ratio * c.lc) & (c.lr - c.lc >= th.swap_length_min_gap)]


@row_check("leakage")
def _leakage(c: Columns) -> np.ndarray | None:
    """Training rows whose normalized prompt appears in the eval data."""
    if c.eval_hashes is None:
        return None
    ev_h, ev_labels = c.eval_hashes
    train_h = np.concatenate([c.p_hp, c.u_hp])
    leak = np.isin(train_h, ev_h) & (train_h != 0)
    ev_leak = np.flatnonzero(np.isin(ev_h, train_h[leak]))
    c.details["leakage"] = {"distinct_prompts": int(np.unique(train_h[leak]).size), "eval_rows": int(ev_leak.size),
                            "eval_example_rows": [ev_labels[i] for i in ev_leak[:c.max_examples]]}
    return np.sort(np.concatenate([c.p_ord, c.u_ord])[leak])


# ---------------------------------------------------------------------------------------------------------
# Messages of row findings

MESSAGES: dict[str, Callable[[Columns, dict[str, Any]], str]] = {}


def message(name: str):
    def register(fn: Callable[[Columns, dict[str, Any]], str]):
        MESSAGES[name] = fn
        return fn
    return register


def _default_message(name: str, c: Columns, d: dict[str, Any]) -> str:
    text = CHECKS.get(name, UNKNOWN_DROP).meaning
    if "by_field" in d:
        text += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(d["by_field"].items())) + ")"
    return text


@message("near_identical")
def _near_identical_message(c: Columns, d: dict[str, Any]) -> str:
    d["threshold"] = c.th.near_identical
    return CHECKS["near_identical"].meaning


@message("swapped_length")
def _swapped_length_message(c: Columns, d: dict[str, Any]) -> str:
    th = c.th
    d.update(ratio=th.swap_length_ratio, min_gap=th.swap_length_min_gap, unit=c.unit)
    return (f"likely swapped: rejected >= {th.swap_length_ratio:g}x as long as chosen "
            f"and >= {th.swap_length_min_gap} {c.unit} longer")


@message("leakage")
def _leakage_message(c: Columns, d: dict[str, Any]) -> str:
    return (f"{d['distinct_prompts']} distinct prompts of the eval data appear in training "
            f"({d['eval_rows']} eval rows)")


def row_findings(c: Columns, flagged: dict[str, np.ndarray]) -> list[Finding]:
    """One finding per flagged name, in catalog order (loader reasons the catalog does not know after them)."""
    details: dict[str, dict[str, Any]] = {k: dict(v) for k, v in c.details.items()}
    for k, errs in c.errors.items():
        details.setdefault(k, {})["errors"] = errs
    for k, counts in c.flag_details.items():
        details.setdefault(k, {})["kind" if k == "identical" else "by_field"] = counts
    names = [n for n in CHECKS if n in flagged] + sorted(n for n in flagged if n not in CHECKS)
    out = []
    for name in names:
        check, rows, d = CHECKS.get(name, UNKNOWN_DROP), flagged[name], details.get(name, {})
        describe = MESSAGES.get(name)
        text = describe(c, d) if describe else _default_message(name, c, d)
        out.append(Finding(name, check.severity, int(rows.size), int(TOTALS[check.total](c)), text,
                           c.examples(rows), d))
    return out


# ---------------------------------------------------------------------------------------------------------
# Dataset statistics


@dataclass
class Outcome:
    """A statistic's finding, its ``report.stats`` entries, and the rows it flags (for ``clean``)."""

    finding: Finding
    stats: dict[str, Any] = field(default_factory=dict)
    rows: np.ndarray | None = None


def _mixed_kinds(c: Columns) -> Outcome | None:
    if not (c.n_pairs and c.n_unpaired):
        return None
    return Outcome(Finding("mixed_kinds", "warning", min(c.n_pairs, c.n_unpaired), c.usable,
                           f"{c.n_pairs} paired and {c.n_unpaired} unpaired rows in one dataset"))


def _length_bias(c: Columns) -> Outcome | None:
    if not c.n_pairs:
        return None
    lb = length_bias(c.lc, c.lr, unit=c.unit, threshold=c.th.length_bias, prompt=c.lp)
    stats = lb.to_dict(with_histogram=True)
    for key in ("threshold", "biased"):
        stats.pop(key)
    return Outcome(Finding("length_bias", "warning" if lb.biased else "info", lb.chosen_longer, lb.pairs,
                           lb.message(), details={k: v for k, v in lb.to_dict().items() if k != "biased"}),
                   {"length": stats})


def _truncation(c: Columns) -> Outcome | None:
    if c.max_length is None or not c.usable:
        return None
    seq = np.concatenate([c.lp.astype(np.int64) + np.maximum(c.lc, c.lr), c.ulp.astype(np.int64) + c.ulc])  # (N,)
    prompt_only = np.concatenate([c.lp, c.ulp]) > c.max_length
    over = seq > c.max_length
    rows = np.sort(np.concatenate([c.p_ord, c.u_ord])[over])
    t = {"max_length": c.max_length, "unit": c.unit, "rows_over": int(over.sum()),
         "prompt_alone_over": int(prompt_only.sum()), "max_seen": int(seq.max())}
    return Outcome(Finding(
        "truncation", "warning" if rows.size else "info", int(rows.size), c.usable,
        f"{int(rows.size)} rows have prompt + longest response > {c.max_length} {c.unit} "
        f"({t['prompt_alone_over']} already in the prompt); longest is {t['max_seen']}",
        c.examples(rows), t), {"truncation": t}, rows if rows.size else None)


def kto_weights(n_desirable: int, n_undesirable: int) -> dict[str, Any]:
    """The KTO class balance of a dataset and the weights the trainer's ``auto`` picks for it.

    λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3]   (Ethayarajh et al., KTO, arXiv:2402.01306v4, Sec. 4.2)
    ``desirable_weight`` / ``undesirable_weight`` are :func:`preftune.losses.kto.balanced_weights` of the counts
    (both ``auto``: 1.0 when the default weights already fit, else the minority's weight moves the ratio to 7/6),
    so what ``data validate`` recommends is what ``loss.desirable_weight: auto`` trains with.
    ``desirable_weight_range`` is the range of λ_D with λ_U = 1: [n_U/n_D, 4/3 · n_U/n_D].
    """
    info: dict[str, Any] = {"n_desirable": n_desirable, "n_undesirable": n_undesirable, "ratio": None,
                            "desirable_weight_range": None, "desirable_weight": None, "undesirable_weight": None,
                            "balanced_ratio": None, "defaults_in_range": False}
    if n_desirable == 0 or n_undesirable == 0:
        return info
    # Imported here: preftune.losses imports torch, which ``data validate`` needs only for unpaired data.
    from preftune.losses.kto import balanced_weights

    d, u = balanced_weights(n_desirable, n_undesirable)
    lo = n_undesirable / n_desirable
    info.update(ratio=round(n_desirable / n_undesirable, 6), desirable_weight_range=[round(lo, 6), round(4 / 3 * lo, 6)],
                desirable_weight=d, undesirable_weight=u,
                balanced_ratio=round(d * n_desirable / (u * n_undesirable), 6),
                defaults_in_range=1.0 <= n_desirable / n_undesirable <= 4.0 / 3.0)
    return info


def _kto_balance(c: Columns) -> Outcome | None:
    """Unpaired rows only: paired data split for KTO is balanced by construction."""
    if not c.n_unpaired:
        return None
    n_d = int(c.u_label.sum())
    n_u = c.n_unpaired - n_d
    kto = kto_weights(n_d, n_u)
    if kto["ratio"] is None:
        text = f"only one class present ({n_d} desirable, {n_u} undesirable): KTO needs both"
    elif kto["defaults_in_range"]:
        text = (f"{n_d} desirable / {n_u} undesirable: λ_D·n_D/(λ_U·n_U) = {kto['ratio']:.3g} with the default "
                "weights, inside [1, 4/3] (the KTO paper's range)")
    else:
        text = (f"{n_d} desirable / {n_u} undesirable: λ_D·n_D/(λ_U·n_U) = {kto['ratio']:.3g} with the default "
                f"weights, outside [1, 4/3]; desirable_weight={kto['desirable_weight']:g}, undesirable_weight="
                f"{kto['undesirable_weight']:g} bring it to {kto['balanced_ratio']:.3g} (what `auto` trains with)")
    return Outcome(Finding("kto_balance", "info" if kto["defaults_in_range"] else "warning", n_d, c.n_unpaired,
                           text, details=kto), {"kto": kto})


STATISTICS: list[Callable[[Columns], Outcome | None]] = [_mixed_kinds, _length_bias, _truncation, _kto_balance]


# ---------------------------------------------------------------------------------------------------------
# The report


def build_report(c: Columns, *, source: str, rows_usable: int, eval_source: str | None = None) -> ValidationReport:
    """Run every registered check over ``c`` and assemble the report."""
    flagged = dict(c.flags)
    for name, check in ROW_CHECKS.items():
        rows = check(c)
        if rows is not None and rows.size:
            flagged[name] = rows
    findings = row_findings(c, flagged)
    stats: dict[str, Any] = {}
    for statistic in STATISTICS:
        outcome = statistic(c)
        if outcome is None:
            continue
        findings.append(outcome.finding)
        stats.update(outcome.stats)
        if outcome.rows is not None:
            flagged[outcome.finding.name] = outcome.rows
    if c.rated:
        stats["ratings"] = {"pairs_with_ratings": c.rated}
    n_p, n_u = c.n_pairs, c.n_unpaired
    kind = "empty" if not c.usable else "mixed" if n_p and n_u else "paired" if n_p else "unpaired"
    return ValidationReport(
        source=source, kind=kind, rows_read=c.rows_read, rows_usable=rows_usable, pairs=n_p, unpaired=n_u,
        length_unit=c.unit, findings=findings, stats=stats, max_unusable_fraction=c.th.max_unusable_fraction,
        eval_source=eval_source, flagged=flagged)
