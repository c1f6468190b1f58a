"""Metric bookkeeping shared by training and evaluation: sums and counts reduced across processes, then
written to ``metrics.jsonl`` (the single source every report is drawn from) and TensorBoard."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

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


class MetricWriter:
    """Appends one JSON object per record to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, append: bool = False):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.file = open(self.path, "a" if append else "w", encoding="utf-8")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, split: str, values: dict) -> None:
        record = {"step": step, "split": split, **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{split}/{key}", value, step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
