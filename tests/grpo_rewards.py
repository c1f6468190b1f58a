"""Reward functions for the GRPO tests, with TRL's signature, referenced as ``<this file>:<name>``.

Deterministic functions of the completion's token ids, so every configuration of one test scores the same
samples the same way.
"""

from __future__ import annotations


def varied(prompts, completions, completion_ids, **_):
    """A spread of rewards in [0, 1): the completion's token ids hashed to sevenths (length counts too)."""
    return [((sum(ids) + 3 * len(ids)) % 7) / 7.0 for ids in completion_ids]


def constant(prompts, completions, **_):
    """1.0 for everything: no group ever has a reward spread."""
    return [1.0] * len(completions)


def half_flat(prompts, completions, completion_ids, **_):
    """Constant (0.5) for prompts whose verb is 'repeat' or 'echo'; ``varied`` for 'copy' and 'say' prompts."""
    spread = varied(prompts, completions, completion_ids)
    return [0.5 if p.split()[0] in ("repeat", "echo") else s for p, s in zip(prompts, spread)]


def wrong_count(prompts, completions, **_):
    return [1.0] * (len(completions) + 1)


def not_a_number(prompts, completions, **_):
    return ["high"] * len(completions)


def raises_on_long(prompts, completions, completion_ids, **_):
    """Fine on the empty check completion; raises on the first real completion longer than 2 tokens."""
    for ids in completion_ids:
        if len(ids) > 2:
            raise ValueError("cannot score long answers")
    return [0.0] * len(completions)


def always_raises(prompts, completions, **_):
    raise RuntimeError("scorer offline")
