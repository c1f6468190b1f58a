"""Sampling responses to prompts: Hugging Face ``generate``, vLLM when installed, or an OpenAI-compatible endpoint.

    prompts (JSONL "prompt" field, text or messages; or TXT, one prompt per line)
      -> n responses per prompt, response i sampled at temperatures[i mod len(temperatures)]
      -> GEN.jsonl, one row per prompt, appended and fsynced as each chunk of prompts finishes

How ``n`` meets ``temperatures``: ``n`` is the number of responses per prompt, handed out round-robin over the
temperatures (n=4 with 0.3,0.7,1.0 gives 0.3, 0.7, 1.0, 0.3), so the cost per prompt does not grow with the
number of temperatures. Every response records its temperature. Temperature 0 is greedy decoding; several
greedy responses to one prompt are identical copies (``synth.pairs`` merges identical texts before judging).

Seeds: response i of a prompt is sampled with its own seed, ``response_seed(seed, prompt_id, i)``, recorded in
the row. With Hugging Face the per-response seed drives a per-row ``torch.Generator`` (:class:`SeededSampler`),
so a response does not depend on which other prompts share its batch: a resumed run writes the same responses
as an uninterrupted one, and ``--batch-size`` does not change the output (up to floating-point differences of
padded attention). vLLM takes the seed per request; OpenAI-compatible servers take ``seed`` as a best effort.

Output row (``GEN.jsonl``)::

    {"prompt": str | [messages], "prompt_id": "<sha256 of the prompt, 16 hex>", "source_line": int,
     "responses": [{"text", "temperature", "seed", "index", "generator", "finish_reason", "num_tokens"}, ...],
     "generation": {"generator", "n", "temperatures", "seed", "max_new_tokens", "top_p", "chat"}}

Resuming: on start the existing OUT is read; prompts whose ``prompt_id`` is there are skipped, a partial last
line (a crash mid-write) is cut off, and a file written with other generation settings is refused rather
than mixed. Duplicate prompts in the input are generated once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from preftune.errors import PreftuneError

log = logging.getLogger(__name__)

PromptText = str | list[dict[str, str]]


class GenerationRequestError(PreftuneError):
    """An endpoint request failed after the bounded retries, or failed in a way retries cannot fix."""


# ---- prompts ------------------------------------------------------------------------------------------------


def prompt_id(prompt: PromptText) -> str:
    """First 16 hex digits of sha256 over the prompt's canonical JSON: the resume key of a prompt."""
    canon = json.dumps(prompt, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]


