"""Verifiers as reward functions: exact match, regex, JSON schema, code unit tests; and build_judge for them."""

from __future__ import annotations

import json
import re

import pytest

from preftune.judges import (
    CodeTestsVerifier,
    ExactMatch,
    JSONSchemaVerifier,
    RegexMatch,
    VerifierJudge,
    build_judge,
    normalize_answer,
    run_code_tests,
)
from preftune.judges.schema import validate_json_schema


def test_exact_match_normalizes_and_extracts():
    assert normalize_answer("  The Answer:\n 42. ") == "the answer: 42"
    verify = ExactMatch("Paris")
    assert verify("capital?", "  paris. ") == 1.0 and verify("capital?", "Lyon") == 0.0
    assert ExactMatch("Paris", normalize=False)("q", "paris") == 0.0
    boxed = ExactMatch({"1+1": "2", "2+2": "4"}, extract=r"\\boxed\{([^}]*)\}")
    assert boxed("2+2", r"first \boxed{3}, no wait: \boxed{4}") == 1.0  # the LAST match counts
    assert boxed("1+1", "2") == 0.0  # nothing to extract
    with pytest.raises(KeyError, match="no reference"):
        boxed("3+3", r"\boxed{6}")
    assert ExactMatch(lambda p: p.upper())("abc", "ABC") == 1.0


def test_regex_match():
    assert RegexMatch(r"\d+")("q", "it is 42") == 1.0
    assert RegexMatch(r"\d+", fullmatch=True)("q", "it is 42") == 0.0
    assert RegexMatch(r"\d+", fullmatch=True)("q", " 42\n") == 1.0
    assert RegexMatch(r"^yes$", flags=re.IGNORECASE | re.MULTILINE)("q", "well\nYES") == 1.0


SCHEMA = {
    "type": "object",
    "required": ["name", "age"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
        "role": {"enum": ["admin", "user"]},
    },
}


def test_json_schema_validator():
    assert validate_json_schema({"name": "x", "age": 3, "tags": ["a"], "role": "user"}, SCHEMA) == []
    errors = validate_json_schema({"name": "", "age": -1.5, "tags": ["a", 1, "c"], "extra": 1}, SCHEMA)
    assert sorted(errors) == sorted([
        "$.name: shorter than 1",
        "$.age: expected integer, got float",
        "$.tags: more than 2 items",
        "$.tags[1]: expected string, got int",
        "$: unexpected property 'extra'",
    ])  # fmt: skip
    assert validate_json_schema({"age": True, "name": "x"}, SCHEMA) == ["$.age: expected integer, got bool"]
    assert validate_json_schema(2.0, {"type": "integer"}) == []


def test_json_schema_verifier():
    verify = JSONSchemaVerifier(SCHEMA)
    assert verify("q", '{"name": "Ada", "age": 36}') == 1.0
    assert verify("q", 'Sure!\n```json\n{"name": "Ada", "age": 36}\n```') == 1.0
    assert verify("q", '{"name": "Ada"}') == 0.0 and verify("q", "not json") == 0.0
    assert JSONSchemaVerifier(SCHEMA, strict=True)("q", 'Sure! {"name": "Ada", "age": 36}') == 0.0
    assert JSONSchemaVerifier({"type": "array", "minItems": 1})("q", "```\n[1]\n```") == 1.0
    # a misspelt keyword would be ignored by JSON Schema (and break-it outputs rewarded): refused, with the fix
    with pytest.raises(ValueError, match=r"unknown JSON Schema keyword\(s\) \['minLenght'\].*'minLength'"):
        JSONSchemaVerifier({"type": "object", "properties": {"a": {"type": "string", "minLenght": 1}}})
    with pytest.raises(ValueError, match="invalid JSON Schema"):
        JSONSchemaVerifier({"type": "strin"})


def test_json_schema_verifier_takes_real_schemas():
    """$ref/$defs, oneOf, patternProperties and format: the standard through jsonschema, with its semantics
    (true is not 1 in an enum, as JSON says; Python's `True in [1]` says otherwise)."""
    tool = {"$defs": {"point": {"type": "object", "required": ["x"], "properties": {"x": {"type": "number"}}}},
            "type": "object", "additionalProperties": False,
            "properties": {"at": {"$ref": "#/$defs/point"}, "kind": {"oneOf": [{"const": "a"}, {"const": "b"}]},
                           "mail": {"type": "string", "format": "email"}},
            "patternProperties": {"^x_": {"type": "integer"}}}
    verify = JSONSchemaVerifier(tool)
    assert verify("q", '{"at": {"x": 1.5}, "kind": "a", "mail": "a@b.org", "x_1": 3}') == 1.0
    assert sorted(verify.errors('{"at": {"x": "1"}, "kind": "c", "mail": "nope", "x_1": 1.5, "y": 0}')) == [
        "$.at.x: expected number, got str", "$.kind: matches none of oneOf", "$.mail: is not a valid email",
        "$.x_1: expected integer, got float", "$: unexpected property 'y'"]
    assert validate_json_schema(True, {"enum": [1, 2]}) == ["$: True not in [1, 2]"]


