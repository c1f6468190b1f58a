"""The search space of a sweep: dotted config keys mapped to choices or ranges, checked before the first trial.

    sweep:
      loss.beta: [0.01, 0.05, 0.1, 0.5]                 # a list: categorical
      training.learning_rate: {log_uniform: [1e-7, 1e-5]}
      training.warmup_ratio: {uniform: [0.0, 0.1]}
      training.gradient_accumulation_steps: {int: [1, 4]}

Refused up front, naming the key: a key that is not a training-config field (``loss.<x>`` must be ``name``,
``weights`` or a hyperparameter of the configured loss, or of one of the losses a ``loss.name`` dimension
offers), an empty list or range (low >= high), a ``log_uniform`` range reaching zero or below, ``int`` bounds
that are not integers, and a value the config would reject (each choice and each bound is put into the config
and checked as ``preftune train`` checks it). ``sampler: grid`` needs every dimension to be a list.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from typing import Any

from preftune.errors import ConfigError
from preftune.tune import adapter
from preftune.tune.settings import SEARCH_KINDS, SweepSettings

_PRIMITIVE = (type(None), bool, int, float, str)


@dataclass
class Dimension:
    """One searched key: ``choices`` (categorical) or ``low``/``high`` of a ``log_uniform``/``uniform``/``int``."""

    key: str
    kind: str
    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None

    @property
    def encoded(self) -> bool:
        """Whether the choices are stored in Optuna as JSON strings (Optuna keeps only primitive categories)."""
        return self.kind == "categorical" and not all(isinstance(c, _PRIMITIVE) for c in self.choices)

    def distribution(self):
        import optuna.distributions as d

        if self.kind == "categorical":
            return d.CategoricalDistribution([json.dumps(c) for c in self.choices] if self.encoded else self.choices)
        if self.kind == "int":
            return d.IntDistribution(int(self.low), int(self.high))
        return d.FloatDistribution(self.low, self.high, log=self.kind == "log_uniform")

    def suggest(self, trial) -> Any:
        """The value of this dimension for an Optuna trial (decoded from JSON when the choices were encoded)."""
        if self.kind == "categorical":
            value = trial.suggest_categorical(self.key, self.distribution().choices)
            return json.loads(value) if self.encoded else value
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log_uniform")

    def decode(self, stored: Any) -> Any:
        """A value as the study stores it -> the config value."""
        return json.loads(stored) if self.encoded else stored

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.key}: one of {self.choices}"
        return f"{self.key}: {self.kind} [{self.low:g}, {self.high:g}]"


def parse_space(raw: dict[str, Any], tree: dict, *, sampler: str) -> list[Dimension]:
    """The dimensions of the sweep's raw search entries, checked against the training tree (see module doc)."""
    if not raw:
        raise ConfigError("sweep: no search dimensions; add keys such as 'loss.beta: [0.05, 0.1]' to the sweep section")
    losses = _loss_names(raw, tree)
    hyper = adapter.loss_hyperparameters(losses)
    dims = []
    for key, value in raw.items():
        _check_key(str(key), hyper, losses)
        dims.append(_dimension(key, value))
        if sampler == "grid" and dims[-1].kind != "categorical":
            raise ConfigError(f"sweep.{key}: sampler grid needs a list of values, got a {dims[-1].kind} range")
    first = {d.key: _bounds(d)[0] for d in dims}
    base = apply_params(tree, first)
    try:
        adapter.check_train_config(base)
    except ConfigError as e:
        raise ConfigError(f"the config (with the sweep's first values) is refused: {e}") from None
    for dim in dims:  # every value the sampler may draw passes the training config's own checks
        for value in _bounds(dim):
            try:
                adapter.check_train_config(apply_params(base, {dim.key: value}))
            except ConfigError as e:
                raise ConfigError(f"sweep.{dim.key}: the value {value!r} is refused by the config: {e}") from None
    return dims


