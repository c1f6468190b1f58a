"""Sequence log-probs: the engine equals the naive twin (a SUM over completion tokens) to 1e-5 in fp32."""

from __future__ import annotations

import math
import random

import pytest
import torch

from preftune.config import LossConfig
from preftune.data.batch import PreferenceBatch
from preftune.data.collate import collate_padded, sequences_of
from preftune.data.tokenize import TokenizedPair, TokenizedSingle
from preftune.logprobs import LogpModel, naive_sequence_logps, sequence_logps
from preftune.losses import dpo
from preftune.trainer.steps import Objective, paired_step


@pytest.fixture(scope="module")
def model(make_model):
    m = make_model(seed=1)
    m.eval()
    return m


def random_pairs(tok, n: int, seed: int) -> list[TokenizedPair]:
    """Pairs of odd and uneven lengths: prompts of 1-7 tokens, completions of 1-9, no padding token inside."""
    rng = random.Random(seed)
    vocab = [i for i in range(len(tok)) if i != tok.pad_token_id]

    def seq(lo, hi):
        return [rng.choice(vocab) for _ in range(rng.randint(lo, hi))]

    return [TokenizedPair(seq(1, 7), seq(1, 9), seq(1, 9)) for _ in range(n)]


def per_token_sum(model, prompt, completion) -> float:
    """Σ_j log p(y_j | x, y_<j) written out term by term, as a float64 Python sum."""
    logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].double()
    total = 0.0
    for j, token in enumerate(completion):
        total += logits[len(prompt) - 1 + j].log_softmax(-1)[token].item()
    return total


# ---- engine == naive ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 100_000])
@pytest.mark.parametrize("n_pairs", [1, 5])
def test_engine_matches_naive_fp32(model, toy_tok, chunk_size, n_pairs):
    pairs = random_pairs(toy_tok, n_pairs, seed=n_pairs)
    batch = collate_padded(pairs, toy_tok.pad_token_id)
    with torch.no_grad():
        logps, lengths = sequence_logps(model, batch, chunk_size=chunk_size)
        ref, ref_lengths = naive_sequence_logps(model, sequences_of(pairs))
    assert logps.dtype == torch.float32 and logps.shape == (2 * n_pairs,)
    torch.testing.assert_close(logps, ref, rtol=0, atol=1e-5)
    assert lengths.tolist() == ref_lengths.tolist() == [len(c) for _, c in sequences_of(pairs)]


def test_engine_is_a_sum_over_completion_tokens(model, toy_tok):
    pairs = random_pairs(toy_tok, 3, seed=7)
    batch = collate_padded(pairs, toy_tok.pad_token_id)
    with torch.no_grad():
        logps, lengths = sequence_logps(model, batch, chunk_size=4)
        expected = [per_token_sum(model, p, c) for p, c in sequences_of(pairs)]
    assert logps.tolist() == pytest.approx(expected, abs=1e-5)
    means = logps / lengths
    assert not torch.allclose(means, logps)  # completions are longer than one token: sum and mean differ


