"""Typed run configuration: YAML in, dotted ``--set`` overrides, unknown keys rejected with a suggestion.

Each field is documented once, in the string directly under it; ``preftune config-doc`` and the README's
config reference are generated from those strings (``field_docs``). A hyperparameter with no safe default
has none: leaving it out is an error that names it.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from preftune.errors import ConfigError

REQUIRED: Any = dataclasses.MISSING


@dataclass
class DataConfig:
    train: Any = None
    """Training rows: a JSONL/JSON/Parquet/CSV path, a `save_to_disk` directory, a hub id (`name` or
    `name:split`), or (from Python) a `datasets.Dataset` / list of dicts."""
    eval: Any = None
    """Held-out rows in any form `train` accepts; if absent, `eval_fraction` of train is held out."""
    eval_fraction: float = 0.0
    """Fraction of train rows held out for evaluation when `eval` is not given (0 disables evaluation)."""
    max_prompt_length: int | None = None
    """Prompts longer than this many tokens are truncated (see `truncation_mode`); None: only `max_length` limits."""
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"
    """Which end of an over-long prompt to keep; `keep_end` keeps the last turn next to the response."""
    allow_unusable: bool = False
    """Train even when the data check finds the data unusable (errors dominate)."""
    split_seed: int | None = None
    """Seed of the held-out rows drawn by `eval_fraction`; None: `training.seed` (a reward-model ensemble varies
    one and keeps the other)."""
    reward_margin: Literal["auto", "margin", "ratings", "none"] = "auto"
    """Reward models (`task: reward`): where each pair's margin m in −log σ(r_w − r_l − m) comes from.
    `margin`: the row's `margin` number; `ratings`: `ratings_scale` × (`score_chosen` − `score_rejected`), the
    rating columns `preftune data convert` keeps; `auto`: `margin` when any row has one, else none; `none`: m = 0.
    A row without the column(s) is dropped with its reason."""
    ratings_scale: float = 1.0
    """With `reward_margin: ratings`, m = ratings_scale × (score_chosen − score_rejected)."""


@dataclass
class LossConfig:
    name: str | list[str] | None = None
    """Registered loss name (`preftune losses` lists them), or a list for a weighted combination (e.g. MPO);
    None: `dpo`, or `bradley_terry` with `task: reward`."""
    weights: list[float] | None = None
    """Weight per loss when `name` is a list (default 1.0 each)."""
    params: dict[str, Any] = field(default_factory=dict)
    """Hyperparameters of the loss, written directly in the `loss:` section (`beta: 0.1`, `gamma: 0.5`, ...)."""


@dataclass
class LoraConfig:
    r: int = 64
    """LoRA rank; DPO benefits from more capacity than SFT (64-128 is typical)."""
    alpha: int = 128
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input; 0 keeps the adapter-disabled reference pass identical across calls."""
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names (or `all-linear`) that receive adapters."""


@dataclass
class ReferenceConfig:
    model: str | None = None
    """Reference model path or hub id; None uses the initial policy (the adapter-disabled base with LoRA)."""
    precompute: bool = True
    """Compute reference log-probs once before training and cache them on disk instead of every step."""
    cache_dir: str | None = None
    """Where cached reference log-probs live; default `$PREFTUNE_CACHE` or `~/.cache/preftune/reference`."""


@dataclass
class EngineConfig:
    layout: Literal["padded", "shared_prompt", "packed"] = "packed"
    """How sequences are laid out for the forward pass; all give the same log-probs (tested to 1e-5 in fp32).
    `packed`: the prompt runs once per pair (rejected never sees chosen) and short pairs share a row, so padding
    is near zero; `shared_prompt`: one row per pair; `padded`: one right-padded row per sequence, for attention
    implementations that take no 4-D mask (flash_attention_2)."""
    chunk_size: int = 256
    """Completion tokens per LM-head chunk; at most chunk_size x vocabulary logits exist at once (forward and
    backward), e.g. 50 MiB in fp32 for a 49k vocabulary. Larger chunks were no faster on CPU. 0: no chunking,
    the completion positions' full logits through plain autograd (the naive head; same log-probs)."""
    group_by_length: bool = False
    """Batch training examples of similar length together (shuffled within mega-batches of 50 micro-batches,
    then the batches shuffled), so packed and padded rows carry little padding on data with a wide length
    spread. Off by default: it changes which examples share a step, and on the toy tasks length-homogeneous
    batches learned measurably worse (several method tests fell below their accuracy floor)."""
    compile: bool = False
    """Compile each decoder layer with `torch.compile` (inductor; on CPU it needs a C++ compiler). Fuses the
    element-wise work between the matrix products and recomputes it in backward instead of saving it: on the
    135M benchmark model on CPU, bf16 steps ran 1.2x faster and peak RSS fell 11-16% (fp32 steps: about the
    same speed, matrix products dominate), after 10-20 s of compilation. The precomputed reference pass,
    generation and gradient-checkpoint recomputation stay eager. Same math, rounded in a different order
    (parity with the eager path is tested to 1e-5 in fp32)."""
    reuse_freed_memory: bool = True
    """On CPU (Linux, glibc): keep freed memory in the heap for reuse during training instead of returning it to
    the system after every tensor, so steps stop paying page faults for their activations and gradients (10%
    faster end to end on the 135M bf16 benchmark, 1% more peak RSS); restored when training ends. No math
    changes."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in backward (less memory, about a third more compute)."""


