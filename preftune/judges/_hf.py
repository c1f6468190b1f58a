"""Shared plumbing of the local (Hugging Face) judges: loading, chat formatting, length-sorted padded batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch


def load_model_and_tokenizer(
    model: Any,
    tokenizer: Any,
    auto_cls: Any,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
) -> tuple[Any, Any]:
    """A model in eval mode and its tokenizer, from a path/hub id or from objects already loaded.

    A loaded model must come with its tokenizer: guessing one from ``name_or_path`` would load a second
    copy of files the caller already has, or the wrong ones.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if isinstance(model, str | Path):
        from transformers import AutoTokenizer

        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(str(model))
        model = auto_cls.from_pretrained(str(model), **({"dtype": dtype} if dtype is not None else {}))
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with a loaded model")
    elif dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def encode(
    tokenizer: Any, messages: list[dict[str, str]], plain_text: str, generation_prompt: bool
) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template, or of ``plain_text`` when it has none.

    The chat-template text already holds its special tokens, so it is encoded without adding them again.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(plain_text)["input_ids"])


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Index batches with similar lengths together (longest first), so little compute goes to padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def pad(
    seqs: Sequence[Sequence[int]], pad_id: int, side: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, each (B, T_max), padded on ``side`` ("left" or "right")."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    return ids.to(device), mask.to(device)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's first parameter lives (inputs go there)."""
    return next(model.parameters()).device
