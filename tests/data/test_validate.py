"""Each problem is planted at a known line; each finding must name exactly those rows. Clean data: no alarms."""

from __future__ import annotations

import json

import pytest

from preftune.data.formats import DropLog, normalize
from preftune.data.load import read_rows
from preftune.data.report_html import render
from preftune.data.validate import (
    Thresholds,
    kto_weights,
    normalize_text,
    similarity,
    validate,
    validate_records,
)

LONG = ("the quick brown fox jumps over the lazy dog while the cat watches from the warm windowsill "
        "and the birds sing in the old oak tree beside the river")


@pytest.fixture
def dirty(tmp_path, jsonl, pair):
    rows = [pair(i) for i in range(10)]  # lines 1-10: clean
    rows += [
        '{"prompt": "broken", "chosen": ',  # 11 malformed JSON
        b'{"prompt": "bad \xff bytes", "chosen": "a", "rejected": "b"}',  # 12 non-UTF-8
        {"prompt": "Bell?", "chosen": "ring \x07 ring the bell", "rejected": "no bell here at all"},  # 13 control
        {"prompt": "Missing?", "chosen": "only chosen"},  # 14 missing rejected
        {"prompt": "Typed?", "chosen": 42, "rejected": "text"},  # 15 wrong type
        {"prompt": "Empty?", "chosen": "something useful", "rejected": "   \n"},  # 16 empty response
        {"prompt": "Same?", "chosen": "exactly the same", "rejected": "exactly the same"},  # 17 identical
        {"prompt": "Near?", "chosen": LONG, "rejected": LONG.replace("lazy", "sleepy")},  # 18 near-identical
        {"prompt": "Rated?", "chosen": "first option text", "rejected": "second option words",
         "chosen_rating": 2, "rejected_rating": 8},  # 19 swapped by rating
        {"prompt": "Joke?", "chosen": "I'm sorry, but I can't help with that request.",
         "rejected": "Why did the chicken cross the road? To reach the other side."},  # 20 refusal
        {"prompt": "Length?", "chosen": "Yes indeed.", "rejected": LONG + " " + LONG},  # 21 swapped length
        pair(0),  # 22 duplicate of line 1
        {**pair(1), "chosen": pair(1)["rejected"], "rejected": pair(1)["chosen"]},  # 23 contradicts line 2
        "[1, 2, 3]",  # 24 JSON but not an object
    ]
    rows += [pair(i) for i in range(10, 16)]  # 25-30: clean
    return jsonl(tmp_path / "dirty.jsonl", rows)


def _rows(report, name):
    f = report.finding(name)
    assert f is not None, f"{name} not reported; findings: {[x.name for x in report.findings]}"
    return [r.rsplit(":", 1)[1] for r in f.example_rows]


def test_every_planted_problem_is_found_at_its_row(dirty):
    r = validate(dirty, max_examples=50)
    expect = {
        "malformed_line": ["11", "24"], "non_utf8": ["12"], "control_characters": ["13"], "missing_field": ["14"],
        "wrong_type": ["15"], "empty_response": ["16"], "identical": ["17"], "near_identical": ["18"],
        "swapped_rating": ["19"], "swapped_refusal": ["20"], "swapped_length": ["21"], "duplicates": ["22"],
        "contradictions": ["2", "23"],
    }
    for name, lines in expect.items():
        assert _rows(r, name) == lines, name
    flagged = {f.name for f in r.findings if f.severity != "info"}
    assert flagged == set(expect), flagged - set(expect)
    assert r.finding("missing_field").details["by_field"] == {"rejected": 1}
    assert r.finding("wrong_type").details["by_field"] == {"chosen": 1}
    assert r.finding("identical").details["kind"] == {"exact": 1}
    assert r.finding("non_utf8").details["errors"][0].startswith(f"{dirty}:12: not valid UTF-8")
    assert all(f.severity == "error" for f in r.findings if f.name in ("malformed_line", "non_utf8", "missing_field"))
    # rows read 30; unusable = 11, 12, 14, 15, 16, 17, 24 -> 7 (23%) > 10%: unusable
    assert (r.rows_read, r.rows_usable, r.pairs) == (30, 23, 23)
    assert r.finding("malformed_line").total == 30 and r.finding("malformed_line").percent == pytest.approx(100 * 2 / 30)
    assert r.finding("duplicates").total == 23
    assert not r.usable and "7 of 30 rows" in r.unusable_reasons[0]
    assert validate(dirty, thresholds=Thresholds(max_unusable_fraction=0.25)).usable


