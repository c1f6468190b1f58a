"""Sequence log-probs: the naive reference implementation and the engine the trainer uses.

    log π(y|x) = Σ_{j < |y|} log softmax(f(x, y_<j))[y_j]        (a SUM over completion tokens)

The engine runs the decoder once over any layout (see ``preftune.data.collate`` and ``preftune.data.packing``),
then sends only the hidden states of positions that predict completion tokens through the LM head,
``chunk_size`` tokens at a time, with the logits recomputed in backward (:class:`_ChunkedTokenLogps`). At most
``chunk_size x V`` logits exist at once; the [tokens x vocabulary] logits are never held for the whole batch.
Naive equivalent (what ``naive_sequence_logps`` does, one sequence at a time)::

    logits = model(prompt + completion).logits[0, len(prompt) - 1 : -1]    # (|y|, V)
    logp = logits.float().log_softmax(-1).gather(-1, completion[:, None]).sum()

Masks: the shared-prompt and packed layouts hand over a (R, 1, T, T) bool mask, which transformers passes to
the attention as-is; ``attention_mask_for`` turns it into what each attention implementation expects.

PPO's critic rides the same forward: ``values=True`` sends the hidden states of the completion positions
through a value head (:class:`ValueHead`, on the policy's own trunk) or runs a separate trunk over the same
layout (:class:`Critic`), giving V(s_t) per completion token; ``entropy=True`` gives each position's entropy
(:func:`token_entropy`, differentiable, chunked).

Torch and transformers' model interface only; no preftune imports.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Iterator, Sequence

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under DDP / PEFT wrappers (PEFT's LoRA layers stay in place and active)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _head_of(model: nn.Module):
    """(decoder, lm_head module, softcap, scale) of a causal LM."""
    lm = unwrap(model)
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    head = lm.get_output_embeddings()
    cfg = getattr(lm, "config", None)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    return decoder, head, softcap, scale


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
            scale: float | None, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 logits z (C, V) of one chunk, and tanh(s / softcap) (C, V) when softcapped (backward needs it).

    ``temperature`` divides the final logits (after the softcap), as sampling at that temperature did.

    hidden (C, H) and weight (V, H) arrive already in the compute dtype (bf16 under autocast); the product is
    taken in that dtype and upcast, as the model's own head would under autocast.
    """
    z = nn.functional.linear(hidden, weight, bias).float()  # (C, V)
    if scale is not None:
        z.mul_(scale)
    if softcap is None:
        return (z if temperature == 1.0 else z.div_(temperature)), None
    t = torch.tanh(z / softcap)  # (C, V)
    return t * (softcap / temperature), t


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the head's product runs in: autocast's when it is on, else the hidden states'."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


_HEAD_CASTS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("preftune_head_casts", default=None)


@contextlib.contextmanager
def head_casts() -> Iterator[None]:
    """Within: the chunked head (:class:`_ChunkedTokenLogps`) casts each head weight to the compute dtype once and
    reuses that copy, in forward and backward and across calls, instead of casting it twice per call.

    The trainer opens one per accumulation window, closed before the optimizer step. A copy is also dropped as
    soon as its weight's version counter moves (any in-place change through autograd-visible ops), and never
    outlives the block. Same math: the same rounding of the same weights.
    """
    token = _HEAD_CASTS.set({})
    try:
        yield
    finally:
        _HEAD_CASTS.reset(token)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype``; inside :func:`head_casts`, a leaf weight's copy is made once and reused while unchanged."""
    if t is None or t.dtype == dtype:
        return t
    cache = _HEAD_CASTS.get()
    if cache is None or not t.is_leaf:
        return t.to(dtype)
    hit = cache.get(id(t))  # (weakref to the weight, its version when cast, the copy)
    if hit is not None and hit[0]() is t and hit[1] == t._version and hit[2].dtype == dtype:
        return hit[2]
    copy = t.to(dtype)
    cache[id(t)] = (weakref.ref(t), t._version, copy)
    return copy


