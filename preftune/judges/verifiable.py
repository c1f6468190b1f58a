"""Verifiable rewards: plain Python callables ``verifier(prompt, response) -> float`` and a Judge around them.

Each verifier is usable directly as a reward function (GRPO, rejection sampling) and, through
:class:`VerifierJudge`, anywhere a :class:`~preftune.judges.base.Judge` is expected. Rewards are 1.0 / 0.0
except the code verifier, which returns the fraction of unit tests passed. A reference (answer, pattern
source, tests) may be shared by every prompt, or given per prompt as a mapping ``{prompt: reference}`` or a
callable ``prompt -> reference``.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from preftune.judges.base import ScoreBasedJudge
from preftune.judges.code_tests import CodeTestResult, extract_code, run_code_tests
from preftune.judges.parsing import json_values
from preftune.judges.schema import check_schema, validate_json_schema

__all__ = [
    "CodeTestResult",
    "CodeTestsVerifier",
    "ExactMatch",
    "JSONSchemaVerifier",
    "RegexMatch",
    "VerifierJudge",
    "extract_code",
    "normalize_answer",
    "run_code_tests",
]

Reference = str | Mapping[str, str] | Callable[[str], str]

_EDGE_PUNCT = " \t\n.,;:!?\"'`"
_NOT_JSON = object()


def per_prompt(spec: Any, prompt: str) -> Any:
    """Resolve a per-prompt spec: a callable is called, a mapping is looked up, anything else is shared."""
    if callable(spec):
        return spec(prompt)
    if isinstance(spec, Mapping):
        try:
            return spec[prompt]
        except KeyError:
            raise KeyError(f"no reference for prompt {prompt[:80]!r}") from None
    return spec


def normalize_answer(text: str) -> str:
    """Unicode NFKC, case-folded, whitespace collapsed, surrounding punctuation and quotes stripped.

    So "  The Answer: 42. " and "the answer: 42" compare equal, while "42" and "4 2" do not.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(text.split()).strip(_EDGE_PUNCT)


class ExactMatch:
    r"""1.0 when the response (or the part ``extract`` captures) equals the reference answer.

    Args:
        reference: the expected answer, shared or per prompt.
        normalize: compare :func:`normalize_answer` forms (True) or raw strings stripped of outer whitespace.
        extract: optional regex; the answer is group 1 (or the whole match) of its LAST match in the response,
            e.g. ``r"\\boxed\{([^}]*)\}"`` or ``r"Answer:\s*(.+)"``. No match scores 0.
    """

    def __init__(self, reference: Reference, normalize: bool = True, extract: str | None = None) -> None:
        self.reference = reference
        self.normalize = normalize
        self.extract = re.compile(extract) if extract else None

    def answer(self, response: str) -> str | None:
        """The part of ``response`` that is compared (None when ``extract`` finds nothing)."""
        if self.extract is None:
            return response
        matches = list(self.extract.finditer(response))
        if not matches:
            return None
        last = matches[-1]
        return last.group(1) if last.groups() else last.group(0)

    def __call__(self, prompt: str, response: str) -> float:
        got, want = self.answer(response), per_prompt(self.reference, prompt)
        if got is None:
            return 0.0
        norm = normalize_answer if self.normalize else str.strip
        return float(norm(got) == norm(want))

    def __repr__(self) -> str:
        return f"ExactMatch(normalize={self.normalize}, extract={self.extract.pattern if self.extract else None!r})"


class RegexMatch:
    """1.0 when the pattern matches the response: anywhere (``re.search``) or the whole of it (``fullmatch``).

    Args:
        pattern: a regex, shared or per prompt.
        fullmatch: require the whole response (outer whitespace stripped) to match.
        flags: ``re`` flags, e.g. ``re.IGNORECASE | re.DOTALL``.
    """

    def __init__(self, pattern: Reference, fullmatch: bool = False, flags: int = 0) -> None:
        self.pattern = pattern
        self.fullmatch = fullmatch
        self.flags = flags

    def __call__(self, prompt: str, response: str) -> float:
        regex = re.compile(per_prompt(self.pattern, prompt), self.flags)
        match = regex.fullmatch(response.strip()) if self.fullmatch else regex.search(response)
        return float(match is not None)

    def __repr__(self) -> str:
        return f"RegexMatch(fullmatch={self.fullmatch}, flags={self.flags})"


