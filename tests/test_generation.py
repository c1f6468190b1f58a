"""The generation engine (``preftune.generation``) against its naive twins: Hugging Face ``generate`` for greedy
decoding, a plain forward over prompt + completion for the log-probs, one call per sequence for batching, the
per-row seeds and the shared prefill; plus hand-worked token choices, stop ids and finish reasons."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.generation import LENGTH, STOP, Completion, SamplingParams, choose_tokens, generate, sample_seed

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = ["say : cat dog fox", "echo : red", "copy : plum pear fig grape lemon", "repeat : owl bee", "say : elk"]


@pytest.fixture(scope="module")
def lively(make_model):
    """The toy model with its matrices redrawn at std 0.3: a freshly initialised one repeats one token forever,
    which would let a broken cache or position pass the greedy comparison."""
    model = make_model(0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def prompts(toy_tok):
    return [toy_tok(t)["input_ids"] for t in TEXTS]  # lengths 6, 4, 8, 5, 4 (with BOS)


def hf_greedy(model, prompts, pad_id, max_new_tokens, eos):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])  # (B, T) left-padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # (B, T)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=pad_id)[:, width:].tolist()  # (B, new)
    cut = [next((k for k, t in enumerate(row) if t in eos), None) for row in out]
    return [row if k is None else row[: k + 1] for row, k in zip(out, cut)]


def plain_logps(model, prompt, ids, temperature=1.0):
    """log_softmax(z / T)[y_t] from one unpadded forward over prompt + completion (the naive twin)."""
    with torch.no_grad():
        z = model(input_ids=torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float()  # (|y|, V)
    return (z / temperature).log_softmax(-1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)  # (|y|,)


def test_greedy_matches_hf_generate_token_for_token(lively, prompts, toy_tok):
    pad = toy_tok.pad_token_id
    free = generate(lively, prompts, SamplingParams(12, temperature=0), pad_id=pad)
    stop = free[0][0].ids[3]  # a token prompt 0 produces at step 3 (and maybe earlier): some rows stop, some not
    expected = hf_greedy(lively, prompts, pad, 12, [toy_tok.eos_token_id, stop])
    for batch_size in (16, 2):
        got = generate(lively, prompts, SamplingParams(12, temperature=0, stop_ids=(toy_tok.eos_token_id, stop)),
                       pad_id=pad, batch_size=batch_size)
        assert [g[0].ids for g in got] == expected
        assert [g[0].finish_reason for g in got] == [STOP if e[-1] in (stop, 3) else LENGTH for e in expected]
    assert {len(e) for e in expected} != {12}, "the stop id should end at least one row early"
    assert any(len(e) == 12 for e in expected), "and leave at least one to run to max_new_tokens"


@pytest.mark.parametrize("kw", [{"temperature": 1.0}, {"temperature": 0.7, "top_p": 0.8},
                                {"temperature": 1.3, "top_k": 5}, {"temperature": 0.0}])
def test_logps_equal_a_plain_forward(lively, prompts, toy_tok, kw):
    """The recorded log-prob is log_softmax(z / T) of the sampled token, before top-k / top-p (T = 1 for greedy),
    whatever the padding, the batch and the expanded cache."""
    params = SamplingParams(10, n=3, stop_ids=(toy_tok.eos_token_id,), **kw)
    out = generate(lively, prompts, params, [7, 8, 9, 10, 11], pad_id=toy_tok.pad_token_id, batch_size=4)
    temperature = kw["temperature"] or 1.0
    for prompt, group in zip(prompts, out):
        assert len(group) == 3
        for c in group:
            assert len(c.logps) == len(c.ids) > 0
            torch.testing.assert_close(torch.tensor(c.logps), plain_logps(lively, prompt, c.ids, temperature),
                                       atol=1e-5, rtol=0)


def test_a_completion_does_not_depend_on_its_batch_mates(lively, prompts, toy_tok):
    params = SamplingParams(12, temperature=1.0, n=2, stop_ids=(toy_tok.eos_token_id,))
    pad = toy_tok.pad_token_id
    together = generate(lively, prompts, params, [5, 6, 7, 8, 9], pad_id=pad, batch_size=10)
    for i in (0, 2, 4):
        alone = generate(lively, [prompts[i]], params, [5 + i], pad_id=pad)[0]
        assert [c.ids for c in alone] == [c.ids for c in together[i]]
        torch.testing.assert_close(torch.tensor(alone[0].logps), torch.tensor(together[i][0].logps), atol=1e-5, rtol=0)
    shuffled = generate(lively, prompts[::-1], params, [9, 8, 7, 6, 5], pad_id=pad, batch_size=3)[::-1]
    assert [[c.ids for c in g] for g in shuffled] == [[c.ids for c in g] for g in together]
    assert together[0][0].ids != together[0][1].ids  # two samples of a prompt differ
    other_seed = generate(lively, prompts[:1], params, [99], pad_id=pad)[0]
    assert [c.ids for c in other_seed] != [c.ids for c in together[0]]


def test_one_prefill_per_prompt_equals_separate_calls(lively, prompts, toy_tok):
    """n samples of a prompt: the prompt runs forward once (batch dimension = distinct prompts), the cache is
    expanded n-fold, and sample j is what a call for that sample alone, seeded sample_seed(s, j), gives."""
    pad = toy_tok.pad_token_id
    params = SamplingParams(8, temperature=1.0, n=4, stop_ids=(toy_tok.eos_token_id,))
    shapes = []
    hook = lively.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                            with_kwargs=True)
    try:
        out = generate(lively, prompts[:2], params, [3, 4], pad_id=pad)
    finally:
        hook.remove()
    assert shapes[0] == (2, 6)  # one prefill: 2 prompts (lengths 6 and 4, left-padded to 6), not 8 rows
    assert shapes[1][0] == 8 and all(s[1] == 1 for s in shapes[1:])  # then 8 rows, one token a step
    for i, seed in ((0, 3), (1, 4)):
        single = SamplingParams(8, temperature=1.0, n=1, stop_ids=(toy_tok.eos_token_id,))
        for j in range(4):
            alone = generate(lively, [prompts[i]], single, [[sample_seed(seed, j)]], pad_id=pad)[0][0]
            assert alone.ids == out[i][j].ids
    # Uneven explicit seed lists: prompt 0 gets 3 samples, prompt 1 one; the same sequences as above.
    uneven = generate(lively, prompts[:2], params, [[sample_seed(3, j) for j in range(3)], [sample_seed(4, 2)]],
                      pad_id=pad)
    assert [c.ids for c in uneven[0]] == [c.ids for c in out[0][:3]] and uneven[1][0].ids == out[1][2].ids


def test_stop_ids_finish_reasons_and_dropping_finished_rows(lively, prompts, toy_tok):
    """Rows stop at different steps (a common token as stop id), so finished rows leave the batch and its cache
    mid-way; every sequence must still equal its own call alone (batch_size 1, nothing dropped)."""
    pad = toy_tok.pad_token_id
    free = generate(lively, prompts, SamplingParams(16, temperature=1.0, n=4), list(range(5)), pad_id=pad)
    counts = torch.bincount(torch.tensor([t for g in free for c in g for t in c.ids]))
    stop = int(counts.argmax())  # the most frequent sampled token
    params = SamplingParams(16, temperature=1.0, n=4, stop_ids=(stop,))
    batched = generate(lively, prompts, params, list(range(5)), pad_id=pad, batch_size=20)
    single = generate(lively, prompts, params, list(range(5)), pad_id=pad, batch_size=1)
    assert [[c.ids for c in g] for g in batched] == [[c.ids for c in g] for g in single]
    reasons = [c.finish_reason for g in batched for c in g]
    assert STOP in reasons and LENGTH in reasons
    for g, f in zip(batched, free):
        for c, c_free in zip(g, f):
            if c.finish_reason == STOP:  # the stop token is kept, and is the first stop in the unstopped sample
                assert c.ids[-1] == stop and stop not in c.ids[:-1] and c.ids == c_free.ids[: len(c.ids)]
            else:
                assert len(c.ids) == 16 and stop not in c.ids


def test_top_k_one_is_greedy(lively, prompts, toy_tok):
    kw = dict(pad_id=toy_tok.pad_token_id)
    greedy = generate(lively, prompts, SamplingParams(10, temperature=0, n=2), **kw)
    top1 = generate(lively, prompts, SamplingParams(10, temperature=1.0, top_k=1, n=2), [1, 2, 3, 4, 5], **kw)
    assert [[c.ids for c in g] for g in top1] == [[c.ids for c in g] for g in greedy]
    for g, t in zip(greedy, top1):  # both log-probs are log_softmax(z)[y] at T = 1
        torch.testing.assert_close(torch.tensor(t[0].logps), torch.tensor(g[0].logps), atol=1e-6, rtol=0)
    assert greedy[0][0] == greedy[0][1] and greedy[0][0].ids is not greedy[0][1].ids  # copies, not aliases


def test_max_new_tokens_is_respected(lively, prompts, toy_tok):
    pad = toy_tok.pad_token_id
    for n_new in (1, 5):
        out = generate(lively, prompts, SamplingParams(n_new, temperature=1.0, n=2), [0] * 5, pad_id=pad)
        assert all(len(c.ids) == n_new and c.finish_reason == LENGTH for g in out for c in g)
    empty = generate(lively, prompts[:2], SamplingParams(0, n=3), [0, 1], pad_id=pad)
    assert empty == [[Completion([], [], LENGTH)] * 3] * 2


def test_choose_tokens_by_hand():
    """logits [2, 1, 0, -1] at T = 0.5: z / T = [4, 2, 0, -2], softmax = [0.8650, 0.1171, 0.0158, 0.0021],
    cumulative [0.8650, 0.9821, 0.9979, 1]. The inverse CDF picks token k when cdf[k-1] <= u < cdf[k]."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4, 1)  # (4, 4)
    u = torch.tensor([0.5, 0.9, 0.99, 0.999])
    logp = torch.tensor([4.0, 2.0, 0.0, -2.0]).log_softmax(-1)  # log [0.8650, 0.1171, 0.0158, 0.0021]
    tokens, logps = choose_tokens(logits, u, SamplingParams(4, temperature=0.5))
    assert tokens.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(logps, logp, atol=1e-6, rtol=0)
    # top_p 0.9: token 1 is kept (mass before it 0.865 < 0.9), token 2 is not (0.982 >= 0.9); the nucleus
    # [0.8650, 0.1171] renormalised has cdf [0.8808, 1]: u 0.5 -> 0, 0.9 / 0.99 / 0.999 -> 1.
    tokens, logps = choose_tokens(logits, u, SamplingParams(4, temperature=0.5, top_p=0.9))
    assert tokens.tolist() == [0, 1, 1, 1]
    torch.testing.assert_close(logps, logp[[0, 1, 1, 1]], atol=1e-6, rtol=0)  # untruncated log-probs
    # top_k 3: cdf over [0.8650, 0.1171, 0.0158] / 0.9979 = [0.8668, 0.9842, 1]: 0.99 and 0.999 -> token 2.
    assert choose_tokens(logits, u, SamplingParams(4, temperature=0.5, top_k=3))[0].tolist() == [0, 1, 2, 2]
    greedy, glogp = choose_tokens(logits, None, SamplingParams(4, temperature=0))
    assert greedy.tolist() == [0] * 4
    assert glogp[0].item() == pytest.approx(2 - math.log(sum(math.exp(x) for x in (2, 1, 0, -1))), abs=1e-6)


