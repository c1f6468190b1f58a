"""clean: kept + dropped = read, every dropped row with its source line and reason; fixes instead of drops."""

from __future__ import annotations

import json
import os

import pytest

from preftune.data.clean import clean, dropped_path_for, parse_names
from preftune.data.validate import CHECKS, STRUCTURAL, validate
from preftune.errors import PreftuneError


@pytest.fixture
def dirty(tmp_path, jsonl, pair):
    rows = [pair(i) for i in range(4)]  # 1-4
    rows += [
        '{"broken": ',  # 5 malformed
        {"prompt": "Same?", "chosen": "Same answer", "rejected": "same   answer"},  # 6 identical (normalized)
        pair(0),  # 7 duplicate of 1
        {**pair(1), "chosen": pair(1)["rejected"], "rejected": pair(1)["chosen"]},  # 8 contradicts 2
        {"prompt": "Rated", "chosen": "first words here", "rejected": "other text there",
         "chosen_rating": 1, "rejected_rating": 5},  # 9 swapped by rating
        {"prompt": "Margin", "chosen": "small edge answer", "rejected": "close other reply",
         "chosen_rating": 5, "rejected_rating": 4.5},  # 10 margin 0.5
        {"prompt": "Ctrl", "chosen": "has a \x1b escape", "rejected": "plain text answer"},  # 11 control char
        {"prompt": "Gone"},  # 12 missing fields
    ]
    return jsonl(tmp_path / "dirty.jsonl", rows)


def _lines(rows):
    return [r["line"] for r in rows]


def test_default_drop_set_and_accounting(tmp_path, dirty, read):
    out = tmp_path / "clean.jsonl"
    res = clean(dirty, out)
    assert (res.read, res.kept, res.dropped) == (12, 6, 6)
    assert res.kept + res.dropped == res.read
    kept, dropped = read(out), read(dropped_path_for(out))
    assert len(kept) == res.kept and len(dropped) == res.dropped
    assert _lines(dropped) == [2, 5, 6, 7, 8, 12]
    by_line = {d["line"]: d for d in dropped}
    assert by_line[5]["reason"].startswith("malformed_line") and by_line[5]["row"] == '{"broken": '
    assert by_line[6]["reason"] == "identical" and by_line[7]["reason"] == "duplicates"
    assert by_line[2]["reason"] == by_line[8]["reason"] == "contradictions"
    assert by_line[12]["reason"] == "missing_field:chosen" and by_line[12]["row"] == {"prompt": "Gone"}
    assert all(d["source"] == str(dirty) for d in dropped)
    assert [k["prompt"] for k in kept][:2] == ["Question number 0 about topic 0?", "Question number 2 about topic 2?"]
    assert res.reasons == {"contradictions": 2, "malformed_line": 1, "identical": 1, "duplicates": 1,
                           "missing_field": 1}


def test_drop_none_keeps_all_usable_rows_and_all_drops_more(tmp_path, dirty, read):
    res = clean(dirty, tmp_path / "a.jsonl", drop="none")
    assert (res.kept, res.dropped) == (10, 2)  # only the malformed line and the row without fields
    res = clean(dirty, tmp_path / "b.jsonl", drop="all")
    dropped = read(tmp_path / "b.dropped.jsonl")
    assert _lines(dropped) == [2, 5, 6, 7, 8, 9, 11, 12] and res.kept + res.dropped == 12
    assert {d["line"]: d["reason"] for d in dropped}[9] == "swapped_rating"


def test_min_margin_and_fixes(tmp_path, dirty, read):
    out = tmp_path / "m.jsonl"
    res = clean(dirty, out, drop="none", min_margin=1.0, fix="swapped_rating,control_characters")
    dropped = {d["line"]: d["reason"] for d in read(dropped_path_for(out))}
    assert dropped[10] == "margin_below:1" and 9 not in dropped  # swapped row fixed: margin 5 - 1 = 4
    kept = {k["prompt"]: k for k in read(out)}
    assert kept["Rated"]["chosen"] == "other text there" and kept["Rated"]["chosen_rating"] == 5
    assert kept["Ctrl"]["chosen"] == "has a  escape"
    assert res.fixed == {"swapped_rating": 1, "control_characters": 1}
    # 10 usable rows, 2 of them rated: 8 kept without ratings
    assert res.unrated == 8 and res.kept + res.dropped == res.read == 12


