"""LLMJudge against a scripted OpenAI-compatible server on 127.0.0.1, through the real ``openai`` client."""

from __future__ import annotations

import json
import logging

import pytest

from preftune.judges import JudgeParseError, JudgeRequestError, LLMJudge
from preftune.judges.prompts import DEFAULT_PAIRWISE_TEMPLATE

from .judge_helpers import SECRET, Reply, fields, user_text

TEMPLATE = "P={prompt}\nA={response_a}\nB={response_b}\n"
SCORE_TEMPLATE = "P={prompt}\nR={response}\n"


def verdict_json(winner: str, confidence: float = 0.8) -> str:
    return json.dumps({"winner": winner, "confidence": confidence, "rationale": f"{winner} is better"})


def quality_judge(body, n) -> Reply:
    """Prefers the response containing "good"; on prompts containing "biased" always says A (position bias)."""
    f = fields(body)
    if "biased" in f["P"]:
        return Reply(verdict_json("A", 0.9))
    return Reply(verdict_json("A" if "good" in f["A"] else "B" if "good" in f["B"] else "tie"))


def make_judge(server, **kwargs) -> LLMJudge:
    opts = dict(model="judge-model", base_url=server.url, template=TEMPLATE, score_template=SCORE_TEMPLATE,
                backoff_base=0.01, timeout=5.0)  # fmt: skip
    opts.update(kwargs)
    return LLMJudge(**opts)


ITEMS = [
    ("q1", "good answer", "bad answer"),
    ("q2", "bad answer", "good answer"),
    ("biased q3", "good answer", "bad answer"),
    ("biased q4", "bad answer", "good answer"),
]


def test_both_orders_are_asked_and_position_bias_becomes_a_tie(server, api_key):
    server.script = quality_judge
    judge = make_judge(server)
    verdicts = judge.judge_many(ITEMS)

    assert [v.winner for v in verdicts] == ["A", "B", "tie", "tie"]
    assert verdicts[0].confidence == pytest.approx(0.8)
    assert [v.flipped for v in verdicts] == [False, False, True, True]
    # Per-order details as the judge gave them: on the swapped order of item 0, "B" names response_a.
    assert [o.winner for o in verdicts[0].orders] == ["A", "B"]
    assert [o.winner for o in verdicts[2].orders] == ["A", "A"]
    assert judge.position_stats.as_dict() == {"compared": 4, "flipped": 2, "failed": 0, "rate": 0.5}
    assert len(server.requests) == 8  # 4 items x 2 orders
    shown = {
        (f["A"], f["B"]) for f in map(fields, (r.body for r in server.requests[:2] + server.requests[4:6]))
    }
    assert shown == {("good answer", "bad answer"), ("bad answer", "good answer")}
    assert all(r.headers["authorization"] == f"Bearer {SECRET}" for r in server.requests)


def test_default_template_carries_prompt_and_both_responses(server, api_key):
    server.script = lambda body, n: Reply(verdict_json("tie"))
    judge = LLMJudge(model="m", base_url=server.url, max_concurrency=1)
    assert judge.template == DEFAULT_PAIRWISE_TEMPLATE
    judge.judge("What is 2+2?", "four", "five")
    text = user_text(server.requests[0].body)
    assert "What is 2+2?" in text and text.index("four") < text.index("five")
    assert '{"winner": "A" or "B" or "tie"' in text  # literal braces survive filling
    for criterion in ("Accuracy", "Helpfulness", "Clarity", "Safety"):
        assert criterion in text


def test_template_from_file_and_missing_placeholder(tmp_path, server, api_key):
    path = tmp_path / "judge.txt"
    path.write_text("Q: {prompt}\nX: {response_a}\nY: {response_b}\n")
    assert make_judge(server, template=None, template_path=path).template.startswith("Q: {prompt}")
    with pytest.raises(ValueError, match=r"\{response_b\}"):
        make_judge(server, template="{prompt} {response_a}")


