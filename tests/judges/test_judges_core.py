"""The judge contract, the both-orders wrapper, output parsing, backoff, ensembles and Cohen's κ."""

from __future__ import annotations

import email.utils
import math
import time

import pytest

from preftune.judges import (
    EnsembleJudge,
    Judge,
    UnsupportedJudgeOperation,
    Verdict,
    VerifierJudge,
    cohen_kappa,
    combine_orders,
    pairwise_kappa,
)
from preftune.judges.llm import backoff_delay, parse_retry_after
from preftune.judges.parsing import parse_score, parse_verdict
from preftune.judges.prompts import fill_template


class AlwaysFirst(Judge):
    """A pairwise-only judge with total position bias: it always prefers whatever is shown first."""

    def _judge_ordered(self, prompt, first, second):
        return Verdict("A", 0.9, "first is best")


class Scripted(Judge):
    """Returns preset verdicts in order; order-invariant, so the wrapper asks once."""

    order_invariant = True

    def __init__(self, name, verdicts):
        super().__init__(name)
        self.verdicts = list(verdicts)

    def _judge_ordered_many(self, items):
        out, self.verdicts = self.verdicts[: len(items)], self.verdicts[len(items) :]
        return out


# ---- contract and position bias -------------------------------------------------------------------------


def test_verdict_validates_and_serializes():
    with pytest.raises(ValueError):
        Verdict("C", 0.5)
    with pytest.raises(ValueError):
        Verdict("A", 1.5)
    d = combine_orders(Verdict("A", 0.8), Verdict("B", 0.6)).to_dict()
    assert d["winner"] == "A" and d["confidence"] == pytest.approx(0.7) and len(d["orders"]) == 2


def test_combine_orders():
    # (b, a) said "B", i.e. response_a: agreement, mean confidence.
    assert combine_orders(Verdict("A", 0.8), Verdict("B", 0.6)).winner == "A"
    flipped = combine_orders(Verdict("A", 0.8), Verdict("A", 0.8))  # first-shown both times
    assert (flipped.winner, flipped.confidence, flipped.flipped) == ("tie", 0.0, True)
    assert combine_orders(Verdict("A", 0.8), Verdict("tie", 0.8)).flipped  # A vs tie also depends on order
    assert combine_orders(Verdict("tie", 0.4), Verdict("tie", 0.6)).winner == "tie"
    failed = combine_orders(Verdict("A", 0.8), Verdict("tie", 0.0, error="unparseable"))
    assert (failed.winner, failed.error, failed.flipped) == ("tie", "unparseable", False)


def test_every_pairwise_judge_is_asked_both_orders_and_bias_is_counted():
    judge = AlwaysFirst()
    verdicts = judge.judge_many([("p", "x", "y"), ("p", "u", "v")])
    assert all(v.winner == "tie" and v.flipped for v in verdicts)
    assert judge.position_stats.rate == 1.0 and judge.position_stats.compared == 2
    judge.position_stats.reset()
    assert judge.position_stats.as_dict() == {"compared": 0, "flipped": 0, "failed": 0, "rate": 0.0}


def test_unsupported_question_raises_a_not_implemented_error():
    judge = AlwaysFirst()
    assert judge.supports_pairwise and not judge.supports_score
    with pytest.raises(UnsupportedJudgeOperation, match="does not score"):
        judge.score("p", "r")
    assert issubclass(UnsupportedJudgeOperation, NotImplementedError)
    with pytest.raises(NotImplementedError):
        Judge().judge("p", "a", "b")


def test_verifier_judge_compares_scores_without_swapping():
    calls = []

    def length_reward(prompt, response):
        calls.append(response)
        return len(response) / 10

    judge = VerifierJudge(length_reward, tie_margin=0.05)
    v = judge.judge("p", "12345", "12")  # scores 0.5 vs 0.2
    assert (v.winner, v.confidence) == ("A", pytest.approx(0.3)) and v.details == {
        "score_a": 0.5,
        "score_b": 0.2,
    }
    assert calls == ["12345", "12"]  # one pass: order cannot matter
    assert judge.judge("p", "abc", "xyz").winner == "tie"
    assert judge.judge("p", "0123456789abc", "").confidence == 1.0  # min(1, 1.3)
    assert judge.score_many([("p", "ab"), ("p", "")]) == [0.2, 0.0]


