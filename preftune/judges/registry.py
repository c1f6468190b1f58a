"""``build_judge(config)``: one judge from a dict or a YAML file, for ``preftune judge --judge CONFIG.yaml``.

The ``type`` key picks a builder; every other key is a keyword argument of that builder, and unknown keys are
rejected with the nearest valid name (a misspelt ``max_concurency`` would otherwise silently run with the
default). Schema, one block per type (defaults shown; see each class for the meaning):

    type: llm                       # LLMJudge
    model: gpt-4o-mini              # required
    base_url: http://localhost:8000/v1
    api_key_env: OPENAI_API_KEY     # the variable's NAME, never the key; null for keyless servers
    template: "...{prompt}...{response_a}...{response_b}..."   # or template_path: judge.txt
    score_template: "...{prompt}...{response}..."              # or score_template_path: score.txt
    system_prompt: null
    temperature: 0.0
    max_tokens: 512
    timeout: 60
    max_attempts: 5
    backoff_base: 1.0
    backoff_max: 60
    max_concurrency: 8
    cache_path: null                # e.g. .preftune/judge_cache.sqlite
    score_fallback: null

    type: reward_model              # RewardModelJudge
    model: path/or/hub-id           # required
    batch_size: 8
    max_length: null
    device: null
    dtype: null                     # "bfloat16", "float32", ...
    separator: "\n"
    tie_margin: 0.0

    type: lm                        # LMJudge
    model: path/or/hub-id           # required; plus template / template_path, batch_size, max_length,
                                    # device, dtype, tie_margin

    type: verifier                  # VerifierJudge around one verifier
    kind: exact_match               # exact_match | regex | json_schema | code_tests | callable
    reference: "42"                 # exact_match (also normalize: true, extract: REGEX)
    pattern: "^\\d+$"               # regex (also fullmatch: false, flags: [IGNORECASE, DOTALL])
    schema: {type: object}          # json_schema, or schema_path: schema.json (also strict: false)
    tests: ["assert f(1) == 2"]     # code_tests (also timeout: 5, memory_limit_mb: null, extract: true)
    target: my_pkg.rewards:fn       # callable: fn(prompt, response) -> float; with kwargs: {...} it is a
                                    # factory called with them first
    references_path: refs.jsonl     # instead of reference / pattern / tests: per-prompt values, one JSON
                                    # object per line {"prompt": ..., "reference": ...}
    tie_margin: 0.0

    type: ensemble                  # EnsembleJudge
    judges: [{type: ...}, ...]      # required, each a config as above
    mode: majority                  # or mean
    weights: null
    tie_margin: 0.0

    type: reward_ensemble           # preftune.judges.RewardEnsemble: score = mean - penalty * std
    members: [path/rm-0, {type: reward_model, model: path/rm-1, device: cuda}]   # required: reward-model
                                    # paths / judge configs, or the directory train_ensemble wrote
    penalty: 1.0
    tie_margin: 0.0

    type: multi_axis                # preftune.reward.MultiAxisReward: score = sum of weight * axis score
    axes:                           # required: axis -> judge (a reward-model path or a judge config) and weight
      helpful: {judge: path/rm-helpful, weight: 1.0}
      harmless: {judge: {type: reward_model, model: path/rm-harmless}, weight: 0.5}
    tie_margin: 0.0

Every type also takes ``name``. Relative paths are relative to the working directory.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from preftune.judges.base import Judge
from preftune.judges.ensemble import EnsembleJudge
from preftune.judges.llm import LLMJudge
from preftune.judges.lm_judge import LMJudge
from preftune.judges.reward_ensemble import MultiAxisReward, RewardEnsemble
from preftune.judges.reward_model import RewardModelJudge
from preftune.judges.verifiable import (
    CodeTestsVerifier,
    ExactMatch,
    JSONSchemaVerifier,
    RegexMatch,
    VerifierJudge,
)

_BUILDERS: dict[str, Callable[..., Judge]] = {}


def register_judge(type_name: str, builder: Callable[..., Judge]) -> None:
    """Make ``{"type": type_name, ...}`` build a judge with ``builder(**other_keys)``."""
    if type_name in _BUILDERS:
        raise ValueError(f"judge type {type_name!r} is registered twice")
    _BUILDERS[type_name] = builder


def registered_judge_types() -> list[str]:
    """The ``type`` values build_judge accepts."""
    return sorted(_BUILDERS)


def _suggest(name: str, options: list[str]) -> str:
    near = difflib.get_close_matches(name, options, n=1)
    return f" Did you mean {near[0]!r}?" if near else ""


def _check_keys(
    where: str, given: Mapping[str, Any], fn: Callable[..., Any], extra: tuple[str, ...] = ()
) -> None:
    """Reject keys ``fn`` does not take, naming the nearest valid key."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if n != "self" and p.kind is not p.VAR_POSITIONAL] + list(extra)
    for key in given:
        if key not in valid:
            raise ValueError(
                f"{where}: unknown key {key!r}.{_suggest(key, valid)} Valid keys: {', '.join(valid)}"
            )