def test_names_are_checked(tmp_path, dirty):
    assert parse_names("swapped,duplicate", ["swapped_rating", "swapped_refusal", "swapped_length",
                                              "duplicates"], "finding") == (
        "swapped_rating", "swapped_refusal", "swapped_length", "duplicates")
    with pytest.raises(PreftuneError, match="unknown finding 'dupes'"):
        clean(dirty, tmp_path / "x.jsonl", drop="dupes")
    with pytest.raises(PreftuneError, match="--eval"):
        clean(dirty, tmp_path / "x.jsonl", drop="leakage")
    from preftune.data.clean import DROPPABLE

    assert set(DROPPABLE) <= set(CHECKS) and not set(DROPPABLE) & set(STRUCTURAL)


def test_leakage_drop(tmp_path, jsonl, pair, read):
    train = jsonl(tmp_path / "t.jsonl", [pair(i) for i in range(5)])
    ev = jsonl(tmp_path / "e.jsonl", [pair(2)])
    res = clean(train, tmp_path / "c.jsonl", drop="leakage", eval_source=ev)
    assert (res.kept, res.dropped) == (4, 1) and read(tmp_path / "c.dropped.jsonl")[0]["line"] == 3


def test_cli_prints_the_three_numbers(tmp_path, dirty, cli, capsys):
    out = tmp_path / "clean.jsonl"
    assert cli(["clean", str(dirty), "--out", str(out), "--drop", "identical,duplicates"]) == 0
    text = capsys.readouterr().out
    assert "read 12, kept 8, dropped 4" in text
    assert dropped_path_for(out).exists() and dropped_path_for(out).name == "clean.dropped.jsonl"


def test_csv_record_with_more_cells_than_the_header_keeps_its_text(tmp_path, read):
    src = tmp_path / "d.csv"
    src.write_text("prompt,chosen,rejected\np1,good answer,bad answer\np2,x,y,SURPLUS\n", encoding="utf-8")
    res = clean(src, tmp_path / "c.jsonl")
    (dropped,) = read(tmp_path / "c.dropped.jsonl")
    assert (res.read, res.kept, res.dropped) == (2, 1, 1)
    assert dropped["line"] == 3 and dropped["reason"] == "malformed_line: more cells than header columns"
    assert dropped["row"] == "p2,x,y,SURPLUS"  # was null: the row could not be found again


def _strict(text):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def test_nan_and_infinity_are_written_as_null_with_a_flag(tmp_path, jsonl):
    src = jsonl(tmp_path / "nan.jsonl", [
        '{"prompt": "p", "chosen": "good answer", "rejected": "bad answer", "chosen_rating": NaN, "w": [1, Infinity]}',
        '{"prompt": "q", "chosen": "nice reply", "rejected": "rude reply", "extra": -Infinity}',
        '{"prompt": "r", "chosen": "same", "rejected": "same", "score": NaN}',  # identical: dropped
    ])
    out = tmp_path / "c.jsonl"
    clean(src, out)
    kept = _strict(out.read_text())  # Python's json writes NaN / Infinity by default: these loads would fail
    assert kept[0]["chosen_rating"] is None and kept[0]["w"] == [1, None]
    assert kept[0]["non_finite"] == ["chosen_rating", "w[1]"] and kept[1]["non_finite"] == ["extra"]
    (dropped,) = _strict(dropped_path_for(out).read_text())
    assert dropped["row"]["score"] is None and dropped["non_finite"] == ["row.score"]
    report = validate(src)
    report.stats["planted"] = float("nan")
    (d,) = _strict(report.to_json(indent=None))
    assert d["stats"]["planted"] is None and d["non_finite"] == ["stats.planted"]


def test_out_may_not_be_the_input_under_any_name(tmp_path, dirty):
    before = dirty.read_bytes()
    with pytest.raises(PreftuneError, match="is the input"):
        clean(dirty, dirty)
    link = tmp_path / "link.jsonl"
    link.symlink_to(dirty)
    with pytest.raises(PreftuneError, match="another name"):
        clean(dirty, link)
    hard = tmp_path / "hard.jsonl"
    os.link(dirty, hard)
    with pytest.raises(PreftuneError, match="another name"):
        clean(hard, dirty)
    assert dirty.read_bytes() == before
    src = tmp_path / "rows.dropped.jsonl"
    src.write_bytes(before)
    with pytest.raises(PreftuneError, match="is the input"):
        clean(src, tmp_path / "rows.jsonl")  # rows.jsonl's dropped rows would go to rows.dropped.jsonl
