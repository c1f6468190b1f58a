"""Reading preference data from every supported source and format, losing nothing: kept + dropped = read."""

from __future__ import annotations

import csv
import json

import pytest

from preftune.config import DataConfig
from preftune.data.formats import DropLog, PairRecord, normalize
from preftune.data.load import DataError, read_rows
from preftune.data.prepare import prepare_data
from preftune.data.tokenize import Tokenization

ROWS = [
    {"prompt": "repeat : cat dog", "chosen": "cat dog", "rejected": "cat dog , hope this helps !"},
    {"prompt": "echo : red blue pear", "chosen": "red blue pear", "rejected": "red blue plum"},
    {"prompt": "say : owl", "chosen": "owl", "rejected": "owl , hope this helps !"},
]


def pairs_of(source, **kw) -> tuple[list[PairRecord], DropLog]:
    drops = DropLog()
    return list(normalize(read_rows(source, **kw), "paired", drops)), drops


def as_triples(records):
    return [(r.prompt, r.chosen, r.rejected) for r in records]


EXPECTED = [(r["prompt"], r["chosen"], r["rejected"]) for r in ROWS]


# ---- sources -----------------------------------------------------------------------------------------------


def test_jsonl_rows_keep_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n" + json.dumps(ROWS[2]) + "\n")
    records, drops = pairs_of(str(path))
    assert as_triples(records) == EXPECTED
    assert [(r.source, r.line) for r in records] == [(str(path), 1), (str(path), 3), (str(path), 4)]  # blank line 2
    assert (drops.read, drops.dropped) == (3, 0)


def test_json_array_and_wrapped_array(tmp_path):
    plain = tmp_path / "a.json"
    plain.write_text(json.dumps(ROWS))
    wrapped = tmp_path / "b.json"
    wrapped.write_text(json.dumps({"data": ROWS, "version": 2}))
    for path in (plain, wrapped):
        records, _ = pairs_of(str(path))
        assert as_triples(records) == EXPECTED
        assert [r.line for r in records] == [1, 2, 3]


