"""Scores of a model against a reference on held-out prompts, and the statistics the drivers report.

:func:`score_model` is what a sweep trial and an iterate round measure:

    win_rate, lc_win_rate   the model's greedy responses against the reference's through a judge (pairwise
                            judges are asked both orders, a disagreement is a tie), W + T/2 over n; the
                            length-controlled figure of ``preftune.eval.win_rate``
    kl, kl_k1               KL(π ‖ π_ref) in nats per sequence on responses sampled from the model at
                            temperature 1: k3 = Σ_t (exp(−r_t) − 1) + r_t and k1 = Σ_t r_t, r_t = log π − log π_ref
                            (``preftune.eval.drift.kl_estimates``)
    perplexity              coherence: the model's greedy responses under the reference (see :func:`perplexity`)
    distinct_1/2, repetition, length
                            of the greedy responses (``drift.generation_stats``; length without the EOS token)
    eos_rate                greedy responses that ended with an end-of-sequence token (:func:`eos_rate`)
    model_score, reference_score
                            the judge's mean score of each side's greedy responses, when the judge scores
                            single responses (a verifier: the share accepted)

The pure functions below (perplexity, EOS rate, Pareto front, bootstrap interval, objective direction) are
tested with hand-worked numbers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from preftune.tune import adapter

MINIMIZED = ("kl", "kl_k1", "perplexity", "repetition", "length")
"""Scores where lower is better (``sweep.direction: auto``)."""
SCORE_KEYS = ("win_rate", "lc_win_rate", "kl", "kl_k1", "perplexity", "distinct_1", "distinct_2", "repetition",
              "eos_rate", "length", "reference_length", "model_score", "reference_score")


def perplexity(token_logps: Sequence[Sequence[float]]) -> float:
    """PPL = exp(−(1/N) Σ_i Σ_t log p(y_i,t | x_i, y_i,<t)),  N = Σ_i |y_i|  (tokens pooled over sequences).

    ``token_logps``: per sequence, the log-probs of its tokens under the scoring model. NaN when N = 0.
    Example: sequences [log 0.5, log 0.5] and [log 0.25] give N = 3, mean −(2 log 2 + 2 log 2)/3 =
    −(4/3) log 2, PPL = 2^(4/3) = 2.52.
    """
    total, n = 0.0, 0
    for seq in token_logps:
        values = [float(v) for v in seq]
        total += sum(values)
        n += len(values)
    return math.exp(-total / n) if n else math.nan


def eos_rate(seqs: Sequence[Sequence[int]], eos_ids: set[int]) -> float:
    """(1/n) Σ_i [y_i ends with an end-of-sequence token]: the share of responses that stopped on their own
    rather than at ``max_new_tokens``. NaN when n = 0."""
    if not seqs:
        return math.nan
    return sum(1 for s in seqs if s and s[-1] in eos_ids) / len(seqs)


def direction(objective: str, setting: str = "auto") -> str:
    """``maximize`` or ``minimize`` for an objective score (auto: minimize the scores in :data:`MINIMIZED`)."""
    if setting != "auto":
        return setting
    return "minimize" if objective in MINIMIZED else "maximize"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated (kl, win_rate) points: lower KL and higher win rate are better.

    Point i is dominated when some j has kl_j <= kl_i and win_j >= win_i, one of them strictly. Returned in
    increasing KL. Example: (1, 0.6), (2, 0.7), (2, 0.5), (3, 0.7) -> [0, 1] ((2, 0.5) is dominated by (1, 0.6);
    (3, 0.7) by (2, 0.7)).
    """
    front = []
    for i, (xi, yi) in enumerate(points):
        dominated = any(xj <= xi and yj >= yi and (xj < xi or yj > yi) for j, (xj, yj) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def bootstrap_ci(values: Sequence[float], *, level: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (Efron & Tibshirani 1993, ch. 13).

    B resamples of n values drawn with replacement; the interval is the (1−level)/2 and (1+level)/2 quantiles
    of the B resample means (linear interpolation between order statistics). Deterministic for a seed.
    All-equal values give the degenerate interval (v, v). NaN bounds when n = 0.
    """
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return _quantile(means, (1 - level) / 2), _quantile(means, (1 + level) / 2)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def greedy_responses(model, tokenizer, prompt_ids: Sequence[list[int]], *, max_new_tokens: int,
                     pad_id: int | None = None, eos_ids: set[int] | None = None, seed: int = 0,
                     batch_size: int = 32) -> tuple[list[list[int]], list[str], list[int]]:
    """(completion ids with their EOS, decoded texts, lengths without EOS) of greedy responses to the prompts."""
    eos = adapter.end_ids(model, tokenizer) if eos_ids is None else eos_ids
    ids = adapter.generate_ids(model, prompt_ids, temperature=0.0, max_new_tokens=max_new_tokens,
                               pad_id=_pad_id(tokenizer) if pad_id is None else pad_id, eos_ids=eos, seed=seed,
                               batch_size=batch_size)
    return (ids, [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids],
            [len([t for t in x if t not in eos]) for x in ids])


def score_model(policy, reference, tokenizer, prompts: Sequence[Any], judge, *, max_new_tokens: int = 64,
                seed: int = 0, batch_size: int = 32, kl: bool = True) -> dict:
    """The scores of the module docstring for ``policy`` against ``reference`` on ``prompts`` (text or messages).

    Returns the flat scores plus ``prompts``, ``wins`` / ``losses`` / ``ties``, ``length_coef`` and the first
    ``samples`` (prompt, model, reference). ``kl=False`` skips the sampled generations (win rate only).
    """
    prompt_ids = adapter.encode_prompts(tokenizer, prompts)
    texts = [adapter.prompt_text(p) for p in prompts]
    pad = _pad_id(tokenizer)
    eos = adapter.end_ids(policy, tokenizer)
    gen = {"max_new_tokens": max_new_tokens, "pad_id": pad, "eos_ids": eos, "seed": seed, "batch_size": batch_size}
    judge.position_stats.reset()
    pol_ids, pol_text, pol_len = greedy_responses(policy, tokenizer, prompt_ids, **gen)
    _, ref_text, ref_len = greedy_responses(reference, tokenizer, prompt_ids, **gen)
    verdicts = judge.judge_many(list(zip(texts, pol_text, ref_text)))
    wr = adapter.win_rate([v.winner for v in verdicts], pol_len, ref_len)
    stats = adapter.generation_stats(pol_ids, eos)
    out: dict[str, Any] = {
        "prompts": len(prompts), "wins": wr["wins"], "losses": wr["losses"], "ties": wr["ties"],
        "win_rate": wr["win_rate"], "lc_win_rate": wr["lc_win_rate"], "length_coef": wr["length_coef"],
        "perplexity": perplexity(adapter.token_logps(reference, prompt_ids, pol_ids, pad)),
        "distinct_1": stats["distinct_1"], "distinct_2": stats["distinct_2"], "repetition": stats["repetition"],
        "eos_rate": eos_rate(pol_ids, eos), "length": stats["length"], "reference_length": _mean(ref_len),
    }
    if kl:
        sampled = adapter.generate_ids(policy, prompt_ids, temperature=1.0, **gen)
        est = adapter.kl_estimates(adapter.token_logps(policy, prompt_ids, sampled, pad),
                                   adapter.token_logps(reference, prompt_ids, sampled, pad))
        out["kl"], out["kl_k1"] = est["kl/k3_seq"], est["kl/k1_seq"]
    if judge.supports_score:
        out["model_score"] = _mean(judge.score_many(list(zip(texts, pol_text))))
        out["reference_score"] = _mean(judge.score_many(list(zip(texts, ref_text))))
    if not judge.order_invariant:
        out["position_bias"] = judge.position_stats.as_dict()
    out["samples"] = [{"prompt": t, "model": a, "reference": b, "verdict": v.winner}
                      for t, a, b, v in list(zip(texts, pol_text, ref_text, verdicts))[:5]]
    return out