def test_near_identical_compares_word_order_not_a_bag_of_words(tmp_path, jsonl, pair):
    # LONG has 29 words. Reversed, every word is still there (bag-of-words overlap 1.0), but the longest common
    # run is short: difflib's ratio is 2·3/58 = 0.103, far under the 0.9 threshold: "the man bit the dog" is not
    # "the dog bit the man". One word swapped ("lazy" -> "sleepy") keeps 28 of 29 in order: 2·28/58 = 0.966.
    reversed_long = " ".join(reversed(LONG.split()))
    assert similarity(LONG, reversed_long) == pytest.approx(6 / 58)
    assert similarity(LONG, LONG.replace("lazy", "sleepy")) == pytest.approx(56 / 58)
    rows = [pair(i) for i in range(6)] + [
        {"prompt": "Order?", "chosen": LONG, "rejected": reversed_long},  # 7: same words, another order
        {"prompt": "Near?", "chosen": LONG, "rejected": LONG.replace("lazy", "sleepy")},  # 8: near-identical
    ]
    r = validate(jsonl(tmp_path / "order.jsonl", rows))
    assert _rows(r, "near_identical") == ["8"]
    assert r.finding("identical") is None


def test_example_rows_are_capped_and_in_file_order(tmp_path, jsonl, pair):
    path = jsonl(tmp_path / "d.jsonl", [pair(0)] * 8)
    f = validate(path, max_examples=3).finding("duplicates")
    assert f.count == 7 and f.example_rows == [f"{path}:2", f"{path}:3", f"{path}:4"]


def test_clean_data_raises_no_alarm(tmp_path, jsonl, pair):
    path = jsonl(tmp_path / "clean.jsonl", [pair(i) for i in range(40)])
    r = validate(path, max_length=100)
    assert r.usable and r.errors == [] and r.warnings == []
    assert {f.name for f in r.findings} == {"length_bias", "truncation"}
    assert r.finding("truncation").count == 0
    assert r.stats["length"]["share_chosen_longer"] == 0.5