def response_seed(seed: int, pid: str, index: int) -> int:
    """The seed of response ``index`` to prompt ``pid`` (31 bits, so every backend accepts it)."""
    digest = hashlib.sha256(f"{seed}|{pid}|{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def assign_temperatures(n: int, temperatures: Sequence[float]) -> list[float]:
    """Temperature of each of the ``n`` responses: round-robin over ``temperatures``."""
    if n < 1 or not temperatures:
        raise PreftuneError("need n >= 1 and at least one temperature")
    return [float(temperatures[i % len(temperatures)]) for i in range(n)]


def prompt_text(prompt: PromptText) -> str:
    """A prompt as plain text (for judges): a lone user message is its content, a dialogue is "role: content" lines."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0].get("role") == "user":
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in value)
    )


@dataclass
class PromptItem:
    """One prompt to answer and where it came from (1-based line of the prompts file)."""

    prompt: PromptText
    source_line: int | None = None

    @property
    def id(self) -> str:
        return prompt_id(self.prompt)


@dataclass
class PromptFile:
    """The prompts of a file: ``items`` in order, duplicates and blank prompts counted, not generated."""

    items: list[PromptItem]
    duplicates: int = 0
    blank: int = 0


def read_prompts(path: str | Path, chat: bool = False) -> PromptFile:
    """Prompts from JSONL (``"prompt"``: text or a message list) or any other file (one prompt per line).

    With ``chat`` a text prompt becomes ``[{"role": "user", "content": text}]``, so the chat template is applied
    at generation and, because the GEN row stores the messages, again at training.
    """
    path = Path(path)
    if not path.exists():
        raise PreftuneError(f"prompts file not found: {path}")
    out = PromptFile([])
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if path.suffix.lower() == ".jsonl":
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PreftuneError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
                prompt = row.get("prompt") if isinstance(row, dict) else None
                if not (isinstance(prompt, str) or _is_messages(prompt)):
                    raise PreftuneError(f"{path}:{lineno}: expected an object with \"prompt\": text or messages")
            else:
                prompt = line.rstrip("\r\n")
            if isinstance(prompt, str) and not prompt.strip():
                out.blank += 1
                continue
            if chat and isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            item = PromptItem(prompt, lineno)
            if item.id in seen:
                out.duplicates += 1
                continue
            seen.add(item.id)
            out.items.append(item)
    return out


# ---- backends -----------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One response to sample."""

    prompt: PromptText
    temperature: float
    seed: int


@dataclass
class Sample:
    """One sampled response. ``finish_reason``: "stop" (end of turn) or "length" (hit max_new_tokens)."""

    text: str
    finish_reason: str | None = None
    num_tokens: int | None = None


class Backend(Protocol):
    name: str
    """Recorded as each response's ``generator``, e.g. ``hf:path/to/model``; never holds a secret."""
    jobs_per_call: int
    """Responses worth sampling together; prompts are processed in chunks of about this many responses."""

    def sample(self, jobs: list[Job]) -> list[Sample]:
        """One sample per job, in order."""
        ...


def encode_prompt(tokenizer: Any, prompt: PromptText) -> list[int]:
    """Token ids exactly as training tokenizes the prompt (``data.tokenize``).

    Text: ``tokenizer(text)`` with its special tokens (BOS). Messages: the chat template with the generation
    prompt, encoded without adding special tokens again.
    """
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise PreftuneError("a prompt is a message list (or --chat was given) but the tokenizer has no chat "
                            "template; give text prompts without --chat, or a tokenizer with a template")
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class SeededSampler:
    """A logits processor that samples every row from its own ``torch.Generator``; HF then decodes greedily.

    Row r gets temperature T_r and seed s_r. With T_r > 0 the next token is drawn from
    softmax(scores_r / T_r), restricted to the top-p nucleus, using generator(s_r); with T_r = 0 it is
    argmax(scores_r). The returned scores are 0 at the chosen token and -inf elsewhere, so ``generate`` with
    ``do_sample=False`` takes exactly that token. The naive equivalent, for one row alone::

        torch.manual_seed(s_r); model.generate(ids_r, do_sample=True, temperature=T_r, top_p=p)

    draws from the same distribution, but its random stream is shared by the whole batch, so a response
    would depend on its batch-mates. Per-row generators make each response a function of its own seed.
    """

    def __init__(self, temperatures: Sequence[float], seeds: Sequence[int], top_p: float = 1.0) -> None:
        self.temperatures = [float(t) for t in temperatures]
        self.seeds = list(seeds)
        self.top_p = top_p
        self._generators: list[Any] | None = None

    def __call__(self, input_ids, scores):  # scores: (B, V)
        import torch

        if self._generators is None:
            self._generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        temps = torch.tensor(self.temperatures, device=scores.device).unsqueeze(1)  # (B, 1)
        probs = torch.softmax(scores.float() / temps.clamp_min(1e-6), dim=-1)  # (B, V)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            outside = sorted_p.cumsum(dim=-1) - sorted_p > self.top_p  # tokens after the nucleus is full
            probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
        chosen = scores.argmax(dim=-1)  # (B,) greedy rows keep this
        for r, t in enumerate(self.temperatures):
            if t > 0:
                chosen[r] = torch.multinomial(probs[r], 1, generator=self._generators[r])[0]
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen.unsqueeze(1), 0.0)
        return out


