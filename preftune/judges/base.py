"""The judge contract: a :class:`Verdict`, the abstract :class:`Judge`, and the position-bias control.

A judge answers one or both questions the online loop asks (``rollout -> judges -> synth.pairs``):
    pairwise   ``judge(prompt, response_a, response_b) -> Verdict``  (which response is better)
    scalar     ``score(prompt, response) -> float``                  (a reward function)

Position-bias control is not optional. Judges implement only the single-order hook ``_judge_ordered``
(or its batch twin); the public ``judge`` / ``judge_many`` always ask (a, b) and then (b, a), map the second
answer back to the original labels, and call any disagreement a tie. LLM judges prefer the first-shown
response often enough (Zheng et al., "Judging LLM-as-a-Judge", arXiv:2306.05685v4, Sec. 3.3) that a single
order would put that bias straight into the preference pairs. Each judge counts how often the verdict flipped
with order in :attr:`Judge.position_stats`. Score-based judges are order-invariant by construction and
declare it (``order_invariant = True``) so the wrapper skips the redundant second pass.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Winner = Literal["A", "B", "tie"]
WINNERS: tuple[str, ...] = ("A", "B", "tie")
PairItem = tuple[str, str, str]
"""(prompt, response_a, response_b)."""
ScoreItem = tuple[str, str]
"""(prompt, response)."""


class UnsupportedJudgeOperation(NotImplementedError):
    """Raised when a judge is asked a question it cannot answer (e.g. ``score`` on a pairwise-only judge)."""


@dataclass
class Verdict:
    """One pairwise decision.

    Attributes:
        winner: ``"A"`` (response_a is better), ``"B"``, or ``"tie"``.
        confidence: how sure the judge is of ``winner``, in [0, 1]. Each judge documents its calibration
            (LLM: as stated by the model; reward model: σ(|s_a − s_b|); verifier: |s_a − s_b| clipped).
        rationale: the judge's short explanation, or why the verdict became a tie.
        details: judge-specific raw data of a single-order verdict (raw model text, scores, letter probs).
        orders: for a debiased verdict, the two single-order verdicts exactly as the judge gave them:
            ``(verdict on (a, b), verdict on (b, a))``; in the second, ``"A"`` names response_b.
        error: set when the verdict is a fallback tie (e.g. unparseable judge output), with the reason.
        flipped: the two orders disagreed (position bias), so the verdict is a tie.
    """

    winner: Winner
    confidence: float
    rationale: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    orders: tuple[Verdict, Verdict] | None = None
    error: str | None = None
    flipped: bool = False

    def __post_init__(self) -> None:
        if self.winner not in WINNERS:
            raise ValueError(f"winner must be one of {WINNERS}, got {self.winner!r}")
        if not (0.0 <= self.confidence <= 1.0) or math.isnan(self.confidence):
            raise ValueError(f"confidence must lie in [0, 1], got {self.confidence!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable view for reports and caches (orders included, recursively)."""
        out: dict[str, Any] = {
            "winner": self.winner,
            "confidence": self.confidence,
            "rationale": self.rationale,
            "details": dict(self.details),
            "error": self.error,
            "flipped": self.flipped,
        }
        if self.orders is not None:
            out["orders"] = [v.to_dict() for v in self.orders]
        return out


def swap_winner(winner: Winner) -> Winner:
    """The same winner named in the other presentation order (A <-> B; tie stays)."""
    return {"A": "B", "B": "A", "tie": "tie"}[winner]  # type: ignore[return-value]