def test_malformed_output_gets_one_retry(server, api_key):
    def script(body, n):
        if len(body["messages"]) == 1:  # first ask: prose without JSON
            return Reply("I believe the first response is better.")
        assert "could not be parsed" in body["messages"][-1]["content"]
        # Retry: JSON in a fence, with prose around it and keys in odd case.
        winner = "Response A" if "good" in fields(body)["A"] else "b"
        return Reply(f'Sure.\n```json\n{{"Winner": "{winner}", "Confidence": "90%"}}\n```\nDone.')

    server.script = script
    judge = make_judge(server, max_concurrency=1)
    v = judge.judge("q", "good answer", "bad answer")
    assert (v.winner, v.confidence, v.error) == ("A", pytest.approx(0.9), None)
    assert len(server.requests) == 4 and judge.counters["parse_retries"] == 2


def test_malformed_twice_is_a_tie_with_recorded_parse_failure(server, api_key):
    server.script = lambda body, n: Reply("no json here {not: valid}")
    judge = make_judge(server)
    v = judge.judge("q", "good answer", "bad answer")
    assert v.winner == "tie" and "unparseable" in v.error
    assert v.orders[0].details["raw"] == ["no json here {not: valid}"] * 2
    assert len(server.requests) == 4  # exactly one retry per order
    assert judge.counters["parse_failures"] == 2
    assert judge.position_stats.as_dict() == {"compared": 0, "flipped": 0, "failed": 1, "rate": 0.0}
    with pytest.raises(JudgeParseError):
        judge.score("q", "r")
    assert make_judge(server, score_fallback=1.0).score("q", "r") == 1.0


def test_slow_response_times_out_and_is_retried(server, api_key):
    server.script = lambda body, n: Reply(verdict_json("A"), delay=0.6 if n == 0 else 0.0)
    judge = make_judge(server, timeout=0.25, max_concurrency=1)
    v = judge.judge("q", "good answer", "bad answer")
    assert v.orders[0].winner == "A" and judge.counters["retries"] == 1
    assert len(server.requests) == 3


def test_rate_limit_waits_for_retry_after_then_succeeds(server, api_key):
    server.script = lambda body, n: (
        Reply("slow down", status=429, headers={"Retry-After": "0.4"}) if n == 0 else Reply('{"score": 7}')
    )
    judge = make_judge(server)
    assert judge.score("q", "r") == 7.0
    first, second = server.requests
    assert second.arrived - first.arrived >= 0.4  # Retry-After honoured although backoff_base is 0.01
    assert judge.counters == {
        "requests": 2,
        "cache_hits": 0,
        "retries": 1,
        "parse_retries": 0,
        "parse_failures": 0,
    }


def test_attempts_are_bounded_and_config_errors_are_not_retried(server, api_key):
    server.script = lambda body, n: Reply("busy", status=503)
    with pytest.raises(JudgeRequestError, match="after 3 attempts"):
        make_judge(server, max_attempts=3).score("q", "r")
    assert len(server.requests) == 3

    server.requests.clear()
    server.script = lambda body, n: Reply(f"Incorrect API key provided: {SECRET}", status=401)
    with pytest.raises(JudgeRequestError, match="HTTP 401") as info:
        make_judge(server).score("q", "r")
    assert len(server.requests) == 1
    assert "Incorrect API key provided: ***" in str(info.value) and SECRET not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_cache_makes_a_rerun_free(tmp_path, server, api_key):
    server.script = quality_judge
    cache = tmp_path / "cache" / "judge.sqlite"
    first = make_judge(server, cache_path=cache).judge_many(ITEMS[:3])
    assert len(server.requests) == 6

    again = make_judge(server, cache_path=cache)
    second = again.judge_many(ITEMS[:3])
    assert len(server.requests) == 6  # zero new requests
    assert again.counters["cache_hits"] == 6
    assert [v.to_dict()["winner"] for v in second] == [v.winner for v in first]

    make_judge(server, cache_path=cache, temperature=0.7).judge_many(ITEMS[:1])  # temperature is in the key
    assert len(server.requests) == 8