@dataclass
class TrainingConfig:
    output_dir: str = REQUIRED
    """Run directory: metrics, checkpoints, dropped rows, the final model; one run per directory (a used one
    needs `--resume` or `--overwrite`)."""
    learning_rate: float = REQUIRED
    """Peak learning rate (DPO full fine-tuning usually 5e-7..5e-6; LoRA 5e-6..5e-5)."""
    per_device_batch_size: int = 2
    """Preference pairs (or completions, for unpaired losses) per process per micro-batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step; global batch = per_device_batch_size x this x processes."""
    num_epochs: float = 1.0
    """Passes over the training data (ignored when `max_steps` is set)."""
    max_steps: int | None = None
    """Optimizer steps to run; overrides `num_epochs`."""
    warmup_ratio: float = 0.0
    """Fraction of steps with linear warmup from 0."""
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warmup."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW (beta1, beta2)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value (None disables clipping)."""
    max_length: int = 512
    """Maximum tokens of prompt + one response; longer responses are truncated, longer prompts dropped."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Compute precision: `bf16` autocasts matrix products on CPU and GPU, weights stay fp32."""
    seed: int = 0
    """Seeds data order, initialisation of adapters and every RNG."""
    eval_every: int = 0
    """Evaluate every N optimizer steps (0: only at the end)."""
    save_every: int = 0
    """Write a resumable checkpoint every N optimizer steps (0: none)."""
    save_total_limit: int = 2
    """Checkpoints of this run kept on disk (oldest step removed first; 0 keeps all)."""
    logging_every: int = 1
    """Write train metrics every N optimizer steps."""
    max_nonfinite_steps: int = 3
    """Consecutive non-finite steps (skipped) after which the run stops, naming the last good checkpoint."""
    save_model: bool = True
    """Save the final model (or adapter) in Hugging Face format under `output_dir/final`."""
    progress_bar: bool = True
    """Show a progress bar with loss, margin, accuracy and tokens/s."""


