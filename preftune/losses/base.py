"""The loss contract: what a loss returns, what it needs, and the registry the loop asks.

A loss is a pure function over per-sequence log-probs (torch only). It returns per-example losses of
shape (B,), never reduced (the caller reduces), plus detached rewards for logging. The trainer never matches
loss names: it reads the :class:`LossSpec` registered under the name. The spec is also the one place that says
which hyperparameters a loss takes (read from the function's signature), which are required, which values are
legal and which are usual (:meth:`LossSpec.check_params`, :meth:`LossSpec.sanity_warnings`).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from preftune.losses.ranges import Range, coerce, kind_of


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


def _admits_tensor(annotation) -> bool:
    return annotation is torch.Tensor or torch.Tensor in typing.get_args(annotation)


@dataclass(frozen=True, eq=False)
class LossSpec:
    """What the loop must compute for a loss, and what values its hyperparameters may take.

    The function's signature is the contract: positional-or-keyword parameters are the tensor inputs (their
    names by ``data``, see the trainer's step functions), keyword-only parameters after ``*`` are the
    hyperparameters (config ``loss.*``), except those whose annotation admits a tensor, which are inputs the
    trainer maintains (:attr:`state`, e.g. BCO's running-mean δ). Sequence log-probs are always sums over
    completion tokens; a loss that length-normalises takes lengths (``needs_lengths``) and divides itself.

    Attributes:
        name: registry name (``loss.name`` in the config).
        fn: the pure loss function.
        needs_reference: whether reference log-probs are inputs; when False no reference model is ever loaded.
        data: ``"paired"`` (prompt, chosen, rejected), ``"unpaired"`` (prompt, completion, label), ``"sft"``
            (prompt, completion; the chosen side of paired data also works) or ``"reward"`` (pairs scored by a
            sequence-classification head: the function takes scores, not log-probs) or ``"policy"`` (on-policy
            groups trained by policy gradient: per-token log-probs, advantages and the step's counts) or ``"ppo"``
            (on-policy minibatches with a critic: per-token log-probs and values, π_old, V_old, advantages and
            returns, the step's token count).
        needs_lengths: whether the function takes ``chosen_lengths`` / ``rejected_lengths`` (token counts).
        needs_kl: unpaired KTO-style losses take a detached KL reference point ``kl`` (estimated by the loop).
        description: one line for the README table and ``preftune losses``.
        ranges: the legal values of every hyperparameter (required: one each); a value outside is refused
            by :meth:`check_params`. ``why`` says what goes wrong outside.
        typical: published settings per hyperparameter (any subset); outside, :meth:`sanity_warnings` warns.
        extra_warnings: warnings that involve several hyperparameters (SimPO's γ/β), given the numeric values
            (defaults filled) and returning one line each.
        reward_scale: the hyperparameter that scales the implicit reward (β for DPO: rewards are β·ρ), so
            the monitor can turn logged rewards back into log-probs; None when the rewards are unscaled.
        auto: hyperparameters the config may set to ``"auto"``, for the trainer to choose from the data
            (KTO's class weights).
        reference_if: a hyperparameter whose value 0 turns the reference off (GRPO's β: with β = 0 no
            reference model is loaded); None: ``needs_reference`` alone decides.
    """

    name: str
    fn: Callable[..., LossOutput]
    needs_reference: bool
    data: Literal["paired", "unpaired", "sft", "reward", "policy", "ppo"] = "paired"
    needs_lengths: bool = False
    needs_kl: bool = False
    description: str = ""
    ranges: Mapping[str, Range] = field(default_factory=dict)
    typical: Mapping[str, Range] = field(default_factory=dict)
    extra_warnings: Callable[[dict[str, float]], list[str]] | None = None
    reward_scale: str | None = None
    auto: tuple[str, ...] = ()
    reference_if: str | None = None

    def __post_init__(self):
        hp = set(self.hyperparameters)
        problems = [f"no legal range for {p!r}" for p in self.hyperparameters if p not in self.ranges]
        problems += [f"{where} names {p!r}, which is not a hyperparameter of {self.fn.__name__}"
                     for where, names in (("ranges", self.ranges), ("typical", self.typical), ("auto", self.auto),
                                          ("reward_scale", [self.reward_scale] if self.reward_scale else []),
                                     ("reference_if", [self.reference_if] if self.reference_if else []))
                     for p in names if p not in hp]
        problems += [f"the default {p} = {v!r} is outside its own legal range ({self.ranges[p].describe(p)})"
                     for p, v in self.defaults.items()
                     if p in self.ranges and isinstance(v, (int, float)) and v not in self.ranges[p]]
        if problems:
            raise ValueError(f"loss spec {self.name!r}: " + "; ".join(problems))

    def uses_reference(self, params: Mapping[str, object]) -> bool:
        """Whether a run with these hyperparameters needs reference log-probs (``reference_if`` at 0: no)."""
        if not self.needs_reference or self.reference_if is None:
            return self.needs_reference
        value = params.get(self.reference_if, self.defaults.get(self.reference_if))
        try:
            return float(value) != 0.0
        except (TypeError, ValueError):
            return True

    # ---- read from the signature ---------------------------------------------------------------------------

    @functools.cached_property
    def _keyword_only(self) -> dict[str, inspect.Parameter]:
        params = inspect.signature(self.fn).parameters.values()
        return {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    @functools.cached_property
    def _hints(self) -> dict:
        return typing.get_type_hints(self.fn)

    @functools.cached_property
    def state(self) -> tuple[str, ...]:
        """Keyword-only inputs the trainer maintains (annotated to admit a tensor); never set by the config."""
        return tuple(n for n in self._keyword_only if _admits_tensor(self._hints.get(n)))

    @functools.cached_property
    def hyperparameters(self) -> tuple[str, ...]:
        """The keyword-only parameters of ``fn`` that are not trainer state, in signature order."""
        return tuple(n for n in self._keyword_only if n not in self.state)

    @functools.cached_property
    def defaults(self) -> dict[str, object]:
        """Default value of each hyperparameter that has one."""
        return {n: self._keyword_only[n].default for n in self.hyperparameters
                if self._keyword_only[n].default is not inspect.Parameter.empty}

    @functools.cached_property
    def required(self) -> tuple[str, ...]:
        """Hyperparameters with no default: no safe value exists, the config must give one."""
        return tuple(n for n in self.hyperparameters if n not in self.defaults)

    # ---- checking values -----------------------------------------------------------------------------------

    def check_params(self, params: Mapping[str, object]) -> list[str]:
        """One readable line per problem with ``params`` (the config's ``loss:`` keys besides ``name``); [] if none.

        Problems: a key the loss does not take (with the nearest name), a required key missing, a value of the
        wrong type, a value outside the legal range. Numbers given as strings (PyYAML reads ``5e-6`` as one)
        are accepted; :meth:`resolve_params` converts them.
        """
        problems = []
        for key in params:
            if key in self.hyperparameters:
                continue
            if key in self.state:
                problems.append(f"loss.{key} is maintained by the trainer for {self.name} (an input computed "
                                "during training, not a hyperparameter); remove it")
                continue
            near = difflib.get_close_matches(key, self.hyperparameters, n=1, cutoff=0.5)
            takes = ", ".join(self.hyperparameters) or "no hyperparameters"
            hint = f" Did you mean 'loss.{near[0]}'?" if near else ""
            problems.append(f"unknown key 'loss.{key}' for {self.name}.{hint} {self.name} takes: {takes}")
        for key in self.required:
            if key not in params:
                problems.append(f"missing required key 'loss.{key}' ({self.name} has no safe default; it needs "
                                f"{self.ranges[key].describe(key)})")
        for key, value in params.items():
            if key not in self.hyperparameters or (key in self.auto and value == "auto"):
                continue
            kind = kind_of(self._hints.get(key))
            try:
                number = coerce(value, kind)
            except TypeError as e:
                auto = " or 'auto' (chosen from the data)" if key in self.auto else ""
                problems.append(f"loss.{key} must be {e.args[0]}{auto} for {self.name}, got {value!r}")
                continue
            legal = self.ranges[key]
            if isinstance(number, (int, float)) and not isinstance(number, bool) and number not in legal:
                why = f": {legal.why}" if legal.why else ""
                problems.append(f"loss.{key} = {number:g} is not allowed for {self.name}; it needs "
                                f"{legal.describe(key)}{why}")
        return problems

    def resolve_params(self, params: Mapping[str, object]) -> dict[str, object]:
        """The keyword arguments to call ``fn`` with: this loss's keys of ``params`` (others are ignored, so a
        weighted mix can share one mapping), numbers as their annotated type, defaults filled, ``"auto"``
        kept for the trainer. Raises ValueError with every problem :meth:`check_params` finds."""
        own = {k: v for k, v in params.items() if k in self.hyperparameters}
        problems = self.check_params(own)
        if problems:
            raise ValueError("; ".join(problems))
        out = dict(self.defaults)
        for key, value in own.items():
            out[key] = value if key in self.auto and value == "auto" else coerce(value, kind_of(self._hints.get(key)))
        return out

    def sanity_warnings(self, params: Mapping[str, object]) -> list[str]:
        """One line per legal but unusual value: outside the declared typical range, or flagged by
        ``extra_warnings``. Each line starts with ``loss.<key> = <value>``. Keys this loss does not take, values
        that do not parse or are illegal, and ``"auto"`` are skipped (:meth:`check_params` reports them)."""
        values: dict[str, float] = {}
        for key in self.hyperparameters:
            if key not in params and key not in self.defaults:
                continue
            try:
                v = coerce(params.get(key, self.defaults.get(key)), kind_of(self._hints.get(key)))
            except TypeError:
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v in self.ranges[key]:
                values[key] = float(v)
        out = []
        for key, rng in self.typical.items():
            if key in params and key in values and values[key] not in rng:
                out.append(f"loss.{key} = {values[key]:g} is outside the usual range for {self.name} "
                           f"({rng.span()}): {rng.why}")
        if self.extra_warnings is not None:
            out += self.extra_warnings(values)
        return out


def check_combined_params(specs: list[LossSpec], params: Mapping[str, object]) -> list[str]:
    """:meth:`LossSpec.check_params` for a weighted mix that shares one ``loss:`` mapping.

    Each key is checked by every component that takes it; a key no component takes is reported once, with the
    nearest name any of them takes. Missing required keys are reported per component. One spec: the same lines
    as its own ``check_params``.
    """
    if len(specs) == 1:
        return specs[0].check_params(params)
    taken = [h for s in specs for h in s.hyperparameters]
    problems = []
    for key in params:
        if key in taken:
            continue
        owner = next((s for s in specs if key in s.state), None)
        if owner is not None:
            problems += owner.check_params({key: params[key]})[:1]
            continue
        near = difflib.get_close_matches(key, taken, n=1, cutoff=0.5)
        hint = f" Did you mean 'loss.{near[0]}'?" if near else ""
        names = "/".join(s.name for s in specs)
        problems.append(f"unknown key 'loss.{key}' for {names}.{hint} {names} takes: "
                        f"{', '.join(dict.fromkeys(taken)) or 'no hyperparameters'}")
    for spec in specs:
        own = {k: v for k, v in params.items() if k in spec.hyperparameters}
        problems += [p for p in spec.check_params(own) if p not in problems]
    return problems


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
