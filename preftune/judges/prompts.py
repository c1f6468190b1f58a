"""Judging prompts: the documented defaults and how a user's own template is loaded and filled.

Templates are plain text with placeholders ``{prompt}``, ``{response_a}``, ``{response_b}`` (pairwise) or
``{prompt}``, ``{response}`` (scoring). Only those exact placeholders are replaced; every other brace is
literal, so a template can show the JSON it wants (``{"winner": ...}``) without escaping, which
``str.format`` would demand.
"""

from __future__ import annotations

import re
from pathlib import Path

PAIRWISE_FIELDS = ("prompt", "response_a", "response_b")
SCORE_FIELDS = ("prompt", "response")

DEFAULT_PAIRWISE_TEMPLATE = """\
You are an impartial judge. Compare two AI assistant responses to the same user prompt and decide which \
one is better.

Judge on these criteria, in order of importance:
1. Accuracy: factually and logically correct; no invented facts; follows the prompt's constraints.
2. Helpfulness: actually answers what was asked, completely, at the right level of detail.
3. Clarity: well organized, easy to follow, no needless padding.
4. Safety: no harmful, deceptive or inappropriate content; refuses only when refusal is warranted.

Do not let the order of the responses, their length, or the assistants' names influence you. If they are \
equally good, answer "tie".

[User prompt]
{prompt}

[Response A]
{response_a}

[Response B]
{response_b}

Reply with only a JSON object, no other text:
{"winner": "A" or "B" or "tie", "confidence": a number from 0 to 1, "rationale": "one or two sentences"}
"""

DEFAULT_SCORE_TEMPLATE = """\
You are an impartial judge. Rate the AI assistant response to the user prompt below on a scale of 1 to 10.

Criteria: accuracy (correct, no invented facts), helpfulness (answers what was asked, completely), clarity \
(well organized, concise) and safety (nothing harmful or deceptive). 1 = useless or harmful, \
10 = excellent on every criterion.

[User prompt]
{prompt}

[Response]
{response}

Reply with only a JSON object, no other text:
{"score": an integer from 1 to 10, "rationale": "one sentence"}
"""

DEFAULT_LETTER_TEMPLATE = """\
Compare two responses to the same prompt on accuracy, helpfulness, clarity and safety.

[Prompt]
{prompt}

[Response A]
{response_a}

[Response B]
{response_b}

Which response is better? Answer with a single letter, A or B.
Answer:"""
"""For :class:`~preftune.judges.lm_judge.LMJudge`: the next token after this text is read as the verdict."""


def load_template(
    template: str | None, template_path: str | Path | None, default: str, fields: tuple[str, ...]
) -> str:
    """The template given inline, or read from a file, or ``default``; checked for its placeholders.

    A template missing a placeholder would silently leave a response out of the judging prompt, so it is
    rejected here rather than discovered from odd verdicts.
    """
    if template is not None and template_path is not None:
        raise ValueError("give either a template string or a template path, not both")
    if template_path is not None:
        template = Path(template_path).read_text(encoding="utf-8")
    text = default if template is None else template
    missing = [f for f in fields if "{" + f + "}" not in text]
    if missing:
        need = ", ".join("{" + f + "}" for f in fields)
        raise ValueError(f"judge template lacks {', '.join('{' + m + '}' for m in missing)}; it needs {need}")
    return text


def fill_template(template: str, **values: str) -> str:
    """Replace each ``{name}`` with its value in one pass, so a response containing ``{prompt}`` stays literal."""
    if not values:
        return template
    pattern = re.compile("|".join(re.escape("{" + k + "}") for k in values))
    return pattern.sub(lambda m: values[m.group(0)[1:-1]], template)


def prompt_text(prompt: str | list[dict[str, str]]) -> str:
    """A prompt as plain text (for judges): a lone user message is its content, a dialogue is "role: content" lines."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0].get("role") == "user":
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
