"""Loading the policy, tokenizer, reference and reward models; LoRA; freezing; the two model kinds.

The reference is never a second copy when it need not be: with LoRA it is the same weights with the adapter
disabled; with full fine-tuning and precomputed reference log-probs it is the policy before its first step.
Only a separate ``reference.model``, or full fine-tuning without precompute, loads another model, and that
one is frozen by construction (no grad, eval mode).

The loop trains one of two model kinds (``task`` in the config, :data:`MODEL_KINDS`): a policy, whose forward
gives sequence log-probs (``LogpModel``), or a reward model, a sequence-classification head with one output on
any causal LM or encoder, whose forward gives one score per sequence (:class:`ScoreModel`). Both take the same
batch tensors and return ``(values (S,), completion token counts (S,))``, so the loop and the steps call them
alike.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune.errors import PreftuneError
from preftune.logprobs import LogpModel

# Written into a trained reward model's config: ``RewardModelJudge`` (input_format "auto") then tokenizes
# (prompt, response) exactly as training did (``data.tokenize``), so scores at judging time match training.
INPUT_FORMAT_KEY = "preftune_input_format"


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] or Path(name).exists()


def _load(kind: str, name: str, loader):
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists() and (kind == "model" or not _has_tokenizer(path)):
            what = ("a LoRA adapter directory (adapter_config.json): give its base model as the model"
                    if (path / "adapter_config.json").exists() else "is it a directory written by save_pretrained?")
            raise PreftuneError(f"{kind} directory {name} has no config.json; {what}")
        try:
            return loader(str(path))
        except (OSError, ValueError) as e:
            raise PreftuneError(f"could not load {kind} {name}: {str(e).strip().splitlines()[0]}") from None
    if _looks_local(name) or name.count("/") > 1:
        raise PreftuneError(f"{kind} path does not exist: {name}")
    try:
        return loader(name)
    except OSError as e:
        raise PreftuneError(
            f"could not load {kind} {name!r}: not a local path, and the hub does not serve it from here "
            f"(no network, a typo, or a gated repo): {str(e).splitlines()[0]}"
        ) from None


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``model_dtype`` -> the torch dtype of the weights."""


def hub_options(cfg) -> dict[str, Any]:
    """The ``from_pretrained`` keywords a config sets: attention kernel, remote code, revision."""
    options: dict[str, Any] = {"trust_remote_code": bool(getattr(cfg, "trust_remote_code", False))}
    if getattr(cfg, "attn_implementation", None):
        options["attn_implementation"] = cfg.attn_implementation
    if getattr(cfg, "revision", None):
        options["revision"] = cfg.revision
    return options


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                              "tokenizer.model", "vocab.txt"))


