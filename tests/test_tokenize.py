"""Tokenization and collation: prompt / completion split, EOS, truncation, chat template, completion-only targets."""

from __future__ import annotations

import pytest
import torch

from preftune.data.collate import collate_padded
from preftune.data.formats import PairRecord, Skip, UnpairedRecord
from preftune.data.tokenize import Tokenization, TokenizedPair


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def eos_template_tok():
    """The toy tokenizer with a chat template that ends every turn with the EOS token itself."""
    from preftune import toy

    tok = toy.build_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    return tok


# ---- text format -------------------------------------------------------------------------------------------


def test_text_pair_prompt_has_bos_completion_gets_one_eos(toy_tok):
    t = Tokenization(toy_tok, max_length=64)
    pair = t.pair(PairRecord("repeat : cat dog", "cat dog", "cat dog , hope this helps !"))
    eos, bos = toy_tok.eos_token_id, toy_tok.bos_token_id
    assert pair.prompt_ids == [bos] + ids(toy_tok, "repeat : cat dog")
    assert pair.chosen_ids == ids(toy_tok, "cat dog") + [eos]
    assert pair.rejected_ids == ids(toy_tok, "cat dog , hope this helps !") + [eos]
    assert toy_tok.unk_token_id not in pair.prompt_ids + pair.chosen_ids + pair.rejected_ids


def test_text_completion_already_ending_in_eos_is_not_doubled(toy_tok):
    t = Tokenization(toy_tok, max_length=64)
    pair = t.pair(PairRecord("repeat : cat", "cat <eos>", "dog"))
    assert pair.chosen_ids == ids(toy_tok, "cat") + [toy_tok.eos_token_id]
    assert pair.chosen_ids.count(toy_tok.eos_token_id) == 1


# ---- conversational format ---------------------------------------------------------------------------------


def test_chat_template_applied_to_conversational_pairs(toy_tok):
    t = Tokenization(toy_tok, max_length=64)
    pair = t.pair(PairRecord(user("repeat : cat"), assistant("cat"), assistant("dog")))
    prompt_text = toy_tok.apply_chat_template(user("repeat : cat"), tokenize=False, add_generation_prompt=True)
    assert prompt_text.startswith("<|user|>") and prompt_text.rstrip().endswith("<|assistant|>")
    assert pair.prompt_ids == ids(toy_tok, prompt_text)  # the template's own markers; no BOS added on top
    assert toy_tok.bos_token_id not in pair.prompt_ids
    end, eos = toy_tok.convert_tokens_to_ids("<|end|>"), toy_tok.eos_token_id
    # The toy template closes a turn with <|end|>, not EOS, so EOS is appended after it.
    assert pair.chosen_ids == ids(toy_tok, "cat") + [end, eos]
    assert pair.rejected_ids == ids(toy_tok, "dog") + [end, eos]
    full = toy_tok.apply_chat_template(user("repeat : cat") + assistant("cat"), tokenize=False)
    assert pair.prompt_ids + pair.chosen_ids[:-1] == ids(toy_tok, full)


def test_eos_not_duplicated_when_template_ends_turn_with_eos(eos_template_tok):
    tok = eos_template_tok
    t = Tokenization(tok, max_length=64)
    pair = t.pair(PairRecord(user("repeat : cat"), assistant("cat"), assistant("dog")))
    eos = tok.eos_token_id
    assert pair.chosen_ids == ids(tok, "cat") + [eos]
    assert pair.rejected_ids == ids(tok, "dog") + [eos]


def test_multi_turn_prompt_goes_through_template(toy_tok):
    t = Tokenization(toy_tok, max_length=64)
    prompt = user("repeat : cat") + assistant("cat") + user("repeat : dog")
    pair = t.pair(PairRecord(prompt, assistant("dog"), assistant("cow")))
    assert pair.prompt_ids == ids(toy_tok, toy_tok.apply_chat_template(prompt, tokenize=False,
                                                                       add_generation_prompt=True))
    assert pair.prompt_ids.count(toy_tok.convert_tokens_to_ids("<|user|>")) == 2


def test_conversational_record_without_template_is_dropped(toy_tok):
    from preftune import toy

    tok = toy.build_tokenizer()
    tok.chat_template = None
    with pytest.raises(Skip, match="no_chat_template"):
        Tokenization(tok, max_length=64).pair(PairRecord(user("repeat : cat"), assistant("cat"), assistant("dog")))


# ---- truncation --------------------------------------------------------------------------------------------

