"""The grouped layout: G completions of one prompt share its forward (the prompt runs once, each completion sees
the prompt and itself only); per-token log-probs, at a temperature, match the naive per-sequence path to 1e-5 in
fp32, gradients included."""

from __future__ import annotations

import pytest
import torch

from preftune.data.batch import padded, token_positions
from preftune.data.collate import collate_padded, sequences_of
from preftune.data.layouts import LAYOUTS
from preftune.data.tokenize import TokenizedGroup
from preftune.logprobs import LogpModel

pytestmark = pytest.mark.usefixtures("one_thread")


def _groups():
    # 3 prompts of different lengths x G = 4 completions of different lengths (one of length 1)
    return [TokenizedGroup([2, 11, 9], [[12, 13], [12, 14, 15], [16], [17, 18, 19, 20]]),
            TokenizedGroup([2, 20], [[21, 22, 23], [24], [25, 26], [27, 28]]),
            TokenizedGroup([2, 30, 31, 32, 33], [[34], [35, 36], [37, 38, 39, 40, 41], [42]])]


def _naive_token_logps(model, sequences, temperature):
    """One unpadded sequence at a time, full logits: log softmax(z / T) at each completion token."""
    out = []
    for prompt, completion in sequences:
        ids = torch.tensor([prompt + completion])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / temperature  # (|y|, V)
        out.append(logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1))
    return out


def test_sequence_order_is_completion_major():
    groups = _groups()
    seqs = sequences_of(groups)
    # sequence u + k·P: completion k of prompt u
    assert seqs[0] == ([2, 11, 9], [12, 13]) and seqs[1] == ([2, 20], [21, 22, 23]) and seqs[3] == ([2, 11, 9], [12, 14, 15])


@pytest.mark.parametrize("layout", ["padded", "shared_prompt", "packed"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_grouped_layouts_match_the_naive_path_with_gradients(make_model, layout, temperature):
    model = make_model(seed=3).float()
    groups = _groups()
    batch = LAYOUTS[layout](groups, 0)
    engine = LogpModel(model, chunk_size=3)
    tok, lengths = engine(*batch.model_args(), per_token=True, temperature=temperature)  # (N,)
    S = batch.num_sequences
    assert S == 12 and lengths.tolist() == [len(c) for _, c in sequences_of(groups)]
    got = padded(tok, batch.target_seq, S)  # (S, T)
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(0))
    (got * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    naive = _naive_token_logps(model, sequences_of(groups), temperature)
    for s, ref in enumerate(naive):
        torch.testing.assert_close(got[s, : len(ref)], ref, atol=1e-5, rtol=0)
        assert (got[s, len(ref):] == 0).all()
    sum(((r * weights[s, : len(r)]).sum() for s, r in enumerate(naive))).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_shared_forward_runs_each_prompt_once():
    groups = _groups()
    packed, plain = LAYOUTS["shared_prompt"](groups, 0), collate_padded(groups, 0)
    prompt_tokens = sum(len(g.prompt_ids) for g in groups)
    completion_tokens = sum(len(c) for g in groups for c in g.completions)
    assert packed.num_tokens == prompt_tokens + completion_tokens  # each prompt once
    assert plain.num_tokens == 4 * prompt_tokens + completion_tokens  # the naive layout repeats it G times


def test_completions_never_see_each_other():
    batch = LAYOUTS["shared_prompt"](_groups()[:1], 0)
    mask = batch.attention_mask[0, 0]  # (T, T): prompt 3 tokens, then completions of 2, 3, 1, 4 tokens
    starts = [3, 5, 8, 9]
    for a, sa in enumerate(starts):
        for b, sb in enumerate(starts):
            if a != b:
                assert not mask[sa, sb] and not mask[sb, sa]
    assert mask[9, :3].all()  # the last completion sees the whole prompt


def test_token_positions_and_padding():
    ts = torch.tensor([1, 1, 0, 0, 0, 2])
    assert token_positions(ts, 3).tolist() == [0, 1, 0, 1, 2, 0]
    assert padded(torch.arange(6.0), ts, 3).tolist() == [[2, 3, 4], [0, 1, 0], [5, 0, 0]]
