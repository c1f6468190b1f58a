"""AdamW and the warmup + decay schedule."""

from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, cfg, learning_rates: dict | None = None) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and norms (1-D tensors).

    ``learning_rates``: {submodule: peak learning rate} for parts that train at their own rate (PPO's critic);
    the schedule scales every rate alike. The rest trains at ``cfg.learning_rate``.
    """
    own = {id(p): lr for module, lr in (learning_rates or {}).items() for p in module.parameters()}
    groups = []
    for lr in dict.fromkeys([cfg.learning_rate, *own.values()]):
        params = [p for p in model.parameters() if p.requires_grad and own.get(id(p), cfg.learning_rate) == lr]
        extra = {} if lr == cfg.learning_rate else {"lr": lr}
        groups += [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay, **extra},
                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, **extra}]
    # foreach=False: the multi-tensor path holds a temporary copy of every state, a memory peak we avoid.
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), foreach=False)


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