class _ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(h W^T + b)[target] over chunks of tokens, logits recomputed in backward.

    Keeps only ``hidden`` (N, H), ``targets`` (N,) and the log-normalizer ``lse`` (N,) between forward and
    backward. Backward rebuilds one chunk's logits at a time and turns them into the logits' gradient in place,
    ``dz = g * (onehot(target) - exp(z - lse))``, then ``dh = dz W`` and, only when the head trains (not LoRA),
    ``dW += dz^T h``, accumulated in fp32 over chunks. Naive equivalent (what autograd does with full logits)::

        logits = (hidden @ weight.T + bias).float()                                # (N, V)
        return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)     # (N,)

    ``with_entropy``: the second output is each position's entropy −Σ_v p_v log p_v (N,), taken from the chunk's
    logits before they are spent (naive: ``-(logp.exp() * logp).sum(-1)``); otherwise it is empty. It carries no
    gradient (a metric).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, softcap, scale, temperature=1.0,
                with_entropy=False):
        device = hidden.device.type
        dtype = _compute_dtype(hidden)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (N,)
        lse = torch.empty_like(out)  # (N,)
        entropy = torch.empty_like(out) if with_entropy else out.new_empty(0)  # (N,) or (0,)
        with torch.autocast(device, enabled=False):
            w, b = _cast(weight, dtype), _cast(bias, dtype)  # (V, H), (V,): reused inside head_casts()
            for s in range(0, hidden.shape[0], chunk_size):
                z, _ = _logits(hidden[s : s + chunk_size].to(dtype), w, b, softcap, scale, temperature)  # (C, V)
                target = z.gather(1, targets[s : s + chunk_size, None]).squeeze(1)  # (C,)
                m = z.amax(1, keepdim=True)  # (C, 1)
                if with_entropy:  # H = log Σe − Σ e·d / Σe with d = z − m, e = exp(d): one more (C, V) pass
                    d = z.sub_(m)  # (C, V) in place
                    e = d.exp()  # (C, V)
                    total = e.sum(1)  # (C,)
                    log_total = total.log()
                    entropy[s : s + chunk_size] = log_total - e.mul_(d).sum(1) / total
                    norm = log_total.add_(m.squeeze(1))  # (C,)
                else:
                    norm = z.sub_(m).exp_().sum(1).log_().add_(m.squeeze(1))  # (C,) in-place: z is spent
                lse[s : s + chunk_size] = norm
                out[s : s + chunk_size] = target - norm
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.softcap, ctx.scale, ctx.dtype = chunk_size, softcap, scale, dtype
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    def backward(ctx, grad_out, _grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype, softcap, scale, chunk = ctx.dtype, ctx.softcap, ctx.scale, ctx.chunk_size
        grad_out = grad_out.float()
        grad_h = torch.empty_like(hidden) if need_h else None  # (N, H)
        grad_w = None  # (V, H) fp32, made by the first chunk's product (no zero-filled pass)
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = _cast(weight, dtype), _cast(bias, dtype)  # the forward's copies inside head_casts()
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s : s + chunk].to(dtype)  # (C, H)
                g = grad_out[s : s + chunk, None]  # (C, 1)
                z, t = _logits(h, w, b, softcap, scale, ctx.temperature)  # (C, V) fp32
                dz = z.sub_(lse[s : s + chunk, None]).exp_().mul_(-g)  # (C, V) = -g * softmax
                dz.scatter_add_(1, targets[s : s + chunk, None], g)  # + g at the target
                if ctx.temperature != 1.0:
                    dz.div_(ctx.temperature)
                if softcap is not None:
                    dz.mul_(1 - t * t)
                if scale is not None:
                    dz.mul_(scale)
                dz = dz.to(dtype)
                if need_h:
                    grad_h[s : s + chunk] = (dz @ w).to(hidden.dtype)  # (C, H)
                if need_w and grad_w is None:
                    grad_w = (dz.t() @ h).float()  # (V, H); a no-op cast in fp32
                elif need_w and dz.dtype == torch.float32:
                    grad_w.addmm_(dz.t(), h)  # (V, H), in place: no (V, H) temporary per chunk
                elif need_w:
                    grad_w.add_(dz.t() @ h)  # bf16 product, accumulated in fp32
                if need_b:
                    grad_b.add_(dz.sum(0))
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None, None)


