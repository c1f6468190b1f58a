"""Offline evaluation of a tuned model against its reference: ``preftune eval MODEL --data PAIRS ...``.

    evaluate_model(model, tokenizer, pairs, reference=ref, judge=judge) -> dict   (also written as JSON)
    format_table(result) -> str                                                  (the terminal table)

Three parts, each in its own module:
    preference_accuracy  held-out pairs: accuracy by implicit reward (with a reference) and by plain log-prob
                         comparison, the margin distribution, perplexity of chosen responses
    drift                generations on held-out prompts: KL to the reference (k1, k3; per token and per
                         sequence), mean output length and distinct-n for the model and the reference
    win_rate             the model's greedy responses against the reference's through a judge, both orders,
                         ties counted; raw and length-controlled

Generations: sampled ones (temperature 1, seed ``seed + i`` for prompt i) measure KL, length and diversity,
as the training monitor does; greedy ones are judged (what a user of the model sees by default).
"""

from __future__ import annotations

__all__ = ["evaluate_model", "format_table"]


def __getattr__(name: str):
    # Lazy, so that `preftune --help` (which imports preftune.eval.cli) does not import torch.
    if name in __all__:
        from preftune.eval import evaluate

        return getattr(evaluate, name)
    raise AttributeError(f"module 'preftune.eval' has no attribute {name!r}")
