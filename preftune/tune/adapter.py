"""The one seam between the drivers (iterate, sweep, review) and the rest of preftune.

Every call the drivers make into generation, judging, pair building, data checks, training, evaluation and the
training config goes through a function here, so when one of those rooms changes (a new generation engine,
a rewritten config, pairs split into files) only this module is re-pointed. What each wraps:

    config_tree / check_train_config / config_field / loss_hyperparameters   preftune.config, losses
    load_model / load_tokenizer                                              preftune.models, eval.cli
    read_prompts / prompts_of_rows / prompt_text / sample_responses          preftune.rollout.generate, data.load
    make_judge / judge_pairs / length_bias                                   rollout.cli, synth.pairs
    validate_pairs                                                           preftune.data.validate
    train                                                                    preftune.train
    generate_ids / token_logps / end_ids / kl_estimates / generation_stats   preftune.eval.drift
    win_rate                                                                 preftune.eval.win_rate
    metric_direction                                                         preftune.monitor
    cohen_kappa / agreement                                                  preftune.data.agreement

Heavy imports (torch, transformers) happen inside the functions, so ``preftune --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from preftune.errors import ConfigError, PreftuneError

PromptText = str | list[dict[str, str]]


# ---- the training config ------------------------------------------------------------------------------------


def config_tree(source: dict | str | Path, overrides: list[str] | None = None) -> dict:
    """The raw config mapping of a dict or YAML file, ``--set key.sub=value`` overrides merged in."""
    from preftune.config import load_yaml, parse_overrides

    tree = dict(source) if isinstance(source, dict) else load_yaml(source)
    return _merge(tree, parse_overrides(list(overrides))) if overrides else tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def check_train_config(tree: dict) -> Any:
    """The checked training config of ``tree`` (unknown keys, types, ranges, the loss's hyperparameters)."""
    from preftune.config import to_config

    return to_config(tree, log=lambda *_: None)  # a check: the run itself prints its notices


def config_field(dotted: str) -> tuple[bool, int, list[str]]:
    """(whether ``dotted`` names a training-config field, the index of the first part that is not one, the valid
    keys at that level).

    Sections are walked through their dataclasses (``lora`` through ``LoraConfig`` although it may be null).
    ``loss.<x>`` is a field when ``x`` is ``name`` / ``weights`` or a loss hyperparameter: those are checked
    against the configured loss by :func:`loss_hyperparameters`, not here.
    """
    from preftune.config import Config

    cls: Any = Config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if cls is None or not dataclasses.is_dataclass(cls):
            return False, i, []
        names = [f.name for f in dataclasses.fields(cls)]
        if cls.__name__ == "LossConfig" and i == len(parts) - 1:
            return True, i, names  # name, weights or a hyperparameter (checked by loss_hyperparameters)
        if part not in names or (cls.__name__ == "LossConfig" and part == "params"):
            return False, i, names
        hint = typing.get_type_hints(cls)[part]
        sections = [a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)]
        cls = sections[0] if sections else None
    return True, len(parts), []


def loss_hyperparameters(names: Sequence[str]) -> set[str]:
    """Hyperparameters taken by any of the registered losses ``names`` (a bad name raises ConfigError)."""
    from preftune.losses import get_loss

    out: set[str] = set()
    for n in names:
        try:
            out.update(get_loss(n).hyperparameters)
        except KeyError as e:
            raise ConfigError(f"loss.name: {e.args[0]}") from None
    return out


def default_loss(tree: dict) -> str:
    from preftune.config import DEFAULT_LOSS

    return DEFAULT_LOSS[tree.get("task", "policy")]


def field_docs(cls: type, prefix: str) -> list[tuple[str, str, str, str]]:
    from preftune.config import field_docs as docs

    return docs(cls, prefix)


# ---- models -------------------------------------------------------------------------------------------------


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name: Any, device_name: str | None = None):
    """A causal LM from a directory or hub id, in eval mode; a LoRA adapter directory is merged into its base.

    A loaded model is returned as is."""
    import torch

    if isinstance(name, torch.nn.Module):
        return name
    from preftune.eval.cli import load_model as load

    return load(str(name), torch.float32, device_name or device())


def load_tokenizer(tokenizer: Any, model: Any):
    from preftune.models import load_tokenizer as load

    return load(tokenizer, model)


def quiet_progress_bars() -> None:
    """Switch off the hub's per-file progress bars (loading / writing weights): the drivers load and save many
    models, and the bars would bury their own log lines."""
    from transformers.utils import logging

    logging.disable_progress_bar()


# ---- prompts and sampling -----------------------------------------------------------------------------------


def read_prompts(path: str | Path, chat: bool = False) -> list[PromptText]:
    """The distinct prompts of a JSONL ("prompt") or text file (one per line), in file order."""
    from preftune.rollout.generate import read_prompts as read

    return [it.prompt for it in read(path, chat=chat).items]


def prompts_of_rows(source: Any) -> list[PromptText]:
    """The distinct prompts of a data source (pairs or prompt rows: anything ``data.load.read_rows`` reads)."""
    from preftune.data.load import read_rows

    seen, out = set(), []
    for raw in read_rows(source):
        p = raw.data.get("prompt") if raw.data else None
        if p is not None and prompt_id(p) not in seen:
            seen.add(prompt_id(p))
            out.append(p)
    return out


def prompt_text(prompt: PromptText) -> str:
    from preftune.rollout.generate import prompt_text as text

    return text(prompt)


def prompt_id(prompt: PromptText) -> str:
    from preftune.rollout.generate import prompt_id as pid

    return pid(prompt)


