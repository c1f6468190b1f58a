"""convert: each direction on tiny inputs with exact expected outputs; read = converted + dropped."""

from __future__ import annotations

import random

import pytest

from preftune.data.convert import (
    convert,
    convert_row,
    detect_format,
    parse_hh,
    render_hh,
    ultrafeedback_pairs,
)
from preftune.data.formats import Skip
from preftune.errors import PreftuneError


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


HH = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?",
      "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away."}
HH_MULTI = {"chosen": "\n\nHuman: A?\n\nAssistant: B.\n\nHuman: C?\n\nAssistant: D is right.",
            "rejected": "\n\nHuman: A?\n\nAssistant: B.\n\nHuman: C?\n\nAssistant: E, wrong."}
STANDARD = {"prompt": "Hi there", "chosen": "Hello! How can I help?", "rejected": "Go away.", "id": 7}
CONVERSATIONAL = {"prompt": [U("Hi there")], "chosen": [A("Hello! How can I help?")], "rejected": [A("Go away.")],
                  "id": 7}
UF = {"instruction": "Q", "source": "x", "completions": [
    {"response": "r1", "overall_score": 3}, {"response": "r2", "overall_score": 9},
    {"response": "r3", "overall_score": 5}]}


def test_detect_format():
    assert detect_format(HH) == "hh" and detect_format(STANDARD) == "standard"
    assert detect_format(CONVERSATIONAL) == "conversational" and detect_format(UF) == "ultrafeedback"
    assert detect_format({"prompt": "p", "completion": "c", "label": True}) == "kto"
    with pytest.raises(Skip, match="unknown_format"):
        detect_format({"text": "x"})


def test_hh_parse_and_render_round_trip():
    msgs = parse_hh(HH_MULTI["chosen"])
    assert msgs == [U("A?"), A("B."), U("C?"), A("D is right.")]
    assert render_hh(msgs) == HH_MULTI["chosen"]
    with pytest.raises(Skip, match="no_turn_markers"):
        parse_hh("just text")


def test_hh_to_standard_and_conversational():
    assert convert_row(HH, to="standard") == [{"prompt": "Hi there", "chosen": "Hello! How can I help?",
                                               "rejected": "Go away."}]
    assert convert_row(HH, to="standard", prompt_style="hh") == [
        {"prompt": "\n\nHuman: Hi there\n\nAssistant:", "chosen": " Hello! How can I help?", "rejected": " Go away."}]
    assert convert_row(HH_MULTI, to="conversational") == [
        {"prompt": [U("A?"), A("B."), U("C?")], "chosen": [A("D is right.")], "rejected": [A("E, wrong.")]}]
    with pytest.raises(Skip, match="multi_turn_prompt"):
        convert_row(HH_MULTI, to="standard")


def test_conversational_and_standard_both_ways_and_back_to_hh():
    assert convert_row(STANDARD, to="conversational") == [CONVERSATIONAL]
    assert convert_row(CONVERSATIONAL, to="standard") == [STANDARD]
    conv = convert_row(HH_MULTI, to="conversational")[0]
    assert convert_row(conv, to="hh") == [HH_MULTI]


def test_paired_to_kto():
    assert convert_row(STANDARD, to="kto") == [
        {"prompt": "Hi there", "completion": "Hello! How can I help?", "label": True, "id": 7},
        {"prompt": "Hi there", "completion": "Go away.", "label": False, "id": 7}]
    assert convert_row(CONVERSATIONAL, to="kto")[1] == {"prompt": [U("Hi there")], "completion": [A("Go away.")],
                                                        "label": False, "id": 7}


def test_ultrafeedback_pairings():
    assert convert_row(UF, to="standard") == [
        {"prompt": "Q", "chosen": "r2", "rejected": "r1", "source": "x", "score_chosen": 9.0, "score_rejected": 3.0}]
    pairs = ultrafeedback_pairs(UF, pairing="all", min_margin=2)
    # margins: r2-r1 = 6, r3-r1 = 2, r2-r3 = 4, in input order (i < j), oriented by rating
    assert pairs == [("Q", "r2", "r1", 9.0, 3.0), ("Q", "r3", "r1", 5.0, 3.0), ("Q", "r2", "r3", 9.0, 5.0)]
    assert [p[1:3] for p in ultrafeedback_pairs(UF, pairing="all", min_margin=3)] == [("r2", "r1"), ("r2", "r3")]
    picks = {ultrafeedback_pairs(UF, pairing="best-vs-random", rng=random.Random(s))[0][2] for s in range(20)}
    assert picks == {"r1", "r3"}
    a = [ultrafeedback_pairs(UF, pairing="best-vs-random", rng=random.Random(3)) for _ in range(2)]
    assert a[0] == a[1]
    with pytest.raises(Skip, match="no_pair_with_rating_margin"):
        ultrafeedback_pairs({"prompt": "Q", "responses": ["a", "b"], "ratings": [5, 5]})
    assert ultrafeedback_pairs({"prompt": "Q", "responses": ["a", "b"], "ratings": [1, 4]}) == [
        ("Q", "b", "a", 4.0, 1.0)]
    with pytest.raises(Skip, match="no_pair_with_rating_margin"):
        ultrafeedback_pairs(UF, min_margin=7)


