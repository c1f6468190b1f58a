"""Reward functions for examples/online_dpo_verifiable.yaml, written exactly as for TRL's GRPOTrainer:
``fn(completions, **kwargs)`` with the prompt rows' columns (here ``answer``) in ``kwargs`` and conversational
completions as ``[{"role": "assistant", "content": ...}]``; one float (or None) per completion."""

import re

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _content(completion):
    return completion[0]["content"] if isinstance(completion, list) else completion


def correct_answer(completions, answer, **kwargs):
    """1.0 when the last number of the completion equals the row's ``answer``, 0.0 otherwise; None for a row
    without an answer (it is left out, not counted wrong)."""
    out = []
    for completion, expected in zip(completions, answer):
        if expected is None:
            out.append(None)
            continue
        numbers = NUMBER.findall(_content(completion))
        got = numbers[-1].replace(",", "") if numbers else None
        out.append(1.0 if got is not None and float(got) == float(str(expected).replace(",", "")) else 0.0)
    return out


def states_answer(completions, **kwargs):
    """0.2 when the completion ends with a line 'Answer: <number>' (a format reward, as in TRL's examples)."""
    return [0.2 if re.search(r"Answer:\s*-?\d[\d,.]*\s*$", _content(c)) else 0.0 for c in completions]