def sample_responses(model, tokenizer, prompts_path: Path, out: Path, *, n: int, temperatures: Sequence[float],
                     seed: int, max_new_tokens: int, top_p: float = 1.0, batch_size: int = 32, chat: bool = False,
                     name: str | None = None) -> str:
    """N responses per prompt of ``prompts_path`` into the GEN file ``out`` (resumable); returns the summary line."""
    from preftune.rollout.generate import HFBackend, run_generation

    backend = HFBackend(model, tokenizer, max_new_tokens=max_new_tokens, top_p=top_p, batch_size=batch_size,
                        name=name)
    res = run_generation(backend, prompts_path, out, n=n, temperatures=temperatures, seed=seed, chat=chat,
                         settings={"max_new_tokens": max_new_tokens, "top_p": top_p}, progress=False)
    return res.summary()


# ---- judges and pairs ---------------------------------------------------------------------------------------


def make_judge(spec: Any):
    """A judge from a spec: a mapping (``build_judge``), or a string as ``preftune judge --judge`` takes it."""
    from preftune.judges import build_judge
    from preftune.rollout.cli import make_judge as from_string

    if isinstance(spec, dict):
        try:
            return build_judge(spec)
        except (ValueError, TypeError, ImportError, AttributeError, OSError) as e:
            raise PreftuneError(f"judge: {e}") from None
    if not isinstance(spec, str):
        raise ConfigError(f"judge: expected a path, a mapping or a name such as 'toy-verifier', got {spec!r}")
    return from_string(spec)


def judge_info(judge, spec: Any) -> dict:
    from preftune.synth.pairs import judge_info as info

    return info(judge, spec if isinstance(spec, str) else "<mapping>")


def judge_pairs(gen_path: Path, judge, out: Path, *, mode: str, min_margin: float | None, spec: Any,
                scoring: str = "auto", tokenizer=None):
    """Judge a GEN file into pairs (``out``, ``out.dropped.jsonl``); returns (PairsResult, LengthBias)."""
    from preftune.synth.pairs import judge_generations

    return judge_generations(gen_path, judge, out, mode=mode, min_margin=min_margin, scoring=scoring,
                             judge_spec=spec if isinstance(spec, str) else "<mapping>", tokenizer=tokenizer)


def dropped_path(out: Path) -> Path:
    from preftune.synth.pairs import dropped_path as path

    return path(out)


# ---- data checks and training -------------------------------------------------------------------------------


def validate_pairs(path: Path, tokenizer=None, max_length: int | None = None):
    """The ``preftune data validate`` report of a pairs file (``.usable``, ``.summary()``, ``.to_dict()``)."""
    from preftune.data.validate import validate

    return validate(str(path), tokenizer=tokenizer, max_length=max_length)


def train(tree: dict, *, resume: bool = True, log=print) -> dict:
    """One training run of the config ``tree``; resumes from its newest checkpoint when there is one, else starts
    afresh (replacing what an attempt without a checkpoint left: ``resume="auto"``)."""
    import preftune

    return preftune.train(tree, resume="auto" if resume else None, log=log)


# ---- evaluation pieces --------------------------------------------------------------------------------------


def encode_prompts(tokenizer, prompts: Sequence[PromptText]) -> list[list[int]]:
    """Prompt token ids exactly as training and ``preftune generate`` encode them."""
    from preftune.rollout.generate import encode_prompt

    return [encode_prompt(tokenizer, p) for p in prompts]


def end_ids(model, tokenizer) -> set[int]:
    from preftune.eval.drift import end_ids as ids

    return ids(model, tokenizer)


def generate_ids(model, prompt_ids: Sequence[list[int]], *, temperature: float, max_new_tokens: int, pad_id: int,
                 eos_ids: set[int], seed: int, batch_size: int = 32) -> list[list[int]]:
    """Completion ids per prompt (greedy at temperature 0), ending with the EOS token when the model stopped."""
    from preftune.eval.drift import generate_ids as gen

    return gen(model, prompt_ids, max_new_tokens=max_new_tokens, pad_id=pad_id, eos_ids=eos_ids,
               temperature=temperature, seed=seed, batch_size=batch_size)


def token_logps(model, prompt_ids, completions, pad_id: int, batch_size: int = 16):
    """log π(y_t | x, y_<t) of every completion token, one (|y|,) tensor per sequence."""
    from preftune.eval.drift import completion_token_logps

    return completion_token_logps(model, prompt_ids, completions, pad_id, batch_size)


def kl_estimates(policy_logps, reference_logps) -> dict[str, float]:
    from preftune.eval.drift import kl_estimates as kl

    return kl(policy_logps, reference_logps)


def generation_stats(seqs, eos_ids: set[int]) -> dict[str, float]:
    from preftune.eval.drift import generation_stats as stats

    return stats(seqs, eos_ids)


def win_rate(verdicts: Sequence[str], model_lengths: Sequence[int], reference_lengths: Sequence[int]) -> dict:
    from preftune.eval.win_rate import win_rate as wr

    return wr(verdicts, model_lengths, reference_lengths)


def metric_direction(metric: str, mode: str) -> str:
    """``max`` or ``min`` for a metrics.jsonl key (``mode`` auto: as the monitor's early stopping decides)."""
    from preftune.monitor.monitor import metric_direction as md

    return md(metric, mode)


# ---- agreement ----------------------------------------------------------------------------------------------


def cohen_kappa(a: Sequence, b: Sequence) -> float:
    from preftune.data.agreement import cohen_kappa as kappa

    return kappa(a, b)


def agreement(rows: list[dict]):
    """``preftune data agreement`` over annotation dicts (item, annotator, choice, shown_first)."""
    from preftune.data.agreement import Annotation, analyze

    anns = [Annotation(r["item"], r["annotator"], r["choice"], r.get("shown_first"), None, None, i)
            for i, r in enumerate(rows)]
    return analyze(anns)
