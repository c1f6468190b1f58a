"""The ``iterate:`` and ``sweep:`` sections of a config: typed settings, parsed here, the rest left to training.

A driver config is a training config (everything ``preftune train`` reads) plus one driver section::

    model: runs/sft/final
    loss: {name: dpo, beta: 0.1}
    training: {output_dir: runs/iter, learning_rate: 5.0e-6}
    iterate: {rounds: 3, prompts: prompts.jsonl, eval_prompts: held_out.jsonl, judge: judge.yaml}

:func:`split_sections` takes the driver sections off; the remaining tree goes to ``preftune.train`` unchanged
(per round or per trial, with ``model``, ``data.train`` and ``training.output_dir`` filled in by the driver).
Each field is documented once, in the string under it (``docs/tune.md`` prints them with
``preftune.config.field_docs``). These dataclasses live here and not in ``preftune/config.py`` so the drivers
do not depend on the training config's internals; folding them into ``Config`` means adding two optional
sections (``iterate: IterateSettings | None``, ``sweep: SweepSettings | None``) that ``train`` ignores.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from preftune.errors import ConfigError

REQUIRED: Any = dataclasses.MISSING
SECTIONS = ("iterate", "sweep")


@dataclass(kw_only=True)
class IterateSettings:
    rounds: int = 3
    """Rounds of sample -> judge -> pairs -> validate -> train -> evaluate; a finished run can be continued by
    raising it."""
    prompts: str = REQUIRED
    """Prompt pool the policy answers each round: JSONL with a "prompt" field (text or messages), or a text
    file with one prompt per line."""
    prompts_per_round: int | None = None
    """Prompts used per round: round k takes the k-th slice of this size (wrapping around the pool), so each
    round sees fresh prompts while the pool lasts; None: every prompt every round."""
    eval_prompts: str = REQUIRED
    """Held-out prompts (same formats as `prompts`) for the round's win rates, KL, lengths and distinct-n."""
    num_eval_prompts: int | None = None
    """Use at most this many held-out prompts (the first ones); None: all."""
    samples_per_prompt: int = 4
    """Responses sampled per prompt from the current policy; the judge picks the best and the worst."""
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    """Sampling temperatures, round-robin over the responses of a prompt (as `preftune generate --temperatures`)."""
    top_p: float = 1.0
    """Nucleus mass for sampled responses."""
    max_new_tokens: int = 128
    """Tokens per sampled and per evaluated response at most."""
    generation_batch_size: int = 32
    """Sequences per `generate` call."""
    chat: bool = False
    """Send text prompts through the chat template as one user message (as `preftune generate --chat`)."""
    judge: Any = REQUIRED
    """Judge of the round's responses and of the evaluation: a judge YAML path, a mapping (docs/judges.md),
    `toy-verifier`, or `callable:module:fn`."""
    pairs: Literal["best-vs-worst", "all"] = "best-vs-worst"
    """How responses become pairs (`preftune judge --pairs`); ties are always dropped."""
    scoring: Literal["auto", "score", "wins"] = "auto"
    """How best and worst are found (`preftune judge --scoring`): `score` (the judge scores each response),
    `wins` (pairwise round robin, both orders), `auto` (score when the judge can)."""
    min_margin: float | None = None
    """Drop pairs whose score difference is below this (`preftune judge --min-margin`)."""
    reference: Literal["previous", "sft"] = "previous"
    """Reference model of each round's training: `previous` (the round's starting policy, i.e. the previous
    round's result) or `sft` (the original model every round)."""
    min_win_rate: float | None = None
    """Stop after a round whose win rate against the previous round's policy falls below this; None: never."""
    seed: int = 0
    """Base seed: round k samples with seed + k; evaluation samples with seed."""


