"""Session fixtures shared by the trainer, data, config and CLI tests.

Everything is local and tiny: the toy task's word-level tokenizer (trained in well under a second) and Llama
models of hidden size 32, built from a seed. No test writes outside its tmp dirs: ``PREFTUNE_CACHE`` points at a
fresh tmp dir for every test, and the hub is offline.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

# A 2-core machine shared with other jobs: one intra-op thread keeps timings stable and results deterministic.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HIDDEN = 32  # model width used throughout; small enough that a training step takes milliseconds


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Reference log-prob caches go to a fresh tmp dir per test, never ~/.cache."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path_factory.mktemp("preftune-cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy_tok():
    """The toy task's tokenizer (word-level, BOS/EOS/pad, a chat template ending turns with ``<|end|>``)."""
    from preftune import toy

    return toy.build_tokenizer()


@pytest.fixture(scope="session")
def make_model(toy_tok):
    """Factory: a fresh tiny Llama; the same seed gives bitwise the same weights."""
    from preftune import toy

    def make(seed: int = 0, hidden: int = HIDDEN, layers: int = 2):
        return toy.build_model(toy_tok, seed=seed, hidden=hidden, layers=layers)

    return make


@pytest.fixture(scope="session")
def toy_items():
    """(train items, held-out items) of the toy echo task; held-out word lists never occur in train."""
    from preftune import toy

    return toy.split_items(0, 160, 64)


@pytest.fixture(scope="session")
def train_pairs(toy_items) -> list[dict]:
    from preftune import toy

    return toy.pair_rows(toy_items[0], 0)


@pytest.fixture(scope="session")
def eval_pairs(toy_items) -> list[dict]:
    from preftune import toy

    return toy.pair_rows(toy_items[1], 1)


@pytest.fixture(scope="session")
def sft_rows(toy_items) -> list[dict]:
    from preftune import toy

    return toy.sft_rows(toy_items[0], 0)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def pairs_jsonl(tmp_path_factory, train_pairs) -> Path:
    """The first 32 training pairs as a JSONL file."""
    return _write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", train_pairs[:32])


@pytest.fixture(scope="session")
def write_jsonl():
    return _write_jsonl


@pytest.fixture(scope="session")
def saved_model_dir(tmp_path_factory, toy_tok, make_model) -> Path:
    """A tiny toy model and its tokenizer written with ``save_pretrained`` (seed 0)."""
    path = tmp_path_factory.mktemp("toy-model")
    make_model(0).save_pretrained(path)
    toy_tok.save_pretrained(path)
    return path


@pytest.fixture
def dpo_config(toy_tok, tmp_path):
    """Factory: a small DPO config dict for ``preftune.train``; keyword sections are merged into the defaults."""

    def make(model, train, *, eval=None, loss=None, training=None, **sections) -> dict:
        cfg = {
            "model": model,
            "tokenizer": toy_tok,
            "data": {"train": train, "eval": eval},
            "loss": {"name": "dpo", "beta": 0.1, **(loss or {})},
            "training": {
                "output_dir": str(tmp_path / "run"), "learning_rate": 1e-3, "per_device_batch_size": 4,
                "max_steps": 3, "max_length": 64, "progress_bar": False, "save_model": False,
                **(training or {}),
            },
        }
        for key, value in sections.items():
            cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
        return cfg

    return make


@pytest.fixture
def quiet_log():
    """A ``log=`` callable for ``preftune.train`` that keeps the lines for assertions."""

    class Lines(list):
        def __call__(self, *args):
            self.append(" ".join(str(a) for a in args))

        def text(self) -> str:
            return "\n".join(self)

    return Lines()


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


@pytest.fixture
def one_thread():
    """One torch thread for the test (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``):
    the machine is shared, and two threads per op oversubscribe it and slow the tiny models ten-fold."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def toy_sft(tmp_path_factory):
    """The quickstart's SFT model (seed 0), trained ONCE per test session for every method's learning tests.

    A :class:`preftune.toy.quickstart.SFTPhase` without its live model (load ``model_dir`` with
    ``AutoModelForCausalLM.from_pretrained`` for a private copy): ``run_dir`` (pass it as a quickstart's
    ``sft_dir=``), ``model_dir``, ``tokenizer``, ``items`` (train prompts SFT never saw), ``held_out``.
    """
    import dataclasses

    import torch

    from preftune.toy.quickstart import sft_phase

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the quickstart runs it: one thread is faster for a 0.1M-parameter model
    try:
        phase = sft_phase(tmp_path_factory.mktemp("toy-sft"), seed=0, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    return dataclasses.replace(phase, model=None)


# ---- online DPO (tests/test_online_*.py) ---------------------------------------------------------------------

DRAWS_PLOTS = {"test_online_quickstart_meets_targets"}  # runs as the command does, plots and report included


@pytest.fixture
def no_plots(monkeypatch, request):
    """Skip the end-of-run plots (seconds per run) except in the tests named in DRAWS_PLOTS."""
    if request.node.name not in DRAWS_PLOTS:
        monkeypatch.setattr("preftune.trainer.loop._plots", lambda run_dir, say: None)


@pytest.fixture(scope="session")
def online_rewards(tmp_path_factory) -> Path:
    """``online_helpers.REWARDS`` written to a file: reference its functions as ``f"{online_rewards}:by_column"``."""
    path = tmp_path_factory.mktemp("rewards") / "my_rewards.py"
    from online_helpers import REWARDS

    path.write_text(REWARDS)
    return path


@pytest.fixture
def online_config(toy_tok, tmp_path, online_rewards):
    """Factory: an online DPO config dict; ``fn`` names reward functions of ``online_helpers.REWARDS``;
    keyword sections merge into the defaults."""

    def make(model, train, *, fn=("by_column",), eval=None, reward=None, rollout=None, training=None, **sections):
        cfg = {
            "model": model, "tokenizer": toy_tok, "data": {"train": train, "eval": eval},
            "loss": {"name": "dpo", "beta": 0.1},
            "rollout": {"num_generations": 4, "max_new_tokens": 6, **(rollout or {})},
            "reward": {"functions": [f"{online_rewards}:{f}" for f in fn], **(reward or {})},
            "training": {"output_dir": str(tmp_path / "run"), "learning_rate": 1e-3, "per_device_batch_size": 4,
                         "max_steps": 1, "max_length": 64, "progress_bar": False, "save_model": False,
                         **(training or {})},
        }
        for key, value in sections.items():
            cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
        return cfg

    return make
