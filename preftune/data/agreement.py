"""Agreement between annotators of pairwise preferences: kappas, gold accuracy and its drift, position bias,
and the items whose labels are agreed on well enough to train on.

Input: one row per item x annotator (JSONL/CSV/...; field names in ``FIELDS``):
    {"item_id": 7, "annotator": "ann1", "choice": "a", "shown_first": "b", "gold": "a", "time": 1712000000,
     "prompt": "...", "response_a": "...", "response_b": "..."}
``choice`` / ``shown_first`` / ``gold`` are compared as lower-cased, stripped strings: ``choice`` and ``gold`` must
be one of ``CHOICES`` ("a", "b", or a tie label), ``shown_first`` one of "a", "b"; a file with any other value is
refused (naming file:line), since a typo would otherwise become a category of its own and skew every number.
``gold`` marks gold items (on any of the item's rows). Without ``shown_first`` the response labelled
``first_label`` ("a") is assumed to have been shown first. Without ``time`` the file order is the time order.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from preftune.data.load import MAX_ROW_BYTES, DataError, read_rows
from preftune.data.outputs import AtomicJsonl, dropped_path_for

FIELDS = {
    "item": ("item_id", "item", "id"),
    "annotator": ("annotator", "annotator_id", "rater", "worker"),
    "choice": ("choice", "label", "preference", "winner"),
    "shown_first": ("shown_first",),
    "gold": ("gold", "gold_label"),
    "time": ("time", "timestamp", "created_at"),
}
TIE_LABELS = ("tie", "equal", "none", "both", "neither")
SIDES = ("a", "b")
CHOICES = SIDES + TIE_LABELS
"""The values ``choice`` and ``gold`` may take (after lower-casing); ``shown_first`` takes one of ``SIDES``."""
PAYLOAD = ("prompt", "response_a", "response_b")


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa of two raters over the same items.

        κ = (p_o - p_e) / (1 - p_e),   p_o = share of items where a == b,   p_e = Σ_k p_a(k) · p_b(k)
    p_a(k), p_b(k): share of items each rater put in category k (Cohen 1960, Educ. Psychol. Meas. 20(1), eq. 1).
    Returns nan when p_e == 1 (both raters always use one and the same category: κ is undefined).
    """
    if len(a) != len(b):
        raise ValueError(f"raters labelled different numbers of items: {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return math.nan
    p_o = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[k] * cb[k] for k in ca) / (n * n)
    return math.nan if p_e == 1 else (p_o - p_e) / (1 - p_e)


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa from an items x categories table of how many raters chose each category.

        P_i = (Σ_j n_ij² - n_i) / (n_i (n_i - 1))     agreement on item i, n_i = Σ_j n_ij raters
        P̄ = mean_i P_i,   p_j = Σ_i n_ij / Σ_i n_i,   P̄_e = Σ_j p_j²,   κ = (P̄ - P̄_e) / (1 - P̄_e)
    (Fleiss 1971, Psychol. Bull. 76(5).) Departure: Fleiss assumes every item has the same number of raters; here
    n_i may vary (items with n_i < 2 are skipped), which is the usual generalization and equals Fleiss' κ when
    n_i is constant. Returns nan when fewer than one item has two raters or P̄_e == 1.
    """
    rows = [list(r) for r in counts if sum(r) >= 2]
    if not rows:
        return math.nan
    p_items = [(sum(x * x for x in r) - sum(r)) / (sum(r) * (sum(r) - 1)) for r in rows]
    p_bar = sum(p_items) / len(rows)
    total = sum(sum(r) for r in rows)
    p_j = [sum(r[j] for r in rows) / total for j in range(len(rows[0]))]
    p_e = sum(p * p for p in p_j)
    return math.nan if p_e == 1 else (p_bar - p_e) / (1 - p_e)


def binomial_two_sided(k: int, n: int) -> float:
    """Two-sided p-value of k successes in n fair coin flips: min(1, 2 · min(P(X <= k), P(X >= k)))."""
    if n == 0:
        return 1.0

    def pmf(i: int) -> float:
        return math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2))

    low = sum(pmf(i) for i in range(0, k + 1))
    high = sum(pmf(i) for i in range(k, n + 1))
    return min(1.0, 2 * min(low, high))


@dataclass
class Annotation:
    item: str
    annotator: str
    choice: str
    shown_first: str | None
    gold: str | None
    time: Any
    order: int


def _get(row: dict, names: tuple[str, ...]) -> Any:
    return next((row[k] for k in names if row.get(k) not in (None, "")), None)


def _label(value: Any) -> str | None:
    return None if value is None else str(value).strip().lower()


def _unknown_labels(values: dict[str, str | None]) -> list[str]:
    """``field 'value'`` for each label outside its allowed set."""
    allowed = {"choice": CHOICES, "gold": CHOICES, "shown_first": SIDES}
    return [f"{k} {values[k]!r}" for k in allowed if values[k] is not None and values[k] not in allowed[k]]


def read_annotations(source: Any, split: str = "train", max_row_bytes: int = MAX_ROW_BYTES
                     ) -> tuple[list[Annotation], dict[str, dict], list[dict]]:
    """(annotations, item payloads {item: {prompt, response_a, response_b}}, unreadable rows with a reason).

    Raises ``DataError`` naming the first rows (file:line) whose ``choice``, ``gold`` or ``shown_first`` is not
    an allowed label (see the module docstring): no number is computed over labels that mean nothing.
    """
    anns: list[Annotation] = []
    payload: dict[str, dict] = {}
    bad: list[dict] = []
    unknown: list[str] = []
    for raw in read_rows(source, split=split, collect_errors=True, max_row_bytes=max_row_bytes):
        row = raw.data
        if row is None:
            bad.append({"source": raw.source, "line": raw.line, "reason": raw.drop_reason})
            continue
        values = {k: _get(row, names) for k, names in FIELDS.items()}
        missing = [k for k in ("item", "annotator", "choice") if values[k] is None]
        if missing:
            bad.append({"source": raw.source, "line": raw.line, "reason": f"missing_field:{missing[0]}",
                        "row": row})
            continue
        labels = {k: _label(values[k]) for k in ("choice", "shown_first", "gold")}
        wrong = _unknown_labels(labels)
        if wrong:
            unknown.append(f"{raw.source}:{raw.line}: {', '.join(wrong)}")
            continue
        item = str(values["item"])
        anns.append(Annotation(item, str(values["annotator"]), labels["choice"], labels["shown_first"],
                               labels["gold"], values["time"], len(anns)))
        if all(isinstance(row.get(k), str) for k in PAYLOAD) and item not in payload:
            payload[item] = {k: row[k] for k in PAYLOAD}
    if unknown:
        raise DataError(f"{len(unknown)} annotation rows have labels outside the allowed set ("
                        + "; ".join(unknown[:5]) + ("; ..." if len(unknown) > 5 else "")
                        + f"): choice and gold must be one of {', '.join(CHOICES)}; shown_first one of "
                        f"{', '.join(SIDES)} (compared lower-cased)")
    return anns, payload, bad


def _time_key(a: Annotation) -> tuple:
    t = a.time
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return (0, float(t), "", a.order)
    return (1 if t is not None else 2, 0.0, "" if t is None else str(t), a.order)


def _finite(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(x, 6)


@dataclass
class AgreementReport:
    """Everything ``agreement`` computes; ``to_dict`` is the JSON report (documented in docs/data.md)."""

    annotations: int
    items: int
    annotators: list[str]
    kappa: dict[str, Any]
    per_annotator: dict[str, dict[str, Any]]
    item_agreement: dict[str, dict[str, Any]] = field(repr=False)
    min_agreement: float
    kept_items: list[str]
    dropped_items: dict[str, str]
    duplicates: int = 0
    unreadable: list[dict] = field(default_factory=list)

    def to_dict(self, *, include_items: bool = False) -> dict[str, Any]:
        d = {"annotations": self.annotations, "items": self.items, "annotators": self.annotators,
             "kappa": self.kappa, "per_annotator": self.per_annotator, "min_agreement": self.min_agreement,
             "kept_items": len(self.kept_items), "dropped_items": len(self.dropped_items),
             "dropped_by_reason": dict(Counter(self.dropped_items.values())),
             "duplicate_annotations": self.duplicates, "unreadable_rows": len(self.unreadable),
             "unreadable_examples": self.unreadable[:5]}
        if include_items:
            d["item_agreement"] = self.item_agreement
        return d

    def summary(self) -> str:
        k = self.kappa
        value = "n/a" if k.get("value") is None else f"{k['value']:.3f}"
        lines = [f"{self.annotations} annotations of {self.items} items by {len(self.annotators)} annotators; "
                 f"{k['method']} kappa = {value} over {k['items']} items",
                 f"{'annotator':<16} {'n':>6} {'first%':>7} {'bias p':>8} {'gold n':>7} {'gold acc':>9} "
                 f"{'drift':>7}  flags"]
        for name, a in self.per_annotator.items():
            pb, g = a["position_bias"], a["gold"]
            first = "-" if pb["first_share"] is None else f"{100 * pb['first_share']:.0f}%"
            acc = "-" if g["accuracy"] is None else f"{g['accuracy']:.2f}"
            drift = "-" if g["drift"] is None else f"{g['drift']:+.2f}"
            lines.append(f"{name:<16} {a['annotations']:>6} {first:>7} {pb['p_value']:>8.3g} {g['n']:>7} "
                         f"{acc:>9} {drift:>7}  {', '.join(a['flags'])}")
        reasons = Counter(self.dropped_items.values())
        lines.append(f"items with agreement >= {self.min_agreement:g}: kept {len(self.kept_items)}, dropped "
                     f"{len(self.dropped_items)}" + (f" ({', '.join(f'{r}: {n}' for r, n in reasons.items())})"
                                                     if reasons else ""))
        if self.unreadable:
            lines.append(f"{len(self.unreadable)} unreadable rows (e.g. {self.unreadable[0]['source']}:"
                         f"{self.unreadable[0]['line']}: {self.unreadable[0]['reason']})")
        return "\n".join(lines)


def analyze(annotations: Iterable[Annotation], *, min_agreement: float = 0.66, windows: int = 4,
            first_label: str = "a", unreadable: list[dict] | None = None) -> AgreementReport:
    """Kappa (Cohen for two annotators, Fleiss for more), per-annotator position bias and gold accuracy with its
    drift over time, and per-item agreement (share of annotators agreeing with the majority).

    An item is kept when it has >= 2 annotations, a unique majority label, and agreement >= ``min_agreement``.
    Gold accuracy drift: the annotator's gold answers in time order are cut into ``windows`` equal chunks;
    drift = accuracy of the last chunk - accuracy of the first. Flags: position_biased (two-sided binomial
    p < 0.01 against picking first and second equally often), low_gold_accuracy (< 0.7 on >= 5 gold items),
    drifting (drift <= -0.2).
    """
    if first_label not in SIDES:
        raise ValueError(f"first_label must be one of {', '.join(SIDES)}, got {first_label!r}")
    first: dict[tuple[str, str], Annotation] = {}
    duplicates = 0
    for a in annotations:
        if (a.item, a.annotator) in first:
            duplicates += 1  # the first label of an annotator on an item counts
        else:
            first[(a.item, a.annotator)] = a
    anns = list(first.values())
    annotators = sorted({a.annotator for a in anns})
    by_item: dict[str, dict[str, str]] = defaultdict(dict)
    gold: dict[str, str] = {}
    for a in anns:
        by_item[a.item][a.annotator] = a.choice
        if a.gold is not None:
            gold.setdefault(a.item, a.gold)
    categories = sorted({a.choice for a in anns})

    kappa = _kappa(by_item, annotators, categories)
    per = {name: _annotator(name, anns, gold, first_label, windows) for name in annotators}
    item_agreement, kept, dropped = _items(by_item, gold, min_agreement)
    return AgreementReport(
        annotations=len(anns), items=len(by_item), annotators=annotators, kappa=kappa, per_annotator=per,
        item_agreement=item_agreement, min_agreement=min_agreement, kept_items=kept, dropped_items=dropped,
        duplicates=duplicates, unreadable=unreadable or [])


def _kappa(by_item: dict[str, dict[str, str]], annotators: list[str], categories: list[str]) -> dict[str, Any]:
    """Cohen's κ for two annotators (items both labelled), else Fleiss' κ and, up to 20 annotators, pairwise Cohen."""
    if len(annotators) == 2:
        x, y = annotators
        shared = [i for i, labels in by_item.items() if x in labels and y in labels]
        value = cohen_kappa([by_item[i][x] for i in shared], [by_item[i][y] for i in shared])
        kappa: dict[str, Any] = {"method": "cohen", "value": _finite(value), "items": len(shared)}
    else:
        table = [[Counter(labels.values())[c] for c in categories] for labels in by_item.values()]
        kappa = {"method": "fleiss", "value": _finite(fleiss_kappa(table)),
                 "items": sum(1 for labels in by_item.values() if len(labels) >= 2)}
        if 2 < len(annotators) <= 20:
            pairwise = {}
            for x, y in combinations(annotators, 2):
                shared = [i for i, labels in by_item.items() if x in labels and y in labels]
                if len(shared) >= 2:
                    pairwise[f"{x}|{y}"] = _finite(cohen_kappa([by_item[i][x] for i in shared],
                                                               [by_item[i][y] for i in shared]))
            kappa["pairwise_cohen"] = pairwise
    return kappa


def _annotator(name: str, anns: list[Annotation], gold: dict[str, str], first_label: str,
               windows: int) -> dict[str, Any]:
    """One annotator's position bias, gold accuracy over time and flags (see :func:`analyze`)."""
    mine = sorted((a for a in anns if a.annotator == name), key=_time_key)
    decided = [a for a in mine if a.choice not in TIE_LABELS]
    picks_first = sum(a.choice == (a.shown_first or first_label) for a in decided)
    p = binomial_two_sided(picks_first, len(decided))
    on_gold = [a.choice == gold[a.item] for a in mine if a.item in gold]
    chunks = _chunks(on_gold, windows)
    accs = [round(sum(c) / len(c), 6) for c in chunks]
    acc = sum(on_gold) / len(on_gold) if on_gold else None
    drift = round(accs[-1] - accs[0], 6) if len(accs) >= 2 else None
    flags = []
    if decided and p < 0.01:
        flags.append("position_biased")
    if acc is not None and len(on_gold) >= 5 and acc < 0.7:
        flags.append("low_gold_accuracy")
    if drift is not None and drift <= -0.2:
        flags.append("drifting")
    return {
        "annotations": len(mine),
        "position_bias": {"first_share": round(picks_first / len(decided), 6) if decided else None,
                          "n": len(decided), "p_value": float(f"{p:.6g}"),
                          "order_known": all(a.shown_first is not None for a in decided)},
        "gold": {"n": len(on_gold), "accuracy": None if acc is None else round(acc, 6),
                 "windows": accs, "drift": drift},
        "flags": flags,
    }


