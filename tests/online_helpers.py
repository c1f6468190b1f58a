"""Shared parts of the online DPO tests (``test_online_dpo.py``, ``test_online_resume.py``; their fixtures
``online_config``, ``online_rewards`` and ``no_plots`` are in conftest.py): reward functions driven by prompt
columns, prompt rows, reading metrics. Kept out of conftest.py under a unique module name so the test files
import exactly what they use.

``by_column`` gives sample j of a prompt with column ``spread`` = s the reward s·j, so the prompt's best is
sample 3 (3s), its worst sample 0 (0), and s = 0 is a tie: the numbers of a run are hand-computable.
"""

from __future__ import annotations

from pathlib import Path

from preftune import toy
from preftune.runlog import read_metrics

REWARDS = '''
import math


def by_column(prompts, completions, spread, n=4, **_):
    """Sample j of a prompt scores spread * j (the samples of a prompt are consecutive)."""
    return [float(s) * (i % n) for i, s in enumerate(spread)]


def none_first(prompts, completions, spread, n=4, **_):
    """by_column, but no score (None) for sample 0 of every prompt."""
    return [None if i % n == 0 else float(s) * (i % n) for i, s in enumerate(spread)]


def constant(prompts, completions, **_):
    return [1.0] * len(completions)


def zero(prompts, completions, **_):
    return [0.0] * len(completions)


def boom(prompts, completions, explode, **_):
    for e in explode:
        if e:
            raise ValueError("cannot score this one")
    return [0.0] * len(completions)


def short(prompts, completions, **_):
    return [1.0] * (len(completions) - 1)


def text(prompts, completions, **_):
    return ["good"] * len(completions)


def overlap(prompts, completions, **_):
    """Words of the completion that occur in the prompt: content-dependent, so a resumed run that sampled
    differently would score differently."""
    return [float(sum(w in p.split() for w in c.split())) for p, c in zip(prompts, completions)]
'''

def prompt_rows(n: int, spread=1.0, **columns) -> list[dict]:
    """n toy prompts with a ``spread`` column (a number for all, or one per row) and other columns."""
    items = toy.split_items(0, n, 0)[0]
    spreads = spread if isinstance(spread, list) else [spread] * n
    return [{"prompt": it.prompt, "spread": s, **{k: v[i] for k, v in columns.items()}}
            for i, (it, s) in enumerate(zip(items, spreads))]


def train_records(run_dir: Path, split: str = "train") -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["split"] == split]
