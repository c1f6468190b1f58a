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
with the judge's own tie rule and confidence. ``judge.judge_many`` would give the same verdicts (tested) while
scoring each response once per pair it is in.

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
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError
from preftune.judges.base import Judge, ScoreBasedJudge, Verdict, swap_winner
from preftune.judges.prompts import prompt_text

MODES = ("all", "best-vs-worst")
SCORINGS = ("auto", "score", "wins")
DROP_REASONS = ("tie", "order_flip", "judge_error", "low_margin", "intransitive", "too_few_responses")


# ---- reading --------------------------------------------------------------------------------------------------


def read_generations(path: str | Path) -> Iterator[dict[str, Any]]:
    """GEN rows of ``path`` (as written by ``preftune generate``), each checked for prompt and responses."""
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
class _Candidate:
    """One prompt's distinct, non-empty responses (``responses[k]`` is GEN response ``indices[k]``)."""

    row: dict[str, Any]
    text: str  # the prompt as plain text, for the judge
    responses: list[dict[str, Any]]
    indices: list[int]


def _distinct(row: dict[str, Any], counts: Counter) -> _Candidate:
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
    return _Candidate(row, prompt_text(row["prompt"]), kept, idx)


# ---- results --------------------------------------------------------------------------------------------------


@dataclass
class PairsResult:
    """Kept pairs and dropped candidates; ``kept + dropped = candidates`` (a prompt with fewer than two distinct
    responses is one candidate, dropped as ``too_few_responses``)."""

    mode: str
    pairs: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    reasons: Counter = field(default_factory=Counter)
    prompts: int = 0
    responses: Counter = field(default_factory=Counter)
    """empty_responses / duplicate_responses merged before judging."""

    @property
    def candidates(self) -> int:
        return len(self.pairs) + len(self.dropped)

    def summary(self) -> str:
        unit = f", {self.candidates} candidate pairs" if self.mode == "all" else ""
        text = f"{self.prompts} prompts{unit}: kept {len(self.pairs)} pairs, dropped {len(self.dropped)}"
        if self.reasons:
            text += " (" + ", ".join(f"{k}: {v}" for k, v in self.reasons.most_common()) + ")"
        merged = [f"{v} {k.replace('_', ' ')}" for k, v in sorted(self.responses.items()) if v]
        if merged:
            text += "; before judging, set aside " + ", ".join(merged)
        return text


# ---- building pairs -------------------------------------------------------------------------------------------


def judge_info(judge: Judge, spec: str | None = None) -> dict[str, Any]:
    """What lineage records about the judge: its name, class and the CLI spec (never a config's contents)."""
    return {"name": judge.name, "type": type(judge).__name__, "spec": spec}


def _as_completion(prompt: Any, text: str) -> Any:
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _verdict_records(v: Verdict, label_a: str, label_b: str) -> list[dict[str, Any]]:
    """The single-order verdicts of ``v`` with A/B replaced by the given labels (e.g. chosen / rejected)."""
    def name(winner: str, first: str, second: str) -> str:
        return {"A": first, "B": second, "tie": "tie"}[winner]

    if v.orders is None:  # order-invariant judge: one verdict
        return [{"shown": [label_a, label_b], "winner": name(v.winner, label_a, label_b),
                 "confidence": v.confidence, "rationale": v.rationale, "order_invariant": True}]
    ab, ba = v.orders
    return [
        {"shown": [label_a, label_b], "winner": name(ab.winner, label_a, label_b), "confidence": ab.confidence,
         "rationale": ab.rationale},
        {"shown": [label_b, label_a], "winner": name(ba.winner, label_b, label_a), "confidence": ba.confidence,
         "rationale": ba.rationale},
    ]


def verdict_from_scores(judge: ScoreBasedJudge, sa: float, sb: float) -> Verdict:
    """The verdict ``judge.judge`` gives when response a scores ``sa`` and b ``sb`` (the judge's tie rule)."""
    margin = abs(sa - sb)
    details = {"score_a": sa, "score_b": sb}
    if margin <= judge.tie_margin:
        conf = 1.0 - margin / judge.tie_margin if judge.tie_margin > 0 else 1.0
        return Verdict("tie", conf, f"scores within {judge.tie_margin:g}", details)
    winner = "A" if sa > sb else "B"
    return Verdict(winner, judge.confidence_from_margin(margin), f"score {sa:.4g} vs {sb:.4g}", details)


