"""Drift from the reference: generations on fixed prompts, KL estimators, output length and diversity.

Shared by the in-training monitor (``preftune.monitor``) and ``preftune eval``. Everything works on token ids,
so it needs no text and no tokenizer beyond the pad and end-of-sequence ids.

KL(π ‖ π_ref) is estimated on samples from the policy, y ~ π(·|x) at temperature 1. With the per-token
log-ratio r_t = log π(y_t | x, y_<t) − log π_ref(y_t | x, y_<t) (Schulman, "Approximating KL divergence",
2020, http://joschu.net/blog/kl-approx.html):

    k1_t = r_t                         unbiased, high variance, can be negative on few samples
    k3_t = (exp(−r_t) − 1) + r_t       unbiased, ≥ 0, lower variance

Each k_t is an unbiased estimate of the KL of the next-token distributions given the sampled prefix, so their
sum over a sequence estimates the sequence-level KL (chain rule). Reported per token (mean over all sampled
tokens) and per sequence (sum over a sequence's tokens, mean over sequences). The end-of-sequence token counts:
stopping is part of the policy's distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from preftune.generation import SamplingParams, generate


def end_ids(model, tokenizer) -> set[int]:
    """Token ids that end a generation (:func:`preftune.generation.stop_ids`), as a set."""
    from preftune.generation import stop_ids

    return set(stop_ids(model, tokenizer))


def generate_ids(model, prompts: Sequence[list[int]], *, max_new_tokens: int, pad_id: int, eos_ids: set[int],
                 temperature: float = 0.0, seed: int = 0, batch_size: int = 16) -> list[list[int]]:
    """Completion ids for every prompt: greedy (``temperature`` 0) or sampled with a per-prompt seed.

    One sample per prompt from :func:`preftune.generation.generate`; prompt i (0-based, in the order given) has
    seed ``seed + i``, so a completion never depends on its batch-mates and the same call gives the same
    completions. A completion keeps its end-of-sequence token when it stopped (the engine's rule: the stop is
    a sampled token too). The model is put in eval mode for the call and its training flag restored after.
    """
    params = SamplingParams(max_new_tokens, temperature=temperature, stop_ids=tuple(eos_ids))
    seeds = [seed + i for i in range(len(prompts))]
    return [group[0].ids for group in generate(model, prompts, params, seeds, pad_id=pad_id, batch_size=batch_size)]


@torch.no_grad()
def completion_token_logps(model, prompts: Sequence[list[int]], completions: Sequence[list[int]], pad_id: int,
                           batch_size: int = 8) -> list[torch.Tensor]:
    """log π(y_t | x, y_<t) of every completion token, one (|y|,) fp32 tensor per sequence (empty for |y| = 0).

    The plain computation with full logits, a micro-batch of right-padded rows at a time (these are a few
    dozen short generations, not the training batch)::

        logits = model(prompt + completion).logits[len(prompt) - 1 : -1]      # (|y|, V)
        logp = logits.float().log_softmax(-1).gather(-1, completion[:, None])  # (|y|, 1)
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return [lp for start in range(0, len(prompts), batch_size)
                for lp in _token_logps_chunk(model, prompts[start : start + batch_size],
                                             completions[start : start + batch_size], pad_id, device)]
    finally:
        model.train(was_training)


def _token_logps_chunk(model, prompts, completions, pad_id: int, device) -> list[torch.Tensor]:
    rows = list(zip(prompts, completions))
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(list(p) + list(c))
        mask[i, : len(p) + len(c)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
    out = []
    for i, (p, c) in enumerate(rows):
        z = logits[i, len(p) - 1 : len(p) + len(c) - 1].float()  # (|y|, V)
        target = torch.tensor(list(c), dtype=torch.long, device=z.device)[:, None]  # (|y|, 1)
        out.append(z.log_softmax(-1).gather(-1, target).squeeze(-1).cpu())
    return out


def kl_estimates(policy_logps: Sequence[torch.Tensor], reference_logps: Sequence[torch.Tensor]) -> dict[str, float]:
    """k1 and k3 estimates of KL(π ‖ π_ref), per token and per sequence, from log-probs of policy samples.

    Args:
        policy_logps / reference_logps: per sequence, (|y|,) log-probs of the sampled tokens under π and π_ref.
    Returns ``kl/k1_token``, ``kl/k3_token`` (mean over all tokens) and ``kl/k1_seq``, ``kl/k3_seq`` (sum over a
    sequence, mean over sequences), in nats. Example: one sequence with r = [log 2, 0] gives k1_token = 0.347,
    k1_seq = 0.693, k3 = [(0.5 − 1) + 0.693, 0] = [0.193, 0], k3_seq = 0.193.
    """
    k1_seq, k3_seq, k1_tok, k3_tok, n_tok = [], [], 0.0, 0.0, 0
    for lp, lr in zip(policy_logps, reference_logps):
        r = lp.double() - lr.double()  # (|y|,)
        k3 = torch.expm1(-r) + r  # (|y|,)
        k1_seq.append(float(r.sum()))
        k3_seq.append(float(k3.sum()))
        k1_tok, k3_tok, n_tok = k1_tok + float(r.sum()), k3_tok + float(k3.sum()), n_tok + r.numel()
    n_seq = len(k1_seq)
    return {
        "kl/k1_token": k1_tok / n_tok if n_tok else math.nan,
        "kl/k3_token": k3_tok / n_tok if n_tok else math.nan,
        "kl/k1_seq": sum(k1_seq) / n_seq if n_seq else math.nan,
        "kl/k3_seq": sum(k3_seq) / n_seq if n_seq else math.nan,
    }


def _content(seq: Sequence[int], eos_ids: set[int]) -> list[int]:
    return [t for t in seq if t not in eos_ids]


def distinct_n(seqs: Sequence[Sequence[int]], n: int) -> float:
    """Distinct-n (Li et al., arXiv:1510.03055v3, Sec. 4.3): unique n-grams / all n-grams, pooled over all
    sequences. 1.0 when no n-gram repeats anywhere; near 0 when every output says the same thing. NaN when
    no sequence has n tokens."""
    grams = [tuple(s[i : i + n]) for s in seqs for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def self_repetition(seqs: Sequence[Sequence[int]], n: int = 2) -> float:
    """Mean over sequences of the share of a sequence's n-grams that repeat an earlier n-gram of the same
    sequence: 0 for "a b c d", 5/6 for "a a a a a a a" (bigrams: 6, all "a a", 5 of them repeats). Sequences
    shorter than n + 1 tokens count as 0. Catches degenerate loops that distinct-n across prompts can miss."""
    values = []
    for s in seqs:
        grams = [tuple(s[i : i + n]) for i in range(len(s) - n + 1)]
        values.append(1.0 - len(set(grams)) / len(grams) if grams else 0.0)
    return sum(values) / len(values) if values else math.nan


def generation_stats(seqs: Sequence[Sequence[int]], eos_ids: set[int]) -> dict[str, float]:
    """Mean length in tokens (the end-of-sequence token not counted), distinct-1/2 and self-repetition."""
    content = [_content(s, eos_ids) for s in seqs]
    return {
        "length": sum(len(s) for s in content) / len(content) if content else math.nan,
        "distinct_1": distinct_n(content, 1),
        "distinct_2": distinct_n(content, 2),
        "repetition": self_repetition(content, 2),
    }
