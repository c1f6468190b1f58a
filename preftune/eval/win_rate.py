"""Win rate of the model's generations against the reference's, raw and length-controlled.

Every prompt gives one verdict from a :class:`~preftune.judges.Judge` on (prompt, model response, reference
response); pairwise judges are asked both orders and a disagreement is a tie (``Judge.judge_many``). With W
wins, L losses and T ties over n prompts:

    win_rate = (W + T/2) / n

**Length-controlled win rate** (a simplified AlpacaEval-LC, Dubois et al., arXiv:2404.04475v2, Sec. 3): a
logistic regression of the outcome y ∈ {1, ½, 0} (win, tie, loss) on the normalized length difference

    P(win | Δ) = σ(a + b·x),   x = tanh(Δ / sd(Δ)),   Δ = len(model) − len(reference) in tokens

fitted by Newton's method on the cross-entropy with fractional targets, lightly L2-regularized (λ = 0.01 on a
and b, so the fit exists when outcomes are separable). The length-controlled win rate is σ(a): the predicted
win rate at equal lengths. ``b`` > 0 says longer answers win more often. Departures from AlpacaEval: no
per-instruction difficulty term and no baseline-model term (one reference, one model); all-equal outcomes give
back the raw win rate (length cannot explain anything then).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def length_controlled(outcomes: Sequence[float], length_diff: Sequence[float], lam: float = 0.01,
                      iterations: int = 50) -> dict[str, float]:
    """Fit σ(a + b·tanh(Δ/sd)) to ``outcomes`` (1, 0.5, 0); returns ``lc_win_rate`` = σ(a), ``a``, ``b``, ``sd``."""
    n = len(outcomes)
    if n == 0:
        return {"lc_win_rate": math.nan, "a": math.nan, "b": math.nan, "sd": math.nan}
    mean_d = sum(length_diff) / n
    sd = math.sqrt(sum((d - mean_d) ** 2 for d in length_diff) / n) or 1.0
    x = [math.tanh(d / sd) for d in length_diff]
    if len(set(outcomes)) == 1:
        return {"lc_win_rate": float(outcomes[0]), "a": math.nan, "b": 0.0, "sd": sd}
    a = b = 0.0
    for _ in range(iterations):
        ga, gb = -lam * a, -lam * b  # gradient of the regularized log-likelihood
        haa, hab, hbb = lam, 0.0, lam  # negative Hessian
        for y, xi in zip(outcomes, x):
            p = _sigmoid(a + b * xi)
            ga += y - p
            gb += (y - p) * xi
            w = p * (1 - p)
            haa, hab, hbb = haa + w, hab + w * xi, hbb + w * xi * xi
        det = haa * hbb - hab * hab
        da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        a, b = a + da, b + db
        if abs(da) + abs(db) < 1e-10:
            break
    return {"lc_win_rate": _sigmoid(a), "a": a, "b": b, "sd": sd}


def win_rate(verdicts: Sequence[str], model_lengths: Sequence[int], reference_lengths: Sequence[int]) -> dict:
    """Raw and length-controlled win rate from verdicts "A" (model wins), "B" (reference wins) or "tie"."""
    outcomes = [{"A": 1.0, "B": 0.0, "tie": 0.5}[v] for v in verdicts]
    n = len(outcomes)
    wins, losses = verdicts.count("A"), verdicts.count("B")
    lc = length_controlled(outcomes, [m - r for m, r in zip(model_lengths, reference_lengths)])
    return {
        "prompts": n, "wins": wins, "losses": losses, "ties": n - wins - losses,
        "win_rate": sum(outcomes) / n if n else math.nan,
        "lc_win_rate": lc["lc_win_rate"], "length_coef": lc["b"],
        "mean_length_diff": sum(m - r for m, r in zip(model_lengths, reference_lengths)) / n if n else math.nan,
    }