def test_engine_single_completions_and_padding_value_irrelevant(model, toy_tok):
    singles = [TokenizedSingle([2, 11], [12, 13, 14]), TokenizedSingle([2, 11, 15, 16, 17], [18])]
    with torch.no_grad():
        a, _ = sequence_logps(model, collate_padded(singles, toy_tok.pad_token_id))
        b, _ = sequence_logps(model, collate_padded(singles, 7))  # another id in the padding slots
        ref, _ = naive_sequence_logps(model, sequences_of(singles))
    torch.testing.assert_close(a, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_engine_gradients_match_naive(make_model, toy_tok):
    pairs = random_pairs(toy_tok, 3, seed=11)
    weights = torch.tensor([1.0, -0.5, 2.0, 0.3, -1.0, 0.7])  # a generic linear function of the 6 log-probs
    grads = []
    for engine in (True, False):
        m = make_model(seed=2)
        if engine:
            logps, _ = sequence_logps(m, collate_padded(pairs, toy_tok.pad_token_id), chunk_size=3)
        else:
            logps, _ = naive_sequence_logps(m, sequences_of(pairs))
        (logps * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_logp_model_wrapper_equals_function(model, toy_tok):
    pairs = random_pairs(toy_tok, 2, seed=3)
    batch = collate_padded(pairs, toy_tok.pad_token_id)
    wrapped = LogpModel(model, chunk_size=2)
    with torch.no_grad():
        a, _ = sequence_logps(wrapped, batch)
        b, _ = sequence_logps(model, batch, chunk_size=2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- sum, not mean ----------------------------------------------------------------------------------------


def test_averaging_instead_of_summing_changes_dpo_loss():
    # β = 1. Chosen has 2 tokens, rejected 4; every policy token has log-prob −1, every reference token −1.5.
    #   sums:   π_w = −2, r_w = −3, π_l = −4, r_l = −6
    #           h = (−2 − (−3)) − (−4 − (−6)) = 1 − 2 = −1      L = −log σ(−1) = log(1 + e) = 1.313262
    #   means:  π_w = −1, r_w = −1.5, π_l = −1, r_l = −1.5
    #           h = (−1 + 1.5) − (−1 + 1.5) = 0                 L = −log σ(0) = log 2      = 0.693147
    # Per-token averaging hides that the rejected response lost twice as much total probability mass.
    policy_tokens = {"chosen": torch.full((2,), -1.0), "rejected": torch.full((4,), -1.0)}
    ref_tokens = {"chosen": torch.full((2,), -1.5), "rejected": torch.full((4,), -1.5)}

    def loss(reduce):
        out = dpo(
            policy_chosen_logps=reduce(policy_tokens["chosen"])[None],
            policy_rejected_logps=reduce(policy_tokens["rejected"])[None],
            reference_chosen_logps=reduce(ref_tokens["chosen"])[None],
            reference_rejected_logps=reduce(ref_tokens["rejected"])[None],
            beta=1.0,
        )
        return out.losses.item()

    summed, averaged = loss(torch.sum), loss(torch.mean)
    assert summed == pytest.approx(math.log(1 + math.e), abs=1e-6) == pytest.approx(1.313262, abs=1e-6)
    assert averaged == pytest.approx(math.log(2), abs=1e-6)
    assert summed - averaged == pytest.approx(0.620115, abs=1e-6)


def test_trainer_dpo_step_feeds_sums_not_means(model, toy_tok):
    """The loop's paired step gives the loss of summed log-probs, never the per-token average. The sums are the
    naive twin's (one sequence at a time, full logits), not the engine's own output: an engine that averaged
    would otherwise agree with itself."""
    pairs = [TokenizedPair([2, 11, 9], [12, 13], [12, 14, 15, 16, 17]),  # chosen 2 tokens, rejected 5
             TokenizedPair([2, 20], [21, 22, 23, 24], [25])]  # chosen 4, rejected 1
    batch = PreferenceBatch(collate_padded(pairs, toy_tok.pad_token_id), paired=True)
    ref = torch.tensor([-9.0, -11.0, -20.0, -3.0])  # fixed reference sums: chosen 0..1, rejected 2..3
    objective = Objective.from_config(LossConfig(name="dpo", params={"beta": 0.5}))

    def logp_fn(b):
        return sequence_logps(model, b, chunk_size=3)

    with torch.no_grad():
        losses, metrics = paired_step(objective, logp_fn, batch, lambda b: (ref, None))
        logps, lengths = naive_sequence_logps(model, sequences_of(pairs))  # chosen 0..1, rejected 2..3
    assert lengths.tolist() == [2, 4, 5, 1]
    n = 2
    by_sum = dpo(policy_chosen_logps=logps[:n], policy_rejected_logps=logps[n:], reference_chosen_logps=ref[:n],
                 reference_rejected_logps=ref[n:], beta=0.5).losses
    mean, ref_mean = logps / lengths, ref / lengths
    by_mean = dpo(policy_chosen_logps=mean[:n], policy_rejected_logps=mean[n:],
                  reference_chosen_logps=ref_mean[:n], reference_rejected_logps=ref_mean[n:], beta=0.5).losses
    torch.testing.assert_close(losses, by_sum, rtol=0, atol=1e-6)
    assert (losses - by_mean).abs().min() > 1e-2
    torch.testing.assert_close(metrics["rewards/chosen"], 0.5 * (logps[:n] - ref[:n]))
    torch.testing.assert_close(metrics["logps/rejected"], logps[n:])


# ---- bf16 ---------------------------------------------------------------------------------------------------


def test_bf16_autocast_runs_on_cpu_and_stays_close(make_model, toy_tok):
    m = make_model(seed=1)
    pairs = random_pairs(toy_tok, 3, seed=5)
    batch = collate_padded(pairs, toy_tok.pad_token_id)
    with torch.no_grad():
        fp32, _ = sequence_logps(m, batch, chunk_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, lengths = sequence_logps(m, batch, chunk_size=4)
    assert bf16.dtype == torch.float32  # reductions are done in fp32 whatever the matmul dtype
    assert torch.isfinite(bf16).all()
    # bf16 has ~3 significant digits; per-token errors of ~1e-2 add up over a completion.
    assert (bf16 - fp32).abs().max() < 0.05 * lengths.max()
    bf16.sum().backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in m.parameters())  # weights stay fp32
