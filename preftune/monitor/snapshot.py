"""The reference's weights on disk, to score the monitor's samples when no reference model stays in memory.

Full fine-tuning with precomputed reference log-probs keeps no reference weights: precomputing exists so that
no second copy of the model is held while training. KL to the reference still needs reference log-probs of the
policy's *own* samples at each evaluation. So, once before the first step, every parameter and buffer of the
reference (the policy itself then, or a separate ``reference.model`` before it is freed) is written to
``run_dir/.reference-weights.pt``. At an evaluation the file is memory-mapped (nothing is read until used) and
the module is run with those tensors in place of its own (``torch.func.functional_call``), so there is no
second model object and, between evaluations, no second copy of the weights in memory. The file is removed
when the run finishes.

Measured (``benchmarks/kl_snapshot.py``; docs/monitoring.md has the table): writing is once per run (3.3 s for
a 135M model's 513 MiB on the development machine); per evaluation the mapping costs 11-75 ms and the reference
scoring pass what it costs with a reference in memory. On CPU the weights are read straight from the page
cache; on GPU they are copied to the device for the pass (one model's worth of device memory during the
evaluation only). Chosen over a CPU copy of the state dict (as fast per evaluation) because that copy would hold
the weights' size in memory for the whole run.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

SNAPSHOT_FILE = ".reference-weights.pt"


class WeightSnapshot:
    """``module``'s parameters and buffers as they are now, saved to ``path``.

    Args:
        module: the reference (the policy before its first step, or a separate frozen reference model).
        path: the file to write.
        free: after saving, move ``module`` to the meta device (a separate reference that nothing else
            uses): its memory is released and it stays as the skeleton the weights are run in.
    """

    def __init__(self, module: nn.Module, path: Path, free: bool = False):
        self.module, self.path = module, Path(path)
        first = next(module.parameters())
        self.device = first.device
        tensors = {n: t.detach().cpu() for n, t in [*module.named_parameters(), *module.named_buffers()]}
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(tensors, tmp)
        os.replace(tmp, self.path)  # never a half-written snapshot under the final name
        self.bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if free:
            module.to("meta")

    @contextlib.contextmanager
    def model(self):
        """The reference as a callable model (``model(input_ids=..., attention_mask=...)``), for one pass."""
        weights = torch.load(self.path, mmap=True, weights_only=True, map_location="cpu")
        if self.device.type != "cpu":
            weights = {k: v.to(self.device, non_blocking=True) for k, v in weights.items()}
        try:
            yield AtWeights(self.module, weights, self.device)
        finally:
            del weights

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


class AtWeights:
    """``module`` run with ``weights`` (every parameter and buffer, by name) in place of its own.

    It has the few model methods the scoring code calls (``parameters`` for the device, ``train`` / ``eval``,
    ``training``, the forward); the naive equivalent is a deep copy of ``module`` with ``load_state_dict``.
    """

    def __init__(self, module: nn.Module, weights: dict[str, torch.Tensor], device: torch.device):
        self.module, self.weights, self.device = module, weights, device

    @property
    def training(self) -> bool:
        return self.module.training

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def parameters(self):
        return iter(self.weights.values())

    def __call__(self, *args, **kwargs):
        # strict: a parameter missing from the snapshot would silently run with the trained value
        return torch.func.functional_call(self.module, self.weights, args, kwargs, strict=True)
