"""Rollouts: sampling responses to prompts (``generate``) for judging into preference pairs (``preftune.synth``).

See :mod:`preftune.rollout.generate` for the backends, the seed scheme and the resumable GEN.jsonl format.
"""
