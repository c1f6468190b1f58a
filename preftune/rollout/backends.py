"""Where responses come from: a Hugging Face model through preftune's generation engine (seeded per response),
vLLM, or an OpenAI-compatible endpoint, behind one ``Backend.sample(jobs) -> samples`` interface. ``preftune.rollout.generate`` turns prompt
files into rows with them; the seeding contract is described there.
"""

from __future__ import annotations

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


class HFBackend:
    """A loaded Hugging Face model, sampled with :func:`preftune.generation.generate`.

    The jobs of one call are grouped by temperature and, within a temperature, by prompt: each prompt is
    prefilled once and its responses decoded from the shared KV cache, response k drawing from its own
    generator seeded with ``jobs[k].seed`` (so a response does not depend on which other jobs share the call).
    Sampling parameters come only from the arguments: the model's own ``generation_config`` (which may set
    temperature, top_p or a repetition penalty) is not used. The text is the decoded completion without its
    stop token; ``num_tokens`` counts the generated tokens, the stop token included.

    Args:
        model / tokenizer: a loaded causal LM and its tokenizer.
        max_new_tokens: generated tokens per response at most.
        top_p: nucleus sampling mass (1.0 = off).
        batch_size: sequences decoded together.
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
        from preftune.generation import SamplingParams, generate

        ids = [encode_prompt(self.tokenizer, j.prompt) for j in jobs]
        out: list[Sample | None] = [None] * len(jobs)
        for temperature in dict.fromkeys(j.temperature for j in jobs):
            groups: dict[tuple[int, ...], list[int]] = {}  # prompt ids -> its jobs at this temperature
            for k, job in enumerate(jobs):
                if job.temperature == temperature:
                    groups.setdefault(tuple(ids[k]), []).append(k)
            params = SamplingParams(self.max_new_tokens, temperature=temperature,
                                    top_p=self.top_p if temperature > 0 else 1.0, stop_ids=tuple(self.eos_ids))
            results = generate(self.model, [list(p) for p in groups], params,
                               [[jobs[k].seed for k in ks] for ks in groups.values()], pad_id=self.pad_id,
                               batch_size=self.jobs_per_call)
            for ks, completions in zip(groups.values(), results):
                for k, c in zip(ks, completions):
                    text_ids = c.ids[:-1] if c.finish_reason == "stop" else c.ids
                    text = self.tokenizer.decode(text_ids, skip_special_tokens=True).strip()
                    out[k] = Sample(text, c.finish_reason, len(c.ids))
        return out  # type: ignore[return-value]  (every job belongs to one group)


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