def token_logps(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_size: int,
                softcap: float | None = None, scale: float | None = None, temperature: float = 1.0,
                with_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target under the LM head, chunked; hidden (N, H), targets (N,) -> (N,) fp32.

    ``temperature`` T: log-probs of softmax(z / T), the distribution sampling at T drew from.
    ``with_entropy``: also the entropy of that distribution at each position, (N,) fp32, detached,
    H_t = −Σ_v q_v log q_v with q = softmax(z_t / T), computed from the same chunk's logits (no (N, V) tensor).

    At most ``chunk_size`` x V logits exist at any time, in forward and in backward (which recomputes them);
    see :class:`_ChunkedTokenLogps` for the naive equivalent, which ``chunk_size=0`` runs instead.
    """
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return (empty, empty.clone()) if with_entropy else empty
    if chunk_size <= 0:  # switched off: full (N, V) logits kept for autograd
        bias = getattr(head, "bias", None)
        dtype = _compute_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            z, _ = _logits(hidden.to(dtype), head.weight.to(dtype), None if bias is None else bias.to(dtype), softcap,
                           scale, temperature)  # (N, V) fp32
        logp = z.log_softmax(-1)  # (N, V)
        tok = logp.gather(-1, targets[:, None]).squeeze(-1)  # (N,)
        if not with_entropy:
            return tok
        return tok, -(logp.exp() * logp).sum(-1).detach()
    tok, entropy = _ChunkedTokenLogps.apply(hidden, head.weight, getattr(head, "bias", None), targets, chunk_size,
                                            softcap, scale, temperature, with_entropy)
    return (tok, entropy) if with_entropy else tok


def token_entropy(hidden: torch.Tensor, head: nn.Module, chunk_size: int, softcap: float | None = None,
                  scale: float | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the tempered next-token distribution at each position, hidden (N, H) -> (N,) fp32, with grad.

        H_t = −Σ_v q_v·log q_v,      q = softmax(z_t / T)

    Chunked like :func:`token_logps`: each chunk of ``chunk_size`` positions is one activation-checkpointed
    segment, so at most chunk_size x V logits exist at once, in forward and in backward (which recomputes them).
    Naive equivalent (``chunk_size=0`` runs it)::

        logq = (hidden @ weight.T + bias).float().div(T).log_softmax(-1)     # (N, V)
        return -(logq.exp() * logq).sum(-1)                                   # (N,)
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    dtype = _compute_dtype(hidden)
    device = hidden.device.type

    def chunk(h, weight, bias):
        with torch.autocast(device, enabled=False):
            z, _ = _logits(h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), softcap, scale,
                           temperature)  # (C, V) fp32
            logq = z.log_softmax(-1)
            return -(logq.exp() * logq).sum(-1)  # (C,)

    weight, bias = head.weight, getattr(head, "bias", None)
    if chunk_size <= 0:
        return chunk(hidden, weight, bias)
    if not torch.is_grad_enabled():
        return torch.cat([chunk(hidden[s : s + chunk_size], weight, bias) for s in range(0, hidden.shape[0], chunk_size)])
    from torch.utils.checkpoint import checkpoint

    return torch.cat([checkpoint(chunk, hidden[s : s + chunk_size], weight, bias, use_reentrant=False)
                      for s in range(0, hidden.shape[0], chunk_size)])


class ValueHead(nn.Module):
    """PPO's value head on the policy's own trunk: V(s_t) = w·h_t + b, h_t the policy's final hidden state at
    the position that predicts completion token t (the state before emitting it), (N, H) -> (N,) fp32.

    Zero-initialised, so every value starts at 0 (the first advantages are the shaped returns themselves).
    It trains in full whatever the policy does (LoRA included).
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor, *layout) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1).float()  # (N,)


