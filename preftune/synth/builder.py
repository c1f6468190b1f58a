"""Turning judged candidates into kept pairs and counted drops (the modes are described in ``synth.pairs``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from preftune.errors import PreftuneError
from preftune.judges.base import Judge, ScoreBasedJudge, Verdict, swap_winner
from preftune.synth.generations import Candidate

MODES = ("all", "best-vs-worst")
SCORINGS = ("auto", "score", "wins")
DROP_REASONS = ("tie", "order_flip", "judge_error", "low_margin", "intransitive", "too_few_responses")


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
    unscored: list[dict[str, Any]] = field(default_factory=list)
    """Responses the judge failed to score (unparseable reply, non-finite score): {"prompt_id", "gen_line",
    "index", "error"}. They take no part in their prompt's pairs; the run goes on."""

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
        if self.unscored:
            first = self.unscored[0]
            text += (f"\njudge failed to score {len(self.unscored)} responses, left out of their pairs "
                     f"(first: generations line {first['gen_line']}, response {first['index']}: {first['error']})")
        return text


def judge_info(judge: Judge, spec: str | None = None) -> dict[str, Any]:
    """What lineage records about the judge: its name, class and the CLI spec (never a config's contents)."""
    return {"name": judge.name, "type": type(judge).__name__, "spec": spec}


def _as_completion(prompt: Any, text: str) -> Any:
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def verdict_records(v: Verdict, label_a: str, label_b: str) -> list[dict[str, Any]]:
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


def swapped(v: Verdict) -> Verdict:
    """``v`` seen with a and b exchanged (winner, scores and the order of its two single-order verdicts)."""
    d = dict(v.details)
    if "score_a" in d or "score_b" in d:
        d["score_a"], d["score_b"] = v.details.get("score_b"), v.details.get("score_a")
    # The single-order verdicts stay exactly as the judge gave them; only which of them was "as given" changes.
    orders = None if v.orders is None else (v.orders[1], v.orders[0])
    return Verdict(swap_winner(v.winner), v.confidence, v.rationale, d, orders, v.error, v.flipped)


def _unscored_verdict(errors: list[str | None]) -> Verdict:
    why = "; ".join(e for e in errors if e)
    return Verdict("tie", 0.0, "the judge failed to score a response", error=why)


