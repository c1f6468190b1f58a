"""Preference pairs from sampled responses: judge them, keep the clear decisions, record where each came from.

    GEN.jsonl (rollout.generate) -> judge -> PAIRS.jsonl (ready for ``preftune train`` / ``data validate``)
                                           + PAIRS.dropped.jsonl (every candidate not kept, with its reason)

Before judging, each prompt's responses are reduced to distinct non-empty texts (greedy or low-temperature
samples repeat; an identical pair teaches nothing, and duplicates would be judged twice). Then, per mode:

    all            every unordered pair of distinct responses is judged pairwise (both orders; see
                   ``judges.base``). A tie, including a verdict that flipped with presentation order, is
                   dropped. With ``min_margin`` (score-based judges only) |s_a − s_b| < min_margin is dropped.
    best-vs-worst  every response gets a score: ``judge.score`` when the judge has one (``scoring="score"``),
                   else its pairwise wins over the others, a tie counting ½ (``scoring="wins"``). chosen = the
                   best, rejected = the worst (first in sample order among equals). Dropped when all scores are
                   equal (tie; within the judge's ``tie_margin`` for score-based judges), when
                   best − worst < ``min_margin``, or (wins) when the best did not beat the worst head-to-head.

Score-based judges (reward models, verifiers) score every distinct response once, and pairs compare the scores
with the judge's own rule (``ScoreBasedJudge.compare_scores``, the one ``judge.judge_many`` uses, while scoring
each response once per pair it is in). A response the judge fails to score (an unparseable reply, a non-finite
score) is counted in ``PairsResult.unscored`` and left out of its prompt's pairs (a pair or prompt left with
nothing to compare is dropped as ``judge_error``); the run goes on and the summary reports the failures.

Each pair row::

    {"prompt", "chosen", "rejected", "lineage": {
        "prompt_id", "source_line", "mode", "generator", "chosen_index", "rejected_index",
        "chosen_temperature", "rejected_temperature", "chosen_seed", "rejected_seed",
        "judge": {"name", "type", "spec"}, "scoring": "pairwise" | "score" | "wins",
        "verdicts": [{"shown": [first, second], "winner": "chosen" | "rejected" | "tie", "confidence",
                      "rationale"}, ...],     # both orders; one entry for order-invariant judges
        "rationale", "confidence", "score_chosen", "score_rejected"}}

With a message-list prompt, chosen and rejected are written as ``[{"role": "assistant", "content": ...}]``
(the conversational format), so training applies the same chat template generation did.

Rooms: ``synth.generations`` reads GEN files and merges repeated responses, ``synth.builder`` turns verdicts into
pairs and drops, this module runs them over a file and writes the results (standard JSON, ``data.outputs``); the
length-bias check is ``data.lengths``, the one ``data validate`` reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from preftune.data.lengths import WORDS, LengthBias, token_counts
from preftune.data.lengths import length_bias as _bias_of_lengths
from preftune.data.outputs import AtomicJsonl, dropped_path_for, refuse_overwrite
from preftune.data.text import plain_text, word_count
from preftune.judges.base import Judge
from preftune.synth.builder import DROP_REASONS, MODES, SCORINGS, Builder, PairsResult, judge_info
from preftune.synth.generations import Candidate, distinct, read_generations

__all__ = ["DROP_REASONS", "MODES", "SCORINGS", "Candidate", "LengthBias", "PairsResult", "build_pairs",
           "dropped_path", "judge_generations", "judge_info", "length_bias", "read_generations"]


def build_pairs(rows: Iterable[dict[str, Any]], judge: Judge, *, mode: str = "all",
                min_margin: float | None = None, scoring: str = "auto", judge_spec: str | None = None,
                chunk_prompts: int = 32) -> PairsResult:
    """Judge GEN ``rows`` and build pairs (see the module docstring for modes, drops and the row format).

    Args:
        rows: generation rows, each with ``prompt`` and ``responses`` (``[{"text", "temperature", ...}]``).
        judge: any :class:`~preftune.judges.Judge`.
        mode: ``"all"`` or ``"best-vs-worst"``.
        min_margin: drop pairs whose score difference is below this (score-based judges; wins in
            best-vs-worst with ``scoring="wins"``).
        scoring: best-vs-worst only: ``"score"`` (``judge.score``), ``"wins"`` (pairwise round robin) or
            ``"auto"`` (score when the judge supports it).
        judge_spec: how the judge was named on the command line, recorded in lineage.
        chunk_prompts: prompts whose judging requests go to the judge together (an LLM judge overlaps them).
    """
    builder = Builder(judge, mode, min_margin, scoring, judge_info(judge, judge_spec))
    chunk: list[Candidate] = []
    for row in rows:
        chunk.append(distinct(row, builder.result.responses))
        if len(chunk) >= chunk_prompts:
            builder.add(chunk)
            chunk = []
    if chunk:
        builder.add(chunk)
    builder.result.dropped.sort(key=lambda d: d.get("gen_line") or 0)  # stable: file order, then pair order
    return builder.result


def length_bias(pairs: Sequence[dict[str, Any]], tokenizer: Any = None, threshold: float = 0.65) -> LengthBias:
    """Length preference of kept pairs (``data.lengths``), in whitespace words or, with a tokenizer, tokens."""
    chosen = [plain_text(p["chosen"]) for p in pairs]
    rejected = [plain_text(p["rejected"]) for p in pairs]
    if tokenizer is None:
        lc, lr, unit = [word_count(t) for t in chosen], [word_count(t) for t in rejected], WORDS
    else:
        lc, lr, unit = token_counts(tokenizer, chosen), token_counts(tokenizer, rejected), "tokens"
    return _bias_of_lengths(lc, lr, unit=unit, threshold=threshold)


def dropped_path(out: str | Path) -> Path:
    """``PAIRS.jsonl`` -> ``PAIRS.dropped.jsonl`` (the naming every data tool uses)."""
    return dropped_path_for(out)


def judge_generations(gen_path: str | Path, judge: Judge, out: str | Path, *, mode: str = "all",
                      min_margin: float | None = None, scoring: str = "auto", judge_spec: str | None = None,
                      tokenizer: Any = None, length_threshold: float = 0.65) -> tuple[PairsResult, LengthBias]:
    """``build_pairs`` over a GEN file; writes ``out`` and ``out.dropped.jsonl`` (each to a temporary file, renamed
    when complete); returns the length bias of the kept pairs too."""
    refuse_overwrite([gen_path], [out, dropped_path(out)])
    result = build_pairs(read_generations(gen_path), judge, mode=mode, min_margin=min_margin, scoring=scoring,
                         judge_spec=judge_spec)
    for path, rows in ((Path(out), result.pairs), (dropped_path(out), result.dropped)):
        with AtomicJsonl(path) as f:
            for row in rows:
                f.write(row)
    return result, length_bias(result.pairs, tokenizer, length_threshold)
