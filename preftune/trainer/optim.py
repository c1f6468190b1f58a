"""AdamW (with fp32 master weights for low-precision models) and the warmup + decay schedule."""

from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, cfg, learning_rates: dict | None = None) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and norms (1-D tensors).

    ``learning_rates``: {submodule: peak learning rate} for parts that train at their own rate (PPO's critic);
    the schedule scales every rate alike. The rest trains at ``cfg.learning_rate``. Trainable weights in bf16 /
    fp16 (``model_dtype``) get fp32 master copies (:class:`MasterAdamW`) unless ``cfg.master_weights`` is False.
    """
    own = {id(p): lr for module, lr in (learning_rates or {}).items() for p in module.parameters()}
    groups = []
    for lr in dict.fromkeys([cfg.learning_rate, *own.values()]):
        params = [p for p in model.parameters() if p.requires_grad and own.get(id(p), cfg.learning_rate) == lr]
        extra = {} if lr == cfg.learning_rate else {"lr": lr}
        groups += [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay, **extra},
                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, **extra}]
    low = any(p.dtype in (torch.bfloat16, torch.float16) for g in groups for p in g["params"])
    kind = MasterAdamW if low and getattr(cfg, "master_weights", True) else AdamW
    # foreach=False: the multi-tensor path holds a temporary copy of every state, a memory peak we avoid.
    return kind(groups, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), foreach=False)


def _one_process() -> bool:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not (distributed and torch.distributed.get_world_size() > 1)


class AdamW(torch.optim.AdamW):
    """torch's AdamW (the same update, bit for bit), with its memory allocated once, before the first forward.

    torch creates the moments lazily at the first step and, with ``zero_grad(set_to_none=True)``, frees every
    gradient after each step and lets backward allocate new ones. Those long-lived buffers (gradients: one
    model size; moments: two) then land between the holes that the micro-batch's freed activations leave, at
    a new place every step; with the heap kept for reuse (``engine.reuse_freed_memory``) the holes are never
    returned, and on the 135M benchmark 1.2-2.5 GB of the heap was free but mapped by the second step
    (``benchmarks/memory_breakdown.py``). Here the gradients (zeros) and the moments are allocated at
    construction and kept: ``zero_grad`` zeroes the gradients in place, whatever ``set_to_none`` says, and the
    next backward accumulates into them (0 + g = g exactly, so the window's sum is the same). A parameter that
    got no gradient in a window (a hook marks the ones that did) is left out of the step, as a None gradient
    would be: no weight decay, no moment decay. More than one process (DDP): torch's lazy behaviour, unchanged.
    """

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.steady = _one_process()
        self._touched: set[int] = set()  # ids of the gradient holders that received a gradient this window
        self._idle: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.register_step_pre_hook(lambda *a: self._before_step())
        self.register_step_post_hook(lambda *a: self._after_step())
        self._marks = [p.register_post_accumulate_grad_hook(self._touch) for p in self._holders()
                       if self.steady and p.is_leaf and p.requires_grad]
        if self.steady:
            self._allocate()

    def _holders(self) -> list[torch.Tensor]:
        """The tensors whose ``.grad`` the step reads (the optimizer's parameters)."""
        return [p for g in self.param_groups for p in g["params"]]

    def _touch(self, p: torch.Tensor) -> None:
        self._touched.add(id(p))

    @torch.no_grad()
    def _allocate(self) -> None:
        """Zero gradients and the moments (torch's own lazy initialisation, run now), in that order."""
        for p in self._holders():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for g in self.param_groups:
            self._init_group(g, [], [], [], [], [], [])

    # step() stays torch's: a subclass's step calling super().step() would run the step hooks twice once torch's
    # own AdamW has been patched with them; these two hooks come first among the instance's hooks instead.
    @torch.no_grad()
    def _before_step(self, *_) -> None:
        """Hold back the gradient buffers of the holders that got none this window: torch skips them."""
        self._idle = [(p, p.grad) for p in self._holders()
                      if self.steady and p.grad is not None and id(p) not in self._touched]
        for p, _ in self._idle:
            p.grad = None

    @torch.no_grad()
    def _after_step(self, *_) -> None:
        for p, grad in self._idle:
            p.grad = grad
        self._idle = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not self.steady:
            return super().zero_grad(set_to_none)
        for p in self._holders():
            if p.grad is not None:
                p.grad.zero_()
        self._touched.clear()
        return None


class MasterAdamW(AdamW):
    """AdamW on fp32 master copies of low-precision weights: the model computes in bf16 / fp16, the update
    happens in fp32, and the result is written back rounded to the weight's dtype.

    Per step, for a model weight w (bf16) with master m (fp32) and the bf16 gradients g_1..g_k of the window's
    k micro-batches::

        m.grad = sum_i float(g_i)  (in fp32);  m <- AdamW(m, m.grad)  (moments in fp32);  w <- round_bf16(m)

    The window's sum is taken in fp32: a hook on each weight (``register_post_accumulate_grad_hook``) adds
    float(w.grad) into m.grad after every backward and frees w.grad, so no bf16 gradient outlives its micro-batch
    and the sum is not rounded to 8 bits after each addition (summing 4 micro-batches in bf16 loses up to 2 bits
    of every gradient). ``gradient_params()`` gives the tensors that hold the gradients (the masters, for
    clipping). Under DDP (more than one process) the hooks would run before the gradients are all-reduced, so
    there the bf16 ``w.grad`` accumulates as before and is cast to fp32 at the step. The masters' gradients and
    moments are allocated once, as in :class:`AdamW`.

    Without masters an update |Δ| below half the bf16 spacing at w (2^-8·|w| for |w| in [1, 2)) rounds away
    every step; the master accumulates it until the rounded weight moves (the test shows it at w = 1, Δ = 1e-3).
    fp32 weights in the same groups (LoRA adapters, norms kept in fp32) are their own masters. The masters and
    moments are part of ``state_dict``, so a resumed run continues from the same fp32 values.
    """

    def __init__(self, params, **kwargs):
        groups = [dict(g) for g in params] if isinstance(params, (list, tuple)) and params and isinstance(
            params[0], dict) else [{"params": list(params)}]
        self._pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []  # (model weight, its fp32 master)
        for g in groups:
            masters = []
            for p in g["params"]:
                if p.dtype == torch.float32:
                    masters.append(p)
                    continue
                m = p.detach().float().clone().requires_grad_(True)
                self._pairs.append((p, m))
                masters.append(m)
            g["params"] = masters
        super().__init__(groups, **kwargs)
        self.accumulates_fp32 = self.steady
        self._hooks = [p.register_post_accumulate_grad_hook(self._accumulate_into(m)) for p, m in self._pairs
                       ] if self.accumulates_fp32 else []

    def _accumulate_into(self, master: torch.Tensor):
        """The post-accumulate-grad hook of one low-precision weight: its micro-batch gradient, added in fp32
        into ``master.grad``, then freed."""

        @torch.no_grad()
        def hook(p: torch.Tensor) -> None:
            _add_fp32(master, p)
            self._touch(master)

        return hook

    def gradient_params(self, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        """``params`` with each low-precision weight replaced by its master: the tensors whose ``.grad`` holds
        the window's gradient (what clipping must scale)."""
        if not self.accumulates_fp32:
            return list(params)
        master = {id(p): m for p, m in self._pairs}
        return [master.get(id(p), p) for p in params]

    @torch.no_grad()
    def _before_step(self, *_) -> None:
        for p, m in self._pairs:  # a gradient still on the weight (DDP, or set by hand): into the fp32 sum
            if p.grad is not None:
                _add_fp32(m, p)
                self._touch(m)
        super()._before_step()

    @torch.no_grad()
    def _after_step(self, *_) -> None:
        super()._after_step()
        for p, m in self._pairs:
            p.copy_(m)  # round to nearest into the weight's dtype
            if not self.steady:
                m.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)  # the masters' fp32 sums
        for p, _ in self._pairs:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["masters"] = [m.detach().clone() for _, m in self._pairs]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("masters", None)
        super().load_state_dict(state_dict)
        if masters is not None:
            with torch.no_grad():
                for (p, m), saved in zip(self._pairs, masters, strict=True):
                    m.copy_(saved)
                    p.copy_(saved)


def _add_fp32(master: torch.Tensor, p: torch.Tensor) -> None:
    """``master.grad += float(p.grad)`` (fp32 += bf16: the sum is rounded to fp32, not to bf16), then
    ``p.grad`` freed."""
    if master.grad is None:
        master.grad = p.grad.float()
    else:
        master.grad.add_(p.grad)
    p.grad = None


def build_scheduler(optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup_ratio`` of the steps, then linear, cosine or constant to the end."""
    warmup = int(math.ceil(cfg.warmup_ratio * total_steps))
    kind = cfg.lr_scheduler

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