class _Builder:
    def __init__(self, judge: Judge, mode: str, min_margin: float | None, scoring: str,
                 info: dict[str, Any]) -> None:
        if mode not in MODES:
            raise PreftuneError(f"unknown pairs mode {mode!r}; one of {', '.join(MODES)}")
        if scoring not in SCORINGS:
            raise PreftuneError(f"unknown scoring {scoring!r}; one of {', '.join(SCORINGS)}")
        self.judge, self.mode, self.min_margin, self.info = judge, mode, min_margin, info
        self.score_based = isinstance(judge, ScoreBasedJudge)
        if mode == "all":
            if not judge.supports_pairwise and not self.score_based:
                raise PreftuneError(f"--pairs all needs a pairwise judge; {judge.name} only scores "
                                    "(use --pairs best-vs-worst)")
            if min_margin is not None and not self.score_based:
                raise PreftuneError("--min-margin with --pairs all needs a score-based judge (reward model, "
                                    f"verifier); {type(judge).__name__} gives verdicts, not score margins")
            self.scoring = "pairwise"
        else:
            if scoring == "auto":
                scoring = "score" if judge.supports_score else "wins"
            if scoring == "score" and not judge.supports_score:
                raise PreftuneError(f"{judge.name} cannot score single responses; use --scoring wins")
            if scoring == "wins" and not judge.supports_pairwise and not self.score_based:
                raise PreftuneError(f"{judge.name} cannot judge pairs; use --scoring score")
            self.scoring = scoring
        self.result = PairsResult(mode)

    # -- judging helpers ----------------------------------------------------------------------------------
    def _scores(self, cands: list[_Candidate]) -> list[list[float]]:
        flat = [(c.text, r["text"]) for c in cands for r in c.responses]
        scores = self.judge.score_many(flat) if flat else []
        out, k = [], 0
        for c in cands:
            out.append(scores[k : k + len(c.responses)])
            k += len(c.responses)
        return out

    def _pair_verdicts(self, cands: list[_Candidate]) -> list[list[tuple[int, int, Verdict]]]:
        """For each candidate, (i, j, verdict of response i vs j) over all i < j."""
        index = [[(i, j) for i in range(len(c.responses)) for j in range(i + 1, len(c.responses))] for c in cands]
        if self.score_based:  # one score per response; see the module docstring
            out = []
            for pairs, scores in zip(index, self._scores(cands)):
                out.append([(i, j, verdict_from_scores(self.judge, scores[i], scores[j])) for i, j in pairs])
            return out
        items = [(c.text, c.responses[i]["text"], c.responses[j]["text"]) for c, ps in zip(cands, index)
                 for i, j in ps]
        verdicts = iter(self.judge.judge_many(items) if items else [])
        return [[(i, j, next(verdicts)) for i, j in ps] for ps in index]

    # -- rows ---------------------------------------------------------------------------------------------
    def _lineage(self, c: _Candidate, ci: int, ri: int) -> dict[str, Any]:
        rc, rr = c.responses[ci], c.responses[ri]
        lin = {
            "prompt_id": c.row.get("prompt_id"), "source_line": c.row.get("source_line"), "mode": self.mode,
            "generator": rc.get("generator"),
            "chosen_index": c.indices[ci], "rejected_index": c.indices[ri],
            "chosen_temperature": rc.get("temperature"), "rejected_temperature": rr.get("temperature"),
            "chosen_seed": rc.get("seed"), "rejected_seed": rr.get("seed"),
            "judge": self.info, "scoring": self.scoring,
        }  # fmt: skip
        if rr.get("generator") != rc.get("generator"):
            lin["rejected_generator"] = rr.get("generator")
        return lin

    def keep(self, c: _Candidate, ci: int, ri: int, *, verdicts: list[dict[str, Any]], rationale: str,
             confidence: float | None, score_c: float | None, score_r: float | None,
             extra: dict[str, Any] | None = None) -> None:
        prompt = c.row["prompt"]
        lin = self._lineage(c, ci, ri)
        lin.update(verdicts=verdicts, rationale=rationale, confidence=confidence, score_chosen=score_c,
                   score_rejected=score_r, **(extra or {}))
        self.result.pairs.append({"prompt": prompt, "chosen": _as_completion(prompt, c.responses[ci]["text"]),
                                  "rejected": _as_completion(prompt, c.responses[ri]["text"]), "lineage": lin})

    def drop(self, c: _Candidate, reason: str, detail: str, **fields: Any) -> None:
        self.result.reasons[reason] += 1
        self.result.dropped.append({"reason": reason, "detail": detail, "prompt": c.row["prompt"],
                                    "prompt_id": c.row.get("prompt_id"), "source_line": c.row.get("source_line"),
                                    "gen_line": c.row.get("_gen_line"), **fields})

    def _drop_verdict(self, c: _Candidate, i: int, j: int, v: Verdict, reason: str | None = None) -> None:
        if reason is None:
            reason = "judge_error" if v.error else "order_flip" if v.flipped else "tie"
        la, lb = f"response_{c.indices[i]}", f"response_{c.indices[j]}"
        self.drop(c, reason, v.error or v.rationale, a_index=c.indices[i], b_index=c.indices[j],
                  a=c.responses[i]["text"], b=c.responses[j]["text"], verdicts=_verdict_records(v, la, lb))

    # -- modes --------------------------------------------------------------------------------------------
    def add(self, cands: list[_Candidate]) -> None:
        self.result.prompts += len(cands)
        ready = []
        for c in cands:
            if len(c.responses) < 2:
                self.drop(c, "too_few_responses", f"{len(c.responses)} distinct non-empty responses")
            else:
                ready.append(c)
        if not ready:
            return
        if self.mode == "all":
            self._all(ready)
        elif self.scoring == "score":
            self._best_vs_worst_scores(ready)
        else:
            self._best_vs_worst_wins(ready)

    def _all(self, cands: list[_Candidate]) -> None:
        for c, verdicts in zip(cands, self._pair_verdicts(cands)):
            for i, j, v in verdicts:
                if v.winner == "tie":
                    self._drop_verdict(c, i, j, v)
                    continue
                ci, ri = (i, j) if v.winner == "A" else (j, i)
                sc = v.details.get("score_a" if v.winner == "A" else "score_b")
                sr = v.details.get("score_b" if v.winner == "A" else "score_a")
                if self.min_margin is not None and abs(sc - sr) < self.min_margin:
                    self._drop_verdict(c, i, j, v, "low_margin")
                    continue
                oriented = v if v.winner == "A" else _swap(v)
                self.keep(c, ci, ri, verdicts=_verdict_records(oriented, "chosen", "rejected"),
                          rationale=v.rationale, confidence=v.confidence, score_c=sc, score_r=sr)

    def _best_vs_worst_scores(self, cands: list[_Candidate]) -> None:
        tie_margin = self.judge.tie_margin if self.score_based else 0.0
        for c, scores in zip(cands, self._scores(cands)):
            best = max(range(len(scores)), key=lambda k: (scores[k], -k))
            worst = min(range(len(scores)), key=lambda k: (scores[k], k))
            margin = scores[best] - scores[worst]
            all_scores = {str(idx): s for idx, s in zip(c.indices, scores)}
            fields = {"a_index": c.indices[best], "b_index": c.indices[worst], "a": c.responses[best]["text"],
                      "b": c.responses[worst]["text"], "scores": all_scores}
            if margin <= tie_margin:
                self.drop(c, "tie", f"best and worst score within {tie_margin:g} ({margin:.4g})", **fields)
            elif self.min_margin is not None and margin < self.min_margin:
                self.drop(c, "low_margin", f"best - worst = {margin:.4g} < {self.min_margin:g}", **fields)
            else:
                self.keep(c, best, worst, verdicts=[], confidence=None,
                          rationale=f"best of {len(scores)} by score: {scores[best]:.4g} vs worst {scores[worst]:.4g}",
                          score_c=scores[best], score_r=scores[worst], extra={"scores": all_scores})

    def _best_vs_worst_wins(self, cands: list[_Candidate]) -> None:
        for c, verdicts in zip(cands, self._pair_verdicts(cands)):
            wins = [0.0] * len(c.responses)
            direct: dict[tuple[int, int], Verdict] = {}
            for i, j, v in verdicts:
                direct[(i, j)] = v
                direct[(j, i)] = _swap(v)
                if v.winner == "tie":
                    wins[i] += 0.5
                    wins[j] += 0.5
                else:
                    wins[i if v.winner == "A" else j] += 1.0
            best = max(range(len(wins)), key=lambda k: (wins[k], -k))
            worst = min(range(len(wins)), key=lambda k: (wins[k], k))
            v = direct[(best, worst)] if best != worst else None
            all_wins = {str(idx): w for idx, w in zip(c.indices, wins)}
            margin = wins[best] - wins[worst]
            if v is None or margin == 0:
                self.drop(c, "tie", "every response has the same number of wins", scores=all_wins)
            elif v.winner != "A":
                self._drop_verdict(c, best, worst, v, None if v.winner == "tie" else "intransitive")
            elif self.min_margin is not None and margin < self.min_margin:
                self._drop_verdict(c, best, worst, v, "low_margin")
            else:
                self.keep(c, best, worst, verdicts=_verdict_records(v, "chosen", "rejected"),
                          rationale=v.rationale, confidence=v.confidence, score_c=wins[best],
                          score_r=wins[worst], extra={"scores": all_wins})


