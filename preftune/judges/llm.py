"""A judge served by any OpenAI-compatible chat endpoint (OpenAI, vLLM, SGLang, llama.cpp, TGI, ...).

One request per presentation order; the base class asks both orders. What happens around a request:
    cache      a hit on sha256(base_url, model, template, temperature, system prompt, filled prompt) answers
               without a request, so a re-run of the same judging costs nothing. Only parseable replies
               are cached; with temperature > 0 the cached sample is reused, by design.
    retries    HTTP 429 / 408 / 409 / 5xx, timeouts and dropped connections are retried up to
               ``max_attempts`` times with exponential backoff and jitter, waiting at least the server's
               Retry-After. The ``openai`` client's own retries are off (``max_retries=0``) so that there is one
               retry policy, and it is ours. Other errors (401, 404, 400) are configuration errors: raised at once.
    parsing    a reply without a usable JSON verdict gets ONE follow-up asking for the JSON only; if that
               fails too, that order is a tie with ``error`` set (counted in ``position_stats.failed``).
    concurrency ``judge_many`` / ``score_many`` run up to ``max_concurrency`` requests at once in threads.

The API key is read from the environment variable named by ``api_key_env``; it is handed to the client and
never stored on the judge, logged, shown in ``repr``, or written to the cache.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import openai

from preftune.errors import PreftuneError
from preftune.judges.base import Judge, PairItem, ScoreItem, Verdict
from preftune.judges.cache import JudgeCache, cache_key
from preftune.judges.parsing import parse_score, parse_verdict
from preftune.judges.prompts import (
    DEFAULT_PAIRWISE_TEMPLATE,
    DEFAULT_SCORE_TEMPLATE,
    PAIRWISE_FIELDS,
    SCORE_FIELDS,
    fill_template,
    load_template,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

RETRYABLE_STATUS = frozenset({408, 409, 429})
FIX_FORMAT_MESSAGE = (
    "Your reply could not be parsed ({reason}). Reply again with only the JSON object requested, "
    "no code fences and no other text."
)


class JudgeRequestError(PreftuneError, RuntimeError):
    """A request still failed after the bounded number of attempts, or failed in a way retries cannot fix."""


class MalformedReply(Exception):
    """HTTP 200 whose body is not a chat completion (not JSON, ``{}``, no choices): retried like a server error."""


class JudgeParseError(ValueError):
    """A scoring reply stayed unparseable after the one retry and no ``score_fallback`` was configured."""


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms``, or ``retry-after`` as seconds or an HTTP date."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_delay(
    attempt: int, base: float, cap: float, retry_after: float | None = None, rng: random.Random | None = None
) -> float:
    """Seconds to wait before attempt ``attempt + 1``.

        d = min(cap, max(retry_after, base · 2^(attempt−1) · u)),   u ~ Uniform(0.5, 1)

    The jitter u spreads out workers that hit a rate limit together, so they do not retry in lockstep;
    Retry-After, when given, is a floor. The cap keeps one absurd Retry-After from stalling a run.
    """
    u = (rng or random).uniform(0.5, 1.0)
    return min(cap, max(retry_after or 0.0, base * 2 ** (attempt - 1) * u))


def _is_retryable(err: Exception) -> bool:
    if isinstance(err, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(err, openai.APIStatusError):
        return err.status_code in RETRYABLE_STATUS or err.status_code >= 500
    return False


def _describe(err: Exception) -> str:
    """Error type and status only: server messages can echo request content, so they are not logged."""
    status = getattr(err, "status_code", None)
    return f"{type(err).__name__}" + (f" (HTTP {status})" if status else "")


class LLMJudge(Judge):
    """Pairwise verdicts and 1–10 scores from a chat model behind an OpenAI-compatible endpoint.

    Confidence is the model's own stated confidence (uncalibrated). See the module docstring for caching,
    retries and parsing.

    Args:
        model: model name sent to the endpoint.
        base_url: endpoint root, e.g. ``http://localhost:8000/v1``; None uses ``OPENAI_BASE_URL`` or OpenAI's.
        api_key_env: name of the environment variable holding the key; None for servers that need none.
        template / template_path: pairwise judging prompt with ``{prompt}``, ``{response_a}``, ``{response_b}``
            (default :data:`~preftune.judges.prompts.DEFAULT_PAIRWISE_TEMPLATE`).
        score_template / score_template_path: scoring prompt with ``{prompt}``, ``{response}``.
        system_prompt: optional system message sent before the judging prompt.
        temperature: sampling temperature; 0 for repeatable verdicts.
        max_tokens: reply length limit sent as ``max_tokens`` (None sends none).
        timeout: seconds per request before it counts as timed out (and is retried).
        max_attempts: attempts per request, first one included.
        backoff_base / backoff_max: seconds; see :func:`backoff_delay`.
        max_concurrency: requests in flight at once in ``*_many``.
        cache_path: SQLite file for the reply cache; None disables caching.
        score_fallback: score returned when a scoring reply stays unparseable; None raises JudgeParseError.
        name: label in reports and ensembles.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        template: str | None = None,
        template_path: str | Path | None = None,
        score_template: str | None = None,
        score_template_path: str | Path | None = None,
        system_prompt: str | None = None,
        temperature: float = 0.0,
        max_tokens: int | None = 512,
        timeout: float = 60.0,
        max_attempts: int = 5,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        max_concurrency: int = 8,
        cache_path: str | Path | None = None,
        score_fallback: float | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name or model)
        if max_attempts < 1 or max_concurrency < 1:
            raise ValueError("max_attempts and max_concurrency must be at least 1")
        self.model = model
        self.api_key_env = api_key_env
        self.template = load_template(template, template_path, DEFAULT_PAIRWISE_TEMPLATE, PAIRWISE_FIELDS)
        self.score_template = load_template(
            score_template, score_template_path, DEFAULT_SCORE_TEMPLATE, SCORE_FIELDS
        )
        self.system_prompt = system_prompt
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_concurrency = max_concurrency
        self.score_fallback = score_fallback
        self.cache = JudgeCache(cache_path) if cache_path is not None else None
        self._client = openai.OpenAI(
            base_url=base_url, api_key=read_api_key(api_key_env), timeout=timeout, max_retries=0
        )
        self.base_url = str(self._client.base_url)
        self._lock = threading.Lock()
        self.counters = {
            "requests": 0,
            "cache_hits": 0,
            "retries": 0,
            "parse_retries": 0,
            "parse_failures": 0,
        }
        """Running totals: requests sent, cache hits, transport retries, format retries, unparseable replies."""

    def __repr__(self) -> str:
        return (
            f"LLMJudge(name={self.name!r}, model={self.model!r}, base_url={self.base_url!r}, "
            f"api_key_env={self.api_key_env!r})"
        )

    # ---- hooks ------------------------------------------------------------------------------------------

    def _judge_ordered(self, prompt: str, first: str, second: str) -> Verdict:
        filled = fill_template(self.template, prompt=prompt, response_a=first, response_b=second)
        verdict, raws, error = self._ask(self.template, filled, parse_verdict)
        if verdict is None:
            return Verdict("tie", 0.0, "unparseable judge output", {"raw": raws}, error=error)
        verdict.details["raw"] = raws  # the reply (two after a format retry; the cached one on a hit)
        return verdict

    def _judge_ordered_many(self, items: list[PairItem]) -> list[Verdict]:
        return self._map(lambda it: self._judge_ordered(*it), items)

    def _score(self, prompt: str, response: str) -> float:
        filled = fill_template(self.score_template, prompt=prompt, response=response)
        score, _, error = self._ask(self.score_template, filled, parse_score)
        if score is None:
            if self.score_fallback is None:
                raise JudgeParseError(f"{self.name}: {error}")
            return self.score_fallback
        return score

    def _score_many(self, items: list[ScoreItem]) -> list[float]:
        return self._map(lambda it: self._score(*it), items)

    # ---- machinery --------------------------------------------------------------------------------------

    def _map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``fn`` over items with at most ``max_concurrency`` in flight; the first error is re-raised.

        Work already finished when an error surfaces is cached, so a re-run resumes instead of starting over.
        """
        if len(items) <= 1 or self.max_concurrency == 1:
            return [fn(it) for it in items]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(items))) as pool:
            return list(pool.map(fn, items))

    def _count(self, counter: str) -> None:
        with self._lock:
            self.counters[counter] += 1

    def _ask(
        self, template: str, filled: str, parse: Callable[[str], tuple[Any, str | None]]
    ) -> tuple[Any, list[str], str | None]:
        """``(parsed, raw replies, error)`` for one filled prompt: cache, request, one format retry."""
        key = cache_key(self.base_url, self.model, template, self.temperature, self.system_prompt, filled)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            parsed, _ = parse(hit)
            if parsed is not None:
                self._count("cache_hits")
                return parsed, [hit], None
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": filled})
        reply = self._complete(messages)
        parsed, reason = parse(reply)
        raws = [reply]
        if parsed is None:
            self._count("parse_retries")
            messages += [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": FIX_FORMAT_MESSAGE.format(reason=reason)},
            ]
            reply = self._complete(messages)
            raws.append(reply)
            parsed, reason = parse(reply)
            if parsed is None:
                self._count("parse_failures")
                log.warning("%s: judge output unparseable after one retry: %s", self.name, reason)
                return None, raws, f"unparseable judge output after one retry: {reason}"
        if self.cache is not None:
            self.cache.put(key, reply)
        return parsed, raws, None

    def _complete(self, messages: list[dict[str, str]]) -> str:
        """The reply text of one chat completion, retried on rate limits, timeouts and server errors."""
        extra: dict[str, Any] = {} if self.max_tokens is None else {"max_tokens": self.max_tokens}
        resp = create_with_retries(
            self._client, label=self.name, error_cls=JudgeRequestError, max_attempts=self.max_attempts,
            backoff_base=self.backoff_base, backoff_max=self.backoff_max,
            on_attempt=lambda: self._count("requests"), on_retry=lambda: self._count("retries"),
            model=self.model, messages=messages, temperature=self.temperature, **extra,
        )  # fmt: skip
        return resp.choices[0].message.content or ""


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def looks_like_key(value: str) -> bool:
    """Whether an ``api_key_env`` value is more likely a pasted key than a variable name: not shaped like one
    (``sk-...``, dots, slashes), or long and in mixed case (``gsk_Ab12...``); ``MY_LONG_PROJECT_API_KEY`` is a name."""
    if not ENV_NAME.fullmatch(value) or value.lower().startswith(("sk-", "sk_")):
        return True
    return len(value) >= 32 and value != value.upper()


def read_api_key(env_name: str | None) -> str:
    """The API key from the environment variable ``env_name`` (never from the config itself; never logged).

    ``None``: a server that needs no key. A missing variable is an error that names the variable, not its value;
    a value that looks like a key itself is refused without being repeated.
    """
    if env_name is None:
        return "no-key"  # the client insists on a string; keyless servers ignore it
    if not isinstance(env_name, str) or looks_like_key(env_name):
        raise ValueError("api_key_env must name the environment variable that holds the key (e.g. OPENAI_API_KEY), "
                         "not hold the key: the value given looks like a key and is not shown; export the key "
                         "as a variable and give that variable's name")
    key = os.environ.get(env_name)
    if not key:
        raise ValueError(
            f"environment variable {env_name} is not set; export the API key there, set api_key_env to "
            "the variable that holds it, or set api_key_env: null for a server that needs no key"
        )
    return key


def create_with_retries(client, *, label: str, error_cls: type[Exception], max_attempts: int, backoff_base: float,
                        backoff_max: float, on_attempt=None, on_retry=None, **request: Any):
    """``client.chat.completions.create(**request)``, retried on rate limits, timeouts and server errors with
    exponential backoff and jitter, honouring Retry-After; shared by the LLM judge and the generator.

    A final failure raises ``error_cls`` with the server's message, the API key masked (`from None`: the
    client's own exception text may quote the key; OpenAI's 401 message shows it partly masked).
    """
    for attempt in range(1, max_attempts + 1):
        try:
            if on_attempt is not None:
                on_attempt()
            return _checked(client.chat.completions.create(**request))
        except (MalformedReply, json.JSONDecodeError) as err:
            if attempt == max_attempts:
                raise error_cls(f"{label}: the endpoint {client.base_url} answered HTTP 200 without a chat completion "
                                f"{attempt} times ({_malformed(err)}); is the base URL the API root (e.g. "
                                "http://host:8000/v1)?") from None
            delay = backoff_delay(attempt, backoff_base, backoff_max)
            log.warning("%s: malformed reply (%s); retry %d of %d in %.2fs", label, _malformed(err), attempt,
                        max_attempts - 1, delay)
            if on_retry is not None:
                on_retry()
            time.sleep(delay)
        except openai.OpenAIError as err:
            if not _is_retryable(err) or attempt == max_attempts:
                after = f" after {attempt} attempts" if _is_retryable(err) else ""
                detail = str(getattr(err, "message", "")).replace(client.api_key, "***")
                raise error_cls(f"{label}: request failed{after}: {_describe(err)}: {detail}") from None
            response = getattr(err, "response", None)
            retry_after = parse_retry_after(response.headers if response is not None else None)
            delay = backoff_delay(attempt, backoff_base, backoff_max, retry_after)
            log.warning("%s: %s; retry %d of %d in %.2fs", label, _describe(err), attempt, max_attempts - 1, delay)
            if on_retry is not None:
                on_retry()
            time.sleep(delay)
    raise AssertionError("unreachable")


def _checked(resp):
    """``resp`` if it is a chat completion with a message; the ``openai`` client hands back a 200's non-JSON
    body as a str and ``{}`` as a completion whose fields are all None."""
    if isinstance(resp, str):
        raise MalformedReply("the body is not JSON")
    choices = getattr(resp, "choices", None)
    if not choices:
        raise MalformedReply("no choices" if choices is not None else "no 'choices' field")
    if getattr(choices[0], "message", None) is None:
        raise MalformedReply("the first choice has no message")
    return resp


def _malformed(err: Exception) -> str:
    return str(err) if isinstance(err, MalformedReply) else "the body is not JSON"
