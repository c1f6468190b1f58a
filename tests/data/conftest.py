"""Shared helpers for the data-tool tests: writing small JSONL files and a tiny local tokenizer."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows are dicts (written as JSON) or bytes/str (written verbatim as one line, for planted breakage)."""
    with open(path, "wb") as f:
        for row in rows:
            if isinstance(row, bytes):
                f.write(row.rstrip(b"\n") + b"\n")
            elif isinstance(row, str):
                f.write(row.rstrip("\n").encode("utf-8") + b"\n")
            else:
                f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def filler(i: int) -> dict:
    """A clean pair: distinct prompt, unrelated responses, chosen longer on even i and shorter on odd i."""
    long, short = f"answer {i} explains alpha beta gamma delta epsilon", f"reply {i} offers zeta eta theta"
    return {"prompt": f"Question number {i} about topic {i}?",
            "chosen": long if i % 2 == 0 else short, "rejected": short if i % 2 == 0 else long}


def run_cli(argv: list[str]) -> int:
    """The top-level CLI's wiring in miniature: ``preftune data ...`` through ``register``."""
    from preftune.data.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["data", *argv])
    return args.func(args)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A word-level tokenizer whose pre-tokenizer splits punctuation ("a,b" is 3 tokens but 1 whitespace word)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world question answer"], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    path = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return path


# Fixtures hand the helpers to tests, so no test imports this conftest by module name.
@pytest.fixture
def jsonl():
    return write_jsonl


@pytest.fixture
def read():
    return read_jsonl


@pytest.fixture
def pair():
    return filler


@pytest.fixture
def cli():
    return run_cli
