"""Metric bookkeeping shared by training and evaluation: sums and counts reduced across processes (written
by :class:`preftune.runlog.MetricWriter`)."""

from __future__ import annotations

import math
from collections import defaultdict

import torch


class MetricSums:
    """Accumulates per-example metric tensors; ``means(accelerator)`` reduces over micro-batches and processes."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for key, value in metrics.items():
            value = value.detach().float()
            self.sums[key] += float(value.sum())
            self.counts[key] += value.numel()

    def means(self, accelerator=None) -> dict[str, float]:
        keys = sorted(self.sums)
        if not keys:
            return {}
        packed = torch.tensor([[self.sums[k] for k in keys], [self.counts[k] for k in keys]], dtype=torch.float64)
        if accelerator is not None and accelerator.num_processes > 1:
            packed = accelerator.reduce(packed.to(accelerator.device), reduction="sum").cpu()
        return {k: float(s / c) if c else math.nan for k, s, c in zip(keys, packed[0].tolist(), packed[1].tolist())}