class Critic(nn.Module):
    """A critic with its own trunk: ``trunk`` (a decoder such as a causal LM's ``.model``) runs over the same
    layout as the policy, and ``head`` (a (H -> 1) linear layer) maps its hidden state at each position that
    predicts a completion token to V(s_t), (N,) fp32. Initialised from a reward model (its body and score head,
    which already rate a whole response at its last token) or from a copy of the policy with a new head.
    """

    def __init__(self, trunk: nn.Module, head: nn.Module):
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, hidden, input_ids, position_ids, attention_mask, target_index) -> torch.Tensor:
        own = self.trunk(input_ids=input_ids, attention_mask=attention_mask_for(self.trunk, attention_mask),
                         position_ids=position_ids, use_cache=False).last_hidden_state  # (R, T, H)
        picked = own.reshape(-1, own.shape[-1]).index_select(0, target_index)  # (N, H)
        return self.head(picked).squeeze(-1).float()  # (N,)


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder (trunk) of a causal LM or a sequence-classification model: what its head reads."""
    lm = unwrap(model)
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    if decoder is None or decoder is lm:
        decoder = getattr(lm, "model", None)
    if decoder is None:
        decoder = getattr(lm, lm.base_model_prefix)
    return decoder


def hidden_size_of(model: nn.Module) -> int:
    """Width of the hidden states the LM head reads."""
    return _head_of(model)[1].weight.shape[1]


def attention_mask_for(model: nn.Module, mask: torch.Tensor):
    """The layout's mask in the form the model's attention implementation reads.

    A (R, T) padding mask passes through. A (R, 1, T, T) bool mask (True = may attend; transformers returns 4-D
    masks as-is) passes through for ``sdpa``; ``eager`` *adds* its mask to the scores, so it gets 0 / -inf-like
    floats; ``flex_attention`` adds a tensor mask too, so it gets a BlockMask built from the bool mask.
    """
    if mask.dim() != 4 or mask.dtype != torch.bool:
        return mask
    impl = getattr(getattr(unwrap(model), "config", None), "_attn_implementation", None) or "sdpa"
    if impl == "sdpa":
        return mask
    if impl == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        rows, _, length, _ = mask.shape
        allowed = mask[:, 0]  # (R, T, T)

        def mask_mod(b, h, q, kv):
            return allowed[b, q, kv]

        return create_block_mask(mask_mod, rows, None, length, length, device=mask.device)
    if impl == "eager":
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    raise ValueError(f"attention implementation {impl!r} takes no per-token 4-D mask; the shared_prompt and packed "
                     "layouts need sdpa, eager or flex_attention (or set engine.layout: padded)")


class LogpModel(nn.Module):
    """Wraps a causal LM so that ``forward(batch) -> (logps (S,), lengths (S,))``.

    ``per_token=True``: the log-prob of every completion token instead, (N,) in ``target_index`` order (which
    sequence each belongs to: ``target_seq``), for token-level losses (GRPO, PPO). ``temperature``: log-probs of
    the tempered distribution softmax(z / T) that on-policy samples were drawn from. With ``per_token``, also
    ``entropy=True``: each position's entropy (N,) — with ``entropy_grad`` (the default) differentiable
    (:func:`token_entropy`, a second chunked pass: PPO's entropy bonus), without it detached and taken from the
    log-prob pass's own chunks at almost no cost (a metric: GRPO) — and ``values=True``: the critic's
    V(s_t) (N,) (``critic``: a :class:`ValueHead` on this model's hidden states or a :class:`Critic` with its own
    trunk); the outputs are then ``(logps, counts[, entropy][, values])`` in that order.

    A module of its own so that DDP (``accelerate``) wraps the whole log-prob computation and its gradient
    hooks fire as usual. ``compile=True``: the decoder layers run compiled (:class:`CompiledLayers`).
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024, compile: bool = False,
                 critic: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.compiled = CompiledLayers(model) if compile else None
        self.critic = critic

    def with_critic(self, critic: nn.Module) -> LogpModel:
        """The same engine (model, chunking, compiled layers) with ``critic`` as a submodule: one module holds
        everything that trains, so DDP synchronises the critic's gradients too."""
        out = LogpModel(self.model, self.chunk_size, critic=critic)
        out.compiled = self.compiled
        return out

    def forward(self, input_ids, position_ids, attention_mask, target_index, target_ids, target_seq,
                num_sequences: int, per_token: bool = False, temperature: float = 1.0, entropy: bool = False,
                values: bool = False, entropy_grad: bool = True):
        decoder, head, softcap, scale = _head_of(self.model)
        with self.compiled.active() if self.compiled is not None else contextlib.nullcontext():
            hidden = decoder(
                input_ids=input_ids, attention_mask=attention_mask_for(self.model, attention_mask),
                position_ids=position_ids, use_cache=False,
            ).last_hidden_state  # (R, T, H)
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_index)  # (N, H)
        fused = entropy and not entropy_grad  # the detached entropy comes out of the log-prob pass itself
        both = token_logps(picked, head, target_ids, self.chunk_size, softcap, scale, temperature, fused)
        tok = both[0] if fused else both  # (N,)
        if per_token:
            out = (tok, torch.bincount(target_seq, minlength=num_sequences))
            if entropy:
                out += (both[1] if fused else token_entropy(picked, head, self.chunk_size, softcap, scale,
                                                            temperature),)  # (N,)
            if values:
                if self.critic is None:
                    raise ValueError("values=True needs a critic (LogpModel(..., critic=...) or with_critic)")
                out += (self.critic(picked, input_ids, position_ids, attention_mask, target_index),)  # (N,)
            return out
        if entropy or values:
            raise ValueError("entropy and values are per token: pass per_token=True")
        logps = torch.zeros(num_sequences, dtype=tok.dtype, device=tok.device).index_add(0, target_seq, tok)  # (S,)
        lengths = torch.bincount(target_seq, minlength=num_sequences)  # (S,)
        return logps, lengths


