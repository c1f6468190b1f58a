"""Several reward models as one scorer: ensembles (mean, spread, uncertainty penalty) and multi-axis composites.

    ensemble of k members, scores r_1..r_k of one (prompt, response):
        mean       μ = (1/k)·Σ_j r_j
        std        σ = sqrt((1/k)·Σ_j (r_j − μ)²)           the spread (population std: the k members are the
                                                             whole ensemble, not a sample of one)
        penalized  μ − c·σ                                  ``score``: high only where the members agree
    multi-axis, axes a with scores r_a and user weights w_a:
        composite  Σ_a w_a·r_a                              ``score``; every r_a is reported too

The penalty follows the uncertainty-weighted optimisation (UWO) of Coste et al., "Reward Model Ensembles Help
Mitigate Overoptimization" (arXiv:2310.02743, version not pinned): a policy should gain little from responses
the members disagree on, where a reward model is most likely wrong. Departure: UWO subtracts λ times the
intra-ensemble *variance*; this subtracts c times the standard deviation, which stays in reward units (c reads as
"how many spreads below the mean").
Bradley–Terry fixes a reward only up to a constant, so members trained apart can disagree by an offset alone and
σ would measure offsets, not uncertainty: train them with reward centering (``loss.center_coef``, e.g. 0.01),
which pulls every member's scores to a common zero. The same holds for the axes of a composite, whose weights
only mean what they say when the axes share a scale.

Both are score-based judges: pairs compare their ``score`` (σ(margin) confidence, as a reward model), so they
work wherever a judge does (``preftune judge --judge``, ``type: reward_ensemble`` / ``type: multi_axis``).
``details`` / ``details_many`` return the breakdown. ``preftune.reward.train_ensemble`` trains the members
(and writes the ``ensemble.json`` that :func:`ensemble_paths` reads).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from preftune.judges.base import Judge, ScoreBasedJudge, ScoreItem

MANIFEST = "ensemble.json"


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _as_judge(member: Judge | str | Path, **kwargs: Any) -> Judge:
    """A judge as given, or a reward model loaded from a path or hub id (``RewardModelJudge``)."""
    if isinstance(member, Judge):
        return member
    from preftune.judges.reward_model import RewardModelJudge

    return RewardModelJudge(str(member), **kwargs)


def _unique(names: list[str]) -> list[str]:
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


class RewardEnsemble(ScoreBasedJudge):
    """k reward models as one: mean, spread and the uncertainty-penalised score μ − c·σ (module docstring).

    Args:
        members: judges that score (``RewardModelJudge``, verifiers, ...), or paths / hub ids of reward models,
            or a directory written by :func:`train_ensemble` (its ``ensemble.json`` lists the members).
        penalty: c in μ − c·σ (0: the plain mean).
        tie_margin: |score_a − score_b| at or below this is a tie.
        name: label in reports.
        **member_kwargs: passed to ``RewardModelJudge`` for members given as paths (batch_size, device, ...).
    """

    def __init__(self, members: Sequence[Judge | str | Path] | str | Path, penalty: float = 1.0,
                 tie_margin: float = 0.0, name: str | None = None, **member_kwargs: Any) -> None:
        super().__init__(name or "reward_ensemble", tie_margin)
        if isinstance(members, (str, Path)):
            members = ensemble_paths(members)
        if not members:
            raise ValueError("a reward ensemble needs at least one member")
        if penalty < 0:
            raise ValueError(f"penalty must be >= 0, got {penalty}")
        self.members = [_as_judge(m, **member_kwargs) for m in members]
        self.member_names = _unique([m.name for m in self.members])
        self.penalty = float(penalty)

    def confidence_from_margin(self, margin: float) -> float:
        """σ(|s_a − s_b|): the Bradley–Terry probability of the higher-scored response, as a reward model."""
        return _sigmoid(margin)

    def details_many(self, items: Sequence[ScoreItem]) -> list[dict[str, Any]]:
        """``{"mean", "std", "penalized", "members": {name: score}}`` for each (prompt, response)."""
        items = [tuple(it) for it in items]
        per_member = [m.score_many(items) for m in self.members]  # k lists of len(items)
        out = []
        for i in range(len(items)):
            scores = [s[i] for s in per_member]
            mean = sum(scores) / len(scores)
            std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
            out.append({"mean": mean, "std": std, "penalized": mean - self.penalty * std,
                        "members": dict(zip(self.member_names, scores))})
        return out

    def details(self, prompt: str, response: str) -> dict[str, Any]:
        """Mean, spread, penalised score and every member's score for one response."""
        return self.details_many([(prompt, response)])[0]

    def _score_many(self, items: list[ScoreItem]) -> list[float]:
        return [d["penalized"] for d in self.details_many(items)]


class MultiAxisReward(ScoreBasedJudge):
    """Several reward models, one per axis (e.g. helpful, harmless), combined as Σ_a w_a·r_a.

    Args:
        axes: ``{axis: (judge, weight)}``; a judge may be given as a reward model's path or hub id. Weights are
            used as given (a weighted sum; weights summing to 1 make it a weighted mean); a negative weight
            penalises an axis.
        tie_margin: |composite_a − composite_b| at or below this is a tie.
        name: label in reports.
        **member_kwargs: passed to ``RewardModelJudge`` for axes given as paths.
    """

    def __init__(self, axes: Mapping[str, tuple[Judge | str | Path, float]], tie_margin: float = 0.0,
                 name: str | None = None, **member_kwargs: Any) -> None:
        super().__init__(name or "multi_axis", tie_margin)
        if not axes:
            raise ValueError("a multi-axis reward needs at least one axis")
        self.axes = {a: _as_judge(j, **member_kwargs) for a, (j, _) in axes.items()}
        self.weights = {a: float(w) for a, (_, w) in axes.items()}
        if not any(self.weights.values()):
            raise ValueError("multi-axis weights are all zero")

    def confidence_from_margin(self, margin: float) -> float:
        """σ(|s_a − s_b|), as a reward model (the composite is in reward units when the axes are)."""
        return _sigmoid(margin)

    def details_many(self, items: Sequence[ScoreItem]) -> list[dict[str, Any]]:
        """``{"composite", "axes": {axis: score}, "weights": {axis: weight}}`` for each (prompt, response)."""
        items = [tuple(it) for it in items]
        per_axis = {a: j.score_many(items) for a, j in self.axes.items()}
        out = []
        for i in range(len(items)):
            scores = {a: s[i] for a, s in per_axis.items()}
            out.append({"composite": sum(self.weights[a] * s for a, s in scores.items()), "axes": scores,
                        "weights": dict(self.weights)})
        return out

    def details(self, prompt: str, response: str) -> dict[str, Any]:
        """The composite score and every axis's score for one response."""
        return self.details_many([(prompt, response)])[0]

    def _score_many(self, items: list[ScoreItem]) -> list[float]:
        return [d["composite"] for d in self.details_many(items)]


def ensemble_paths(directory: str | Path) -> list[str]:
    """The member model paths listed in ``directory/ensemble.json`` (written by :func:`train_ensemble`)."""
    manifest = Path(directory) / MANIFEST
    if not manifest.exists():
        raise ValueError(f"{directory}: no {MANIFEST} (written by train_ensemble); list the members instead")
    return [m["path"] for m in json.loads(manifest.read_text())["members"]]
