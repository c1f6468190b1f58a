"""The length-bias check, once: how often chosen is the longer response, for ``data validate`` (a dataset) and
``preftune judge`` (the pairs a judge kept).

    share = chosen longer / pairs          equal lengths count in the denominator
    biased = share > threshold             (default 0.65: the model would learn verbosity)

Lengths are whitespace words of the normalized text (:func:`preftune.data.text.word_count`) or, with a
tokenizer, tokens without special tokens (:func:`token_counts`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

WORDS = "whitespace words"


def token_counts(tokenizer: Any, texts: list[str]) -> list[int]:
    """Token count of each text, in one batched call, without special tokens."""
    if not texts:
        return []
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return [len(x) for x in ids]


def histogram(diff: np.ndarray, bins: int = 40) -> dict[str, Any]:
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


@dataclass
class LengthBias:
    """Length statistics of pairs; ``chosen_longer`` of ``pairs`` is the share that decides ``biased``."""

    unit: str
    pairs: int
    chosen_longer: int
    rejected_longer: int
    mean_difference: float
    """Mean of len(chosen) − len(rejected)."""
    median_difference: float
    chosen_mean: float
    rejected_mean: float
    threshold: float = 0.65
    prompt_mean: float | None = None
    histogram: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def ties(self) -> int:
        return self.pairs - self.chosen_longer - self.rejected_longer

    @property
    def share_chosen_longer(self) -> float:
        return self.chosen_longer / self.pairs if self.pairs else 0.0

    @property
    def biased(self) -> bool:
        return self.pairs > 0 and self.share_chosen_longer > self.threshold

    def message(self) -> str:
        """The one-line finding of ``data validate``."""
        text = (f"chosen longer in {100 * self.share_chosen_longer:.1f}% of pairs; difference chosen - rejected: "
                f"mean {self.mean_difference:+.1f}, median {self.median_difference:+g} {self.unit}")
        if self.biased:
            text += f" (> {100 * self.threshold:g}%: the model would learn verbosity)"
        return text

    def summary(self) -> str:
        """What ``preftune judge`` prints: the numbers, then a warning line when biased."""
        if not self.pairs:
            return "length bias: no pairs"
        text = (f"length bias: chosen longer in {100 * self.share_chosen_longer:.1f}% of {self.pairs} pairs "
                f"(rejected longer {self.rejected_longer}, equal {self.ties}); "
                f"mean difference chosen - rejected {self.mean_difference:+.2f} {self.unit}")
        if self.biased:
            text += (f"\nwarning: the judge prefers the longer response in more than {100 * self.threshold:g}% "
                     "of pairs; training on these pairs would teach verbosity")
        return text

    def to_dict(self, *, with_histogram: bool = False) -> dict[str, Any]:
        out = {"unit": self.unit, "pairs": self.pairs, "chosen_longer": self.chosen_longer,
               "rejected_longer": self.rejected_longer, "ties": self.ties,
               "share_chosen_longer": round(self.share_chosen_longer, 6),
               "mean_difference": self.mean_difference, "median_difference": self.median_difference,
               "chosen_mean": self.chosen_mean, "rejected_mean": self.rejected_mean, "threshold": self.threshold,
               "biased": self.biased}
        if self.prompt_mean is not None:
            out["prompt_mean"] = self.prompt_mean
        if with_histogram and self.histogram is not None:
            out["histogram"] = self.histogram
        return out


def length_bias(chosen: Sequence[int] | np.ndarray, rejected: Sequence[int] | np.ndarray, *, unit: str = WORDS,
                threshold: float = 0.65, prompt: Sequence[int] | np.ndarray | None = None) -> LengthBias:
    """Length bias of pairs from their chosen and rejected lengths (same order; ``prompt`` lengths optional)."""
    lc = np.asarray(chosen, dtype=np.int64)  # (N,)
    lr = np.asarray(rejected, dtype=np.int64)  # (N,)
    n = int(lc.size)
    if n == 0:
        return LengthBias(unit, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, threshold)
    diff = lc - lr  # (N,)
    return LengthBias(
        unit=unit, pairs=n, chosen_longer=int((diff > 0).sum()), rejected_longer=int((diff < 0).sum()),
        mean_difference=round(float(diff.mean()), 4), median_difference=float(np.median(diff)),
        chosen_mean=round(float(lc.mean()), 4), rejected_mean=round(float(lr.mean()), 4), threshold=threshold,
        prompt_mean=None if prompt is None else round(float(np.asarray(prompt, dtype=np.int64).mean()), 4),
        histogram=histogram(diff))
