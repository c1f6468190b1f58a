"""PPO's engine additions: per-token values V(s_t) from the same packed forward as the log-probs (a value head on
the policy's trunk, or a critic with its own trunk) and per-position entropies, each against the naive
one-sequence-at-a-time path to 1e-5 in fp32, gradients included."""

from __future__ import annotations

import pytest
import torch

from preftune.data.batch import padded
from preftune.data.collate import sequences_of
from preftune.data.layouts import LAYOUTS
from preftune.data.tokenize import TokenizedGroup
from preftune.logprobs import Critic, LogpModel, ValueHead, decoder_of, hidden_size_of, token_entropy

pytestmark = pytest.mark.usefixtures("one_thread")


def _groups():
    # 3 prompts of different lengths x G = 2 completions of different lengths (one of length 1)
    return [TokenizedGroup([2, 11, 9], [[12, 13], [16]]),
            TokenizedGroup([2, 20], [[21, 22, 23], [24, 25]]),
            TokenizedGroup([2, 30, 31, 32, 33], [[34], [35, 36, 37, 38]])]


def _naive_hidden(decoder, prompt, completion):
    """The decoder's final hidden states at the positions that predict each completion token, (|y|, H)."""
    ids = torch.tensor([prompt + completion])
    return decoder(input_ids=ids).last_hidden_state[0, len(prompt) - 1 : -1]


def _random_head(hidden: int, seed: int) -> ValueHead:
    head = ValueHead(hidden)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # zero-initialised by design; random here so the parity is not 0 == 0
        head.linear.weight.copy_(torch.randn(head.linear.weight.shape, generator=g))
        head.linear.bias.fill_(0.3)
    return head


def _grads(*modules):
    out = {f"{i}.{n}": p.grad.clone() for i, m in enumerate(modules) for n, p in m.named_parameters()
           if p.grad is not None}
    for m in modules:
        m.zero_grad()
    return out


def _assert_grads_close(a, b):
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("layout", ["padded", "shared_prompt", "packed"])
def test_value_head_values_match_the_naive_path_with_gradients(make_model, layout):
    model = make_model(seed=3).float()
    head = _random_head(hidden_size_of(model), seed=1)
    engine = LogpModel(model, chunk_size=3).with_critic(head)
    groups = _groups()
    batch = LAYOUTS[layout](groups, 0)
    tok, counts, values = engine(*batch.model_args(), per_token=True, temperature=0.7, values=True)  # (N,) each
    S = batch.num_sequences
    got = padded(values, batch.target_seq, S)  # (S, T)
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(0))
    ((got * weights).sum() + tok.sum()).backward()
    fast = _grads(model, head)

    decoder = decoder_of(model)
    naive_total = 0.0
    for s, (prompt, completion) in enumerate(sequences_of(groups)):
        v = head(_naive_hidden(decoder, prompt, completion))  # (|y|,)
        torch.testing.assert_close(got[s, : len(completion)], v, atol=1e-5, rtol=0)
        assert (got[s, len(completion):] == 0).all()
        naive_total = naive_total + (v * weights[s, : len(completion)]).sum()
    naive_total = naive_total + _naive_logp_sum(model, groups, 0.7)
    naive_total.backward()
    _assert_grads_close(fast, _grads(model, head))


def _naive_logp_sum(model, groups, temperature):
    total = 0.0
    for prompt, completion in sequences_of(groups):
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float()
        logp = (logits / temperature).log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])
        total = total + logp.sum()
    return total


def test_separate_critic_runs_its_own_trunk_over_the_same_layout(make_model):
    policy, other = make_model(seed=3).float(), make_model(seed=5).float()
    head = torch.nn.Linear(hidden_size_of(other), 1)
    critic = Critic(decoder_of(other), head)
    engine = LogpModel(policy, chunk_size=4, critic=critic)
    groups = _groups()
    batch = LAYOUTS["packed"](groups, 0)
    _, _, values = engine(*batch.model_args(), per_token=True, values=True)
    got = padded(values, batch.target_seq, batch.num_sequences)
    got.pow(2).sum().backward()
    fast = _grads(other)
    assert all(p.grad is None for p in policy.parameters())  # the policy's hidden states are not read
    total = 0.0
    for s, (prompt, completion) in enumerate(sequences_of(groups)):
        v = head(_naive_hidden(decoder_of(other), prompt, completion)).squeeze(-1)
        torch.testing.assert_close(got[s, : len(completion)], v, atol=1e-5, rtol=0)
        total = total + v.pow(2).sum()
    total.backward()
    _assert_grads_close(fast, _grads(other))


@pytest.mark.parametrize("chunk_size", [0, 3, 1000])
def test_token_entropy_matches_full_logits_with_gradients(make_model, chunk_size):
    model = make_model(seed=4).float()
    groups = _groups()
    batch = LAYOUTS["packed"](groups, 0)
    engine = LogpModel(model, chunk_size=chunk_size)
    _, _, entropy = engine(*batch.model_args(), per_token=True, temperature=0.8, entropy=True)  # (N,)
    got = padded(entropy, batch.target_seq, batch.num_sequences)
    weights = torch.rand(got.shape, generator=torch.Generator().manual_seed(2))
    (got * weights).sum().backward()
    fast = _grads(model)
    total = 0.0
    for s, (prompt, completion) in enumerate(sequences_of(groups)):
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float()
        logq = (logits / 0.8).log_softmax(-1)  # (|y|, V)
        h = -(logq.exp() * logq).sum(-1)
        torch.testing.assert_close(got[s, : len(completion)], h, atol=1e-5, rtol=0)
        total = total + (h * weights[s, : len(completion)]).sum()
    total.backward()
    _assert_grads_close(fast, _grads(model))


def test_entropy_of_a_uniform_head_is_log_v():
    # zero logits: q uniform over V = 7 tokens, H = log 7 = 1.9459 nats at every position
    head = torch.nn.Linear(4, 7, bias=False)
    torch.nn.init.zeros_(head.weight)
    h = token_entropy(torch.randn(5, 4), head, chunk_size=2)
    torch.testing.assert_close(h, torch.full((5,), 1.945910149), atol=1e-6, rtol=0)


def test_values_need_a_critic_and_per_token(make_model):
    batch = LAYOUTS["packed"](_groups(), 0)
    with pytest.raises(ValueError, match="needs a critic"):
        LogpModel(make_model(seed=0))(*batch.model_args(), per_token=True, values=True)
    with pytest.raises(ValueError, match="per_token=True"):
        LogpModel(make_model(seed=0), critic=ValueHead(32))(*batch.model_args(), values=True)


def test_value_head_starts_at_zero():
    head = ValueHead(8)
    assert torch.equal(head(torch.randn(3, 8)), torch.zeros(3))