def test_convert_file_accounts_for_every_row(tmp_path, jsonl, read):
    src = jsonl(tmp_path / "in.jsonl", [HH, HH_MULTI, UF, STANDARD, '{"bad json',
                                        {"prompt": "p", "completion": "c", "label": True},
                                        {"chosen": "\n\nHuman: x\n\nAssistant: same", "rejected":
                                         "\n\nHuman: x\n\nAssistant: same"}])
    out = tmp_path / "out.jsonl"
    res = convert(src, out, to="conversational")
    assert (res.read, res.converted, res.dropped, res.written) == (7, 4, 3, 4)
    dropped = read(tmp_path / "out.dropped.jsonl")
    assert [(d["line"], d["reason"].split(":")[0]) for d in dropped] == [
        (5, "malformed_line"), (6, "unpaired_row_cannot_be_paired"), (7, "identical_responses")]
    assert read(out)[0] == {"prompt": [U("Hi there")], "chosen": [A("Hello! How can I help?")],
                            "rejected": [A("Go away.")]}
    res = convert(src, tmp_path / "k.jsonl", to="kto")
    assert res.written == 8 and res.converted + res.dropped == res.read


def test_cli_convert(tmp_path, jsonl, cli, capsys, read):
    src = jsonl(tmp_path / "uf.jsonl", [UF])
    out = tmp_path / "pairs.jsonl"
    assert cli(["convert", str(src), "--to", "standard", "--out", str(out), "--pairing", "all"]) == 0
    assert "read 1, converted 1, dropped 0; wrote 3 records" in capsys.readouterr().out
    assert len(read(out)) == 3
    with pytest.raises(PreftuneError, match="unknown pairing"):
        convert(src, out, to="standard", pairing="best")


def S(text):
    return {"role": "system", "content": text}


def test_system_and_user_prompt_to_standard_keeps_the_system_text(toy_tok):
    row = {"prompt": [S("this helps !"), U("say : cat dog")], "chosen": [A("cat dog")], "rejected": [A("dog")]}
    (out,) = convert_row(row, to="standard")  # was dropped as multi_turn_prompt
    assert out == {"prompt": "this helps !\n\nsay : cat dog", "chosen": "cat dog", "rejected": "dog"}
    implicit = {"chosen": [S("this helps !"), U("say : cat dog"), A("cat dog")],
                "rejected": [S("this helps !"), U("say : cat dog"), A("dog")]}
    assert convert_row(implicit, to="standard") == [out]  # the prompt is the shared system + user turns
    assert convert_row({**row, "prompt": [S("   "), U("say : cat dog")]}, to="standard")[0]["prompt"] == \
        "say : cat dog"
    # What the trainer makes of it (toy word-level tokenizer): a text prompt is tokenized as it stands, with BOS
    # and the system text first; the completions follow as plain text with EOS.
    from preftune.data.formats import to_pair
    from preftune.data.tokenize import Tokenization

    tokenized = Tokenization(toy_tok, max_length=64).pair(to_pair(out))
    assert toy_tok.convert_ids_to_tokens(tokenized.prompt_ids) == ["<bos>", "this", "helps", "!", "say", ":",
                                                                   "cat", "dog"]
    assert toy_tok.convert_ids_to_tokens(tokenized.chosen_ids) == ["cat", "dog", "<eos>"]
    # A prompt with an earlier assistant turn still cannot be one plain text.
    with pytest.raises(Skip, match="multi_turn_prompt"):
        convert_row({**row, "prompt": [S("s"), U("a"), A("b"), U("c")]}, to="standard")


def test_convert_refuses_to_write_over_its_input(tmp_path, jsonl):
    src = jsonl(tmp_path / "in.jsonl", [STANDARD])
    with pytest.raises(PreftuneError, match="is the input"):
        convert(src, src, to="conversational")
    assert "Hi there" in src.read_text()