def build_judge(config: Mapping[str, Any] | str | Path) -> Judge:
    """A judge from a config dict (or a YAML file holding one); see the module docstring for the schema."""
    if isinstance(config, str | Path):
        import yaml

        with open(config, encoding="utf-8") as f:
            try:
                config = yaml.safe_load(f)
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
                at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
                raise ValueError(f"{config}{at}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(config, Mapping):
        raise ValueError(f"a judge config is a mapping with a 'type' key, got {type(config).__name__}")
    cfg = dict(config)
    if "type" not in cfg:
        raise ValueError(f"judge config lacks 'type'; one of: {', '.join(registered_judge_types())}")
    type_name = cfg.pop("type")
    if type_name not in _BUILDERS:
        raise ValueError(
            f"unknown judge type {type_name!r}.{_suggest(str(type_name), list(_BUILDERS))} "
            f"Registered: {', '.join(registered_judge_types())}"
        )
    builder = _BUILDERS[type_name]
    _check_keys(f"judge type {type_name!r}", cfg, builder)
    return builder(**cfg)


def _build_ensemble(judges: list[Mapping[str, Any]], **kwargs: Any) -> EnsembleJudge:
    """An ensemble whose members are built from their own configs."""
    if not isinstance(judges, list) or not judges:
        raise ValueError("ensemble 'judges' must be a non-empty list of judge configs")
    _check_keys("judge type 'ensemble'", kwargs, EnsembleJudge.__init__)
    return EnsembleJudge([build_judge(j) for j in judges], **kwargs)


def _member(spec: Any, where: str) -> Any:
    """A member judge from a judge config, or a reward-model path / hub id (loaded by the reward builder)."""
    if isinstance(spec, Mapping):
        return build_judge(spec)
    if isinstance(spec, str | Path):
        return str(spec)
    raise ValueError(f"{where}: expected a reward-model path or a judge config, got {spec!r}")


def _build_reward_ensemble(members: Any, penalty: float = 1.0, tie_margin: float = 0.0,
                           name: str | None = None) -> Judge:
    """A reward-model ensemble (mean − penalty·std) from paths, judge configs or a train_ensemble directory."""
    if isinstance(members, list):
        members = [_member(m, "reward_ensemble members") for m in members]
    elif not isinstance(members, str | Path):
        raise ValueError("reward_ensemble 'members' must be a list of reward models or a train_ensemble directory")
    return RewardEnsemble(members, penalty=penalty, tie_margin=tie_margin, name=name)


def _build_multi_axis(axes: Mapping[str, Any], tie_margin: float = 0.0, name: str | None = None) -> Judge:
    """A weighted composite of per-axis judges: ``axes: {axis: {judge: ..., weight: w}}``."""
    if not isinstance(axes, Mapping) or not axes:
        raise ValueError("multi_axis 'axes' must map each axis name to {judge: ..., weight: w}")
    built = {}
    for axis, spec in axes.items():
        if not isinstance(spec, Mapping) or "judge" not in spec or set(spec) - {"judge", "weight"}:
            raise ValueError(f"multi_axis axis {axis!r}: expected {{judge: <path or config>, weight: w}}, got {spec!r}")
        built[axis] = (_member(spec["judge"], f"multi_axis axis {axis!r}"), float(spec.get("weight", 1.0)))
    return MultiAxisReward(built, tie_margin=tie_margin, name=name)


def _load_references(path: str | Path) -> dict[str, Any]:
    """``{prompt: reference}`` from a JSONL file of ``{"prompt": ..., "reference": ...}`` objects."""
    refs: dict[str, Any] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or "prompt" not in row or "reference" not in row:
                raise ValueError(f"{path}:{lineno}: expected an object with 'prompt' and 'reference'")
            refs[row["prompt"]] = row["reference"]
    return refs


def _import_target(target: str) -> Callable[..., Any]:
    module, _, attr = target.partition(":")
    if not module or not attr:
        raise ValueError(f"callable target must look like 'package.module:function', got {target!r}")
    return getattr(importlib.import_module(module), attr)


# kind -> (verifier class, name of its reference argument or None)
_VERIFIERS: dict[str, tuple[Callable[..., Any], str | None]] = {
    "exact_match": (ExactMatch, "reference"),
    "regex": (RegexMatch, "pattern"),
    "json_schema": (JSONSchemaVerifier, None),
    "code_tests": (CodeTestsVerifier, "tests"),
}


def _build_verifier(
    kind: str,
    name: str | None = None,
    tie_margin: float = 0.0,
    references_path: str | None = None,
    schema_path: str | None = None,
    target: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> VerifierJudge:
    """A :class:`VerifierJudge` around the verifier ``kind`` configured by ``options``."""
    if kind == "callable":
        if target is None:
            raise ValueError("verifier kind 'callable' needs target: 'package.module:function'")
        if options:
            raise ValueError(f"verifier kind 'callable' takes target and kwargs, not {sorted(options)}")
        fn = _import_target(target)
        fn = fn(**kwargs) if kwargs is not None else fn
        return VerifierJudge(fn, name=name or target, tie_margin=tie_margin)
    if kind not in _VERIFIERS:
        raise ValueError(f"unknown verifier kind {kind!r}.{_suggest(kind, [*_VERIFIERS, 'callable'])}")
    cls, ref_arg = _VERIFIERS[kind]
    if references_path is not None:
        if ref_arg is None:
            raise ValueError(f"verifier kind {kind!r} takes no references_path")
        options[ref_arg] = _load_references(references_path)
    if schema_path is not None:
        options["schema"] = json.loads(Path(schema_path).read_text(encoding="utf-8"))
    if kind == "regex" and isinstance(options.get("flags"), list):
        options["flags"] = _regex_flags(options["flags"])
    _check_keys(f"verifier kind {kind!r}", options, cls.__init__)
    return VerifierJudge(cls(**options), name=name or kind, tie_margin=tie_margin)


def _regex_flags(names: list[str]) -> int:
    flags = 0
    for flag in names:
        try:
            flags |= re.RegexFlag[str(flag).upper()]
        except KeyError:
            raise ValueError(f"unknown regex flag {flag!r}; e.g. IGNORECASE, MULTILINE, DOTALL") from None
    return flags


register_judge("llm", LLMJudge)
register_judge("reward_model", RewardModelJudge)
register_judge("lm", LMJudge)
register_judge("verifier", _build_verifier)
register_judge("ensemble", _build_ensemble)
register_judge("reward_ensemble", _build_reward_ensemble)
register_judge("multi_axis", _build_multi_axis)
