"""The one generation engine: token ids in; per sequence the sampled ids, their log-probs and a finish reason out.

Monitor samples, ``preftune eval``, ``preftune generate`` (its Hugging Face backend), the quickstart and the
on-policy sources all sample through :func:`generate`. It knows only torch and transformers::

    params = SamplingParams(max_new_tokens=64, temperature=1.0, n=4, stop_ids=(eos,))
    groups = generate(model, prompt_ids, params, seeds, pad_id=pad)   # groups[i][j]: sample j of prompt i

**End of sequence.** A sequence stops when it samples one of ``stop_ids`` (finish reason ``"stop"``) or after
``max_new_tokens`` tokens (``"length"``). The stop token is KEPT in ``ids`` and ``logps``: stopping is an
action the policy took, and the training data ends completions with EOS too. Text decoders strip it
(``tokenizer.decode(ids, skip_special_tokens=True)``).

**Sampling.** With logits z_t (fp32) of the row at step t, temperature T, and u_{r,t} ~ U[0, 1) the row's t-th
draw from its own generator::

    greedy (T = 0):  y_t = argmax z_t
    sampled:         q = softmax(z_t / T), kept to its top_k tokens, then to the top_p nucleus (the fewest most
                     probable tokens whose mass reaches top_p), renormalised; y_t = inverse CDF of q at u_{r,t}

**Log-probs.** ``logps[t] = log_softmax(z_t / T)[y_t]`` with T = 1 for greedy: the tempered distribution BEFORE
the top-k / top-p truncation. At T = 1 without truncation this is exactly log π(y_t | x, y_<t), the "old"
log-prob an on-policy loss needs; a plain forward over prompt + completion recomputes it (tested to 1e-5).

**Seeds.** Every sequence draws from its own ``torch.Generator`` (on the CPU, so results do not depend on the
device), seeded ``sample_seed(seed_i, j)`` for sample j of prompt i, or with an explicitly given seed. Its
``max_new_tokens`` uniforms are drawn up front, so a completion is a function of its prompt, its seed and the
weights only: not of its batch-mates, the batch size or the order of prompts (up to floating-point differences
of padded attention, which move a token only when a uniform lands on a CDF boundary).

**Precision.** The model runs as the caller's autocast says: the on-policy sources call ``generate`` inside the
run's autocast (bf16 under ``training.precision: bf16``), as ONE region, so autocast casts each weight once per
call; the logits are upcast to fp32 before sampling either way. Under autocast the call runs without gradients
but outside inference mode, which would hide the weights' ``requires_grad`` and so disable that cache.

**Work.** The rows of one batch share a left-padded prefill: each distinct prompt runs forward ONCE, only its
last position through the LM head, and the KV cache is then expanded to its n samples
(``Cache.batch_repeat_interleave`` / ``batch_select_indices``) into buffers with room for every new position,
written in place (no per-step ``torch.cat`` of the whole cache). Decoding runs all rows together with the
cache, an attention mask and per-row position ids. Rows that finished are dropped from the batch once a
quarter of it is done, and the loop ends when every row is. Greedy samples of one prompt are identical, so
one row is decoded and copied n times; greedy steps do an argmax and one log-sum-exp, nothing else over the
vocabulary. The naive equivalent of one sequence, without cache or batching::

    ids = prompt
    for t in range(max_new_tokens):
        z = model(ids).logits[-1] / T
        y = sample(z, u[t]); ids.append(y)
        if y in stop_ids: break
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

try:  # transformers >= 4.56 builds its caches from layers; without it the model's own cache is used as it is
    from transformers.cache_utils import DynamicLayer
except ImportError:  # pragma: no cover
    DynamicLayer = type("DynamicLayer", (), {})

STOP, LENGTH = "stop", "length"


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: greedy (``temperature`` 0) or tempered with optional top-k / top-p truncation."""

    max_new_tokens: int
    """New tokens per sequence at most (the stop token included)."""
    temperature: float = 1.0
    """Softmax temperature; 0 decodes greedily (then ``top_k`` and ``top_p`` are not used)."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]: sample among the fewest most probable tokens whose mass reaches it (1 = off)."""
    top_k: int = 0
    """Sample among the k most probable tokens (0 = off); applied before ``top_p``."""
    n: int = 1
    """Samples per prompt when a prompt's seed is one int."""
    stop_ids: tuple[int, ...] = ()
    """Token ids that end a sequence (kept in its ids); usually the tokenizer's and the model's EOS ids."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.n < 1:
            raise ValueError(f"need top_k >= 0 and n >= 1, got top_k={self.top_k}, n={self.n}")
        object.__setattr__(self, "stop_ids", tuple(sorted({int(i) for i in self.stop_ids})))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One sampled sequence: ``ids`` (the stop token kept), ``logps[t]`` of ``ids[t]`` (see the module
    docstring for the distribution), ``finish_reason`` ``"stop"`` or ``"length"``."""

    ids: list[int]
    logps: list[float]
    finish_reason: str