class HFBackend:
    """Batched Hugging Face ``generate`` with the KV cache, left padding and :class:`SeededSampler`.

    The n responses of a prompt are n rows of the batch (the prompt repeated, as ``num_return_sequences``
    does internally). Sampling parameters come only from the arguments: the model's own
    ``generation_config`` (which may set temperature, top_p or a repetition penalty) is not used.

    Args:
        model / tokenizer: a loaded causal LM and its tokenizer.
        max_new_tokens: generated tokens per response at most.
        top_p: nucleus sampling mass (1.0 = off).
        batch_size: sequences per ``generate`` call.
        name: model name recorded as ``hf:<name>`` (default: the model's ``name_or_path``).
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_new_tokens: int = 128, top_p: float = 1.0,
                 batch_size: int = 16, name: str | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.top_p = top_p
        self.jobs_per_call = batch_size
        label = name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        self.name = f"hf:{label}"
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise PreftuneError("the tokenizer has neither a pad nor an EOS token")
        self.pad_id = pad
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}

    def sample(self, jobs: list[Job]) -> list[Sample]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        out: list[Sample] = []
        device = next(self.model.parameters()).device
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
            pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids) or None,
        )  # fmt: skip
        for start in range(0, len(jobs), self.jobs_per_call):
            batch = jobs[start : start + self.jobs_per_call]
            ids = [encode_prompt(self.tokenizer, j.prompt) for j in batch]
            width = max(len(x) for x in ids)
            input_ids = torch.tensor([[self.pad_id] * (width - len(x)) + x for x in ids], device=device)  # (B, T)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)  # (B, T)
            sampler = SeededSampler([j.temperature for j in batch], [j.seed for j in batch], self.top_p)
            with torch.inference_mode():
                seqs = self.model.generate(
                    input_ids=input_ids, attention_mask=mask, generation_config=config,
                    logits_processor=LogitsProcessorList([sampler]),
                )  # (B, T + new)  # fmt: skip
            for row in seqs[:, width:].tolist():
                stop = next((k for k, tok in enumerate(row) if tok in self.eos_ids), None)
                kept = row if stop is None else row[:stop]
                text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
                out.append(Sample(text, "length" if stop is None else "stop", len(kept)))
        return out


class VLLMBackend:
    """vLLM offline inference (used only when ``import vllm`` works; not exercised by the CPU test suite).

    Prompts are passed as token ids encoded like :class:`HFBackend` does; each response is its own request
    with its own seed.
    """

    def __init__(self, model: str, *, tokenizer: str | None = None, max_new_tokens: int = 128,
                 top_p: float = 1.0, dtype: str = "auto", jobs_per_call: int = 1024) -> None:
        try:
            from vllm import LLM
        except ImportError:
            raise PreftuneError("--backend vllm: vllm is not installed (pip install vllm)") from None
        self.llm = LLM(model=model, tokenizer=tokenizer, dtype=dtype)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_new_tokens = max_new_tokens
        self.top_p = top_p
        self.jobs_per_call = jobs_per_call
        self.name = f"vllm:{model}"

    def sample(self, jobs: list[Job]) -> list[Sample]:
        from vllm import SamplingParams

        prompts = [{"prompt_token_ids": encode_prompt(self.tokenizer, j.prompt)} for j in jobs]
        params = [SamplingParams(n=1, temperature=j.temperature, top_p=self.top_p if j.temperature > 0 else 1.0,
                                 max_tokens=self.max_new_tokens, seed=j.seed) for j in jobs]
        results = self.llm.generate(prompts, params, use_tqdm=False)
        out = []
        for res in results:
            o = res.outputs[0]
            out.append(Sample(o.text.strip(), o.finish_reason, len(o.token_ids)))
        return out


class OpenAIBackend:
    """Chat completions from an OpenAI-compatible endpoint, ``max_concurrency`` requests in flight.

    A text prompt is sent as one user message. Retries follow the LLM judge (:mod:`preftune.judges.llm`, whose
    helpers this reuses): 429 / 408 / 409 / 5xx, timeouts and dropped connections are retried with exponential
    backoff and jitter, never sooner than Retry-After; other errors stop the run. The API key is read from the
    environment variable named ``api_key_env`` and is never logged or recorded (the generator is
    ``openai:<model>``).
    """

    def __init__(self, model: str, *, base_url: str | None = None, api_key_env: str | None = "OPENAI_API_KEY",
                 max_new_tokens: int = 128, top_p: float = 1.0, timeout: float = 120.0, max_attempts: int = 5,
                 backoff_base: float = 1.0, backoff_max: float = 60.0, max_concurrency: int = 8) -> None:
        import openai

        from preftune.judges.llm import LLMJudge

        try:
            key = LLMJudge._read_api_key(api_key_env)
        except ValueError as e:
            raise PreftuneError(str(e)) from None
        self._client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=0)
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.top_p = top_p
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_concurrency = max_concurrency
        self.jobs_per_call = 4 * max_concurrency
        self.name = f"openai:{model}"
        self.retries = 0

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.model!r}, base_url={str(self._client.base_url)!r})"

    def sample(self, jobs: list[Job]) -> list[Sample]:
        if len(jobs) <= 1 or self.max_concurrency == 1:
            return [self._complete(j) for j in jobs]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(jobs))) as pool:
            return list(pool.map(self._complete, jobs))

    def _complete(self, job: Job) -> Sample:
        from preftune.judges.llm import create_with_retries

        messages = job.prompt if isinstance(job.prompt, list) else [{"role": "user", "content": job.prompt}]
        extra: dict[str, Any] = {"top_p": self.top_p} if self.top_p < 1.0 and job.temperature > 0 else {}
        resp = create_with_retries(
            self._client, label="generate", error_cls=GenerationRequestError, max_attempts=self.max_attempts,
            backoff_base=self.backoff_base, backoff_max=self.backoff_max, on_retry=self._count_retry,
            model=self.model, messages=messages, temperature=job.temperature, max_tokens=self.max_new_tokens,
            seed=job.seed, **extra,
        )  # fmt: skip
        choice = resp.choices[0]
        usage = getattr(resp, "usage", None)
        return Sample((choice.message.content or "").strip(), choice.finish_reason,
                      getattr(usage, "completion_tokens", None))

    def _count_retry(self) -> None:
        self.retries += 1


# ---- rows -----------------------------------------------------------------------------------------------------


def generate_rows(backend: Backend, items: Sequence[PromptItem], *, n: int, temperatures: Sequence[float],
                  seed: int = 0, settings: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """One GEN row per item, in order, sampled in chunks of about ``backend.jobs_per_call`` responses."""
    temps = assign_temperatures(n, temperatures)
    per_chunk = max(1, backend.jobs_per_call // n)
    for start in range(0, len(items), per_chunk):
        chunk = items[start : start + per_chunk]
        jobs = [Job(it.prompt, t, response_seed(seed, it.id, i)) for it in chunk for i, t in enumerate(temps)]
        samples = backend.sample(jobs)
        for k, it in enumerate(chunk):
            responses = []
            for i in range(n):
                job, s = jobs[k * n + i], samples[k * n + i]
                responses.append({"text": s.text, "temperature": job.temperature, "seed": job.seed, "index": i,
                                  "generator": backend.name, "finish_reason": s.finish_reason,
                                  "num_tokens": s.num_tokens})
            row = {"prompt": it.prompt, "prompt_id": it.id, "source_line": it.source_line, "responses": responses}
            if settings is not None:
                row["generation"] = settings
            yield row


def generate_responses(model: Any, tokenizer: Any, prompts: Iterable[PromptText | PromptItem], n: int = 4,
                       temperatures: Sequence[float] = (1.0,), max_new_tokens: int = 128, batch_size: int = 16,
                       seed: int = 0, *, top_p: float = 1.0, chat: bool = False,
                       name: str | None = None) -> Iterator[dict[str, Any]]:
    """GEN rows for ``prompts`` from a loaded Hugging Face model (see the module docstring for the row).

    Args:
        model / tokenizer: a causal LM and its tokenizer.
        prompts: text, message lists, or :class:`PromptItem`.
        n: responses per prompt, round-robin over ``temperatures`` (0 = greedy).
        max_new_tokens: tokens per response at most.
        batch_size: sequences per ``generate`` call.
        seed: base seed; response i of prompt p uses ``response_seed(seed, prompt_id(p), i)``.
        top_p: nucleus mass for sampled responses.
        chat: send text prompts through the chat template as one user message (stored as messages).
        name: model name recorded in ``generator``.
    """
    items = []
    for p in prompts:
        item = p if isinstance(p, PromptItem) else PromptItem(p)
        if chat and isinstance(item.prompt, str):
            item = PromptItem([{"role": "user", "content": item.prompt}], item.source_line)
        items.append(item)
    backend = HFBackend(model, tokenizer, max_new_tokens=max_new_tokens, top_p=top_p, batch_size=batch_size,
                        name=name)
    yield from generate_rows(backend, items, n=n, temperatures=temperatures, seed=seed)


# ---- the resumable file run ---------------------------------------------------------------------------------


@dataclass
class GenerateResult:
    """Counts of one ``run_generation``: prompts read, already in OUT, generated now, skipped."""

    out: Path
    prompts: int
    already_done: int
    generated: int
    duplicates: int = 0
    blank: int = 0
    repaired_partial_line: bool = False
    seconds: float = 0.0
    responses: int = 0

    def summary(self) -> str:
        parts = [f"{self.prompts} prompts", f"{self.already_done} already in {self.out.name}",
                 f"generated {self.generated} ({self.responses} responses) in {self.seconds:.1f}s"]
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicate prompts skipped")
        if self.blank:
            parts.append(f"{self.blank} blank prompts skipped")
        if self.repaired_partial_line:
            parts.append("cut a partial last line left by an interrupted run")
        return "; ".join(parts)


def scan_existing(out: Path) -> tuple[set[str], dict[str, Any] | None, bool]:
    """(prompt ids already in ``out``, the settings they were generated with, whether a partial line was cut).

    A last line without its newline is what a crash mid-write leaves: it is cut off so the prompt is redone.
    Any other unreadable line means the file is not a GEN file this run wrote, and it is refused.
    """
    if not out.exists():
        return set(), None, False
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    repaired = end < len(data)
    if repaired:
        with open(out, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    done: set[str] = set()
    settings = None
    for lineno, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pid = row["prompt_id"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise PreftuneError(f"{out}:{lineno}: not a generation row; to start afresh use another --out") from None
        done.add(pid)
        settings = settings or row.get("generation")
    return done, settings, repaired


def check_settings(out: Path, previous: dict[str, Any] | None, settings: dict[str, Any]) -> None:
    """Refuse to append rows generated with other settings than the rows already in ``out``.

    Only keys present in ``settings`` are compared, so a caller can check before the model is loaded (without
    ``generator``) and again after.
    """
    if previous is None:
        return
    diff = sorted(k for k in settings if previous.get(k) != settings[k])
    if diff:
        raise PreftuneError(f"{out} was generated with other settings ("
                            + ", ".join(f"{k}: {previous.get(k)!r} there, {settings[k]!r} now" for k in diff)
                            + "); resume with the same settings or write to another --out")


def run_generation(backend: Backend, prompts_path: str | Path, out: str | Path, *, n: int,
                   temperatures: Sequence[float], seed: int = 0, chat: bool = False,
                   settings: dict[str, Any] | None = None, progress: bool = True) -> GenerateResult:
    """Generate for every prompt of ``prompts_path`` not yet in ``out``; append rows as chunks finish.

    ``settings`` (generation parameters beyond those named here, e.g. max_new_tokens and top_p) are stored in
    every row; resuming with different settings raises instead of mixing two distributions in one file.
    """
    out = Path(out)
    t0 = time.perf_counter()
    pf = read_prompts(prompts_path, chat=chat)
    settings = {"generator": backend.name, "n": n, "temperatures": [float(t) for t in temperatures],
                "seed": seed, "chat": chat, **(settings or {})}
    done, previous, repaired = scan_existing(out)
    check_settings(out, previous, settings)
    todo = [it for it in pf.items if it.id not in done]
    res = GenerateResult(out, len(pf.items), len(pf.items) - len(todo), 0, pf.duplicates, pf.blank, repaired)
    out.parent.mkdir(parents=True, exist_ok=True)
    report_every = max(1, math.ceil(len(todo) / 10))
    with open(out, "a", encoding="utf-8") as f:
        for row in generate_rows(backend, todo, n=n, temperatures=temperatures, seed=seed, settings=settings):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")  # one write per row, then to disk
            f.flush()
            os.fsync(f.fileno())
            res.generated += 1
            res.responses += len(row["responses"])
            if progress and (res.generated % report_every == 0 or res.generated == len(todo)):
                print(f"generated {res.generated}/{len(todo)} prompts", flush=True)
    res.seconds = time.perf_counter() - t0
    return res
