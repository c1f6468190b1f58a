"""Shared parts of the GRPO tests (``test_grpo.py``, ``test_grpo_rollout.py``): the config factory, prompt rows,
reading metrics, built runs and the gradient spy. The reward functions are in ``grpo_rewards.py``.
Kept out of conftest.py under a unique module name so the test files import exactly what they use."""

from __future__ import annotations

from pathlib import Path

import torch

from preftune import toy
from preftune.config import to_config
from preftune.runlog import read_metrics
from preftune.trainer.build import build_run

REWARDS = Path(__file__).with_name("grpo_rewards.py")
AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")


def prompt_rows(n: int) -> list[dict]:
    return [{"prompt": it.prompt} for it in toy.split_items(0, n, 0)[0]]


def grpo_config(toy_tok, tmp_path):
    """Factory: a GRPO config dict; ``fn`` names reward functions of ``grpo_rewards.py``; sections merge in."""

    def make(model, train, *, fn=("varied",), loss=None, rollout=None, reward=None, training=None, **sections):
        cfg = {
            "model": model, "tokenizer": toy_tok, "data": {"train": train},
            "loss": {"name": "grpo", **(loss or {})},
            "rollout": {"num_generations": 4, "max_new_tokens": 6, **(rollout or {})},
            "reward": {"functions": [f"{REWARDS}:{f}" for f in fn], **(reward or {})},
            "training": {"output_dir": str(tmp_path / "run"), "learning_rate": 1e-3, "per_device_batch_size": 4,
                         "max_steps": 1, "max_length": 64, "progress_bar": False, "save_model": False,
                         **(training or {})},
        }
        for key, value in sections.items():
            cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
        return cfg

    return make


def records(run_dir: Path, split: str = "train") -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["split"] == split]


def spy_on_gradients(monkeypatch) -> list[list[torch.Tensor]]:
    """Every optimizer step's gradients, read where the loop clips them (as the accumulation test does)."""
    real_clip = torch.nn.utils.clip_grad_norm_
    grads: list[list[torch.Tensor]] = []

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        grads.append([p.grad.detach().clone() for p in params])
        return real_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    return grads


def built(cfg):
    """A built run (its source, model and parts) without running any step."""
    return build_run(to_config(cfg), None, lambda *_: None)