def test_requests_run_concurrently_up_to_the_limit(server, api_key):
    server.script = lambda body, n: Reply('{"score": 5}', delay=0.15)
    judge = make_judge(server, max_concurrency=3)
    assert judge.score_many([("q", f"r{i}") for i in range(9)]) == [5.0] * 9
    assert server.peak_in_flight == 3


def test_api_key_never_leaks(tmp_path, server, api_key, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, the openai client's and httpx's included

    def script(body, n):
        if n == 0:
            return Reply("rate limited", status=429, headers={"Retry-After": "0"})
        if n == 1:
            return Reply("prose, no verdict")
        return quality_judge(body, n)

    server.script = script
    judge = make_judge(
        server, cache_path=tmp_path / "c.sqlite", api_key_env="JUDGE_TEST_KEY", max_concurrency=1
    )
    verdicts = judge.judge_many(ITEMS[:2])
    assert server.requests[0].headers["authorization"] == f"Bearer {SECRET}"
    assert any(r.levelno == logging.DEBUG and r.name.startswith("openai") for r in caplog.records)
    assert "retry" in caplog.text.lower()  # the retry was logged ...
    assert SECRET not in caplog.text  # ... without the key
    for text in (
        repr(judge),
        str(judge),
        json.dumps([v.to_dict() for v in verdicts]),
        json.dumps(judge.counters),
    ):
        assert SECRET not in text
    assert "JUDGE_TEST_KEY" in repr(judge)  # the variable's name is fine to show
    assert SECRET not in repr(vars(judge).get("api_key_env"))
    files = list(tmp_path.rglob("*"))
    assert files and all(SECRET.encode() not in f.read_bytes() for f in files if f.is_file())


def test_missing_key_variable_is_a_clear_error(server, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ValueError, match="NO_SUCH_KEY_VAR is not set"):
        make_judge(server, api_key_env="NO_SUCH_KEY_VAR")
    server.script = lambda body, n: Reply('{"score": 3}')
    assert make_judge(server, api_key_env=None).score("q", "r") == 3.0  # keyless local server


def test_one_unparseable_score_reply_does_not_abort_a_judge_run(server, api_key):
    # Scores by the response's first word; "garbled" answers are unreadable, also after the format retry.
    def script(body, n):
        response = fields(body).get("R", "")
        if response.startswith("garbled"):
            return Reply("I would rate it highly!")
        return Reply(json.dumps({"score": {"great": 9, "fine": 5, "poor": 2}[response.split()[0]]}))

    server.script = script
    from preftune.synth.pairs import build_pairs

    rows = [{"prompt": "q1", "prompt_id": "a", "_gen_line": 1,
             "responses": [{"text": "fine one"}, {"text": "garbled two"}, {"text": "great three"},
                           {"text": "poor four"}]},
            {"prompt": "q2", "prompt_id": "b", "_gen_line": 2,
             "responses": [{"text": "garbled x"}, {"text": "great y"}]}]
    res = build_pairs(rows, make_judge(server, max_concurrency=1), mode="best-vs-worst", scoring="score")
    # q1: the garbled response is left out; great (9) vs poor (2) is kept. q2: one scored response is no pair.
    (pair,) = res.pairs
    assert (pair["chosen"], pair["rejected"]) == ("great three", "poor four")
    assert pair["lineage"]["scores"] == {"0": 5.0, "1": None, "2": 9.0, "3": 2.0}
    assert res.reasons == {"judge_error": 1} and res.candidates == 2
    assert [(u["gen_line"], u["index"]) for u in res.unscored] == [(1, 1), (2, 0)]
    assert "JudgeParseError" in res.unscored[0]["error"] and "judge failed to score 2 responses" in res.summary()