def _bounds(dim: Dimension) -> list[Any]:
    """The values a dimension's check tries: every choice, or both bounds (as ints for ``int``)."""
    if dim.kind == "categorical":
        return dim.choices
    return [int(dim.low), int(dim.high)] if dim.kind == "int" else [dim.low, dim.high]


def _dimension(key: Any, value: Any) -> Dimension:
    where = f"sweep.{key}"
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{where}: empty list of values")
        return Dimension(key, "categorical", choices=list(value))
    if not (isinstance(value, dict) and len(value) == 1 and next(iter(value)) in SEARCH_KINDS):
        raise ConfigError(f"{where}: expected a list of values or one of "
                          + ", ".join(f"{{{k}: [low, high]}}" for k in SEARCH_KINDS) + f", got {value!r}")
    kind, bounds = next(iter(value.items()))
    if not (isinstance(bounds, list) and len(bounds) == 2):
        raise ConfigError(f"{where}: {kind} needs [low, high], got {bounds!r}")
    try:
        low, high = (float(b) for b in bounds)  # PyYAML reads 1e-5 (no dot) as a string
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {kind} bounds must be numbers, got {bounds!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"{where}: {kind} bounds must be finite, got {bounds!r}")
    if low >= high:
        raise ConfigError(f"{where}: empty range [{low:g}, {high:g}] (low must be below high; a fixed value "
                          "belongs in the config, not the sweep)")
    if kind == "log_uniform" and low <= 0:
        raise ConfigError(f"{where}: log_uniform range [{low:g}, {high:g}] reaches zero or below; its low bound "
                          "must be > 0")
    if kind == "int":
        if not (low.is_integer() and high.is_integer()):
            raise ConfigError(f"{where}: int bounds must be integers, got {bounds!r}")
    return Dimension(key, kind, low=low, high=high)


def _loss_names(raw: dict[str, Any], tree: dict) -> list[str]:
    """The losses a trial may train: the config's, or every choice of a ``loss.name`` dimension."""
    if "loss.name" in raw:
        choices = raw["loss.name"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError("sweep.loss.name: a loss is chosen from a non-empty list of names")
        out = []
        for c in choices:
            out.extend(c if isinstance(c, list) else [c])
        return [str(n) for n in out]
    name = (tree.get("loss") or {}).get("name") or adapter.default_loss(tree)
    return list(name) if isinstance(name, list) else [name]


def _check_key(key: str, hyper: set[str], losses: list[str]) -> None:
    ok, depth, valid = adapter.config_field(key)
    parts = key.split(".")
    if ok and parts[0] == "loss" and len(parts) == 2 and parts[1] not in ("name", "weights"):
        if parts[1] in hyper:
            return
        near = difflib.get_close_matches(parts[1], sorted(hyper), n=1, cutoff=0.5)
        hint = f" Did you mean 'loss.{near[0]}'?" if near else f" {'/'.join(losses)} takes: {', '.join(sorted(hyper)) or 'none'}."
        raise ConfigError(f"sweep.{key}: not a hyperparameter of loss {'/'.join(losses)}.{hint}")
    if ok:
        return
    options = list(valid)
    if len(parts) == 1:  # a misspelt setting is read as a search key: suggest the settings too
        options += [f.name for f in dataclasses.fields(SweepSettings)]
    near = difflib.get_close_matches(parts[depth], options, n=1, cutoff=0.5) if depth < len(parts) else []
    hint = f" Did you mean '{'.'.join([*parts[:depth], near[0], *parts[depth + 1:]])}'?" if near else ""
    raise ConfigError(f"sweep.{key}: not a config field.{hint} (`preftune config-doc` lists them)")


def apply_params(tree: dict, params: dict[str, Any]) -> dict:
    """A copy of ``tree`` with each dotted key set (loss hyperparameters sit directly under ``loss:``)."""
    out = copy.deepcopy(tree)
    for key, value in params.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return out


def grid_size(dims: list[Dimension]) -> int:
    return math.prod(len(d.choices) for d in dims)