class PositionBiasStats:
    """Counts of how often a judge's verdict changed when the two responses swapped places.

    ``rate`` = flipped / compared, where *compared* counts items whose both orders produced a real verdict
    (an order that failed, e.g. unparseable output, is counted in ``failed`` and not as bias). Thread-safe,
    because the LLM judge records from worker threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.compared = 0
        self.flipped = 0
        self.failed = 0

    def record(self, *, flipped: bool, failed: bool) -> None:
        """Count one debiased item."""
        with self._lock:
            if failed:
                self.failed += 1
            else:
                self.compared += 1
                self.flipped += int(flipped)

    @property
    def rate(self) -> float:
        """Fraction of compared items whose verdict flipped with order (0.0 before any item)."""
        return self.flipped / self.compared if self.compared else 0.0

    def as_dict(self) -> dict[str, float | int]:
        """Counts and rate, for reports."""
        return {"compared": self.compared, "flipped": self.flipped, "failed": self.failed, "rate": self.rate}

    def reset(self) -> None:
        """Start counting afresh (e.g. per evaluation round)."""
        with self._lock:
            self.compared = self.flipped = self.failed = 0

    def __repr__(self) -> str:
        return f"PositionBiasStats({self.as_dict()})"


def combine_orders(ab: Verdict, ba: Verdict) -> Verdict:
    """Merge the verdict on (a, b) with the verdict on (b, a) into one verdict in the original labels.

    Agreement keeps the winner with the mean confidence; disagreement (including A vs tie) is a tie with
    confidence 0 and ``flipped=True``; a failed order makes a tie that carries the error.
    """
    ba_winner = swap_winner(ba.winner)  # in the original labels
    errors = [e for e in (ab.error, ba.error) if e]
    if errors:
        return Verdict("tie", 0.0, "one order failed", orders=(ab, ba), error="; ".join(errors))
    if ab.winner == ba_winner:
        conf = 0.5 * (ab.confidence + ba.confidence)
        return Verdict(ab.winner, conf, ab.rationale, orders=(ab, ba))
    why = f"position bias: {ab.winner} as shown, {ba_winner} with the responses swapped"
    return Verdict("tie", 0.0, why, orders=(ab, ba), flipped=True)


class Judge:
    """Base class of every judge (use a subclass: this one answers nothing).

    Subclasses implement the hooks for what they support: ``_judge_ordered`` / ``_judge_ordered_many``
    (one presentation order; the base class adds the swap and the bias count) and ``_score`` /
    ``_score_many``. The ``*_many`` defaults loop over the single-item hooks; judges that batch (reward model,
    LM) or run requests concurrently (LLM) override them. A question with no hook raises
    :class:`UnsupportedJudgeOperation`.
    """

    order_invariant: bool = False
    """True when a verdict cannot depend on which response is shown first (score comparisons)."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or type(self).__name__
        self.position_stats = PositionBiasStats()

    # ---- public API -------------------------------------------------------------------------------------

    def judge(self, prompt: str, response_a: str, response_b: str) -> Verdict:
        """Which of two responses to ``prompt`` is better, asked in both orders (see module docstring)."""
        return self.judge_many([(prompt, response_a, response_b)])[0]

    def judge_many(self, items: Sequence[PairItem]) -> list[Verdict]:
        """Debiased verdicts for many ``(prompt, response_a, response_b)`` items, in order.

        Both orders of every item go to ``_judge_ordered_many`` in one call, so a concurrent judge overlaps
        them all.
        """
        items = [tuple(it) for it in items]
        if self.order_invariant:
            verdicts = self._judge_ordered_many(items)
            for v in verdicts:
                self.position_stats.record(flipped=False, failed=v.error is not None)
            return verdicts
        swapped = [(p, b, a) for p, a, b in items]
        both = self._judge_ordered_many(items + swapped)
        out = []
        for ab, ba in zip(both[: len(items)], both[len(items) :]):
            v = combine_orders(ab, ba)
            self.position_stats.record(flipped=v.flipped, failed=v.error is not None)
            out.append(v)
        return out

    def score(self, prompt: str, response: str) -> float:
        """A scalar reward for one response (higher is better)."""
        return self.score_many([(prompt, response)])[0]

    def score_many(self, items: Sequence[ScoreItem]) -> list[float]:
        """Scalar rewards for many ``(prompt, response)`` items, in order."""
        return [float(s) for s in self._score_many([tuple(it) for it in items])]

    def try_score_many(self, items: Sequence[ScoreItem]) -> tuple[list[float | None], list[str | None]]:
        """``score_many`` that survives a bad item: (scores, errors), one of the two None per item.

        An item fails when its reply cannot be read as a score (``ValueError``, e.g. the LLM judge's
        ``JudgeParseError``) or its score is not finite; any other error (configuration, a server still failing
        after its retries) is raised as by ``score_many``. A failing batch is halved until the failing items are
        alone, so the rest keep their batching. Judges that cache replies (LLM) do not ask again for work already
        answered; others re-score the items of every failing half (one bad item in n costs about 2n re-scores).
        """
        items = [tuple(it) for it in items]
        scores: list[float | None] = [None] * len(items)
        errors: list[str | None] = [None] * len(items)

        def run(lo: int, hi: int) -> None:
            try:
                got = self.score_many(items[lo:hi])
            except ValueError as e:
                if hi - lo == 1:
                    errors[lo] = f"{type(e).__name__}: {e}"
                    return
                mid = (lo + hi) // 2
                run(lo, mid)
                run(mid, hi)
                return
            for i, s in enumerate(got, start=lo):
                if math.isfinite(s):
                    scores[i] = s
                else:
                    errors[i] = f"non-finite score {s}"

        if items:
            run(0, len(items))
        return scores, errors

    @property
    def supports_pairwise(self) -> bool:
        """Whether ``judge`` works (a subclass overrides a pairwise hook)."""
        cls = type(self)
        return (
            cls._judge_ordered is not Judge._judge_ordered
            or cls._judge_ordered_many is not Judge._judge_ordered_many
        )

    @property
    def supports_score(self) -> bool:
        """Whether ``score`` works (a subclass overrides a scoring hook)."""
        cls = type(self)
        return cls._score is not Judge._score or cls._score_many is not Judge._score_many

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    # ---- hooks for subclasses ---------------------------------------------------------------------------

    def _judge_ordered(self, prompt: str, first: str, second: str) -> Verdict:
        """Verdict with ``first`` shown as A and ``second`` as B; no swapping here."""
        raise UnsupportedJudgeOperation(f"{type(self).__name__} does not judge pairs; use score()")

    def _judge_ordered_many(self, items: list[PairItem]) -> list[Verdict]:
        """Single-order verdicts for many items; loops by default."""
        return [self._judge_ordered(p, a, b) for p, a, b in items]

    def _score(self, prompt: str, response: str) -> float:
        """Scalar reward of one response."""
        raise UnsupportedJudgeOperation(f"{type(self).__name__} does not score single responses; use judge()")

    def _score_many(self, items: list[ScoreItem]) -> list[float]:
        """Scalar rewards for many items; loops by default."""
        return [self._score(p, r) for p, r in items]