def test_json_suffix_holding_jsonl_is_read_as_jsonl(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert as_triples(pairs_of(str(path))[0]) == EXPECTED


def test_csv(tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(ROWS)
    records, _ = pairs_of(str(path))
    assert as_triples(records) == EXPECTED
    assert [r.line for r in records] == [2, 3, 4]  # the header is line 1


def test_parquet_written_with_pyarrow(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    records, _ = pairs_of(str(path))
    assert as_triples(records) == EXPECTED
    assert [r.line for r in records] == [1, 2, 3]


def test_save_to_disk_directory_dataset_dict_and_in_memory_dataset(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert as_triples(pairs_of(str(tmp_path / "single"))[0]) == EXPECTED
    assert as_triples(pairs_of(str(tmp_path / "dict"))[0]) == EXPECTED
    assert as_triples(pairs_of(str(tmp_path / "dict"), split="test")[0]) == EXPECTED[:1]
    with pytest.raises(DataError, match="no split 'validation'"):
        pairs_of(str(tmp_path / "dict"), split="validation")
    records, _ = pairs_of(ds)
    assert as_triples(records) == EXPECTED and records[0].source == "<dataset>"
    records, _ = pairs_of(list(ROWS))
    assert as_triples(records) == EXPECTED and records[2].line == 3


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        list(read_rows(str(tmp_path / "absent.jsonl")))
    bad = tmp_path / "d.txt"
    bad.write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        list(read_rows(str(bad)))


# ---- malformed lines ---------------------------------------------------------------------------------------


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n" + '{"prompt": "x", "chosen": \n')
    with pytest.raises(DataError) as info:
        list(read_rows(str(path)))
    assert str(info.value).startswith(f"{path}:3: malformed JSON")


@pytest.mark.parametrize(("line", "why"), [(b"[1, 2]", "expected a JSON object, got list"),
                                           (b'{"prompt": "caf\xe9"}', "not valid UTF-8")])
def test_non_object_and_bad_utf8_lines_name_their_line(tmp_path, line, why):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + line + b"\n")
    with pytest.raises(DataError, match=rf"^{path}:2: {why}"):
        list(read_rows(str(path)))


def test_collected_malformed_line_is_a_counted_drop(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    records, drops = pairs_of(str(path), collect_errors=True)
    assert len(records) == 1 and drops.read == 2
    assert [(r["line"], r["reason"].split(":")[0]) for r in drops.rows] == [(2, "malformed_line")]


# ---- formats -----------------------------------------------------------------------------------------------


def msgs(*turns):
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


def test_conversational_explicit_prompt():
    row = {"prompt": msgs("repeat : cat"), "chosen": [{"role": "assistant", "content": "cat"}],
           "rejected": [{"role": "assistant", "content": "dog"}]}
    (rec,), drops = pairs_of([row])
    assert rec.prompt == msgs("repeat : cat")
    assert rec.chosen == [{"role": "assistant", "content": "cat"}]
    assert drops.dropped == 0


def test_conversational_string_prompt_becomes_a_user_turn():
    row = {"prompt": "repeat : cat", "chosen": [{"role": "assistant", "content": "cat"}],
           "rejected": [{"role": "assistant", "content": "dog"}]}
    (rec,), _ = pairs_of([row])
    assert rec.prompt == [{"role": "user", "content": "repeat : cat"}]


def test_conversational_implicit_prompt_is_longest_common_prefix():
    # Two shared turns and a shared user turn; the dialogues differ only in the final assistant turn.
    shared = msgs("repeat : cat", "cat", "now : dog")
    row = {"chosen": shared + [{"role": "assistant", "content": "dog"}],
           "rejected": shared + [{"role": "assistant", "content": "dog , hope this helps !"}]}
    (rec,), _ = pairs_of([row])
    assert rec.prompt == shared
    assert rec.chosen == [{"role": "assistant", "content": "dog"}]
    assert rec.rejected == [{"role": "assistant", "content": "dog , hope this helps !"}]


def test_conversational_implicit_prompt_never_ends_in_an_assistant_turn():
    # The final assistant turns share a first message; the prompt stops before the assistant side.
    row = {"chosen": msgs("q", "same") + [{"role": "assistant", "content": "a"}],
           "rejected": msgs("q", "same") + [{"role": "assistant", "content": "b"}]}
    (rec,), _ = pairs_of([row])
    assert rec.prompt == msgs("q")
    assert rec.chosen[0] == {"role": "assistant", "content": "same"}


def test_implicit_text_prompt_cut_at_assistant_marker():
    row = {"chosen": "Human: repeat : cat\n\nAssistant: cat", "rejected": "Human: repeat : cat\n\nAssistant: cow"}
    (rec,), _ = pairs_of([row])
    assert rec.prompt == "Human: repeat : cat\n\nAssistant:"
    assert (rec.chosen, rec.rejected) == (" cat", " cow")


# ---- drops: counted, printed, written; kept + dropped = read ------------------------------------------------


@pytest.fixture
def dirty_rows(train_pairs):
    good = train_pairs[:60]
    bad = [
        {"prompt": "repeat : cat", "rejected": "dog"},  # missing_field:chosen
        {"prompt": "repeat : cat", "chosen": 5, "rejected": "dog"},  # wrong_type:chosen
        {"prompt": "repeat : cat", "chosen": "cat", "rejected": "  \n\t "},  # empty_response
        {"prompt": "repeat : cat", "chosen": "cat dog", "rejected": "cat dog"},  # identical_responses
        {"prompt": "repeat : " + " ".join(["cat"] * 80), "chosen": "cat", "rejected": "dog"},  # prompt_too_long
    ]
    rows = good[:10] + bad + good[10:]
    return rows, {i + 1: reason for i, reason in enumerate(
        ["missing_field:chosen", "wrong_type:chosen", "empty_response", "identical_responses", "prompt_too_long"],
        start=10)}


def test_drops_counted_printed_and_written_with_source_line(tmp_path, toy_tok, dirty_rows, write_jsonl, quiet_log):
    rows, expected = dirty_rows
    path = write_jsonl(tmp_path / "dirty.jsonl", rows)
    out = tmp_path / "run"
    tokenization = Tokenization(toy_tok, max_length=64)
    train, evals, drops = prepare_data(DataConfig(train=str(path)), "paired", tokenization, 0, out, quiet_log)

    assert drops.read == len(rows) == 65
    assert len(train) + len(evals) + drops.dropped == drops.read  # kept + dropped = read
    assert len(train) == 60 and len(evals) == 0
    assert dict(drops.counts) == {reason: 1 for reason in expected.values()}

    written = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    assert {(w["line"], w["reason"]) for w in written} == set(expected.items())
    assert all(w["source"] == str(path) for w in written)
    by_line = {w["line"]: w for w in written}
    assert by_line[13]["row"]["rejected"] == "  \n\t "  # the row itself is kept for the user

    summary = next(line for line in quiet_log if line.startswith("data: read"))
    assert "read 65 rows, kept 60, dropped 5" in summary
    for reason in expected.values():
        assert f"{reason}: 1" in summary
    assert any(str(out / "dropped.jsonl") in line for line in quiet_log)


def test_eval_fraction_holds_out_without_losing_rows(toy_tok, train_pairs, quiet_log):
    tokenization = Tokenization(toy_tok, max_length=64)
    train, evals, drops = prepare_data(DataConfig(train=train_pairs[:40], eval_fraction=0.25), "paired",
                                       tokenization, 0, None, quiet_log)
    assert (len(train), len(evals), drops.read, drops.dropped) == (30, 10, 40, 0)
    train_prompts = {tuple(e.prompt_ids) for e in train.examples}
    assert not train_prompts & {tuple(e.prompt_ids) for e in evals.examples}


def test_malformed_line_stops_training_data_with_file_and_line(tmp_path, toy_tok, train_pairs, write_jsonl):
    path = write_jsonl(tmp_path / "d.jsonl", train_pairs[:3])
    with open(path, "a") as f:
        f.write('{"prompt": "x", "chosen": "y",\n')
    with pytest.raises(DataError, match=rf"^{path}:4: malformed JSON"):
        prepare_data(DataConfig(train=str(path)), "paired", Tokenization(toy_tok, max_length=64), 0, None,
                     lambda *_: None)


def test_in_memory_rows_do_not_flood_the_log(toy_tok, train_pairs, quiet_log):
    prepare_data(DataConfig(train=train_pairs[:40]), "paired", Tokenization(toy_tok, max_length=64), 0, None,
                 quiet_log)
    assert max(len(line) for line in quiet_log) < 500