def _swap(v: Verdict) -> Verdict:
    """``v`` seen with a and b exchanged (winner, scores and the order of its two single-order verdicts)."""
    d = dict(v.details)
    if "score_a" in d or "score_b" in d:
        d["score_a"], d["score_b"] = v.details.get("score_b"), v.details.get("score_a")
    # The single-order verdicts stay exactly as the judge gave them; only which of them was "as given" changes.
    orders = None if v.orders is None else (v.orders[1], v.orders[0])
    return Verdict(swap_winner(v.winner), v.confidence, v.rationale, d, orders, v.error, v.flipped)


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
    builder = _Builder(judge, mode, min_margin, scoring, judge_info(judge, judge_spec))
    chunk: list[_Candidate] = []
    for row in rows:
        chunk.append(_distinct(row, builder.result.responses))
        if len(chunk) >= chunk_prompts:
            builder.add(chunk)
            chunk = []
    if chunk:
        builder.add(chunk)
    builder.result.dropped.sort(key=lambda d: d.get("gen_line") or 0)  # stable: file order, then pair order
    return builder.result


# ---- length bias --------------------------------------------------------------------------------------------


def _content(value: Any) -> str:
    return value if isinstance(value, str) else "".join(m["content"] for m in value)


@dataclass
class LengthBias:
    """How often the judge's chosen response is the longer one (the share validate calls ``length_bias``).

    share = chosen longer / pairs (equal lengths count in the denominator, as in ``data.validate``); a judge
    indifferent to length picks the longer response about half the time among pairs that differ in length.
    """

    unit: str
    pairs: int
    chosen_longer: int
    rejected_longer: int
    mean_difference: float
    """Mean of len(chosen) − len(rejected)."""
    threshold: float = 0.65

    @property
    def share_chosen_longer(self) -> float:
        return self.chosen_longer / self.pairs if self.pairs else 0.0

    @property
    def biased(self) -> bool:
        return self.pairs > 0 and self.share_chosen_longer > self.threshold

    def summary(self) -> str:
        if not self.pairs:
            return "length bias: no pairs"
        text = (f"length bias: chosen longer in {100 * self.share_chosen_longer:.1f}% of {self.pairs} pairs "
                f"(rejected longer {self.rejected_longer}, equal {self.pairs - self.chosen_longer - self.rejected_longer}); "
                f"mean difference chosen - rejected {self.mean_difference:+.2f} {self.unit}")
        if self.biased:
            text += (f"\nwarning: the judge prefers the longer response in more than {100 * self.threshold:g}% "
                     "of pairs; training on these pairs would teach verbosity")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "pairs": self.pairs, "chosen_longer": self.chosen_longer,
                "rejected_longer": self.rejected_longer, "share_chosen_longer": self.share_chosen_longer,
                "mean_difference": self.mean_difference, "threshold": self.threshold, "biased": self.biased}


