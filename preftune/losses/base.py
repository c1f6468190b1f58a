"""The loss contract: what a loss returns, what it needs, and the registry the loop asks.

A loss is a pure function over per-sequence log-probs (torch only). It returns per-example losses of
shape (B,), never reduced (the caller reduces), plus detached rewards for logging. The trainer never matches
loss names: it reads the :class:`LossSpec` registered under the name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch


@dataclass
class LossOutput:
    """Per-example losses and detached rewards.

    Attributes:
        losses: (B,) per-example loss, not reduced.
        chosen_rewards: (B,) detached implicit reward of chosen (paired losses).
        rejected_rewards: (B,) detached implicit reward of rejected (paired losses).
        rewards: (B,) detached implicit reward of each completion (unpaired losses).
        metrics: extra detached per-example tensors, each (B,), logged under their key (e.g. ``nll_loss``).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor | None = None
    rejected_rewards: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class LossSpec:
    """What the loop must compute for a loss.

    Attributes:
        name: registry name (``loss.name`` in the config).
        fn: the pure loss function.
        needs_reference: whether reference log-probs are inputs; when False no reference model is ever loaded.
        data: ``"paired"`` (prompt, chosen, rejected), ``"unpaired"`` (prompt, completion, label), ``"sft"``
            (prompt, completion; the chosen side of paired data also works) or ``"reward"`` (pairs scored by a
            sequence-classification head: the function takes scores, not log-probs).
        reduction: how token log-probs become a sequence log-prob: ``"sum"`` or ``"mean"`` over completion tokens.
            Losses that length-normalize inside (SimPO, ORPO) take ``"sum"`` plus lengths and say so.
        needs_lengths: whether the function takes ``chosen_lengths`` / ``rejected_lengths`` (token counts).
        hyperparameters: names of the keyword hyperparameters the function accepts (config ``loss.*``).
        needs_kl: unpaired KTO-style losses take a detached KL reference point ``kl`` (estimated by the loop).
        description: one line for the README table and ``preftune losses``.
    """

    name: str
    fn: Callable[..., LossOutput]
    needs_reference: bool
    data: Literal["paired", "unpaired", "sft", "reward"] = "paired"
    reduction: Literal["sum", "mean"] = "sum"
    needs_lengths: bool = False
    hyperparameters: tuple[str, ...] = ()
    needs_kl: bool = False
    description: str = ""


_REGISTRY: dict[str, LossSpec] = {}


def register_loss(spec: LossSpec) -> LossSpec:
    """Add a loss to the registry; a duplicate name is a programming error."""
    if spec.name in _REGISTRY:
        raise ValueError(f"loss {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_loss(name: str) -> LossSpec:
    """Look a loss up by name; an unknown name raises with the nearest registered names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        near = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
        raise KeyError(f"unknown loss {name!r}.{hint} Registered: {', '.join(sorted(_REGISTRY))}") from None


def registered_losses() -> dict[str, LossSpec]:
    """All registered losses, by name."""
    return dict(_REGISTRY)
