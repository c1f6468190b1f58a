"""Sampling responses to prompts into resumable rows, with a Hugging Face model (``preftune.generation``), vLLM
when installed, or an OpenAI-compatible endpoint (the samplers: ``preftune.rollout.backends``).

    prompts (JSONL "prompt" field, text or messages; or TXT, one prompt per line)
      -> n responses per prompt, response i sampled at temperatures[i mod len(temperatures)]
      -> GEN.jsonl, one row per prompt, appended and fsynced as each chunk of prompts finishes

How ``n`` meets ``temperatures``: ``n`` is the number of responses per prompt, handed out round-robin over the
temperatures (n=4 with 0.3,0.7,1.0 gives 0.3, 0.7, 1.0, 0.3), so the cost per prompt does not grow with the
number of temperatures. Every response records its temperature. Temperature 0 is greedy decoding; several
greedy responses to one prompt are identical copies (``synth.pairs`` merges identical texts before judging).

Seeds: response i of a prompt is sampled with its own seed, ``response_seed(seed, prompt_id, i)``, recorded in
the row. With Hugging Face the per-response seed drives that response's own ``torch.Generator`` in
:func:`preftune.generation.generate`, so a response does not depend on which other prompts share its batch: a
resumed run writes the same responses as an uninterrupted one, and ``--batch-size`` does not change the output
(up to floating-point differences of padded attention). vLLM takes the seed per request; OpenAI-compatible servers take ``seed`` as a best effort.

Output row (``GEN.jsonl``)::

    {"prompt": str | [messages], "prompt_id": "<sha256 of the prompt, 16 hex>", "source_line": int,
     "responses": [{"text", "temperature", "seed", "index", "generator", "finish_reason", "num_tokens"}, ...],
     "generation": {"generator", "n", "temperatures", "seed", "max_new_tokens", "top_p", "chat"}}

Resuming: on start the existing OUT is read; prompts whose ``prompt_id`` is there are skipped, and a file
written with other generation settings, or one that is not a generation file at all (the prompts file, say), is
refused and left untouched rather than mixed. A partial last line of our own (a crash mid-write) is moved to
``OUT.partial`` and its prompt redone. Duplicate prompts in the input are generated once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError
from preftune.judges.prompts import prompt_text  # noqa: F401 (re-exported)
from preftune.rollout.backends import (  # noqa: F401 (re-exported: one import for callers)
    Backend,
    GenerationRequestError,
    HFBackend,
    Job,
    OpenAIBackend,
    PromptText,
    Sample,
    VLLMBackend,
    encode_prompt,
)

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
        batch_size: sequences decoded together.
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
    set_aside: Path | None = None

    def summary(self) -> str:
        parts = [f"{self.prompts} prompts", f"{self.already_done} already in {self.out.name}",
                 f"generated {self.generated} ({self.responses} responses) in {self.seconds:.1f}s"]
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicate prompts skipped")
        if self.blank:
            parts.append(f"{self.blank} blank prompts skipped")
        if self.set_aside is not None:
            parts.append(f"moved a partial last line left by an interrupted run to {self.set_aside}")
        return "; ".join(parts)


PARTIAL_SUFFIX = ".partial"
ROW_START = b'{"prompt": '  # how every GEN row begins (json.dumps keeps the row's key order)


@dataclass
class ExistingOut:
    """What ``OUT`` already holds (read-only; see :func:`scan_existing`).

    ``partial``: a last line without its newline that is the beginning of one of our rows (a crash mid-write),
    set aside before appending; ``unterminated``: a last row complete but for its newline, kept.
    """

    done: set[str]
    settings: dict[str, Any] | None
    end: int = 0
    partial: bytes = b""
    unterminated: bool = False


def _gen_row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("prompt_id"), str) else None


def scan_existing(out: Path) -> ExistingOut:
    """The prompt ids already in ``out`` and their generation settings, without modifying ``out``.

    Every complete line must be a GEN row; anything else means ``out`` is not a generation file, and it is refused
    untouched. A last line without its newline is a complete row (kept), the beginning of a row (what a crash
    mid-write leaves: :func:`set_aside_partial` moves it to ``OUT.partial`` before appending), or not ours
    (refused).
    """
    if not out.exists():
        return ExistingOut(set(), None)
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    tail = data[end:]
    state = ExistingOut(set(), None, end)
    lines = data[:end].decode("utf-8", errors="replace").splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = _gen_row(line)
        if row is None:
            raise PreftuneError(f"{out}:{lineno}: not a generation row, so {out} is not a file preftune generate "
                                "wrote; it was left as it is: choose another --out")
        state.done.add(row["prompt_id"])
        state.settings = state.settings or row.get("generation")
    if tail.strip():
        row = _gen_row(tail.decode("utf-8", errors="replace"))
        if row is not None:
            state.done.add(row["prompt_id"])
            state.settings = state.settings or row.get("generation")
            state.unterminated = True
        elif tail.startswith(ROW_START):
            state.partial = tail
        else:
            raise PreftuneError(f"{out}:{len(lines) + 1}: not a generation row, so {out} is not a file preftune "
                                "generate wrote; it was left as it is: choose another --out")
    return state


def set_aside_partial(out: Path, state: ExistingOut) -> Path | None:
    """Move a partial last line to ``OUT.partial`` (appended, fsynced) and cut it from ``out``; end an
    unterminated last row with its newline. Returns the ``.partial`` file when a line was moved."""
    if state.unterminated:
        with open(out, "ab") as f:
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
    if not state.partial:
        return None
    side = out.with_name(out.name + PARTIAL_SUFFIX)
    with open(side, "ab") as f:  # first keep the bytes elsewhere, then cut them
        f.write(state.partial + b"\n")
        f.flush()
        os.fsync(f.fileno())
    with open(out, "r+b") as f:
        f.truncate(state.end)
        f.flush()
        os.fsync(f.fileno())
    return side


def check_out(out: Path, prompts: Path) -> None:
    """Refuse an ``--out`` that is the prompts file itself."""
    if out.exists() and prompts.exists() and os.path.samefile(out, prompts):
        raise PreftuneError(f"--out {out} is the prompts file; write the generations to another file")


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
    check_out(out, Path(prompts_path))
    existing = scan_existing(out)
    check_settings(out, existing.settings, settings)  # refused before anything in OUT is touched
    side = set_aside_partial(out, existing)
    todo = [it for it in pf.items if it.id not in existing.done]
    res = GenerateResult(out, len(pf.items), len(pf.items) - len(todo), 0, pf.duplicates, pf.blank,
                         side is not None, set_aside=side)
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
