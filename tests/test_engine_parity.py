"""The log-prob engine against its naive twin, for every layout, on a tiny random Llama in fp32.

Per-sequence log-probs and lengths, the DPO loss and the gradient of every parameter must match
``naive_sequence_logps`` (one unpadded sequence at a time, full logits) to 1e-5, with SDPA and eager attention,
odd lengths, batch 1, one-token completions and chunk sizes 1, 7 and larger than the batch.
"""

from __future__ import annotations

import functools
import math
import random
import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from preftune.data.collate import SequenceBatch, collate_padded, sequences_of
from preftune.data.layouts import LAYOUTS
from preftune.data.packing import (
    collate_packed,
    collate_shared_prompt,
    length_grouped_order,
    pack_rows,
    padding_fraction,
    unit_length,
)
from preftune.data.tokenize import TokenizedPair, TokenizedSingle
from preftune.logprobs import LogpModel, naive_sequence_logps, sequence_logps, token_logps
from preftune.losses import dpo

VOCAB = 101
HIDDEN = 32
HUGE = 10**6
TOL = 1e-5

def collate_two_per_row(examples, pad_id):
    """Packed rows up to the two longest examples' tokens: rows hold two (or more) pairs, not all of them."""
    lengths = sorted((unit_length(e) for e in examples), reverse=True)
    return collate_packed(examples, pad_id, max_row_tokens=sum(lengths[:2]))


# "packed" with its default limit (the longest pair) happens to give every pair of these cases a row of its
# own; the two other packed layouts put several pairs in one row, so the block-diagonal mask is exercised.
LAYOUT_FNS = {
    "padded": collate_padded,
    "shared_prompt": collate_shared_prompt,
    "packed": collate_packed,
    "packed_two_per_row": collate_two_per_row,
    "packed_one_row": functools.partial(collate_packed, max_row_tokens=HUGE),
}
SHARING = ("packed_two_per_row", "packed_one_row")


def tiny_llama(attn: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, attn_implementation=attn)
    model = LlamaForCausalLM(cfg).float()
    model.config._attn_implementation = attn
    with torch.no_grad():  # a less uniform output distribution than the init's, so log-probs differ per token
        model.model.embed_tokens.weight.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return tiny_llama(request.param)


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, VOCAB) for _ in range(n)]


def make_pairs(case: str) -> list[TokenizedPair]:
    rng = random.Random(7)
    if case == "batch1":
        return [TokenizedPair(_ids(rng, 5), _ids(rng, 9), _ids(rng, 3))]
    if case == "one_token":  # a one-token chosen and a one-token rejected completion, beside longer ones
        return [TokenizedPair(_ids(rng, 4), _ids(rng, 1), _ids(rng, 6)),
                TokenizedPair(_ids(rng, 1), _ids(rng, 7), _ids(rng, 1)),
                TokenizedPair(_ids(rng, 3), _ids(rng, 1), _ids(rng, 1))]
    # odd and uneven lengths: prompts 1..13, completions 1..15
    return [TokenizedPair(_ids(rng, p), _ids(rng, c), _ids(rng, r))
            for p, c, r in [(3, 5, 11), (1, 13, 7), (13, 1, 9), (7, 9, 1), (5, 15, 3)]]


CASES = ["odd", "batch1", "one_token"]


def _pairs_per_row(batch: SequenceBatch) -> list[int]:
    """How many pairs each row holds: distinct chosen sequences (0..B-1) among the row's targets."""
    B, T = batch.num_sequences // 2, batch.input_ids.shape[1]
    rows = batch.target_index // T  # (N,) the row of each target
    return [len(set(batch.target_seq[(rows == r) & (batch.target_seq < B)].tolist()))
            for r in range(batch.input_ids.shape[0])]


@pytest.mark.parametrize("layout", SHARING)
@pytest.mark.parametrize("case", ["odd", "one_token"])
def test_sharing_layouts_put_several_pairs_in_one_row(layout, case):
    # Otherwise the parity tests below would not exercise the block-diagonal mask between pairs.
    assert max(_pairs_per_row(LAYOUT_FNS[layout](make_pairs(case), 0))) >= 2


def _run(model, batch: SequenceBatch, chunk: int):
    return sequence_logps(model, batch, chunk)