def test_clean_conversational_and_kto_data_raise_no_alarm(tmp_path, jsonl, pair):
    conv = [{"prompt": [{"role": "user", "content": p["prompt"]}],
             "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in map(pair, range(20))]
    r = validate(jsonl(tmp_path / "conv.jsonl", conv))
    assert r.usable and r.kind == "paired" and r.warnings == [] and r.errors == []
    kto = [{"prompt": p["prompt"], "completion": p["chosen"], "label": i % 2 == 0}
           for i, p in enumerate(map(pair, range(20)))]
    r = validate(jsonl(tmp_path / "kto.jsonl", kto))
    assert r.usable and r.kind == "unpaired" and r.warnings == [] and r.errors == []
    assert r.finding("kto_balance").severity == "info"


def test_implicit_prompt_hh_rows_are_read(tmp_path, jsonl):
    rows = [{"chosen": f"\n\nHuman: q{i}?\n\nAssistant: a good answer {i}",
             "rejected": f"\n\nHuman: q{i}?\n\nAssistant: bad {i}"} for i in range(4)]
    r = validate(jsonl(tmp_path / "hh.jsonl", rows))
    assert r.pairs == 4 and r.errors == [] and r.finding("empty_prompt") is None


def test_length_bias_numbers_and_warning(tmp_path, jsonl):
    ten, five = "w " * 10, "v " * 5
    rows = [{"prompt": f"p{i}", "chosen": ten + str(i), "rejected": five + str(i)} for i in range(8)]
    rows += [{"prompt": f"q{i}", "chosen": five + str(i), "rejected": ten + str(i)} for i in range(2)]
    r = validate(jsonl(tmp_path / "bias.jsonl", rows))
    f = r.finding("length_bias")
    # chosen 11 words vs 6 in 8 pairs (+5), 6 vs 11 in 2 pairs (-5): share 0.8, mean (40 - 10) / 10 = 3, median 5
    assert f.severity == "warning" and (f.count, f.total) == (8, 10)
    assert f.details["share_chosen_longer"] == 0.8
    assert f.details["mean_difference"] == 3.0 and f.details["median_difference"] == 5.0
    assert sum(r.stats["length"]["histogram"]["counts"]) == 10


def test_kto_imbalance_and_weights(tmp_path, jsonl):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}", "label": i < 9} for i in range(12)]
    f = validate(jsonl(tmp_path / "kto.jsonl", rows)).finding("kto_balance")
    # n_D = 9, n_U = 3: ratio 9/3 = 3 > 4/3 with the default weights. What `auto` trains with (the majority keeps
    # 1, the minority rises to put the ratio at 7/6): λ_U = 9 / (7/6 · 3) = 2.5714 -> 1·9 / (2.5714·3) = 1.1667.
    # The λ_D range with λ_U = 1 is [3/9, 4/3 · 3/9] = [0.333, 0.444].
    assert f.severity == "warning" and f.count == 9 and f.total == 12
    assert (f.details["desirable_weight"], f.details["undesirable_weight"]) == (1.0, 2.5714)
    assert f.details["balanced_ratio"] == pytest.approx(7 / 6, abs=1e-4)
    assert f.details["desirable_weight_range"] == [pytest.approx(1 / 3, abs=1e-6), pytest.approx(4 / 9, abs=1e-6)]
    assert "desirable_weight=1, undesirable_weight=2.5714" in f.message
    w = kto_weights(3, 9)  # the minority is desirable: λ_D = 7/6 · 9/3 = 3.5, λ_U = 1; range [3, 4]
    assert (w["desirable_weight"], w["undesirable_weight"]) == (3.5, 1.0) and w["desirable_weight_range"] == [3.0, 4.0]
    assert kto_weights(4, 4)["defaults_in_range"] and kto_weights(5, 4)["defaults_in_range"]  # 5/4 ≤ 4/3
    assert (kto_weights(5, 4)["desirable_weight"], kto_weights(5, 4)["undesirable_weight"]) == (1.0, 1.0)


def test_validate_recommends_what_the_trainer_auto_weights_use():
    # One function answers both (losses.kto.balanced_weights): the trainer's Objective.setup resolves `auto`
    # with it, and data validate reports it, for every class balance.
    from preftune.losses.kto import balanced_weights
    from preftune.trainer.steps import balanced_weights as trainer_weights

    assert trainer_weights is balanced_weights
    for n_d, n_u in [(30, 90), (90, 30), (100, 90), (1, 999), (7, 3)]:
        w = kto_weights(n_d, n_u)
        assert (w["desirable_weight"], w["undesirable_weight"]) == balanced_weights(n_d, n_u)


def test_kto_contradictions_and_duplicates(tmp_path, jsonl):
    rows = [{"prompt": "p", "completion": "c", "label": True}, {"prompt": "q", "completion": "d", "label": True},
            {"prompt": "P ", "completion": "c", "label": False}, {"prompt": "q", "completion": "d", "label": True}]
    r = validate(jsonl(tmp_path / "kto.jsonl", rows), max_examples=10)
    assert _rows(r, "contradictions") == ["1", "3"] and _rows(r, "duplicates") == ["4"]


def test_leakage_between_train_and_eval(tmp_path, jsonl, pair):
    train = jsonl(tmp_path / "train.jsonl", [pair(i) for i in range(6)])
    evaluation = jsonl(tmp_path / "eval.jsonl", [{**pair(3), "prompt": "  QUESTION number 3 about   topic 3? "},
                                                 pair(100)])
    r = validate(train, eval_source=evaluation)
    f = r.finding("leakage")
    assert f.example_rows == [f"{train}:4"] and f.severity == "warning"
    assert f.details["eval_example_rows"] == [f"{evaluation}:1"] and f.details["distinct_prompts"] == 1
    assert validate(train).finding("leakage") is None


def test_truncation_counts_tokens_with_a_tokenizer(tmp_path, jsonl, tiny_tokenizer_dir):
    rows = [{"prompt": "hello", "chosen": "a,b,c,d,e", "rejected": "answer"},  # 1 + 9 tokens, 1 + 1 words
            {"prompt": "hello world", "chosen": "answer", "rejected": "question"}]
    path = jsonl(tmp_path / "t.jsonl", rows)
    words = validate(path, max_length=8)
    assert words.finding("truncation").count == 0 and words.length_unit == "whitespace words"
    toks = validate(path, tokenizer=str(tiny_tokenizer_dir), max_length=8, batch_size=1)
    f = toks.finding("truncation")
    assert f.example_rows == [f"{path}:1"] and f.severity == "warning"
    assert f.details["max_seen"] == 10 and toks.length_unit.startswith("tokens")
    assert toks.stats["length"]["chosen_mean"] == 5.0  # (9 + 1) / 2 tokens


def test_csv_and_in_memory_dataset_sources(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,chosen,rejected,chosen_rating,rejected_rating\n"
                   "p1,good answer,bad answer,9,2\n"
                   "p2,worse answer,better answer,3,7\n"
                   "p3,x,,1,2\n"
                   "p4,fine answer,other answer,,\n"
                   "p5,fine answer,other answer,high,low\n", encoding="utf-8")
    r = validate(csv, max_examples=10)
    assert _rows(r, "swapped_rating") == ["3"] and _rows(r, "empty_response") == ["4"]
    assert _rows(r, "invalid_rating") == ["6"]  # blank cells mean "no rating", words are invalid
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "p", "chosen": "same", "rejected": "same"},
                                     {"prompt": "q", "chosen": "yes sir", "rejected": "no way"}])
    r = validate(ds)
    assert r.finding("identical").example_rows == ["<dataset>:1"] and r.rows_usable == 1


