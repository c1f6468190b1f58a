"""Where responses come from: Hugging Face ``generate`` (seeded per response), vLLM, or an OpenAI-compatible
endpoint, behind one ``Backend.sample(jobs) -> samples`` interface. ``preftune.rollout.generate`` turns prompt
files into rows with them; the seeding contract is described there.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from preftune.errors import PreftuneError

PromptText = str | list[dict[str, str]]


class GenerationRequestError(PreftuneError):
    """An endpoint request failed after the bounded retries, or failed in a way retries cannot fix."""



# ---- the interface -----------------------------------------------------------------------------------------------


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

        from preftune.judges.llm import read_api_key

        try:
            key = read_api_key(api_key_env)
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
