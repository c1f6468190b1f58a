"""Built-in reward functions with TRL's signature: ``fn(prompts, completions, **columns) -> list[float | None]``.

Reference them in a config as ``preftune.rewards:<name>``; parameters go in ``kwargs``::

    reward:
      functions:
        - preftune.rewards:toy_verifier
        - {function: preftune.rewards:format_reward, kwargs: {pattern: "^<think>.*</think>"}}
        - {function: preftune.rewards:length_penalty, kwargs: {max_words: 200, per_word: 0.01}}

Verifiers with more machinery (exact match against a column, JSON schema, unit tests) are judges:
``reward.judge: {type: verifier, kind: ...}`` (docs/judges.md).
"""

from __future__ import annotations

import re
from typing import Any


def _text(completion: Any) -> str:
    if isinstance(completion, list):  # TRL's conversational form: [{"role": "assistant", "content": ...}]
        return "".join(m.get("content", "") for m in completion)
    return completion


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, list):
        return next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), "")
    return prompt


def toy_verifier(prompts: list, completions: list, **_) -> list[float]:
    """1.0 when the completion repeats the toy task's words exactly (``preftune.toy.verify``), else 0.0."""
    from preftune import toy

    return [float(toy.verify(_prompt(p), _text(c))) for p, c in zip(prompts, completions)]


def format_reward(prompts: list, completions: list, *, pattern: str, **_) -> list[float]:
    """1.0 when the completion matches the regular expression ``pattern`` (``re.search``, DOTALL), else 0.0."""
    rx = re.compile(pattern, re.DOTALL)
    return [1.0 if rx.search(_text(c)) else 0.0 for c in completions]


def exact_answer(prompts: list, completions: list, *, answer: list, **_) -> list[float]:
    """1.0 when the stripped completion equals the row's ``answer`` column, else 0.0 (None without an answer)."""
    return [None if a is None else float(_text(c).strip() == str(a).strip()) for c, a in zip(completions, answer)]


def length_penalty(prompts: list, completions: list, *, max_words: int, per_word: float = 0.01, **_) -> list[float]:
    """−per_word for every whitespace word beyond ``max_words`` (0 up to it): a guard against length drift."""
    return [-per_word * max(0, len(_text(c).split()) - max_words) for c in completions]