def length_bias(pairs: Sequence[dict[str, Any]], tokenizer: Any = None, threshold: float = 0.65) -> LengthBias:
    """Length preference of kept pairs, in whitespace words or, with a tokenizer, in tokens."""
    if tokenizer is None:
        def length(text: str) -> int:
            return len(text.split())
        unit = "words"
    else:
        def length(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])
        unit = "tokens"
    diffs = [length(_content(p["chosen"])) - length(_content(p["rejected"])) for p in pairs]
    return LengthBias(unit, len(diffs), sum(d > 0 for d in diffs), sum(d < 0 for d in diffs),
                      sum(diffs) / len(diffs) if diffs else 0.0, threshold)


# ---- files --------------------------------------------------------------------------------------------------


def dropped_path(out: str | Path) -> Path:
    """``PAIRS.jsonl`` -> ``PAIRS.dropped.jsonl``."""
    out = Path(out)
    return out.with_name(out.stem + ".dropped" + (out.suffix or ".jsonl"))


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write to a temporary file and rename: a crash never leaves a half-written OUT."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def judge_generations(gen_path: str | Path, judge: Judge, out: str | Path, *, mode: str = "all",
                      min_margin: float | None = None, scoring: str = "auto", judge_spec: str | None = None,
                      tokenizer: Any = None, length_threshold: float = 0.65) -> tuple[PairsResult, LengthBias]:
    """``build_pairs`` over a GEN file; writes ``out`` and ``out.dropped.jsonl``; returns the length bias too."""
    result = build_pairs(read_generations(gen_path), judge, mode=mode, min_margin=min_margin, scoring=scoring,
                         judge_spec=judge_spec)
    out = Path(out)
    _write_jsonl(out, result.pairs)
    _write_jsonl(dropped_path(out), result.dropped)
    return result, length_bias(result.pairs, tokenizer, length_threshold)