class ScoreBasedJudge(Judge):
    """A judge whose pairwise verdict compares two scalar scores (reward models, verifiers).

    Scoring each response on its own makes the verdict independent of presentation order, so the swap is
    skipped. Subclasses implement ``_score`` or ``_score_many`` and :meth:`confidence_from_margin`.
    """

    order_invariant = True

    def __init__(self, name: str | None = None, tie_margin: float = 0.0) -> None:
        super().__init__(name)
        self.tie_margin = tie_margin
        """|s_a − s_b| at or below this is a tie."""

    def confidence_from_margin(self, margin: float) -> float:
        """Confidence in the winner given |s_a − s_b| > tie_margin; subclasses define the calibration."""
        raise NotImplementedError

    def compare_scores(self, sa: float, sb: float) -> Verdict:
        """The verdict on a pair whose responses scored ``sa`` (a) and ``sb`` (b): the one rule every pairwise
        verdict of a score-based judge follows (``judge``, and ``synth.pairs``, which scores each response once).

        |sa − sb| <= tie_margin is a tie whose confidence falls linearly from 1 (equal scores) to 0 at the
        margin's edge; otherwise the higher score wins with ``confidence_from_margin(|sa − sb|)``.
        """
        details = {"score_a": sa, "score_b": sb}
        margin = abs(sa - sb)
        if margin <= self.tie_margin:
            conf = 1.0 - margin / self.tie_margin if self.tie_margin > 0 else 1.0
            return Verdict("tie", conf, f"scores within {self.tie_margin:g}", details)
        winner: Winner = "A" if sa > sb else "B"
        return Verdict(winner, self.confidence_from_margin(margin), f"score {sa:.4g} vs {sb:.4g}", details)

    def _judge_ordered_many(self, items: list[PairItem]) -> list[Verdict]:
        flat = [(p, r) for p, a, b in items for r in (a, b)]
        scores = self.score_many(flat)  # one batched pass over 2N responses
        return [self.compare_scores(scores[2 * i], scores[2 * i + 1]) for i in range(len(items))]