def _items(by_item: dict[str, dict[str, str]], gold: dict[str, str], min_agreement: float
           ) -> tuple[dict[str, dict[str, Any]], list[str], dict[str, str]]:
    """Per-item agreement, the kept items and the dropped ones with their reason (see :func:`analyze`)."""
    item_agreement: dict[str, dict[str, Any]] = {}
    kept: list[str] = []
    dropped: dict[str, str] = {}
    for item, labels in by_item.items():
        counts = Counter(labels.values())
        n = len(labels)
        (top, m), *rest = counts.most_common()
        unique = not rest or rest[0][1] < m
        share = m / n
        item_agreement[item] = {"n": n, "counts": dict(counts), "majority": top if unique else None,
                                "agreement": round(share, 6), "gold": gold.get(item)}
        if n < 2:
            dropped[item] = "single_annotation"
        elif not unique:
            dropped[item] = "no_majority"
        elif share < min_agreement:
            dropped[item] = "below_min_agreement"
        else:
            kept.append(item)
    return item_agreement, kept, dropped


def _chunks(values: list, k: int) -> list[list]:
    if not values or k < 1:
        return []
    k = min(k, len(values))
    size, extra = divmod(len(values), k)
    out, start = [], 0
    for i in range(k):
        end = start + size + (i < extra)
        out.append(values[start:end])
        start = end
    return out


