"""Sequence log-probs: the naive reference implementation and the engine the trainer uses.

    log π(y|x) = Σ_{j < |y|} log softmax(f(x, y_<j))[y_j]        (a SUM over completion tokens)

The engine runs the decoder once over any layout (see ``preftune.data.collate``), then sends only the hidden
states of positions that predict completion tokens through the LM head, ``chunk_size`` tokens at a time, with
the logits recomputed in backward. The [tokens x vocabulary] logits are never held for the whole batch.
Naive equivalent (what ``naive_sequence_logps`` does, one sequence at a time)::

    logits = model(prompt + completion).logits[0, len(prompt) - 1 : -1]    # (|y|, V)
    logp = logits.float().log_softmax(-1).gather(-1, completion[:, None]).sum()

Torch and transformers' model interface only; no other preftune imports beyond the batch type.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


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


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                 softcap: float | None, scale: float | None) -> torch.Tensor:
    """log softmax(h W^T + b)[target] for one chunk; hidden (C, H), weight (V, H), targets (C,) -> (C,)."""
    logits = nn.functional.linear(hidden, weight, bias).float()  # (C, V)
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (C,)


def token_logps(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_size: int,
                softcap: float | None = None, scale: float | None = None) -> torch.Tensor:
    """Log-prob of each target under the LM head, chunked; hidden (N, H), targets (N,) -> (N,) fp32.

    With gradients enabled each chunk is checkpointed, so backward recomputes that chunk's logits instead of
    keeping (N, V) of them alive between forward and backward.
    """
    weight, bias = head.weight, getattr(head, "bias", None)
    out = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            out.append(checkpoint(_chunk_logps, h, weight, bias, t, softcap, scale, use_reentrant=False))
        else:
            out.append(_chunk_logps(h, weight, bias, t, softcap, scale))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


class LogpModel(nn.Module):
    """Wraps a causal LM so that ``forward(batch) -> (logps (S,), lengths (S,))``.

    A module of its own so that DDP (``accelerate``) wraps the whole log-prob computation and its gradient
    hooks fire as usual.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids, position_ids, attention_mask, target_index, target_ids, target_seq,
                num_sequences: int):
        decoder, head, softcap, scale = _head_of(self.model)
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (R, T, H)
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_index)  # (N, H)
        tok = token_logps(picked, head, target_ids, self.chunk_size, softcap, scale)  # (N,)
        logps = torch.zeros(num_sequences, dtype=tok.dtype, device=tok.device).index_add(0, target_seq, tok)  # (S,)
        lengths = torch.bincount(target_seq, minlength=num_sequences)  # (S,)
        return logps, lengths


def sequence_logps(model: nn.Module, batch, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (S,) and completion token counts (S,) of every sequence in ``batch``."""
    fn = model if isinstance(getattr(model, "module", model), LogpModel) else LogpModel(model, chunk_size)
    return fn(batch.input_ids, batch.position_ids, batch.attention_mask, batch.target_index,
              batch.target_ids, batch.target_seq, batch.num_sequences)


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