@dataclass
class MonitorConfig:
    enabled: bool = True
    """Watch the run at every evaluation: margin health, KL to the reference, reward-hacking alarms, samples,
    early stopping and the best model (needs held-out data; see docs/monitoring.md)."""
    num_prompts: int = 16
    """Held-out prompts (the first distinct ones of the eval set) generated for at each evaluation (0: none)."""
    max_new_tokens: int = 32
    """Tokens per monitor generation at most."""
    max_kl: float | None = None
    """Stop the run (the best model is kept) when KL to the reference, k3 estimate in nats per sequence,
    exceeds this (e.g. 10); None: never."""
    kl_spike_factor: float = 10.0
    """Alarm when KL exceeds this multiple of its first measured value (or of 0.5 nats per sequence, if larger)."""
    reward_max_fraction: float = 0.99
    """Alarm when σ(mean eval implicit-reward margin) exceeds this: the implicit reward is saturated."""
    min_distinct_ratio: float = 0.5
    """Alarm when distinct-1 or distinct-2 of the policy's generations falls below this fraction of the
    reference's."""
    max_repetition: float = 0.5
    """Alarm when the self-repetition of the policy's generations (share of repeated bigrams) exceeds this."""
    max_length_ratio: float = 1.5
    """Alarm when the mean generation length exceeds this multiple of the reference's."""
    min_length_ratio: float = 0.5
    """Alarm when the mean generation length falls below this multiple of the reference's."""
    sample_every: int | None = None
    """Write greedy samples every N optimizer steps; None: at every evaluation."""
    print_samples: int = 2
    """Samples echoed to the console each time (all go to samples.jsonl and TensorBoard)."""
    early_stopping_metric: str = "eval/loss"
    """Metric for the best model and early stopping, `split/key` from metrics.jsonl (e.g.
    `eval/rewards/accuracies`, `monitor/kl/k3_seq`)."""
    early_stopping_mode: Literal["auto", "min", "max"] = "auto"
    """Whether lower or higher is better; auto: higher for accuracies, margins, rewards and win rates."""
    patience: int | None = None
    """Stop after this many evaluations without improvement of `early_stopping_metric`; None: never."""
    save_best: bool = True
    """Keep the model at the best `early_stopping_metric` in `output_dir/best` (rewritten when it improves;
    only when `training.save_model`)."""


