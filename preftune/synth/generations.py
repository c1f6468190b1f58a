"""Reading what ``preftune generate`` wrote, and reducing each prompt's responses to the distinct ones to judge."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError
from preftune.judges.prompts import prompt_text


def read_generations(path: str | Path) -> Iterator[dict[str, Any]]:
    """GEN rows of ``path`` (as written by ``preftune generate``), each checked for prompt and responses.

    Each row gets ``"_gen_line"``, its 1-based line, so dropped candidates can name where they came from.
    """
    path = Path(path)
    if not path.exists():
        raise PreftuneError(f"generations file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PreftuneError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            responses = row.get("responses") if isinstance(row, dict) else None
            if not isinstance(responses, list) or "prompt" not in row or not all(
                isinstance(r, dict) and isinstance(r.get("text"), str) for r in responses
            ):
                raise PreftuneError(f"{path}:{lineno}: expected a generation row with \"prompt\" and "
                                    "\"responses\": [{\"text\": ...}, ...] (written by preftune generate)")
            row["_gen_line"] = lineno
            yield row


@dataclass
class Candidate:
    """One prompt's distinct, non-empty responses (``responses[k]`` is GEN response ``indices[k]``)."""

    row: dict[str, Any]
    text: str  # the prompt as plain text, for the judge
    responses: list[dict[str, Any]]
    indices: list[int]


def distinct(row: dict[str, Any], counts: Counter) -> Candidate:
    """The prompt's responses without empty texts and repeats (greedy or low-temperature samples repeat: an
    identical pair teaches nothing, and a duplicate would be judged twice); ``counts`` gets what was set aside."""
    seen: set[str] = set()
    kept, idx = [], []
    for i, r in enumerate(row["responses"]):
        if not r["text"].strip():
            counts["empty_responses"] += 1
        elif r["text"] in seen:
            counts["duplicate_responses"] += 1
        else:
            seen.add(r["text"])
            kept.append(r)
            idx.append(r.get("index", i))
    return Candidate(row, prompt_text(row["prompt"]), kept, idx)