def load_tokenizer(tokenizer, model_name, *, trust_remote_code: bool = False, revision: str | None = None):
    """A loaded tokenizer is used as is; a name or path is loaded. A missing pad token falls back to EOS, a
    missing EOS (encoders such as BERT) to the separator token. ``revision`` applies when the tokenizer is the
    model's (a separate tokenizer id has its own default branch)."""
    from transformers import AutoTokenizer

    if tokenizer is None:
        if not isinstance(model_name, (str, os.PathLike)):
            raise PreftuneError("a loaded model needs a tokenizer: pass `tokenizer=` or set `tokenizer:`")
        tokenizer = model_name
        kind = "model"
    else:
        kind = "tokenizer"
    if isinstance(tokenizer, (str, os.PathLike)):
        options = {"trust_remote_code": trust_remote_code, **({"revision": revision} if revision and kind == "model"
                                                                else {})}
        tokenizer = _load(kind, os.fspath(tokenizer), lambda n: AutoTokenizer.from_pretrained(n, **options))
    if tokenizer.eos_token_id is None and getattr(tokenizer, "sep_token", None) is not None:
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(model, dtype: torch.dtype = torch.float32, **options) -> nn.Module:
    """A loaded model is used as is; a hub id or path is loaded in ``dtype`` with ``options`` (``hub_options``,
    ``quantization_config``, ``device_map``) passed to ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    if isinstance(model, nn.Module):
        return model
    return _load("model", os.fspath(model), lambda n: AutoModelForCausalLM.from_pretrained(n, dtype=dtype, **options))


def cast_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Parameters to ``dtype`` in place, buffers left as they are: what ``from_pretrained(dtype=...)`` gives (the
    rotary tables stay fp32); tied weights stay tied (one Parameter, cast once)."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    if getattr(model, "config", None) is not None:
        model.config.dtype = dtype
    return model


def quantization_refusal(bits: str, device_type: str) -> str | None:
    """The one-line reason ``lora.quantization`` cannot run here (no CUDA, no bitsandbytes), or None."""
    import importlib.util

    needs = f"QLoRA (lora.quantization: {bits}) needs a CUDA GPU and bitsandbytes (pip install bitsandbytes)"
    if device_type != "cuda" or not torch.cuda.is_available():
        return f"{needs}; this machine has no CUDA device: remove lora.quantization to train plain LoRA"
    if importlib.util.find_spec("bitsandbytes") is None:
        return f"{needs}; bitsandbytes is not installed: pip install bitsandbytes"
    return None


def quantization_config(bits: str, compute_dtype: torch.dtype):
    """bitsandbytes settings of QLoRA: 4-bit NF4 with double quantization (the QLoRA paper's recipe,
    arXiv 2305.14314v1, Sec. 3) or 8-bit LLM.int8 weights; products computed in ``compute_dtype``."""
    from transformers import BitsAndBytesConfig

    if bits == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(cfg, kind: ModelKind, tokenizer, device: torch.device, model=None) -> nn.Module:
    """The model to train (or a separate reference, ``model=cfg.reference.model``), as the config asks:
    weights in ``model_dtype``, the attention kernel, remote code and revision, on ``device``; with
    ``lora.quantization`` quantized by bitsandbytes and prepared for k-bit training (norms in fp32, input
    gradients on for the adapter, gradient checkpointing as ``engine.gradient_checkpointing`` says)."""
    dtype = DTYPES[cfg.model_dtype]
    source = cfg.model if model is None else model
    options = hub_options(cfg)
    bits = cfg.lora.quantization if cfg.lora is not None else None
    if bits:
        refusal = quantization_refusal(bits, device.type)
        if refusal:
            raise PreftuneError(refusal)
        if isinstance(source, nn.Module):
            raise PreftuneError("lora.quantization loads the base quantized from its hub id or path; pass the "
                                "model as a name or path, not a loaded model")
        options.update(quantization_config=quantization_config(bits, dtype),
                       device_map={"": device.index or 0})
    loaded = kind.load(source, tokenizer, dtype=dtype, **options)
    if bits:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(
            loaded, use_gradient_checkpointing=cfg.engine.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if any(hasattr(p, "ds_id") for p in loaded.parameters()):
        return loaded  # ZeRO-3 partitioned the weights as they loaded, each on its process's device
    return cast_weights(loaded, dtype).to(device)


def load_reward_model(model, tokenizer, dtype: torch.dtype = torch.float32, **options) -> nn.Module:
    """A sequence-classification model with one output (the reward r(x, y)) on any causal LM or encoder.

    A hub id or path loads with ``AutoModelForSequenceClassification.from_pretrained(name, num_labels=1)``: the
    pretrained body and a freshly initialised head (``score`` or ``classifier``), unless the checkpoint is
    already a one-output reward model. A loaded ``...ForSequenceClassification`` is used as is; a loaded causal
    LM gets a new head on its body (same weights, the LM head dropped). ``config.pad_token_id`` is set to the
    tokenizer's pad id, since the model finds each sequence's last real token by looking for pad ids.
    """
    from transformers import AutoModelForSequenceClassification

    if isinstance(model, nn.Module):
        if model.config.num_labels != 1 or "ForSequenceClassification" not in type(model).__name__:
            model = _with_score_head(model)
    else:
        model = _load("model", os.fspath(model), lambda n: AutoModelForSequenceClassification.from_pretrained(
            n, num_labels=1, dtype=dtype, **options))
    model.config.pad_token_id = tokenizer.pad_token_id
    setattr(model.config, INPUT_FORMAT_KEY, "preftune")
    return model


def _with_score_head(lm: nn.Module) -> nn.Module:
    """The sequence-classification twin of a loaded model (one output), sharing nothing: body weights copied."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(lm.config)
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config).to(next(lm.parameters()).dtype)
    missing, _ = model.load_state_dict(lm.state_dict(), strict=False)
    body = [k for k in missing if not k.startswith(_head_name(model) + ".")]
    if body:
        raise PreftuneError(f"cannot put a reward head on {type(lm).__name__}: its weights do not match "
                            f"{type(model).__name__} (missing {body[:3]}); pass a hub id or path instead")
    return model


