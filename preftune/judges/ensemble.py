"""Several judges as one: majority vote or mean signed confidence, and how much the judges agree.

Agreement is reported as Cohen's κ between every pair of members over all items judged so far. Raw agreement
overstates it when both judges mostly say the same label (e.g. "A" because the policy usually wins); κ
subtracts the agreement their label frequencies alone would produce. A κ near 0 means an ensemble of
those judges averages noise, which is worth knowing before training on its pairs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from itertools import combinations
from typing import Literal

from preftune.data.agreement import cohen_kappa  # one definition of κ for annotators and judges
from preftune.judges.base import Judge, PairItem, ScoreItem, Verdict, Winner


def pairwise_kappa(labels: Mapping[str, Sequence[Hashable]]) -> dict[tuple[str, str], float]:
    """κ for every pair of raters in ``{rater name: labels}`` (pairs in insertion order)."""
    return {(a, b): cohen_kappa(labels[a], labels[b]) for a, b in combinations(labels, 2)}


def _signed(v: Verdict) -> float:
    """Support for A in [−1, 1]: +confidence for A, −confidence for B, 0 for a tie."""
    return {"A": v.confidence, "B": -v.confidence, "tie": 0.0}[v.winner]


class EnsembleJudge(Judge):
    """Combine member judges' (already debiased) verdicts, and their scores.

    Modes (members with weights w_j; a member whose verdict failed abstains):
        majority  the label with the largest total weight among {A, B, tie}; a shared top is a tie;
                  confidence = that label's share of the weight.
        mean      s̄ = Σ w_j·s_j / Σ w_j with s_j = +c_j for A, −c_j for B, 0 for tie; A if s̄ > tie_margin,
                  B if s̄ < −tie_margin, else tie; confidence = |s̄| (1 − |s̄| for a tie).
    ``score`` is the weighted mean of the members' scores, meaningful only when they share a scale.
    Each member asks both orders itself, so the ensemble is order-invariant and never swaps again.

    Args:
        judges: members; their ``name`` labels them in :meth:`agreement` (duplicates get ``#i`` appended).
        mode: ``"majority"`` or ``"mean"``.
        weights: one non-negative weight per member (default all 1).
        tie_margin: for ``mean``, |s̄| at or below this is a tie.
    """

    order_invariant = True

    def __init__(
        self,
        judges: Sequence[Judge],
        mode: Literal["majority", "mean"] = "majority",
        weights: Sequence[float] | None = None,
        tie_margin: float = 0.0,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        if not judges:
            raise ValueError("an ensemble needs at least one judge")
        if mode not in ("majority", "mean"):
            raise ValueError(f"ensemble mode must be 'majority' or 'mean', got {mode!r}")
        weights = [1.0] * len(judges) if weights is None else [float(w) for w in weights]
        if len(weights) != len(judges) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError("weights: one non-negative number per judge, not all zero")
        self.judges = list(judges)
        self.mode = mode
        self.weights = weights
        self.tie_margin = tie_margin
        names = [j.name for j in judges]
        self.member_names = [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]
        self.member_winners: dict[str, list[str]] = {n: [] for n in self.member_names}
        """Every member's winner for every item judged so far, in order (the input to :meth:`agreement`)."""

    def agreement(self) -> dict[tuple[str, str], float]:
        """Cohen's κ between every pair of members over all items judged so far."""
        if not any(self.member_winners.values()):
            return {}
        return pairwise_kappa(self.member_winners)

    @property
    def position_bias(self) -> dict[str, float]:
        """Each member's position-bias rate (the ensemble itself never swaps)."""
        return {n: j.position_stats.rate for n, j in zip(self.member_names, self.judges)}

    def _judge_ordered_many(self, items: list[PairItem]) -> list[Verdict]:
        per_member = [judge.judge_many(items) for judge in self.judges]
        for name, verdicts in zip(self.member_names, per_member):
            self.member_winners[name].extend(v.winner for v in verdicts)
        return [self._combine([vs[i] for vs in per_member]) for i in range(len(items))]

    def _combine(self, verdicts: list[Verdict]) -> Verdict:
        members = {n: v.to_dict() for n, v in zip(self.member_names, verdicts)}
        voting = [(v, w) for v, w in zip(verdicts, self.weights) if v.error is None]
        if not voting:
            return Verdict(
                "tie", 0.0, "every member failed", {"members": members}, error="every member failed"
            )
        total = sum(w for _, w in voting)
        winner: Winner
        if self.mode == "majority":
            tally: Counter[str] = Counter()
            for v, w in voting:
                tally[v.winner] += w
            (top, top_w), *rest = tally.most_common()
            shared = bool(rest) and rest[0][1] == top_w
            winner = "tie" if shared else top  # type: ignore[assignment]
            conf = top_w / total
            details = {"members": members, "votes": dict(tally)}
            return Verdict(winner, conf, f"weighted vote {dict(tally)}", details)
        mean = sum(w * _signed(v) for v, w in voting) / total
        if abs(mean) <= self.tie_margin:
            winner, conf = "tie", 1.0 - abs(mean)
        else:
            winner, conf = ("A" if mean > 0 else "B"), abs(mean)
        return Verdict(
            winner, conf, f"mean signed confidence {mean:+.3f}", {"members": members, "mean": mean}
        )

    def _score_many(self, items: list[ScoreItem]) -> list[float]:
        per_member = [judge.score_many(items) for judge in self.judges]
        total = sum(self.weights)
        return [sum(w * s[i] for w, s in zip(self.weights, per_member)) / total for i in range(len(items))]
