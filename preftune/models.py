"""Loading the policy, tokenizer and reference; LoRA; freezing.

The reference is never a second copy when it need not be: with LoRA it is the same weights with the adapter
disabled; with full fine-tuning and precomputed reference log-probs it is the policy before its first step.
Only a separate ``reference.model``, or full fine-tuning without precompute, loads another model, and that
one is frozen by construction (no grad, eval mode).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from preftune.errors import PreftuneError


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] or Path(name).exists()


def _load(kind: str, name: str, loader):
    path = Path(name).expanduser()
    if path.exists():
        return loader(str(path))
    if _looks_local(name) or name.count("/") > 1:
        raise PreftuneError(f"{kind} path does not exist: {name}")
    try:
        return loader(name)
    except OSError as e:
        raise PreftuneError(
            f"could not load {kind} {name!r}: not a local path, and the hub does not serve it from here "
            f"(no network, a typo, or a gated repo): {str(e).splitlines()[0]}"
        ) from None


def load_tokenizer(tokenizer, model_name):
    """A loaded tokenizer is used as is; a name or path is loaded. A missing pad token falls back to EOS."""
    from transformers import AutoTokenizer

    if tokenizer is None:
        if not isinstance(model_name, (str, os.PathLike)):
            raise PreftuneError("a loaded model needs a tokenizer: pass `tokenizer=` or set `tokenizer:`")
        tokenizer = model_name
        kind = "model"
    else:
        kind = "tokenizer"
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = _load(kind, os.fspath(tokenizer), AutoTokenizer.from_pretrained)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(model, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A loaded model is used as is; a hub id or path is loaded in ``dtype`` (fp32 master weights)."""
    from transformers import AutoModelForCausalLM

    if isinstance(model, nn.Module):
        return model
    return _load("model", os.fspath(model), lambda n: AutoModelForCausalLM.from_pretrained(n, dtype=dtype))


def apply_lora(model: nn.Module, lora, seed: int) -> nn.Module:
    """Wrap ``model`` with a fresh LoRA adapter (peft); only adapter weights train."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=lora.target_modules, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        raise PreftuneError(f"lora.target_modules: {e}") from None


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


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that train (all for full fine-tuning, the adapter for LoRA), by name."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_pretrained(model: nn.Module, tokenizer, out: Path) -> None:
    """Hugging Face format: the full model, or the adapter (``PeftModel.from_pretrained``), plus tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