@dataclass
class Config:
    model: Any = REQUIRED
    """Policy to tune, or the base of a reward model: hub id or local path (or, from Python, a loaded
    `PreTrainedModel`)."""
    task: Literal["policy", "reward"] = "policy"
    """`policy`: tune a causal LM on preferences; `reward`: train a reward model (a one-output
    sequence-classification head on any causal LM or encoder; loss `bradley_terry`; see docs/reward_models.md)."""
    tokenizer: Any = None
    """Tokenizer id or path (default: the model's); from Python, a loaded tokenizer."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation data."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The objective."""
    lora: LoraConfig | None = None
    """LoRA adapter settings; absent means full fine-tuning."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """Reference model and its log-prob cache."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Speed and memory options of the log-prob engine."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Optimisation, schedule, checkpoints."""
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    """Health checks, KL, alarms, samples and early stopping during training."""


# ----------------------------------------------------------------------------------------------------------------
# Parsing and type checking


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against ``tp``; accept the conversions YAML users expect (``5e-6`` as a float)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        sections = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and sections:  # a section: its own errors (unknown key, type) come through
            return _coerce(value, sections[0], where)
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        near = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"{where}: expected one of {_type_name(tp)}, got {value!r}{hint}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 5e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")


def _build(cls: type, values: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if cls is LossConfig:  # loss hyperparameters sit beside `name`; they are checked against the loss later
        values = dict(values)
        params = {k: values.pop(k) for k in list(values) if k not in ("name", "weights")}
        values["params"] = params
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            hint = f" Did you mean '{_join(where, near[0])}'?" if near else f" Valid keys: {', '.join(names)}."
            raise ConfigError(f"unknown key '{_join(where, key)}'.{hint}")
        kwargs[key] = _coerce(value, hints[key], _join(where, key))
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and f.default is REQUIRED and f.default_factory is REQUIRED:
            raise ConfigError(f"missing required key '{_join(where, f.name)}'")
    return cls(**kwargs)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    """``["training.learning_rate=1e-5", "lora=null"]`` -> nested dict, values parsed as YAML scalars."""
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key.sub=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key.strip()}: the value {raw!r} is not valid YAML "
                              f"({getattr(e, 'problem', None) or e}); quote it to pass a string") from None
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        # An unclosed bracket is detected at the end of the file; the context mark says where it was opened.
        mark = getattr(e, "context_mark", None) or getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{at}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections, got {type(tree).__name__}")
    return tree


def _shallow(obj: Any) -> Any:
    """A config dataclass as nested dicts, leaving field values (models, datasets, lists) uncopied."""
    if isinstance(obj, LossConfig):
        return {"name": obj.name, "weights": obj.weights, **obj.params}
    if dataclasses.is_dataclass(obj):
        return {f.name: _shallow(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return obj


def to_config(source: Config | dict | str | Path, overrides: list[str] | dict | None = None) -> Config:
    """Build a checked :class:`Config` from a Config, a dict or a YAML path, with optional overrides."""
    if isinstance(source, Config):
        tree = _shallow(source)  # not dataclasses.asdict: it would deep-copy a loaded model or dataset
    elif isinstance(source, dict):
        tree = source
    else:
        tree = load_yaml(source)
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
        tree = _merge(tree, extra)
    config = _build(Config, tree, "")
    if config.loss.name is None:
        config.loss.name = DEFAULT_LOSS[config.task]
    return config


DEFAULT_LOSS = {"policy": "dpo", "reward": "bradley_terry"}
"""``loss.name`` when the config leaves it out, by ``task``."""


def check_loss_params(config: Config) -> None:
    """Reject loss hyperparameters that the chosen loss(es) do not take, with a suggestion; fill defaults."""
    from preftune.losses import get_loss

    if config.loss.name is None:
        config.loss.name = DEFAULT_LOSS[config.task]
    names = config.loss.name if isinstance(config.loss.name, list) else [config.loss.name]
    specs = []
    for n in names:
        try:
            specs.append(get_loss(n))
        except KeyError as e:
            raise ConfigError(f"loss.name: {e.args[0]}") from None
    _check_task(config, names, specs)
    accepted = sorted({p for s in specs for p in s.hyperparameters})
    for key in config.loss.params:
        if key not in accepted:
            near = difflib.get_close_matches(key, accepted, n=1, cutoff=0.5)
            hint = f" Did you mean 'loss.{near[0]}'?" if near else f" {'/'.join(names)} takes: {', '.join(accepted) or 'none'}."
            raise ConfigError(f"unknown key 'loss.{key}'.{hint}")
    for spec in specs:
        sig = inspect.signature(spec.fn)
        for p in spec.hyperparameters:
            param = sig.parameters[p]
            if p in config.loss.params:
                value = config.loss.params[p]
                if value == "auto" and p in ("desirable_weight", "undesirable_weight"):
                    continue  # chosen from the class counts by the trainer (steps.balanced_weights)
                if isinstance(param.default, float) or p in ("beta", "gamma", "lam", "label_smoothing"):
                    config.loss.params[p] = _coerce(value, float, f"loss.{p}")
            elif param.default is inspect.Parameter.empty:
                raise ConfigError(f"missing required key 'loss.{p}' (no safe default for {spec.name})")
    if config.loss.weights is not None and len(config.loss.weights) != len(names):
        raise ConfigError(f"loss.weights has {len(config.loss.weights)} values for {len(names)} losses")


def _check_task(config: Config, names: list[str], specs: list) -> None:
    """A reward model trains with reward losses only (scores, not log-probs), and a policy never does."""
    from preftune.losses import registered_losses

    reward = [s.data == "reward" for s in specs]
    if config.task == "reward" and not all(reward):
        kinds = ", ".join(sorted(n for n, s in registered_losses().items() if s.data == "reward"))
        raise ConfigError(f"task: reward trains a reward model, which has scores, not log-probs; loss.name "
                          f"{'/'.join(names)} is a policy loss (reward-model losses: {kinds})")
    if config.task == "policy" and any(reward):
        raise ConfigError(f"loss {'/'.join(names)} trains a reward model: set `task: reward`")
    if config.task == "policy" and config.data.reward_margin in ("margin", "ratings"):
        raise ConfigError(f"data.reward_margin: {config.data.reward_margin} is for reward models (`task: reward`)")


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, doc) for every field, read from the string under each field."""
    source = inspect.getsource(cls)
    tree = ast.parse(source)
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign) and i + 1 < len(body):
            nxt = body[i + 1]
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        sub = [a for a in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(a)]
        if f.default is REQUIRED and f.default_factory is REQUIRED:
            default = "required"
        elif f.default_factory is not REQUIRED:
            default = "" if sub else repr(f.default_factory())
        else:
            default = repr(f.default)
        if sub:
            rows.append((key, "section", "" if default == "" else default, docs.get(f.name, "")))
            rows.extend(field_docs(sub[0], key))
        else:
            rows.append((key, _type_name(hints[f.name]), default, docs.get(f.name, "")))
    return rows
