"""Reward functions for the PPO trainer tests (TRL's signature), referenced as ``tests/ppo_rewards.py:<name>``."""


def constant(prompts, completions, **_):
    """1.0 for every completion: no completion is better than another."""
    return [1.0 for _ in completions]


def words(prompts, completions, **_):
    """A tenth of the number of words: longer is better (varies between samples of a random model)."""
    return [0.1 * len(c.split()) for c in completions]