class CompiledLayers:
    """``torch.compile`` of each decoder layer (regional compilation), in force only inside the engine's forward.

    Inductor fuses what the eager decoder runs as separate kernels per token (RMSNorm, rotary, SiLU x up, the
    residual adds, autocast's casts) and recomputes cheap element-wise results in backward instead of saving
    them. All layers share one compiled graph (the layers differ only in weights, which are graph inputs), and
    ``dynamic=True`` keeps varying batch shapes from recompiling. The compiled call is switched in per forward
    (``Module.compile`` does the same with ``_compiled_call_impl``, permanently), so generation with a KV cache,
    other callers and gradient-checkpoint recomputation run the layers eagerly: same math, no recompiles.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._layers: list[tuple[nn.Module, object]] | None = None

    def _build(self) -> list[tuple[nn.Module, object]]:
        decoder = _head_of(self.model)[0]
        layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"engine.compile: no list of decoder layers found on {type(decoder).__name__}")
        return [(layer, torch.compile(layer._call_impl, dynamic=True)) for layer in layers]

    @contextlib.contextmanager
    def active(self):
        if self._layers is None:
            self._layers = self._build()
        for layer, fn in self._layers:
            layer._compiled_call_impl = fn
        try:
            yield
        finally:
            for layer, _ in self._layers:
                layer._compiled_call_impl = None


def sequence_logps(model: nn.Module, batch, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (S,) and completion token counts (S,) of every sequence in ``batch``."""
    fn = model if isinstance(getattr(model, "module", model), LogpModel) else LogpModel(model, chunk_size)
    return fn(*batch.model_args())


def naive_sequence_logps(model: nn.Module, sequences: Sequence[tuple[list[int], list[int]]]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook computation, one unpadded sequence at a time with full logits: the twin every fast path
    is tested against. ``sequences`` holds (prompt_ids, completion_ids); returns logps (S,), lengths (S,)."""
    device = next(model.parameters()).device
    logps, lengths = [], []
    for prompt, completion in sequences:
        ids = torch.tensor([prompt + completion], device=device)  # (1, T)
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()  # (|y|, V)
        target = torch.tensor(completion, device=device)  # (|y|,)
        logps.append(logits.log_softmax(-1).gather(-1, target[:, None]).sum())
        lengths.append(len(completion))
    return torch.stack(logps), torch.tensor(lengths, device=device)