# ---- parsing, templates, backoff ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, winner, confidence",
    [
        ('{"winner": "B", "confidence": 0.7, "rationale": "x"}', "B", 0.7),
        ('Here you go:\n```json\n{"WINNER": "response a"}\n```\nHope that helps.', "A", 0.5),
        ('I pick {"Winner": "TIE", "Confidence": 1} since both are fine.', "tie", 1.0),
        ('{"winner": "[[B]]", "confidence": "85%", "rationale": "uses {braces} inside"}', "B", 0.85),
        ('prose {"note": "not it"} then {"winner": "a", "confidence": 60}', "A", 0.6),
        ('An unmatched { in prose, then {"winner": "B", "confidence": 0.2}', "B", 0.2),
    ],
)
def test_parse_verdict_variants(text, winner, confidence):
    v, reason = parse_verdict(text)
    assert reason is None and v.winner == winner and v.confidence == pytest.approx(confidence)


@pytest.mark.parametrize(
    "text", ["A is better", '{"winner": "C"}', '{"winner": "A", "confidence": 150}', "{}"]
)
def test_parse_verdict_failures_give_a_reason(text):
    v, reason = parse_verdict(text)
    assert v is None and reason


def test_parse_score():
    assert parse_score('{"score": 7}') == (7.0, None)
    assert parse_score('```\n{"Score": "8"}\n```')[0] == 8.0
    assert parse_score('{"score": 11}')[0] is None
    assert parse_score("seven")[0] is None


def test_fill_template_is_one_pass_and_keeps_other_braces():
    out = fill_template('{"x": 1} {prompt} | {response}', prompt="say {response}", response="ok")
    assert out == '{"x": 1} say {response} | ok'


def test_retry_after_and_backoff():
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < parse_retry_after({"retry-after": date}) <= 30
    assert parse_retry_after({"retry-after": "soon"}) is None and parse_retry_after(None) is None
    for _ in range(20):
        assert 2.0 <= backoff_delay(3, base=1.0, cap=100.0) <= 4.0  # 1 * 2^2 * U(0.5, 1)
    assert backoff_delay(1, base=1.0, cap=100.0, retry_after=10.0) == 10.0  # Retry-After is a floor
    assert backoff_delay(1, base=1.0, cap=5.0, retry_after=10.0) == 5.0  # ... and the cap a ceiling


# ---- Cohen's kappa and ensembles ------------------------------------------------------------------------


def test_cohen_kappa_hand_computed():
    a = ["A", "A", "A", "B", "B", "tie", "A", "B", "A", "tie"]
    b = ["A", "A", "B", "B", "B", "tie", "A", "A", "A", "B"]
    # p_o = 7/10 (items 2, 7, 9 differ)
    # a: A 5, B 3, tie 2;  b: A 5, B 4, tie 1  ->  p_e = (5·5 + 3·4 + 2·1) / 100 = 0.39
    # κ = (0.7 − 0.39) / (1 − 0.39) = 0.31 / 0.61 = 0.508197
    assert cohen_kappa(a, b) == pytest.approx(0.31 / 0.61)
    assert cohen_kappa(["A", "B"], ["B", "A"]) == pytest.approx(-1.0)  # p_o = 0, p_e = 0.5
    assert cohen_kappa(["A", "B", "A"], ["A", "B", "A"]) == 1.0
    assert math.isnan(cohen_kappa(["tie", "tie"], ["tie", "tie"]))  # p_e = 1: κ = 0/0, undefined
    assert math.isnan(cohen_kappa([], []))
    with pytest.raises(ValueError):
        cohen_kappa(["A"], [])


def _members():
    return [
        Scripted("j1", [Verdict("A", 0.9), Verdict("A", 0.5), Verdict("B", 0.7)]),
        Scripted("j2", [Verdict("A", 0.6), Verdict("B", 0.5), Verdict("B", 0.5)]),
        Scripted("j3", [Verdict("B", 0.8), Verdict("tie", 1.0), Verdict("tie", 0.9)]),
    ]


ITEMS = [("p1", "a", "b"), ("p2", "a", "b"), ("p3", "a", "b")]