def stop_ids(model, tokenizer) -> tuple[int, ...]:
    """The ids that end a generation: the tokenizer's EOS and the model's ``generation_config`` EOS ids."""
    ids = {getattr(tokenizer, "eos_token_id", None)}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return tuple(sorted(i for i in ids if i is not None))


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index`` of a prompt whose seed is ``seed`` (63 bits of sha256)."""
    digest = hashlib.sha256(f"{int(seed)}|{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def choose_tokens(logits: torch.Tensor, u: torch.Tensor | None, params: SamplingParams
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of every row and its log-prob, by the rules of the module docstring.

    Args:
        logits: (B, V) fp32 next-token logits.
        u: (B,) uniforms in [0, 1), one per row (unused when greedy).
    Returns (tokens (B,) long, logps (B,) fp32).
    """
    if params.greedy:
        tokens = logits.argmax(-1)  # (B,)
        return tokens, logits.gather(-1, tokens[:, None]).squeeze(-1) - logits.logsumexp(-1)
    logp = (logits / params.temperature).log_softmax(-1)  # (B, V)
    if params.top_k or params.top_p < 1:
        if params.top_k:
            top, order = logp.topk(min(params.top_k, logp.shape[-1]), dim=-1)  # (B, k), sorted descending
        else:
            top, order = logp.sort(dim=-1, descending=True)  # (B, V)
        p = top.exp()
        if params.top_p < 1:
            before = p.cumsum(-1) - p  # mass of the more probable tokens; 0 for the first, which is always kept
            p = p.masked_fill(before >= params.top_p, 0.0)
        tokens = order.gather(-1, _inverse_cdf(p, u)[:, None]).squeeze(-1)  # (B,)
    else:
        tokens = _inverse_cdf(logp.exp(), u)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def _inverse_cdf(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index k of every row with cdf[k-1] <= u·mass < cdf[k]: a draw from p (B, K), unnormalised, >= 0.

    In float64, so u·mass < mass strictly for u < 1; ``right=True`` never lands on a zero-probability entry.
    """
    cdf = p.double().cumsum(-1)  # (B, K)
    x = u.double()[:, None] * cdf[:, -1:]  # (B, 1)
    return torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp_max(p.shape[-1] - 1)


def generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams,
             seeds: Sequence[int | Sequence[int]] | None = None, *, pad_id: int,
             batch_size: int = 16) -> list[list[Completion]]:
    """Sample completions of every prompt; ``out[i][j]`` is sample j of prompt i.

    Args:
        model: a causal LM (Hugging Face, or PEFT-wrapped); runs on its parameters' device, in eval mode for
            the call (its training flag is restored), without gradients.
        prompts: token ids per prompt, non-empty.
        params: :class:`SamplingParams`.
        seeds: per prompt, an int s (``params.n`` samples, sample j drawing from ``sample_seed(s, j)``) or a
            list of generator seeds, one sample each (that prompt's n). Only greedy decoding may omit them.
        pad_id: token used for left padding (never attended to).
        batch_size: sequences decoded together at most (the samples of a prompt may span two batches).
    """
    if seeds is None:
        if not params.greedy:
            raise ValueError("sampling (temperature > 0) needs seeds: one per prompt")
        seeds = [0] * len(prompts)
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: the model needs at least one token to condition on")
    # One row per sequence to decode: (prompt index, generator seed). Greedy: one row per prompt, copied later.
    per_prompt = [[int(x) for x in s] if isinstance(s, Sequence) else [sample_seed(s, j) for j in range(params.n)]
                  for s in seeds]
    counts = [len(x) for x in per_prompt]
    rows: list[tuple[int, int]] = []
    for i, row_seeds in enumerate(per_prompt):
        rows.extend((i, x) for x in (row_seeds[:1] if params.greedy and row_seeds else row_seeds))
    was_training = model.training
    model.eval()
    done: list[Completion] = []
    device = next(model.parameters()).device
    # Under autocast, no_grad rather than inference_mode: autocast caches a weight's low-precision copy only
    # for tensors that require grad, which inference mode hides, so it would recast all the weights every step.
    grad_off = torch.no_grad() if torch.is_autocast_enabled(device.type) else torch.inference_mode()
    try:
        with grad_off:
            for start in range(0, len(rows), batch_size):
                done.extend(_decode(model, prompts, rows[start : start + batch_size], params, pad_id))
    finally:
        model.train(was_training)
    out: list[list[Completion]] = [[] for _ in prompts]
    for (i, _), c in zip(rows, done):
        out[i].append(c)
    if params.greedy:  # identical copies, each its own lists
        out = [[Completion(list(g[0].ids), list(g[0].logps), g[0].finish_reason) for _ in range(k)] if g else []
               for g, k in zip(out, counts)]
    return out


class _InPlaceLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in buffers with room for every position still to come.

    ``DynamicLayer.update`` appends with ``torch.cat``, reallocating and copying the layer's whole cache at every
    decoding step (on the 135M benchmark model that copy was half of a step on the CPU). Here ``update`` writes
    the new positions in place and returns views of the filled part, so attention sees exactly what the plain
    layer would return: the same values, the same length.
    """

    def update(self, key_states, value_states, *args, **kwargs):
        n, m = self.keys.shape[-2], key_states.shape[-2]
        if n + m > self.key_buffer.shape[-2]:  # more positions than reserved: grow like the plain layer
            self.key_buffer = torch.cat([self.keys, key_states], dim=-2)
            self.value_buffer = torch.cat([self.values, value_states], dim=-2)
        else:
            self.key_buffer[:, :, n : n + m].copy_(key_states)
            self.value_buffer[:, :, n : n + m].copy_(value_states)
        self.keys, self.values = self.key_buffer[:, :, : n + m], self.value_buffer[:, :, : n + m]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        n = self.keys.shape[-2]
        self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
        self.keys, self.values = self.key_buffer[:, :, :n], self.value_buffer[:, :, :n]

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.batch_select_indices(beam_idx.to(self.key_buffer.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        n = self.keys.shape[-2]
        self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
        self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
        self.keys, self.values = self.key_buffer[:, :, :n], self.value_buffer[:, :, :n]


def _reserve(cache, positions: int) -> None:
    """Give every plain ``DynamicLayer`` of ``cache`` room for ``positions`` more (see :class:`_InPlaceLayer`).

    Other layer kinds (sliding windows, quantized, linear attention) and caches without ``layers`` are left as
    they are: they still work, with the model's own update.
    """
    for layer in getattr(cache, "layers", ()):
        if type(layer) is not DynamicLayer or not getattr(layer, "is_initialized", False) or layer.keys.dim() != 4:
            continue
        b, h, n, d = layer.keys.shape  # (B, heads, T, head dim)
        layer.key_buffer = layer.keys.new_empty((b, h, n + positions, d))
        layer.value_buffer = layer.values.new_empty((b, h, n + positions, layer.values.shape[-1]))
        layer.key_buffer[:, :, :n].copy_(layer.keys)
        layer.value_buffer[:, :, :n].copy_(layer.values)
        layer.keys, layer.values = layer.key_buffer[:, :, :n], layer.value_buffer[:, :, :n]
        layer.__class__ = _InPlaceLayer


def _forward_names(model) -> tuple[str, bool]:
    """(the name of the cache argument, whether ``logits_to_keep`` is accepted) of the model's forward.

    transformers 5 renamed ``past_key_values`` to ``cache``; a PEFT wrapper forwards keyword arguments to its
    base model, so the base model's signature decides.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = inspect.signature(base.forward).parameters
    return ("cache" if "cache" in names else "past_key_values"), "logits_to_keep" in names


def _decode(model, prompts, rows: list[tuple[int, int]], params: SamplingParams, pad_id: int) -> list[Completion]:
    """Prefill the distinct prompts of ``rows`` once, expand the cache to the rows, decode them together."""
    device = next(model.parameters()).device
    steps = params.max_new_tokens
    if steps == 0:
        return [Completion([], [], LENGTH) for _ in rows]
    cache_kw, keep_kw = _forward_names(model)
    # -- prefill: the distinct prompts (rows of a prompt are contiguous), left-padded
    order = list(dict.fromkeys(i for i, _ in rows))
    width = max(len(prompts[i]) for i in order)
    ids = torch.full((len(order), width), pad_id, dtype=torch.long)  # (U, L)
    mask = torch.zeros((len(order), width), dtype=torch.long)  # (U, L)
    for k, i in enumerate(order):
        ids[k, width - len(prompts[i]) :] = torch.tensor(list(prompts[i]), dtype=torch.long)
        mask[k, width - len(prompts[i]) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (U, L): real tokens count from 0 after the padding
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **({"logits_to_keep": 1} if keep_kw else {}))
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    logits = out.logits[:, -1].float()  # (U, V)
    # -- expand to the rows: prompt k repeated once per sample of it
    per_prompt = torch.tensor([sum(1 for _ in group) for _, group in itertools.groupby(i for i, _ in rows)])  # (U,)
    if len(rows) > len(order):
        expand = torch.repeat_interleave(torch.arange(len(order)), per_prompt).to(device)  # (R,)
        if bool((per_prompt == per_prompt[0]).all()):
            cache.batch_repeat_interleave(int(per_prompt[0]))
        else:
            cache.batch_select_indices(expand)
        logits, mask, positions = logits[expand], mask[expand], positions[expand]
    _reserve(cache, steps)
    n_rows = len(rows)
    u = None
    if not params.greedy:  # (R, steps): every row's uniforms, from its own CPU generator
        u = torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                         for _, s in rows]).to(device)
    full_mask = torch.cat([mask, mask.new_ones((n_rows, steps))], dim=1)  # (R, L + steps)
    pos = positions[:, -1:]  # (R, 1)
    stop = torch.tensor(params.stop_ids, dtype=torch.long, device=device) if params.stop_ids else None
    out_ids = torch.full((n_rows, steps), pad_id, dtype=torch.long, device=device)  # (R, steps)
    out_logps = torch.zeros((n_rows, steps), dtype=torch.float32, device=device)  # (R, steps)
    length = torch.full((n_rows,), steps, dtype=torch.long, device=device)  # (R,) tokens kept per row
    stopped = torch.zeros(n_rows, dtype=torch.bool, device=device)  # (R,) sampled a stop id
    live = torch.arange(n_rows, device=device)  # (b,) the row of each batch position
    finished = torch.zeros(n_rows, dtype=torch.bool, device=device)  # (b,) batch positions already stopped
    # -- decode
    for t in range(steps):
        tokens, logps = choose_tokens(logits, None if u is None else u[:, t], params)  # (b,), (b,)
        out_ids[live, t] = tokens
        out_logps[live, t] = logps
        n_done = 0
        if stop is not None:
            hit = torch.isin(tokens, stop) & ~finished  # (b,)
            length[live[hit]] = t + 1
            stopped[live[hit]] = True
            finished |= hit
            n_done = int(finished.sum())  # the one host sync of a step
            if n_done == len(finished):
                break
        if t == steps - 1:
            break
        if n_done and 4 * n_done >= len(finished):  # drop finished rows from the batch and the cache
            keep = (~finished).nonzero().squeeze(1)  # (b',)
            cache.batch_select_indices(keep)
            live, tokens, finished, full_mask, pos = (live[keep], tokens[keep], finished[keep], full_mask[keep],
                                                      pos[keep])
            u = None if u is None else u[keep]
        pos = pos + 1
        width_t = full_mask.shape[1] - steps + t + 1  # the prompt and the t + 1 tokens fed so far
        out = model(input_ids=tokens[:, None], attention_mask=full_mask[:, :width_t], position_ids=pos,
                    use_cache=True, **{cache_kw: cache})
        logits = out.logits[:, -1].float()  # (b, V)
    ids_l, logps_l, length_l, stopped_l = out_ids.tolist(), out_logps.tolist(), length.tolist(), stopped.tolist()
    return [Completion(ids_l[r][: length_l[r]], logps_l[r][: length_l[r]], STOP if stopped_l[r] else LENGTH)
            for r in range(n_rows)]