def _head_name(model: nn.Module) -> str:
    """The attribute holding a sequence-classification model's output layer."""
    for name in ("score", "classifier"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise PreftuneError(f"{type(model).__name__} has no `score` or `classifier` head to train as a reward model")


class ScoreModel(nn.Module):
    """Wraps a one-output sequence-classification model so that ``forward(batch) -> (scores (S,), lengths (S,))``.

    Takes the trainer's batch tensors (the padded layout: one right-padded row per sequence) and returns the
    model's own pooled logit per row, the same forward ``RewardModelJudge`` runs: the last non-pad token for
    causal LMs, the first token's pooled state for BERT-style encoders. ``lengths`` counts completion tokens.
    Naive equivalent, one sequence at a time::

        score = model(input_ids=torch.tensor([prompt + completion])).logits[0, 0]
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, attention_mask, target_index, target_ids, target_seq,
                num_sequences: int):
        if attention_mask.dim() != 2 or input_ids.shape[0] != num_sequences:
            raise PreftuneError("a reward model scores the padded layout (one row per sequence)")
        scores = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]  # (S,)
        lengths = torch.bincount(target_seq, minlength=num_sequences)  # (S,)
        return scores.float(), lengths


@dataclass(frozen=True)
class ModelKind:
    """What the loop needs to know about the model it trains.

    Attributes:
        load: (config.model, tokenizer, dtype=..., **from_pretrained options) -> the model to train.
        forward: (model, engine config) -> a module from batch tensors to (values (S,), token counts (S,)):
            sequence log-probs for a policy, scores for a reward model.
        lora_task: peft ``task_type`` of the adapter.
        layout: a layout the model requires (None: ``engine.layout``).
        generates: whether the model generates text (monitor samples, KL, length and diversity checks).
    """

    load: Callable[[Any, Any], nn.Module]
    forward: Callable[[nn.Module, Any], nn.Module]
    lora_task: str
    layout: str | None
    generates: bool


MODEL_KINDS = {
    "policy": ModelKind(lambda model, tok, **options: load_causal_lm(model, **options),
                        lambda model, engine: LogpModel(model, engine.chunk_size, engine.compile), "CAUSAL_LM", None,
                        True),
    "reward": ModelKind(load_reward_model, lambda model, _: ScoreModel(model), "SEQ_CLS", "padded", False),
}


def apply_lora(model: nn.Module, lora, seed: int, task_type: str = "CAUSAL_LM") -> nn.Module:
    """Wrap ``model`` with a fresh LoRA adapter (peft); only adapter weights train.

    In place, as peft does: the adapter layers are injected into ``model`` itself (its base weights are left
    untouched and frozen), so a model passed from Python carries the trained adapter after training, as a
    fully fine-tuned one carries its trained weights. A model that already has LoRA layers is refused: a
    second adapter named ``default`` would silently mix with the first.
    ``task_type="SEQ_CLS"`` (reward models): the new head trains in full beside the adapter (modules_to_save).
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise PreftuneError("lora: this model already has LoRA layers (an in-memory model keeps the adapter of "
                            "an earlier LoRA run: peft adds it in place); pass a fresh model, one loaded from "
                            "disk, or the earlier run's PeftModel after `.unload()`")
    torch.manual_seed(seed)
    head = [_head_name(model)] if task_type == "SEQ_CLS" else None
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=lora.target_modules, task_type=task_type, modules_to_save=head)
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:  # peft says which setting it rejects; name that key, not always target_modules
        text = str(e)
        key = ("lora.r" if "`r`" in text else "lora.alpha" if "alpha" in text else
               "lora.target_modules" if "target" in text or "module" in text else "lora")
        raise PreftuneError(f"{key}: {text}") from None