def test_ensemble_majority_and_agreement():
    ens = EnsembleJudge(_members(), mode="majority")
    v = ens.judge_many(ITEMS)
    # item 1: A, A, B -> A with 2/3 of the votes; item 2: A, B, tie -> shared top -> tie (1/3);
    # item 3: B, B, tie -> B (2/3)
    assert [x.winner for x in v] == ["A", "tie", "B"]
    assert [x.confidence for x in v] == pytest.approx([2 / 3, 1 / 3, 2 / 3])
    # j1 = [A, A, B], j2 = [A, B, B]: p_o = 2/3, p_e = (2·1 + 1·2)/9 = 4/9, κ = (2/9)/(5/9) = 0.4
    kappa = ens.agreement()
    assert kappa[("j1", "j2")] == pytest.approx(0.4)
    assert kappa == pairwise_kappa(ens.member_winners)


def test_ensemble_mean_confidence_and_weights():
    v = EnsembleJudge(_members(), mode="mean").judge_many(ITEMS)
    # signed support: item 1 (+0.9 + 0.6 − 0.8)/3 = 0.2333 -> A; item 2 (+0.5 − 0.5 + 0)/3 = 0 -> tie;
    # item 3 (−0.7 − 0.5 + 0)/3 = −0.4 -> B
    assert [x.winner for x in v] == ["A", "tie", "B"]
    assert [x.confidence for x in v] == pytest.approx([0.7 / 3, 1.0, 0.4])
    weighted = EnsembleJudge(_members(), mode="majority", weights=[1, 1, 3]).judge_many(ITEMS[:1])[0]
    assert (weighted.winner, weighted.confidence) == ("B", pytest.approx(3 / 5))  # A 2 vs B 3


def test_ensemble_scores_and_members_debias_themselves():
    ens = EnsembleJudge([VerifierJudge(lambda p, r: 1.0), VerifierJudge(lambda p, r: 0.0)], weights=[3, 1])
    assert ens.score("p", "r") == pytest.approx(0.75)
    biased = EnsembleJudge([AlwaysFirst("x"), AlwaysFirst("y")])
    assert biased.judge("p", "a", "b").winner == "tie"
    assert biased.position_bias == {"x": 1.0, "y": 1.0}
    with pytest.raises(ValueError):
        EnsembleJudge(_members(), mode="median")


class Reader(Judge):
    """Scores a response by its length; "???" cannot be read (like an unparseable LLM reply), "inf" is infinite.
    Counts the batches it is asked, to show the bad item is isolated without scoring everything one by one."""

    def __init__(self):
        super().__init__("reader")
        self.batches = []

    def _score_many(self, items):
        self.batches.append(len(items))
        if any(r == "???" for _, r in items):
            raise ValueError("unparseable judge output")
        return [math.inf if r == "inf" else float(len(r)) for _, r in items]


def test_try_score_many_isolates_failures_and_keeps_the_rest():
    judge = Reader()
    items = [("p", r) for r in ["a", "bb", "???", "dddd", "inf", "ffffff", "g", "hh"]]
    scores, errors = judge.try_score_many(items)
    assert scores == [1.0, 2.0, None, 4.0, None, 6.0, 1.0, 2.0]
    assert errors[2] == "ValueError: unparseable judge output" and errors[4] == "non-finite score inf"
    assert [e is None for e in errors] == [True, True, False, True, False, True, True, True]
    # 8 fail -> 4 + 4; [a bb ??? dddd] fails -> 2 + 2; [a bb] ok, [??? dddd] fails -> 1 + 1; the second half ok.
    assert judge.batches == [8, 4, 2, 2, 1, 1, 4]
    assert judge.try_score_many([]) == ([], [])

    class Broken(Judge):
        def _score(self, prompt, response):
            raise RuntimeError("server down")  # not a reply problem: raised, not counted

    with pytest.raises(RuntimeError, match="server down"):
        Broken().try_score_many([("p", "r")])


def test_compare_scores_is_the_score_based_verdict_rule():
    judge = VerifierJudge(lambda p, r: 0.0, tie_margin=0.2)
    tie = judge.compare_scores(0.5, 0.4)  # |0.1| <= 0.2: a tie, confidence 1 - 0.1/0.2 = 0.5
    assert (tie.winner, round(tie.confidence, 9), tie.details) == ("tie", 0.5, {"score_a": 0.5, "score_b": 0.4})
    win = judge.compare_scores(0.1, 0.9)
    assert win.winner == "B" and win.confidence == judge.confidence_from_margin(0.8)
    assert [(v.winner, v.confidence) for v in judge.judge_many([("p", "x", "y")])] == [("tie", 1.0)]