ADD = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add('a', 'b') == 'ab'"]


def test_code_tests_pass_partial_fail():
    assert CodeTestsVerifier(TESTS)("q", f"Here:\n```python\n{ADD}```\nDone.") == 1.0
    wrong = "def add(a, b):\n    return a - b if isinstance(a, int) and a < 0 else a + b\n"
    result = CodeTestsVerifier(TESTS).run("q", wrong)
    assert (result.passed, result.total) == (2, 3) and "test_1: AssertionError" in result.errors[0]
    crash = run_code_tests("raise SystemExit(0)", TESTS)
    assert crash.passed == 0 and "candidate: SystemExit" in crash.errors[0]
    per_prompt = CodeTestsVerifier({"add": TESTS, "sub": "assert add(3, 1) == 2"})
    assert per_prompt("sub", ADD) == 0.0 and per_prompt("add", ADD) == 1.0


def test_code_tests_timeout_and_guards():
    slow = run_code_tests("while True:\n    pass\n", TESTS, timeout=0.5)
    assert slow.timed_out and slow.fraction == 0.0
    # Printing a fake result or exiting early earns nothing: the result travels through a hidden file.
    spoof = 'import sys, json\nprint(json.dumps({"passed": 3, "errors": []}))\nsys.stdout.flush()\nimport os\nos._exit(0)\n'
    assert run_code_tests(spoof, TESTS).fraction == 0.0
    net = "import socket\ntry:\n    socket.create_connection(('127.0.0.1', 9))\n    ok = True\nexcept OSError:\n    ok = False\n"
    assert run_code_tests(net, ["assert ok is False"]).passed == 1


def test_build_judge_verifiers(tmp_path):
    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"prompt": "2+2", "reference": "4"}) + "\n")
    exact = build_judge(
        {"type": "verifier", "kind": "exact_match", "references_path": str(refs), "name": "math"}
    )
    assert isinstance(exact, VerifierJudge) and exact.name == "math"
    assert exact.score("2+2", "4.") == 1.0
    assert exact.judge("2+2", "5", "4").winner == "B"

    regex = build_judge({"type": "verifier", "kind": "regex", "pattern": "^ok$", "flags": ["IGNORECASE"]})
    assert regex.score("q", "OK") == 1.0
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["a"]}))
    assert (
        build_judge({"type": "verifier", "kind": "json_schema", "schema_path": str(schema)}).score(
            "q", '{"a": 1}'
        )
        == 1.0
    )
    code = build_judge({"type": "verifier", "kind": "code_tests", "tests": TESTS, "timeout": 5})
    assert code.score("q", ADD) == 1.0
    fn = build_judge({"type": "verifier", "kind": "callable", "target": "preftune.judges.verifiable:RegexMatch",
                      "kwargs": {"pattern": "x"}})  # fmt: skip
    assert fn.score("q", "xyz") == 1.0

    path = tmp_path / "judge.yaml"
    path.write_text("type: verifier\nkind: regex\npattern: '\\d'\n")
    assert build_judge(path).score("q", "a1") == 1.0


def test_build_judge_rejects_unknown_keys_with_a_suggestion():
    with pytest.raises(ValueError, match="Did you mean 'pattern'"):
        build_judge({"type": "verifier", "kind": "regex", "patern": "x"})
    with pytest.raises(ValueError, match="Did you mean 'max_concurrency'"):
        build_judge({"type": "llm", "model": "m", "max_concurency": 2})
    with pytest.raises(ValueError, match="Did you mean 'ensemble'"):
        build_judge({"type": "ensembl"})
    with pytest.raises(ValueError, match="Did you mean 'exact_match'"):
        build_judge({"type": "verifier", "kind": "exact"})


def test_build_judge_ensemble_of_verifiers():
    ens = build_judge({
        "type": "ensemble", "mode": "mean", "name": "combo",
        "judges": [
            {"type": "verifier", "kind": "regex", "pattern": "4", "name": "has4"},
            {"type": "verifier", "kind": "exact_match", "reference": "4", "name": "exact"},
        ],
    })  # fmt: skip
    v = ens.judge("2+2", "the answer is 4", "5")
    # has4: A (1 vs 0, confidence 1); exact: tie (0 vs 0) -> mean signed support (1 + 0)/2 = 0.5 -> A
    assert (v.winner, v.confidence) == ("A", 0.5)
    # has4 = [A], exact = [tie]: p_o = 0, p_e = 0 (no label in common), κ = (0 − 0)/(1 − 0) = 0
    assert ens.agreement() == {("has4", "exact"): 0.0}