@pytest.mark.parametrize("chunk", [0, 1, 7, HUGE])  # 0: the chunked head switched off
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", list(LAYOUT_FNS))
def test_logps_match_naive(model, layout, case, chunk):
    pairs = make_pairs(case)
    with torch.no_grad():
        want, want_len = naive_sequence_logps(model, sequences_of(pairs))
        got, got_len = _run(model, LAYOUT_FNS[layout](pairs, 0), chunk)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
    assert got_len.tolist() == want_len.tolist()


@pytest.mark.parametrize("layout", list(LAYOUT_FNS))
def test_singles_match_naive(model, layout):
    rng = random.Random(3)
    singles = [TokenizedSingle(_ids(rng, p), _ids(rng, c), label=bool(i % 2))
               for i, (p, c) in enumerate([(3, 1), (1, 8), (6, 5), (2, 2)])]
    with torch.no_grad():
        want, want_len = naive_sequence_logps(model, sequences_of(singles))
        got, got_len = _run(model, LAYOUT_FNS[layout](singles, 0), 3)
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
    assert got_len.tolist() == want_len.tolist()


def _dpo_and_grads(model, logps: torch.Tensor, ref: torch.Tensor):
    n = logps.shape[0] // 2
    loss = dpo(logps[:n], logps[n:], ref[:n], ref[n:], beta=0.1).losses.mean()
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name, g in want.items():
        scale = g.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(got[name], g, rtol=TOL, atol=TOL * scale, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("chunk", [0, 1, 7, HUGE])  # 0: the chunked head switched off
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", list(LAYOUT_FNS))
def test_dpo_loss_and_gradients_match_naive(model, layout, case, chunk):
    pairs = make_pairs(case)
    with torch.no_grad():  # a reference that differs from the policy, so both terms of the loss are live
        ref = naive_sequence_logps(model, sequences_of(pairs))[0] + torch.linspace(-2, 2, 2 * len(pairs))
    want_loss, want_grads = _dpo_and_grads(model, naive_sequence_logps(model, sequences_of(pairs))[0], ref)
    got_loss, got_grads = _dpo_and_grads(model, _run(model, LAYOUT_FNS[layout](pairs, 0), chunk)[0], ref)
    torch.testing.assert_close(got_loss, want_loss, rtol=TOL, atol=TOL)
    _assert_grads_close(got_grads, want_grads)
    model.zero_grad(set_to_none=True)


def test_frozen_head_gets_no_gradient_and_the_rest_matches():
    """LoRA-like: the (tied) head weight does not train; the chunked head then only back-propagates to hidden."""
    model = tiny_llama("sdpa", seed=1)
    model.model.embed_tokens.weight.requires_grad_(False)
    pairs = make_pairs("odd")
    ref = torch.zeros(2 * len(pairs))
    want_loss, want = _dpo_and_grads(model, naive_sequence_logps(model, sequences_of(pairs))[0], ref)
    got_loss, got = _dpo_and_grads(model, _run(model, collate_packed(pairs, 0), 4)[0], ref)
    assert "model.embed_tokens.weight" not in got
    torch.testing.assert_close(got_loss, want_loss, rtol=TOL, atol=TOL)
    _assert_grads_close(got, want)


@pytest.mark.parametrize("softcap,scale", [(None, None), (30.0, None), (None, 0.5), (5.0, 2.0)])
def test_token_logps_with_bias_softcap_and_scale_match_autograd(softcap, scale):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 37, bias=True)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 37, (23,))
    weights = torch.randn(23)

    logits = torch.nn.functional.linear(hidden, head.weight, head.bias).float()  # (N, V) the naive way
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    want = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    want_grads = torch.autograd.grad((want * weights).sum(), [hidden, head.weight, head.bias])
    got = token_logps(hidden, head, targets, 5, softcap, scale)
    got_grads = torch.autograd.grad((got * weights).sum(), [hidden, head.weight, head.bias])
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=TOL, atol=TOL)


