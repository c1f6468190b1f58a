"""Built-in reward functions with TRL's signature: ``fn(prompts, completions, **columns) -> list[float | None]``.

Reference them in a config as ``preftune.rewards:<name>``; parameters go in ``kwargs``::

    reward:
      functions:
        - preftune.rewards:toy_verifier
        - {function: preftune.rewards:format_reward, kwargs: {pattern: "^<think>.*</think>"}}
        - {function: preftune.rewards:length_penalty, kwargs: {max_words: 200, per_word: 0.01}}

Reward shaping applied by the rollout itself (``reward.missing_eos_penalty``, ``reward.overlong_buffer``) is a
pure function of lengths here too: :func:`soft_overlong_penalty`.

Verifiers with more machinery (exact match against a column, JSON schema, unit tests) are judges:
``reward.judge: {type: verifier, kind: ...}`` (docs/judges.md).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np


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


def _normal(text: str) -> str:
    """An answer for comparison: stripped of space, surrounding ``$`` and a trailing period; a number in plain
    form ("1,000" -> "1000", "2.50" -> "2.5", "3.0" -> "3")."""
    text = text.strip().strip("$").strip().rstrip(".").strip()
    number = text.replace(",", "")
    try:
        value = float(number)
    except ValueError:
        return text
    if not math.isfinite(value):
        return text
    return str(int(value)) if value == int(value) else repr(value)


def exact_answer(prompts: list, completions: list, *, pattern: str | None = None, column: str = "answer",
                 answer_pattern: str | None = None, **columns) -> list[float | None]:
    """1.0 when the completion's answer equals the row's reference answer, else 0.0; None for a row without one.

    The completion's answer is the whole completion, or with ``pattern`` (a regular expression with one group)
    the group of its LAST match (no match: 0.0), e.g. ``'\\boxed\\{(.*)\\}'`` or ``'####\\s*(.+)'``. The reference
    is the row's ``column`` (default ``answer``), through ``answer_pattern`` the same way (GSM8K's answers end
    with ``#### 42``). Both are compared after :func:`_normal` (space, ``$``, thousands separators, 2.50 = 2.5).
    """
    if column not in columns:
        raise KeyError(f"exact_answer reads the rows' {column!r} column, which the prompts do not have (columns: "
                       f"{', '.join(sorted(columns)) or 'none'}); set kwargs: {{column: ...}}")

    def last(rx: str | None, text: str) -> str | None:
        if rx is None:
            return text
        found = re.findall(rx, text, re.DOTALL)
        return found[-1] if found else None

    out = []
    for c, a in zip(completions, columns[column]):
        ref = None if a is None else last(answer_pattern, str(a))
        if ref is None:
            out.append(None)
            continue
        got = last(pattern, _text(c))
        out.append(0.0 if got is None else float(_normal(got) == _normal(ref)))
    return out


def length_penalty(prompts: list, completions: list, *, max_words: int, per_word: float = 0.01, **_) -> list[float]:
    """−per_word for every whitespace word beyond ``max_words`` (0 up to it): a guard against length drift."""
    return [-per_word * max(0, len(_text(c).split()) - max_words) for c in completions]


def soft_overlong_penalty(lengths, *, max_length: int, buffer: int, factor: float = 1.0) -> np.ndarray:
    """DAPO's soft overlong punishment of each completion, by its length in tokens (0 or negative).

        R_len(|y|) = 0                                    |y| ≤ L_max − L_cache
                   = factor · ((L_max − L_cache) − |y|) / L_cache     L_max − L_cache < |y| ≤ L_max
                   = −factor                              |y| > L_max

    |y|: completion length in tokens (the end-of-sequence token counted: it is a generated token); L_max:
    ``max_length`` (``rollout.max_new_tokens``); L_cache: ``buffer`` (``reward.overlong_buffer``); factor:
    ``reward.overlong_penalty``. Added to the task reward.

    Paper: Yu et al., "DAPO", arXiv:2503.14476v1, Sec. 3.4, Eq. 13 (factor 1; L_max 20,480 with a 4,096-token
    cache). Departure: here L_max is the generation budget itself, so the third case never occurs in a rollout
    (a completion is cut at max_new_tokens); the punishment reaches −factor exactly at the budget.

    Args:
        lengths: completion lengths, any shape (e.g. (P, G)).
    Returns:
        float64 array of the same shape.
    """
    if not (isinstance(buffer, int) and 0 < buffer <= max_length):
        raise ValueError(f"buffer must be an integer in [1, max_length={max_length}]; got {buffer!r}")
    n = np.asarray(lengths, dtype=np.float64)
    start = max_length - buffer
    ramp = (start - n) / buffer * factor
    return np.where(n <= start, 0.0, np.where(n <= max_length, ramp, -factor))
