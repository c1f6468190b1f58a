"""Fixtures of the driver tests: the toy task's prompts and pairs as files, tiny saved models, and a judge that
separates the outputs of untrained tiny models (so pairs exist without an SFT phase)."""

from __future__ import annotations

from pathlib import Path

import pytest

from preftune import toy

from .helpers import write_jsonl


@pytest.fixture(scope="session")
def toy_files(tmp_path_factory) -> dict[str, Path]:
    """prompts.jsonl (64 train prompts), eval.jsonl (8 held-out prompts), pairs.jsonl, eval_pairs.jsonl."""
    root = tmp_path_factory.mktemp("tune-data")
    train, held = toy.split_items(3, 64, 8)
    return {
        "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": it.prompt} for it in train]),
        "eval": write_jsonl(root / "eval.jsonl", [{"prompt": it.prompt} for it in held]),
        "pairs": write_jsonl(root / "pairs.jsonl", toy.pair_rows(train, 0)),
        "eval_pairs": write_jsonl(root / "eval_pairs.jsonl", toy.pair_rows(held, 1)),
    }


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory, toy_tok, make_model) -> Path:
    """A second tiny toy model (seed 1), saved with its tokenizer."""
    path = tmp_path_factory.mktemp("toy-model-1")
    make_model(1).save_pretrained(path)
    toy_tok.save_pretrained(path)
    return path