def test_validate_records_for_the_trainer(dirty):
    drops = DropLog()
    records = list(normalize(read_rows(dirty, collect_errors=True), "paired", drops))
    r = validate_records(records, drops, max_examples=50)
    assert (r.rows_read, r.rows_usable) == (30, 23) and not r.usable
    assert _rows(r, "malformed_line") == ["11", "24"] and _rows(r, "non_utf8") == ["12"]
    assert _rows(r, "identical") == ["17"] and _rows(r, "duplicates") == ["22"]
    assert _rows(r, "contradictions") == ["2", "23"] and _rows(r, "swapped_refusal") == ["20"]
    assert r.finding("swapped_rating") is None  # ratings are not part of records
    clean = [rec for rec in records if rec.line <= 10]
    ok = validate_records(clean)
    assert ok.usable and ok.warnings == [] and ok.errors == []


def test_require_usable_and_mixed_kinds(tmp_path, dirty, jsonl, pair):
    from preftune.data.load import DataError

    r = validate(dirty)
    with pytest.raises(DataError, match="training data is unusable: 7 of 30 rows"):
        r.require_usable()
    r.require_usable(allow_unusable=True)
    r = validate(jsonl(tmp_path / "m.jsonl", [pair(0), pair(1), {"prompt": "p", "completion": "c", "label": True}]))
    assert r.kind == "mixed" and r.finding("mixed_kinds").count == 1 and r.usable


def test_report_json_and_html(dirty):
    r = validate(dirty)
    d = json.loads(r.to_json())
    assert d["schema_version"] == 1 and d["usable"] is False and d["rows_read"] == 30
    assert {"name", "severity", "count", "total", "percent", "message", "example_rows", "details"} <= set(
        d["findings"][0])
    html = render(r)
    assert "<svg" in html and "near_identical" in html and "UNUSABLE" in html
    assert "<script" not in html and "src=" not in html and "<link" not in html
    assert "30 rows read, 23 usable" in r.summary()


def test_helpers():
    assert normalize_text("  Héllo\u00a0 WORLD\n") == "héllo world"
    assert normalize_text("ﬁne") == "fine"  # NFKC folds the ligature
    assert similarity("a b c d", "a b c e") == pytest.approx(0.75)


def test_cli_validate_exit_codes_and_reports(tmp_path, dirty, jsonl, pair, cli, capsys):
    clean = jsonl(tmp_path / "clean.jsonl", [pair(i) for i in range(12)])
    assert cli(["validate", str(clean)]) == 0
    assert "USABLE" in capsys.readouterr().out
    out_json, out_html = tmp_path / "r.json", tmp_path / "r.html"
    assert cli(["validate", str(dirty), "--report", str(out_json), "--html", str(out_html)]) == 1
    text = capsys.readouterr().out
    assert "malformed_line" in text and "UNUSABLE" in text
    assert json.loads(out_json.read_text())["usable"] is False and out_html.read_text().startswith("<!doctype html>")
    assert cli(["validate", str(dirty), "--max-unusable", "0.5"]) == 0
    assert cli(["validate", str(dirty), "--max-unusable", "0.5", "--fail-on", "warning"]) == 1
    assert cli(["validate", str(clean), "--fail-on", "warning"]) == 0


def test_cli_validate_unknown_file_is_a_user_error(tmp_path, cli):
    from preftune.errors import PreftuneError

    with pytest.raises(PreftuneError, match="no such file"):
        cli(["validate", str(tmp_path / "missing.jsonl")])


def test_trainer_preflight_judges_the_train_file_alone(tmp_path, jsonl, pair, toy_tok):
    from preftune.config import DataConfig
    from preftune.data.load import DataError
    from preftune.data.prepare import prepare_data
    from preftune.data.tokenize import Tokenization

    # 46 train lines, 6 of them unusable (13% > 10%), and 60 clean eval rows. Counting the eval rows under the
    # train file's name read "106 rows read, 6 unusable (5.7%)" and let this train file through.
    empty = {"prompt": "p", "chosen": "an answer", "rejected": " "}
    train = jsonl(tmp_path / "train.jsonl", [pair(i) for i in range(40)] + [empty] * 6)
    evaluation = jsonl(tmp_path / "eval.jsonl", [pair(100 + i) for i in range(60)])
    lines = []
    with pytest.raises(DataError, match="6 of 46 rows"):
        prepare_data(DataConfig(train=str(train), eval=str(evaluation)), "paired",
                     Tokenization(toy_tok, max_length=64), 0, None, lines.append)
    assert f"data check: {train}: 46 rows read, 40 usable" in lines[0]