def write_filtered(report: AgreementReport, payload: dict[str, dict], out: str | Path) -> tuple[Path, Path, int]:
    """Write kept items to ``out`` and dropped items to ``out.dropped.jsonl``; returns (out, dropped, n_kept).

    When every item carries prompt / response_a / response_b, kept items become preference pairs
    ({"prompt", "chosen", "rejected", "item_id", "agreement"}; majority "tie" items are dropped as
    ``majority_not_a_or_b``); otherwise item rows {"item_id", "label", "agreement", "annotations"}.
    kept + dropped == items.
    """
    out = Path(out)
    dropped_path = dropped_path_for(out)
    pairs = bool(payload) and all(i in payload for i in report.item_agreement)
    dropped = dict(report.dropped_items)
    with AtomicJsonl(out) as fk:
        for item in report.kept_items:
            info = report.item_agreement[item]
            if pairs:
                if info["majority"] not in SIDES:
                    dropped[item] = "majority_not_a_or_b"
                    continue
                p = payload[item]
                win, lose = ("response_a", "response_b") if info["majority"] == "a" else ("response_b", "response_a")
                rec = {"prompt": p["prompt"], "chosen": p[win], "rejected": p[lose], "item_id": item,
                       "agreement": info["agreement"]}
            else:
                rec = {"item_id": item, "label": info["majority"], "agreement": info["agreement"],
                       "annotations": info["n"], **payload.get(item, {})}
            fk.write(rec)
    with AtomicJsonl(dropped_path) as fd:
        for item, reason in dropped.items():
            fd.write({"item_id": item, "reason": reason, **report.item_agreement[item], **payload.get(item, {})})
    if fk.count + len(dropped) != report.items:
        raise RuntimeError(f"internal error: {report.items} items, kept {fk.count}, dropped {len(dropped)}")
    return out, dropped_path, fk.count