class _LargestVocabTensor(TorchDispatchMode):
    """Records the most rows of any tensor an op returns with the vocabulary as its last dimension (the head
    weight's transpose, (H, V), aside)."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == VOCAB and t.shape != (HIDDEN, VOCAB):
                self.rows = max(self.rows, t.numel() // VOCAB)
        return out


@pytest.mark.parametrize("chunk", [1, 4])
def test_chunked_head_never_builds_logits_beyond_the_chunk(chunk):
    model = tiny_llama("sdpa")
    pairs = make_pairs("odd")  # 74 completion tokens, rows up to 23 tokens (no decoder tensor ends in VOCAB)
    batch = collate_shared_prompt(pairs, 0)
    assert batch.target_ids.numel() > 10 * chunk
    ref = torch.zeros(2 * len(pairs))
    with _LargestVocabTensor() as seen:
        logps, _ = _run(model, batch, chunk)
        n = len(pairs)
        dpo(logps[:n], logps[n:], ref[:n], ref[n:], beta=0.1).losses.mean().backward()
    assert 0 < seen.rows <= chunk
    with _LargestVocabTensor() as naive_seen:  # the probe does see full logits when they exist
        naive_sequence_logps(model, sequences_of(pairs[:1]))
    assert naive_seen.rows > chunk


@pytest.mark.parametrize("layout", ["padded", "shared_prompt", "packed"])
def test_bf16_autocast_runs_and_is_close(layout):
    model = tiny_llama("sdpa")
    pairs = make_pairs("odd")
    with torch.no_grad():
        want, _ = naive_sequence_logps(model, sequences_of(pairs))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = _run(model, LAYOUTS[layout](pairs, 0), 7)
        n = len(pairs)
        loss = dpo(got[:n], got[n:], want[:n].detach(), want[n:].detach(), beta=0.1).losses.mean()
    loss.backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=3e-2, atol=0.5)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert abs(loss.item() - math.log(2)) < 0.05


# ---- the layouts themselves ----------------------------------------------------------------------------------


def test_shared_prompt_mask_and_positions():
    """prompt [1 2 3], chosen [4 5], rejected [6 7 8]: rejected sees the prompt and itself, never chosen."""
    batch = collate_shared_prompt([TokenizedPair([1, 2, 3], [4, 5], [6, 7, 8])], 0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]  # rejected restarts at len(prompt)
    mask = batch.attention_mask[0, 0].int().tolist()
    assert mask[4] == [1, 1, 1, 1, 1, 0, 0, 0]  # last chosen token: prompt + chosen
    assert mask[5] == [1, 1, 1, 0, 0, 1, 0, 0]  # first rejected token: prompt + itself
    assert mask[7] == [1, 1, 1, 0, 0, 1, 1, 1]
    # chosen [4 5] predicted at rows 2, 3; rejected [6 7 8] at 2 (the last prompt token), 5, 6
    assert batch.target_index.tolist() == [2, 3, 2, 5, 6]
    assert batch.target_seq.tolist() == [0, 0, 1, 1, 1]
    assert batch.num_sequences == 2 and batch.num_tokens == 8


def test_packed_rows_are_block_diagonal_and_padding_rows_attend_to_themselves():
    pairs = [TokenizedPair([1, 2], [3], [4]), TokenizedPair([5], [6, 7], [8]), TokenizedPair([9, 10, 11], [12], [13])]
    batch = collate_packed(pairs, 0, max_row_tokens=9)
    # First fit by decreasing length (5, 4, 4 tokens) under 9: row 0 = pair 2 then pair 0, row 1 = pair 1 + pad
    assert batch.input_ids.tolist() == [[9, 10, 11, 12, 13, 1, 2, 3, 4], [5, 6, 7, 8, 0, 0, 0, 0, 0]]
    mask = batch.attention_mask[:, 0]  # (R, T, T)
    # Row 0, by hand: pair 2 = prompt 0-2, chosen 3, rejected 4; pair 0 = prompt 5-6, chosen 7, rejected 8.
    # Causal inside each pair, rejected never sees chosen, nothing across the two pairs.
    row0 = [
        [1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0],  # chosen 12: its prompt and itself
        [1, 1, 1, 0, 1, 0, 0, 0, 0],  # rejected 13: its prompt and itself, not chosen 12
        [0, 0, 0, 0, 0, 1, 0, 0, 0],  # pair 0 starts over: nothing of pair 2
        [0, 0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1, 1, 0, 1],
    ]
    assert mask[0].int().tolist() == row0
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 3, 0, 1, 2, 2]
    # Row 1: pair 1 = prompt 0, chosen 1-2, rejected 3; padding 4-8 attends causally among itself only.
    assert mask[1, :4, :4].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]]
    assert not mask[1, :4, 4:].any() and not mask[1, 4:, :4].any()
    assert mask[1, 4:, 4:].int().tolist() == torch.ones(5, 5, dtype=torch.int).tril().tolist()
    assert mask.any(-1).all()  # every query row sees something: no NaN from SDPA
    assert batch.num_tokens == 13 and padding_fraction(batch) == pytest.approx(1 - 13 / 18)  # 4 + 4 + 5 real
    # sequence order holds whatever the rows: chosen 0..2 then rejected 3..5
    assert sorted(set(batch.target_seq.tolist())) == list(range(6))
    for s, (_, c) in enumerate(sequences_of(pairs)):
        picked = batch.target_ids[batch.target_seq == s].tolist()
        assert picked == c


def test_pack_rows_first_fit_decreasing():
    assert pack_rows([5, 3, 2, 4, 1]) == [[0], [3, 4], [1, 2]]
    assert pack_rows([5, 3, 2, 4, 1], max_row_tokens=8) == [[0, 1], [3, 2, 4]]
    assert pack_rows([9, 2], max_row_tokens=4) == [[0], [1]]  # a unit longer than the limit gets its own row


def test_length_grouped_order_is_a_deterministic_permutation_of_similar_neighbours():
    rng = random.Random(0)
    lengths = [rng.randrange(10, 500) for _ in range(403)]
    order = length_grouped_order(lengths, 4, seed=1, epoch=0)
    assert sorted(order) == list(range(403))
    assert order == length_grouped_order(lengths, 4, seed=1, epoch=0)
    assert order != length_grouped_order(lengths, 4, seed=1, epoch=1)
    spread = sum(max(lengths[i] for i in order[k : k + 4]) - min(lengths[i] for i in order[k : k + 4])
                 for k in range(0, 400, 4)) / 100
    assert spread < 40  # random batches of 4 spread about 250 tokens


def test_layouts_registered():
    assert {"padded", "shared_prompt", "packed"} <= set(LAYOUTS)


def test_empty_prompt_is_an_error():
    with pytest.raises(ValueError, match="empty prompt"):
        collate_packed([TokenizedPair([], [1], [2])], 0)


def test_logp_model_flash_attention_refuses_4d_mask():
    model = tiny_llama("sdpa")
    model.config._attn_implementation = "flash_attention_2"
    batch = collate_shared_prompt(make_pairs("batch1"), 0)
    with pytest.raises(ValueError, match="shared_prompt and packed"):
        LogpModel(model, 4)(batch.input_ids, batch.position_ids, batch.attention_mask, batch.target_index,
                            batch.target_ids, batch.target_seq, batch.num_sequences)


def test_flex_attention_gets_a_block_mask_from_the_bool_mask():
    """FlexAttention adds a tensor mask to the scores, so the engine hands it a BlockMask instead. (On CPU, flex
    runs forward only: torch has no CPU backward for it, so CPU training uses sdpa or eager.)"""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from torch.nn.attention.flex_attention import BlockMask

    from preftune.logprobs import attention_mask_for

    model = tiny_llama("sdpa")
    model.config._attn_implementation = "flex_attention"
    batch = collate_packed(make_pairs("odd"), 0)
    block = attention_mask_for(model, batch.attention_mask)
    assert isinstance(block, BlockMask)
    dense = block.to_dense()  # (R, 1, T/blk, T/blk) block occupancy; every block with an allowed pair is kept
    assert dense.shape[0] == batch.attention_mask.shape[0]


@pytest.mark.skipif(not any(map(shutil.which, ("g++", "c++", "clang++"))), reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_compiled_layers_match_naive_and_stay_local(layout):
    """engine.compile: the decoder layers run through inductor inside the engine's forward only; log-probs,
    DPO loss and every gradient match the naive eager path to 1e-5 in fp32, and afterwards the layers are eager
    again (generation and other callers never see the compiled graph)."""
    model = tiny_llama("sdpa", seed=2)
    pairs = make_pairs("odd")
    compiled = LogpModel(model, 4, compile=True)
    with torch.no_grad():
        ref = naive_sequence_logps(model, sequences_of(pairs))[0] + torch.linspace(-2, 2, 2 * len(pairs))
        want, _ = naive_sequence_logps(model, sequences_of(pairs))
        got, _ = compiled(*LAYOUT_FNS[layout](pairs, 0).model_args())
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
    want_loss, want_grads = _dpo_and_grads(model, naive_sequence_logps(model, sequences_of(pairs))[0], ref)
    got_loss, got_grads = _dpo_and_grads(model, compiled(*LAYOUT_FNS[layout](pairs, 0).model_args())[0], ref)
    torch.testing.assert_close(got_loss, want_loss, rtol=TOL, atol=TOL)
    _assert_grads_close(got_grads, want_grads)
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)