def test_choose_tokens_frequencies_follow_softmax():
    """4000 rows, uniforms from one generator: frequencies within 0.03 of softmax(z / T); a zero-probability
    token (masked to -inf) is never drawn even at u = 0."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)  # (B, V)
    u = torch.rand(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tokens, _ = choose_tokens(logits, u, SamplingParams(4, temperature=0.5))
    freq = torch.bincount(tokens, minlength=4).double() / 4000
    torch.testing.assert_close(freq, torch.tensor([4.0, 2.0, 0.0, -2.0]).softmax(-1).double(), atol=0.03, rtol=0)
    masked = torch.tensor([[float("-inf"), 1.0, float("-inf"), 0.0]]).repeat(3, 1)
    tokens, _ = choose_tokens(masked, torch.tensor([0.0, 0.5, 0.9999999]), SamplingParams(4, temperature=1.0))
    assert set(tokens.tolist()) <= {1, 3} and tokens[0] == 1 and tokens[2] == 3


def test_peft_model_training_flag_and_bad_input(make_model, prompts, toy_tok):
    from peft import LoraConfig, get_peft_model

    base = make_model(1)
    expected = generate(base, prompts, SamplingParams(6, temperature=1.0), [1] * 5, pad_id=toy_tok.pad_token_id)
    peft = get_peft_model(make_model(1), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft.train()
    got = generate(peft, prompts, SamplingParams(6, temperature=1.0), [1] * 5, pad_id=toy_tok.pad_token_id)
    assert [g[0].ids for g in got] == [e[0].ids for e in expected]  # LoRA B = 0: the base model's function
    assert peft.training  # restored after the call
    with pytest.raises(ValueError, match="needs seeds"):
        generate(base, prompts, SamplingParams(4, temperature=1.0), pad_id=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(base, [[1, 2], []], SamplingParams(4, temperature=0), pad_id=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(4, top_p=0.0)
    assert SamplingParams(4, stop_ids=[3, 3, 1]).stop_ids == (1, 3)


def test_in_place_cache_layer_equals_the_plain_one(lively, prompts):
    """The decoding cache writes new positions into reserved buffers (``_reserve``) instead of ``torch.cat``:
    the same keys and values as the plain layer after prefill, a batch expansion, appends and a row selection,
    and views of the buffers (no copy per step)."""
    from preftune import generation

    ids = torch.tensor([prompts[0][:4], prompts[2][:4]])  # (2, 4)
    with torch.no_grad():
        plain, fast = (lively(input_ids=ids, use_cache=True).past_key_values for _ in range(2))
    generation._reserve(fast, 3)
    assert all(type(layer) is generation._InPlaceLayer for layer in fast.layers)
    g = torch.Generator().manual_seed(0)
    for cache_op in ("repeat", "append", "append", "select", "append", "append"):  # the last append overflows
        if cache_op == "repeat":
            plain.batch_repeat_interleave(2), fast.batch_repeat_interleave(2)
        elif cache_op == "select":
            rows = torch.tensor([3, 0])
            plain.batch_select_indices(rows), fast.batch_select_indices(rows)
        else:
            for a, b in zip(plain.layers, fast.layers):
                k, v = (torch.randn(a.keys.shape[:2] + (1, a.keys.shape[-1]), generator=g) for _ in range(2))
                a.update(k, v), b.update(k.clone(), v.clone())
        for a, b in zip(plain.layers, fast.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert fast.get_seq_length() == plain.get_seq_length() == 8
    assert all(b.keys.data_ptr() == b.key_buffer.data_ptr() for b in fast.layers)  # views, not copies