def freeze(model: nn.Module) -> nn.Module:
    """No gradients, eval mode: a frozen reference by construction."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextlib.contextmanager
def reference_mode(policy: nn.Module):
    """Within this block ``policy`` computes reference log-probs: adapter disabled (LoRA), eval mode, no grad."""
    was_training = policy.training
    policy.eval()
    ctx = policy.disable_adapter() if is_peft(policy) else contextlib.nullcontext()
    try:
        with ctx, torch.no_grad():
            yield policy
    finally:
        policy.train(was_training)


def save_pretrained(model: nn.Module, tokenizer, out: Path, state_dict: dict | None = None) -> None:
    """Hugging Face format: the full model, or the adapter (``PeftModel.from_pretrained``), plus tokenizer; the
    weights keep their dtype (``model_dtype``), as ``from_pretrained`` records it in the config.

    A LoRA reward model is saved merged, as a full model: ``AutoModelForSequenceClassification.from_pretrained``
    cannot load a classification adapter on its own (the base checkpoint would get a fresh head of the wrong
    shape), and a reward model is used as one standalone scorer. ``state_dict``: the model's full state dict
    gathered from a sharded engine (FSDP, ZeRO-3), under the model's own names, used instead of its sharded one.
    """
    out.mkdir(parents=True, exist_ok=True)
    with _no_progress_bars():  # transformers' "Writing model shards" bar would break the training bar's line
        if is_peft(model) and model.peft_config[model.active_adapter].task_type == "SEQ_CLS":
            if state_dict is not None:
                raise PreftuneError("a LoRA reward model cannot be saved merged from sharded weights: train it "
                                    "without FSDP / ZeRO-3, or fully fine-tune it")
            model.get_base_model().save_pretrained(str(out), state_dict=merged_state_dict(model))
        elif state_dict is not None:
            model.save_pretrained(str(out), state_dict=state_dict)
        else:
            model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' and huggingface_hub's progress bars off for the block, each restored as it was."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from transformers.utils import logging as hf_logging

    was_on, hub_was_off = hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
            if hub_was_off:
                disable_progress_bars()


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with the active LoRA adapter folded in, under the base model's own names;
    the model itself is left untouched (training continues after a best-model save).

    Per adapted layer W' = W + ΔW (``get_delta_weight``: B·A·alpha/r); trained ``modules_to_save`` copies
    replace their originals. Naive equivalent (destructive): ``model.merge_and_unload().state_dict()``.
    """
    from peft.tuners.lora import LoraLayer

    adapter = model.active_adapter
    base = model.get_base_model()
    deltas = {f"{name}.base_layer.weight": module.get_delta_weight(adapter)
              for name, module in base.named_modules() if isinstance(module, LoraLayer) and adapter in module.lora_A}
    out = {}
    for key, value in base.state_dict().items():
        if "lora_" in key or ".original_module." in key or (".modules_to_save." in key
                                                             and f".modules_to_save.{adapter}." not in key):
            continue
        if key in deltas:
            value = value + deltas[key].to(value.dtype)
        out[key.replace(".base_layer.", ".").replace(f".modules_to_save.{adapter}.", ".")] = value.detach().clone()
    return out


def disable_dropout(model: nn.Module) -> nn.Module:
    """Every dropout of ``model`` off, in train mode too: ``nn.Dropout`` modules get p = 0, and attention layers
    that apply their ``attention_dropout`` rate functionally (transformers' attention classes) get 0.

    On-policy methods that compare two passes over the same tokens (PPO's ratio π/π_old, its values against
    V_old) need both passes deterministic (TRL's ``disable_dropout_in_model`` does the first half)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model