@dataclass(kw_only=True)
class SweepSettings:
    trials: int | None = None
    """Trials in the study (finished, pruned and failed ones count; interrupted ones are retried); None: the
    grid's size with `sampler: grid`, else 20. `--trials` overrides."""
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    """Search: `tpe` (Bayesian, Optuna's TPESampler), `random`, or `grid` (every combination of list values)."""
    seed: int = 0
    """Sampler seed."""
    objective: str = "win_rate"
    """Score to optimize: `win_rate`, `lc_win_rate`, `kl`, `perplexity`, `distinct_2`, `repetition`,
    `eos_rate`, `length`, or `model_score` (the judge's mean score, with a scoring judge)."""
    direction: Literal["auto", "maximize", "minimize"] = "auto"
    """Whether higher objective is better; auto: minimize `kl`, `perplexity`, `repetition` and `length`,
    maximize the others."""
    max_kl: float | None = None
    """Trials whose KL to the reference (k3, nats per sequence) exceeds this are marked infeasible: listed, never
    best; None: no limit."""
    judge: Any = REQUIRED
    """Judge of the trials' responses against the reference's (same forms as `iterate.judge`)."""
    prompts: str | None = None
    """Held-out prompts for the scores (JSONL "prompt" or one per line); None: the distinct prompts of
    `data.eval`."""
    num_prompts: int = 64
    """Held-out prompts scored per trial at most."""
    max_new_tokens: int = 64
    """Tokens per scored response at most."""
    reference_model: str | None = None
    """Model the trials are scored against; None: `reference.model` if set, else `model` (where trials start)."""
    pruner: Literal["median", "hyperband", "successive_halving", "none"] = "median"
    """Optuna pruner applied at the run's evaluations (`training.eval_every`); `none` never stops a trial."""
    prune_metric: str = "eval/rewards/accuracies"
    """Metric of `metrics.jsonl` reported at each evaluation for pruning, `split/key`."""
    prune_mode: Literal["auto", "max", "min"] = "auto"
    """Whether higher `prune_metric` is better; auto: higher for accuracies, margins, rewards and win rates."""
    prune_warmup_steps: int = 0
    """Evaluations at steps up to this are never pruned."""
    prune_startup_trials: int = 2
    """Trials finished before the pruner may stop one."""
    study_name: str = "sweep"
    """Optuna study name; several machines pointed at one storage with one name share the study."""
    storage: str | None = None
    """Optuna storage URL; None: `sqlite:///<sweep dir>/sweep.db`. `--storage postgresql://...` overrides."""
    heartbeat_interval: int = 30
    """Seconds between a running trial's heartbeats; a trial silent for `grace_period` is failed and retried."""
    grace_period: int | None = None
    """Seconds without a heartbeat after which a running trial is stale; None: 4 x `heartbeat_interval`."""
    max_retry: int = 2
    """Times an interrupted trial is retried with the same parameters."""
    poll_seconds: float = 0.5
    """How often the driver reads a running trial's metrics.jsonl for its evaluations."""


SEARCH_KINDS = ("log_uniform", "uniform", "int")
"""Range forms of a search dimension; a list is categorical."""


# ---- parsing ------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _check(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against ``tp`` (the few types these settings use); ``5e-6`` strings read as floats."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check(value, arg, where)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        if isinstance(value, list):
            return [_check(v, typing.get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 5e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    return _fail(where, tp, value)


def _fail(where: str, tp: Any, value: Any):
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def parse_settings(cls: type, values: dict, where: str, *, extra: str = "reject") -> tuple[Any, dict]:
    """``cls`` built from the keys of ``values`` that are its fields; (settings, the other keys).

    ``extra="reject"``: another key is an error naming the nearest field; ``"return"``: other keys come back
    (the sweep's search dimensions).
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs, rest = {}, {}
    for key, value in (values or {}).items():
        if key in names:
            kwargs[key] = _check(value, hints[key], f"{where}.{key}")
        elif extra == "return":
            rest[key] = value
        else:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" Did you mean '{where}.{near[0]}'?" if near else f" Valid keys: {', '.join(names)}."
            raise ConfigError(f"unknown key '{where}.{key}'.{hint}")
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and f.default is REQUIRED and f.default_factory is REQUIRED:
            raise ConfigError(f"missing required key '{where}.{f.name}'")
    return cls(**kwargs), rest


def load_tree(source: dict | str | Path, overrides: list[str] | None = None) -> dict:
    """A config tree from a dict or a YAML path, with ``--set key.sub=value`` overrides merged in."""
    from preftune.tune import adapter

    return adapter.config_tree(source, overrides)


def split_sections(tree: dict) -> tuple[dict, dict]:
    """(the training tree, {section: raw mapping}) for the driver sections present in ``tree``."""
    train = {k: v for k, v in tree.items() if k not in SECTIONS}
    sections = {}
    for name in SECTIONS:
        if name in tree:
            value = tree[name]
            if not isinstance(value, dict):
                raise ConfigError(f"'{name}' must be a mapping of settings, got {value!r}")
            sections[name] = value
    return train, sections


def as_dict(settings: Any) -> dict:
    """Settings as a plain dict (for lineage files and the study's record)."""
    return dataclasses.asdict(settings)


def dump_yaml(tree: dict) -> str:
    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)