class Builder:
    """Judges chunks of candidates and fills a :class:`PairsResult` (``add`` per chunk)."""

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
    def _scores(self, cands: list[Candidate]) -> list[tuple[list[float | None], list[str | None]]]:
        """Per candidate, (score of each response or None, error of each response or None); failures are
        recorded in ``result.unscored`` and the run goes on."""
        flat = [(c.text, r["text"]) for c in cands for r in c.responses]
        scores, errors = self.judge.try_score_many(flat)
        out, k = [], 0
        for c in cands:
            n = len(c.responses)
            out.append((scores[k:k + n], errors[k:k + n]))
            for i, err in enumerate(errors[k:k + n]):
                if err is not None:
                    self.result.unscored.append({"prompt_id": c.row.get("prompt_id"),
                                                 "gen_line": c.row.get("_gen_line"), "index": c.indices[i],
                                                 "error": err})
            k += n
        return out

    def _pair_verdicts(self, cands: list[Candidate]) -> list[list[tuple[int, int, Verdict]]]:
        """For each candidate, (i, j, verdict of response i vs j) over all i < j."""
        index = [[(i, j) for i in range(len(c.responses)) for j in range(i + 1, len(c.responses))] for c in cands]
        if self.score_based:  # one score per response; a pair with an unscored response is a failed verdict
            out = []
            for pairs, (s, e) in zip(index, self._scores(cands)):
                out.append([(i, j, _unscored_verdict([e[i], e[j]]) if s[i] is None or s[j] is None
                             else self.judge.compare_scores(s[i], s[j])) for i, j in pairs])
            return out
        items = [(c.text, c.responses[i]["text"], c.responses[j]["text"]) for c, ps in zip(cands, index)
                 for i, j in ps]
        verdicts = iter(self.judge.judge_many(items) if items else [])
        return [[(i, j, next(verdicts)) for i, j in ps] for ps in index]

    # -- rows ---------------------------------------------------------------------------------------------
    def _lineage(self, c: Candidate, ci: int, ri: int) -> dict[str, Any]:
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

    def keep(self, c: Candidate, ci: int, ri: int, *, verdicts: list[dict[str, Any]], rationale: str,
             confidence: float | None, score_c: float | None, score_r: float | None,
             extra: dict[str, Any] | None = None) -> None:
        prompt = c.row["prompt"]
        lin = self._lineage(c, ci, ri)
        lin.update(verdicts=verdicts, rationale=rationale, confidence=confidence, score_chosen=score_c,
                   score_rejected=score_r, **(extra or {}))
        self.result.pairs.append({"prompt": prompt, "chosen": _as_completion(prompt, c.responses[ci]["text"]),
                                  "rejected": _as_completion(prompt, c.responses[ri]["text"]), "lineage": lin})

    def drop(self, c: Candidate, reason: str, detail: str, **fields: Any) -> None:
        self.result.reasons[reason] += 1
        self.result.dropped.append({"reason": reason, "detail": detail, "prompt": c.row["prompt"],
                                    "prompt_id": c.row.get("prompt_id"), "source_line": c.row.get("source_line"),
                                    "gen_line": c.row.get("_gen_line"), **fields})

    def _drop_verdict(self, c: Candidate, i: int, j: int, v: Verdict, reason: str | None = None) -> None:
        if reason is None:
            reason = "judge_error" if v.error else "order_flip" if v.flipped else "tie"
        la, lb = f"response_{c.indices[i]}", f"response_{c.indices[j]}"
        self.drop(c, reason, v.error or v.rationale, a_index=c.indices[i], b_index=c.indices[j],
                  a=c.responses[i]["text"], b=c.responses[j]["text"], verdicts=verdict_records(v, la, lb))

    # -- modes --------------------------------------------------------------------------------------------
    def add(self, cands: list[Candidate]) -> None:
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

    def _all(self, cands: list[Candidate]) -> None:
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
                oriented = v if v.winner == "A" else swapped(v)
                self.keep(c, ci, ri, verdicts=verdict_records(oriented, "chosen", "rejected"),
                          rationale=v.rationale, confidence=v.confidence, score_c=sc, score_r=sr)

    def _best_vs_worst_scores(self, cands: list[Candidate]) -> None:
        tie_margin = self.judge.tie_margin if self.score_based else 0.0
        for c, (scores, errors) in zip(cands, self._scores(cands)):
            all_scores = {str(idx): s for idx, s in zip(c.indices, scores)}
            ok = [k for k, s in enumerate(scores) if s is not None]  # responses the judge scored
            if len(ok) < 2:
                self.drop(c, "judge_error", "; ".join(e for e in errors if e), scores=all_scores)
                continue
            best = max(ok, key=lambda k: (scores[k], -k))
            worst = min(ok, key=lambda k: (scores[k], k))
            margin = scores[best] - scores[worst]
            fields = {"a_index": c.indices[best], "b_index": c.indices[worst], "a": c.responses[best]["text"],
                      "b": c.responses[worst]["text"], "scores": all_scores}
            if margin <= tie_margin:
                self.drop(c, "tie", f"best and worst score within {tie_margin:g} ({margin:.4g})", **fields)
            elif self.min_margin is not None and margin < self.min_margin:
                self.drop(c, "low_margin", f"best - worst = {margin:.4g} < {self.min_margin:g}", **fields)
            else:
                self.keep(c, best, worst, verdicts=[], confidence=None,
                          rationale=f"best of {len(ok)} by score: {scores[best]:.4g} vs worst {scores[worst]:.4g}",
                          score_c=scores[best], score_r=scores[worst], extra={"scores": all_scores})

    def _best_vs_worst_wins(self, cands: list[Candidate]) -> None:
        for c, verdicts in zip(cands, self._pair_verdicts(cands)):
            wins = [0.0] * len(c.responses)
            direct: dict[tuple[int, int], Verdict] = {}
            for i, j, v in verdicts:
                direct[(i, j)] = v
                direct[(j, i)] = swapped(v)
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
                self.keep(c, best, worst, verdicts=verdict_records(v, "chosen", "rejected"),
                          rationale=v.rationale, confidence=v.confidence, score_c=wins[best],
                          score_r=wins[worst], extra={"scores": all_wins})