class JSONSchemaVerifier:
    """1.0 when the response is JSON valid under the schema (see :mod:`preftune.judges.schema`).

    Args:
        schema: a JSON Schema (any draft ``jsonschema`` implements; checked at construction, see
            :func:`preftune.judges.schema.check_schema`).
        strict: the whole response must be the JSON document. When False, JSON inside a code fence or
            an object inside prose is accepted too: the first candidate that parses is validated.
    """

    def __init__(self, schema: dict[str, Any], strict: bool = False) -> None:
        check_schema(schema)
        self.schema = schema
        self.strict = strict

    def errors(self, response: str) -> list[str]:
        """Why ``response`` fails (empty list when it passes)."""
        if self.strict:
            try:
                return validate_json_schema(json.loads(response.strip()), self.schema)
            except ValueError:
                return ["response is not JSON"]
        value = next(json_values(response), _NOT_JSON)
        return ["response holds no JSON"] if value is _NOT_JSON else validate_json_schema(value, self.schema)

    def __call__(self, prompt: str, response: str) -> float:
        return float(not self.errors(response))

    def __repr__(self) -> str:
        return f"JSONSchemaVerifier(strict={self.strict})"


TestSpec = str | Sequence[str]


class CodeTestsVerifier:
    """``verifier(prompt, response) -> fraction of unit tests passed`` by the response's code.

    Args:
        tests: one test block (a string), several (a list, each scored separately), or per prompt: a mapping
            ``{prompt: tests}`` or a callable ``prompt -> tests``. Tests are Python snippets that raise
            (usually ``assert``) on failure and see the candidate's top-level names.
        timeout: seconds for the whole run.
        memory_limit_mb: address-space limit for the subprocess (POSIX only); None for no limit.
        extract: take the code from the first fenced block (True) or use the response as is.
    """

    def __init__(
        self,
        tests: TestSpec | Mapping[str, TestSpec] | Callable[[str], TestSpec],
        timeout: float = 5.0,
        memory_limit_mb: int | None = None,
        extract: bool = True,
    ) -> None:
        self.tests = tests
        self.timeout = timeout
        self.memory_limit_mb = memory_limit_mb
        self.extract = extract

    def tests_for(self, prompt: str) -> list[str]:
        """The test snippets that apply to ``prompt``."""
        spec = per_prompt(self.tests, prompt)
        return [spec] if isinstance(spec, str) else list(spec)

    def run(self, prompt: str, response: str) -> CodeTestResult:
        """Full outcome for one response (the reward is its ``fraction``)."""
        code = extract_code(response) if self.extract else response
        return run_code_tests(code, self.tests_for(prompt), self.timeout, self.memory_limit_mb)

    def __call__(self, prompt: str, response: str) -> float:
        return self.run(prompt, response).fraction

    def __repr__(self) -> str:
        return f"CodeTestsVerifier(timeout={self.timeout})"


class VerifierJudge(ScoreBasedJudge):
    """Any callable ``fn(prompt, response) -> float | bool`` as a Judge.

    ``score`` is ``float(fn(prompt, response))``; ``judge`` compares the two scores (order-invariant) with
    confidence min(1, |s_a − s_b|), which is 1 for pass-vs-fail and the gap for fractional rewards.
    """

    def __init__(
        self, fn: Callable[[str, str], float | bool], name: str | None = None, tie_margin: float = 0.0
    ) -> None:
        super().__init__(name or getattr(fn, "__name__", type(fn).__name__), tie_margin)
        self.fn = fn

    def confidence_from_margin(self, margin: float) -> float:
        """min(1, |s_a − s_b|)."""
        return min(1.0, margin)

    def _score(self, prompt: str, response: str) -> float:
        return float(self.fn(prompt, response))
