"""Periodic generations on fixed held-out prompts, side by side with the reference's.

Each time, one line per prompt goes to ``samples.jsonl``::

    {"step": 20, "index": 0, "prompt": "...", "policy": "...", "reference": "...",
     "policy_tokens": 5, "reference_tokens": 10}

the first few go to the console, and all of them to TensorBoard as one markdown table (tag ``samples``).
Generations are greedy, so a change between two steps is a change of the model, not of the dice. The
reference's side is generated once, before the first step, and reused.
"""

from __future__ import annotations

import json
from pathlib import Path

from preftune.runlog import read_records, truncate_records


def held_out_prompts(examples: list, n: int) -> list[list[int]]:
    """The first ``n`` distinct prompts (token ids) of the eval examples, in order: a fixed set for the run."""
    seen, out = set(), []
    if n <= 0:
        return out
    for e in examples:
        key = tuple(e.prompt_ids)
        if key not in seen:
            seen.add(key)
            out.append(list(e.prompt_ids))
            if len(out) == n:
                break
    return out


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def write_samples(run_dir: Path, step: int, prompts: list[str], policy: list[str], reference: list[str],
                  policy_tokens: list[int], reference_tokens: list[int], writer=None, say=None,
                  show: int = 2) -> list[dict]:
    """Append one ``samples.jsonl`` row per prompt; echo ``show`` of them to ``say``; a TensorBoard table."""
    rows = [{"step": step, "index": i, "prompt": p, "policy": a, "reference": b, "policy_tokens": na,
             "reference_tokens": nb}
            for i, (p, a, b, na, nb) in enumerate(zip(prompts, policy, reference, policy_tokens, reference_tokens))]
    with open(Path(run_dir) / "samples.jsonl", "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    if say is not None:
        for row in rows[:show]:
            say(f"sample @ {step} [{row['index']}] {_clip(row['prompt'])!r}\n    policy:    {_clip(row['policy'])!r}"
                f"\n    reference: {_clip(row['reference'])!r}")
    if writer is not None:
        cell = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
        table = "| prompt | policy | reference |\n|---|---|---|\n" + "\n".join(
            f"| {cell(r['prompt'])} | {cell(r['policy'])} | {cell(r['reference'])} |" for r in rows)
        writer.text(step, "samples", table)
    return rows


def read_samples(run_dir: Path, kind: str | None = None) -> list[dict]:
    """Rows of ``samples.jsonl``: the monitor's side-by-side samples (``kind`` None), or the rows of another
    kind (``"rollout"``: an on-policy run's prompt, chosen, rejected and rewards at each evaluation). A
    half-written last line (a kill) is skipped, as in ``metrics.jsonl``."""
    rows = read_records(Path(run_dir) / "samples.jsonl", "sample row")
    return [r for r in rows if r.get("kind") == kind]


def truncate_samples(run_dir: Path, upto: int) -> None:
    """Drop rows past ``upto`` (a resumed run redoes those steps), as the loop does with metrics.jsonl."""
    truncate_records(Path(run_dir) / "samples.jsonl", upto, "sample row")


def _clip(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