WORDS = "apple banana cherry grape lemon mango melon peach pear plum".split()


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_max_prompt_length_truncates_the_chosen_end(toy_tok, mode):
    t = Tokenization(toy_tok, max_length=64, max_prompt_length=4, truncation_mode=mode)
    full = [toy_tok.bos_token_id] + ids(toy_tok, " ".join(WORDS))
    pair = t.pair(PairRecord(" ".join(WORDS), "cat", "dog"))
    assert pair.prompt_ids == (full[-4:] if mode == "keep_end" else full[:4])
    assert t.stats.truncated["prompt"] == 1
    assert "prompt 1" in t.stats.summary()


def test_completion_truncated_to_max_length_and_loses_eos(toy_tok):
    t = Tokenization(toy_tok, max_length=8)
    pair = t.pair(PairRecord("repeat : cat", " ".join(WORDS), "dog"))  # prompt is 4 tokens
    assert len(pair.prompt_ids) == 4
    assert pair.chosen_ids == ids(toy_tok, " ".join(WORDS))[:4]  # keep the start of a response
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == 8
    assert pair.rejected_ids == ids(toy_tok, "dog") + [toy_tok.eos_token_id]  # short side untouched
    assert t.stats.truncated["completion"] == 1


def test_prompt_alone_over_max_length_is_dropped(toy_tok):
    t = Tokenization(toy_tok, max_length=8)
    with pytest.raises(Skip, match="prompt_too_long"):
        t.pair(PairRecord(" ".join(WORDS), "cat", "dog"))
    # a prompt that leaves room for at least one completion token is kept
    assert len(t.pair(PairRecord(" ".join(WORDS[:6]), "cat", "dog")).prompt_ids) == 7


def test_pair_identical_after_truncation_is_dropped(toy_tok):
    t = Tokenization(toy_tok, max_length=6)
    with pytest.raises(Skip, match="identical_after_truncation"):
        t.pair(PairRecord("repeat : cat", "cat dog cow", "cat dog pig"))


def test_fingerprint_changes_with_rules(toy_tok):
    a = Tokenization(toy_tok, max_length=64).fingerprint
    assert a == Tokenization(toy_tok, max_length=64).fingerprint
    assert a != Tokenization(toy_tok, max_length=32).fingerprint
    assert a != Tokenization(toy_tok, max_length=64, max_prompt_length=8).fingerprint
    assert a != Tokenization(toy_tok, max_length=64, max_prompt_length=8, truncation_mode="keep_start").fingerprint


# ---- collate: targets only at completion positions ---------------------------------------------------------


def test_padded_collate_targets_only_completion_tokens(toy_tok):
    t = Tokenization(toy_tok, max_length=64)
    pairs = [t.pair(PairRecord("repeat : cat dog", "cat dog", "cat dog , hope this helps !")),
             t.pair(PairRecord("say : owl", "owl", "cow")),
             t.pair(PairRecord(user("echo : red blue"), assistant("red blue"), assistant("red pear")))]
    pad = toy_tok.pad_token_id
    batch = collate_padded(pairs, pad)
    seqs = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    rows, width = batch.input_ids.shape
    assert (rows, batch.num_sequences) == (6, 6)
    assert width == max(len(p) + len(c) for p, c in seqs)
    assert batch.num_tokens == sum(len(p) + len(c) for p, c in seqs)

    # Every completion token is predicted exactly once, from the position just before it; nothing else is.
    expected = set()
    for s, (p, c) in enumerate(seqs):
        assert batch.input_ids[s, : len(p) + len(c)].tolist() == p + c
        assert batch.input_ids[s, len(p) + len(c) :].eq(pad).all()
        assert batch.attention_mask[s].tolist() == [1] * (len(p) + len(c)) + [0] * (width - len(p) - len(c))
        expected |= {(s, len(p) + j) for j in range(len(c))}
    got = set()
    for index, target, seq in zip(batch.target_index.tolist(), batch.target_ids.tolist(), batch.target_seq.tolist()):
        row, col = divmod(index, width)
        assert row == seq
        assert batch.input_ids[row, col + 1].item() == target  # the logits at col predict token col + 1
        got.add((row, col + 1))
    assert len(got) == len(batch.target_index) == sum(len(c) for _, c in seqs)
    assert got == expected  # completion positions only: no prompt token, no padding
    assert batch.position_ids[0].tolist() == list(range(width))


def test_collate_singles_keeps_order(toy_tok):
    t = Tokenization(toy_tok, max_length=64)
    singles = [t.single(UnpairedRecord("say : owl", "owl", True)), t.single(UnpairedRecord("say : cat", "dog", False))]
    batch = collate_padded(singles, toy_tok.pad_token_id)
    assert batch.num_sequences == 2
    counts = torch.bincount(batch.target_seq, minlength=2).tolist()
    assert counts == [len(s.completion_ids) for s in singles]
    assert isinstance(t.pair(PairRecord("say : owl", "owl", "cow")), TokenizedPair)
