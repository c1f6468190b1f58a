"""The bf16 copies of the weights, cast once per optimizer step instead of once per micro-batch.

``torch.autocast`` caches the bf16 copy of every fp32 leaf weight it casts, but drops the cache when the outermost
autocast region closes: with one region per micro-batch, each of the ``gradient_accumulation_steps`` micro-batches
casts every weight again (and the LM head, which :mod:`preftune.logprobs` casts itself, twice: forward and
backward). :class:`CastWindow` spans one accumulation window:

- an outer autocast region, *disabled*, holds autocast's nesting above zero, so the cache survives from one
  micro-batch to the next; each forward still runs in its own bf16 region (:meth:`CastWindow.forward`), and
  everything else (the source, the loss reduction, backward) runs outside autocast exactly as before;
- :func:`preftune.logprobs.head_casts` keeps the head's bf16 copy for the same window.

Same math: a cached copy is the same bf16 rounding of the same fp32 weights, and the weight gradients still flow
through each copy's cast back into the fp32 ``.grad`` (autograd's cast node saves nothing, so every micro-batch's
backward may pass through it). The window closes, dropping both caches, before the optimizer changes the weights:
a copy never outlives the weights it was cast from. Off for fp32 (nothing to cast) and for sharded engines: FSDP
would keep every gathered weight's copy alive between micro-batches, and DeepSpeed steps the optimizer inside the
last backward.
"""

from __future__ import annotations

import contextlib

import torch

from preftune.logprobs import head_casts


class CastWindow:
    """The context of one accumulation window; ``forward()`` the context of each micro-batch's forward.

    ``enabled`` False: ``forward()`` is a plain per-micro-batch autocast region (the casts redone every time).
    """

    def __init__(self, autocast, device_type: str, enabled: bool):
        self.autocast, self.device_type, self.enabled = autocast, device_type, enabled
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> CastWindow:
        if self.enabled:
            self._stack = contextlib.ExitStack()
            self._stack.enter_context(torch.autocast(self.device_type, enabled=False))  # the cache's lifetime
            self._stack.enter_context(head_casts())
        return self

    def __exit__(self, *exc) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None
            torch.clear_autocast_cache()  # also when train() itself runs inside someone's autocast region

    def forward(self):
        return self.autocast()


def cast_window(run) -> CastWindow:
    """The window of ``run``'s next optimizer step: enabled by ``engine.cast_once`` (off by default) under bf16 on an
    unsharded engine; otherwise each forward has its own autocast region, as before."""
    bf16 = run.cfg.training.precision == "bf16"
    return CastWindow(run.autocast, run.accelerator.device.type,
                      bf16 and run.cfg.engine.cast_once and not run.parallel.sharded)
