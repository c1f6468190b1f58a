"""Data at scale: several sources with mixing weights, globs and hub ids, tokenization cached across runs
(``datasets.map``), chat templates and tools, the pre-flight check on rows that would all drop, and streaming."""

from __future__ import annotations

import copy
import json
import math
from collections import Counter

import numpy as np
import pytest

import preftune
from preftune.config import DataConfig, to_config
from preftune.data.formats import DropLog, PairRecord
from preftune.data.load import DataError, parse_hub_id, read_rows
from preftune.data.prepare import prepare_data
from preftune.data.sources import mixture_order, source_problems
from preftune.data.stream import Cursor, StreamSplit, shuffled
from preftune.data.tokenize import Tokenization
from preftune.errors import ConfigError
from preftune.runlog import read_metrics
from preftune.trainer.source import StaticSource

pytestmark = pytest.mark.usefixtures("one_thread")


def within_binomial(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    """|count − n·p| ≤ 4σ with σ = √(n·p·(1−p)): a mixture whose draws follow p fails this about once in 16,000."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_mixture_order_draws_sources_by_weight():
    """Sources of 40 and 400 examples with weights 0.7 / 0.3: over 10 epochs of 440 draws, 70% come from the
    small source (repeated about 7.7 times per epoch), whatever the sizes. n = 4400, p = 0.7: σ = √(4400·0.21)
    = 30.4, so the count must lie within 3080 ± 122."""
    groups = np.array([0] * 40 + [1] * 400)
    counts = Counter()
    for epoch in range(10):
        order = mixture_order(groups, [0.7, 0.3], seed=3, epoch=epoch)
        assert len(order) == 440 and set(order) <= set(range(440))
        counts.update(groups[order].tolist())
        small = [i for i in order if i < 40]
        assert sorted(Counter(small).values())[-1] - sorted(Counter(small).values())[0] <= 1  # passes, not luck
    assert within_binomial(counts[0], 4400, 0.7), counts
    assert mixture_order(groups, [0.7, 0.3], 3, 0) == mixture_order(groups, [0.7, 0.3], 3, 0)
    assert mixture_order(groups, [0.7, 0.3], 3, 0) != mixture_order(groups, [0.7, 0.3], 3, 1)


def test_weighted_sources_reach_the_training_batches(tmp_path, toy_tok, train_pairs, write_jsonl):
    """Two files as `data.train` with weights 0.8 / 0.2: the examples of the static source's steps come from
    them in that proportion (80 steps of 8 examples: n = 640, p = 0.8, σ = 10.1), not 50 / 50 as the sizes
    (80 and 80 rows) would give."""
    a = write_jsonl(tmp_path / "a.jsonl", train_pairs[:80])
    b = write_jsonl(tmp_path / "b.jsonl", train_pairs[80:160])
    data = DataConfig(train=[{"path": str(a), "weight": 0.8}, {"path": str(b), "weight": 0.2}])
    train, _, _ = prepare_data(data, "paired", Tokenization(toy_tok, max_length=64), 0, None, lambda *_: None)
    assert train.weights == [0.8, 0.2] and {e.group for e in train.examples} == {0, 1}
    source = StaticSource(train, micro=4, accum=2, world=1, rank=0, seed=0, pad_id=toy_tok.pad_token_id,
                          layout="packed", device="cpu")
    assert source.steps_per_epoch == 20
    from_a = 0
    for step in range(80):
        for m in range(2):
            at = (step % 20 * 2 + m) * 4
            from_a += sum(train.examples[i].group == 0 for i in source.order(step // 20)[at:at + 4])
        list(source.micro_batches(step))
    assert within_binomial(from_a, 640, 0.8), from_a
    pooled, _, _ = prepare_data(DataConfig(train=[str(a), str(b)]), "paired", Tokenization(toy_tok, max_length=64),
                                0, None, lambda *_: None)
    assert pooled.weights is None and len(pooled) == 160  # without weights: every row once per epoch


def test_glob_hub_ids_and_source_lists(tmp_path, train_pairs, write_jsonl):
    for i in range(3):
        write_jsonl(tmp_path / f"part-{i}.jsonl", train_pairs[i * 5:(i + 1) * 5])
    rows = list(read_rows(str(tmp_path / "part-*.jsonl")))
    assert [r.source for r in rows[::5]] == [str(tmp_path / f"part-{i}.jsonl") for i in range(3)]
    assert [r.data for r in rows] == train_pairs[:15]
    with pytest.raises(DataError, match="no file matches"):
        list(read_rows(str(tmp_path / "none-*.jsonl")))
    assert parse_hub_id("org/ds", "train") == ("org/ds", None, "train")
    assert parse_hub_id("org/ds:test", "train") == ("org/ds", None, "test")
    assert parse_hub_id("org/ds:sub:test", "train") == ("org/ds", "sub", "test")
    assert parse_hub_id("org/ds", "train", "sub") == ("org/ds", "sub", "train")
    with pytest.raises(DataError, match="name:subset:split"):
        parse_hub_id("a:b:c:d", "train")


def test_hub_subsets_and_splits_reach_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake(name, subset=None, split=None, streaming=False):
        calls.append((name, subset, split, streaming))
        return [{"prompt": "p", "chosen": "a", "rejected": "b"}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    rows = list(read_rows([{"path": "org/ds", "name": "sub", "split": "dev"}, "org/other:cfg:test"]))
    assert calls == [("org/ds", "sub", "dev", False), ("org/other", "cfg", "test", False)]
    assert [r.source for r in rows] == ["org/ds[sub:dev]", "org/other[cfg:test]"]
    list(read_rows("org/ds", streaming=True))
    assert calls[-1] == ("org/ds", None, "train", True)


def test_source_lists_are_checked_with_the_config():
    assert source_problems([{"path": "a", "weight": 0}], "data.train") == [
        "data.train[0].weight: expected a number > 0, got 0"]
    with pytest.raises(ConfigError, match=r"a weight on some sources but not on data.train\[1\]"):
        to_config({"model": "m", "loss": {"beta": 0.1}, "data": {"train": [{"path": "a", "weight": 1}, "b"]},
                   "training": {"output_dir": "x", "learning_rate": 1e-3}})
    with pytest.raises(ConfigError, match="group_by_length: a weighted mixture"):
        to_config({"model": "m", "loss": {"beta": 0.1}, "engine": {"group_by_length": True},
                   "data": {"train": [{"path": "a", "weight": 1}]},
                   "training": {"output_dir": "x", "learning_rate": 1e-3}})


# ---- tokenization through datasets.map, cached ---------------------------------------------------------------


def test_tokenization_is_cached_across_runs(tmp_path, toy_tok, train_pairs, write_jsonl, monkeypatch):
    """The second prepare of the same rows under the same rules reads datasets' cache file and tokenizes
    nothing (a spy on the one function that tokenizes a pair counts zero calls); other rules, a new file."""
    path = write_jsonl(tmp_path / "pairs.jsonl", train_pairs[:40])
    cache = tmp_path / "cache"
    expected = first_stats(toy_tok, train_pairs[:40])  # the record-by-record path's truncation counts
    assert expected["completion"] > 0
    calls = Counter()
    real = Tokenization.pair

    def spy(self, rec):
        calls["pair"] += 1
        return real(self, rec)

    monkeypatch.setattr(Tokenization, "pair", spy)
    data = DataConfig(train=str(path), cache_dir=str(cache))
    first, _, _ = prepare_data(data, "paired", Tokenization(toy_tok, max_length=12), 0, None, lambda *_: None)
    assert calls["pair"] == 40 and len(list(cache.glob("*.arrow"))) == 1
    tok2 = Tokenization(toy_tok, max_length=12)
    again, _, _ = prepare_data(data, "paired", tok2, 0, None, lambda *_: None)
    assert calls["pair"] == 40  # not one more
    assert again.examples == first.examples and tok2.stats.truncated == expected
    prepare_data(data, "paired", Tokenization(toy_tok, max_length=64), 0, None, lambda *_: None)
    assert calls["pair"] == 80 and len(list(cache.glob("*.arrow"))) == 2


def first_stats(tok, rows) -> Counter:
    """What the record-by-record path counts as truncated for ``rows`` at max_length 12."""
    t = Tokenization(tok, max_length=12)
    t.all([PairRecord(r["prompt"], r["chosen"], r["rejected"]) for r in rows], DropLog())
    return t.stats.truncated


@pytest.mark.slow
def test_parallel_tokenization_gives_the_same_examples(tmp_path, toy_tok, train_pairs):
    one, _, _ = prepare_data(DataConfig(train=train_pairs, cache_dir=str(tmp_path / "a")), "paired",
                             Tokenization(toy_tok, max_length=64), 0, None, lambda *_: None)
    two, _, _ = prepare_data(DataConfig(train=train_pairs, cache_dir=str(tmp_path / "b"), num_proc=2), "paired",
                             Tokenization(toy_tok, max_length=64), 0, None, lambda *_: None)
    assert one.examples == two.examples and len(list((tmp_path / "b").glob("*_of_00002.arrow"))) == 2


# ---- chat templates, tools, and rows that would all drop -------------------------------------------------------


def conversational(rows: list[dict]) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]


@pytest.fixture
def plain_tok(toy_tok):
    tok = copy.deepcopy(toy_tok)
    tok.chat_template = None
    return tok


def test_preflight_refuses_rows_that_would_all_drop(plain_tok, train_pairs):
    """Conversational rows and a tokenizer without a chat template: every row drops as no_chat_template, and
    the check says unusable before training (it used to say usable, then stop on an empty set)."""
    lines = []
    with pytest.raises(DataError, match="training data is unusable"):
        prepare_data(DataConfig(train=conversational(train_pairs[:20])), "paired",
                     Tokenization(plain_tok, max_length=64), 0, None, lines.append)
    assert any("no_chat_template" in line for line in lines), lines
    assert "data check: UNUSABLE: no usable rows" in lines and not any(" USABLE" in line for line in lines)


def test_chat_template_from_the_config(tmp_path, dpo_config, make_model, plain_tok, toy_tok, train_pairs):
    template = tmp_path / "chat.jinja"
    template.write_text(toy_tok.chat_template)
    rows = conversational(train_pairs[:16])
    for value in (toy_tok.chat_template, str(template)):
        cfg = dpo_config(make_model(seed=2), rows, training={"max_steps": 1, "save_model": True})
        cfg["tokenizer"], cfg["data"]["chat_template"] = copy.deepcopy(plain_tok), value
        summary = preftune.train(cfg, log=lambda *_: None)
        assert summary["train_examples"] == 16 and summary["dropped_rows"] == {}
        from transformers import AutoTokenizer

        assert AutoTokenizer.from_pretrained(summary["model_dir"]).chat_template == toy_tok.chat_template
    with pytest.raises(DataError, match="neither a file nor a Jinja template"):
        cfg = dpo_config(make_model(seed=2), rows)
        cfg["data"]["chat_template"] = str(tmp_path / "missing.jinja")
        preftune.train(cfg, log=lambda *_: None)


def test_tools_column_reaches_the_chat_template(toy_tok):
    """A template that renders `tools`: the prompt text carries the tool's name; a JSON string works too; a text
    prompt with tools drops (no template would render them)."""
    tok = copy.deepcopy(toy_tok)
    tok.chat_template = ("{% if tools %}{% for t in tools %}{{ t['name'] }} {% endfor %}{% endif %}"
                         + toy_tok.chat_template)
    tools = [{"name": "owl", "description": "d", "parameters": {"type": "object", "properties": {}}}]
    drops = DropLog()
    rows = [{"prompt": [{"role": "user", "content": "say : cat"}], "chosen": [{"role": "assistant", "content": "cat"}],
             "rejected": [{"role": "assistant", "content": "dog"}], "tools": t} for t in (tools, json.dumps(tools))]
    rows.append({"prompt": "say : cat", "chosen": "cat", "rejected": "dog", "tools": tools})
    from preftune.data.formats import normalize

    records = list(normalize(read_rows(rows), "paired", drops))
    t = Tokenization(tok, max_length=64)
    examples = t.all(records, drops)
    assert len(examples) == 2 and drops.counts == Counter({"tools_with_text_prompt": 1})
    assert tok.decode(examples[0].prompt_ids).startswith("owl <|user|> say : cat")  # the tool's name, rendered
    assert examples[0].prompt_ids == examples[1].prompt_ids  # the JSON-string column reads the same


# ---- streaming -------------------------------------------------------------------------------------------------


def test_shuffle_buffer_is_a_seeded_permutation():
    import random

    out = list(shuffled(iter(range(100)), 10, random.Random(0)))
    assert sorted(out) == list(range(100)) and out != list(range(100))
    assert out == list(shuffled(iter(range(100)), 10, random.Random(0)))
    assert list(shuffled(iter(range(5)), 1, random.Random(0))) == list(range(5))
    # a buffer of 10 only reorders locally: the first item out is one of the first 11 read
    assert out[0] <= 10


def test_cursor_resumes_exactly_and_draws_by_weight(tmp_path, train_pairs, write_jsonl):
    a = write_jsonl(tmp_path / "a.jsonl", train_pairs[:30])
    b = write_jsonl(tmp_path / "b.jsonl", train_pairs[30:130])
    for source in (str(a), [{"path": str(a), "weight": 0.25}, {"path": str(b), "weight": 0.75}]):
        split = StreamSplit(source, "paired", 8, seed=5)
        cursor = Cursor(split, DropLog())
        head = [cursor.next() for _ in range(47)]  # past the end of a: the next pass starts
        state = json.loads(json.dumps(cursor.state_dict()))  # what a checkpoint holds
        rest = [cursor.next() for _ in range(40)]
        again = Cursor(StreamSplit(source, "paired", 8, seed=5), DropLog())
        again.load_state_dict(state)
        assert [(r.source, r.line) for r in (again.next() for _ in range(40))] == [(r.source, r.line) for r in rest]
        assert len({(r.source, r.line) for r in head[:30]}) == (30 if isinstance(source, str) else
                                                               len({(r.source, r.line) for r in head[:30]}))
    cursor = Cursor(StreamSplit([{"path": str(a), "weight": 0.25}, {"path": str(b), "weight": 0.75}], "paired", 8, 1),
                    DropLog())
    groups = Counter(cursor.next().group for _ in range(2000))
    assert within_binomial(groups[0], 2000, 0.25), groups  # σ = √(2000·0.25·0.75) = 19.4
    assert cursor.passes[0] >= 15  # source a (30 rows) ran out and started over many times


@pytest.fixture
def stream_files(tmp_path, train_pairs, eval_pairs, write_jsonl):
    rows = [{"prompt": "say : owl", "chosen": "owl", "rejected": "owl"}] + train_pairs  # the first row drops
    return write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "eval.jsonl", eval_pairs)


def _stream_cfg(model, tok, train, evals, out, **training):
    return {"model": model, "tokenizer": tok, "data": {"train": str(train), "eval": str(evals), "streaming": True,
                                                        "shuffle_buffer": 32},
            "loss": {"name": "dpo", "beta": 0.1}, "lora": {"r": 8, "alpha": 16},
            "training": {"output_dir": str(out), "learning_rate": 2e-2, "max_steps": 12, "per_device_batch_size": 8,
                         "max_length": 64, "progress_bar": False, "save_model": False, **training}}


@pytest.mark.slow
def test_a_streamed_split_trains_and_resumes(tmp_path, toy_tok, make_model, stream_files):
    """LoRA DPO on a streamed file (161 rows, 8 per step: 20 steps a pass), reference scored live: held-out
    accuracy rises above chance; a run resumed from its step-6 checkpoint logs the same steps 7..12 as the
    uninterrupted one and ends with the same adapter; dropped.jsonl holds the one bad row once."""
    train, evals = stream_files
    full = tmp_path / "full"
    summary = preftune.train(_stream_cfg(make_model(seed=0), toy_tok, train, evals, full, save_every=6,
                                         eval_every=6), log=lambda *_: None)
    assert summary["train_examples"] == 96 and summary["final_eval_metrics"]["rewards/accuracies"] > 0.6
    steps = [r for r in read_metrics(full) if r["split"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, 13)) and steps[-1]["data/examples_drawn"] == 96

    part = tmp_path / "part"  # the run as a kill after step 6 leaves it: checkpoint 6, records up to 6
    import shutil

    shutil.copytree(full, part, ignore=shutil.ignore_patterns("step-00000012"))
    (part / "metrics.jsonl").write_text("".join(line + "\n" for line in (full / "metrics.jsonl").read_text().splitlines()
                                                if json.loads(line)["step"] <= 6))
    resumed_model = make_model(seed=0)
    preftune.train(_stream_cfg(resumed_model, toy_tok, train, evals, part, save_every=6, eval_every=6),
                   resume=str(part / "checkpoints" / "step-00000006"), log=lambda *_: None)
    again = [r for r in read_metrics(part) if r["split"] == "train"]
    assert [r["step"] for r in again] == list(range(1, 13))
    for key in ("loss", "grad_norm", "data/examples_drawn"):
        assert [r[key] for r in again[6:]] == pytest.approx([r[key] for r in steps[6:]], rel=1e-5), key
    for run in (full, part):  # read before the checkpoint, replayed after it: written once
        dropped = [json.loads(line) for line in (run / "dropped.jsonl").read_text().splitlines()]
        assert [(d["line"], d["reason"]) for d in dropped] == [(1, "identical_responses")]


def test_streaming_needs_max_steps_and_held_out_data():
    base = {"model": "m", "loss": {"beta": 0.1}, "training": {"output_dir": "x", "learning_rate": 1e-3}}
    with pytest.raises(ConfigError) as err:
        to_config({**base, "data": {"train": "a.jsonl", "streaming": True, "eval_fraction": 0.1}})
    assert "set training.max_steps" in str(err.value) and "give data.eval instead" in str(err.value)


def test_streamed_batches_are_the_static_layout(tmp_path, toy_tok, train_pairs, write_jsonl):
    """Rank r's micro-batch m of a step holds examples (m·W + r)·M ... of the step's draw, as StaticSource
    lays out a step: two ranks together see exactly the one-process batch."""
    from preftune.trainer.streaming import StreamingSource

    path = write_jsonl(tmp_path / "t.jsonl", train_pairs[:40])

    def source(world, rank, micro):
        return StreamingSource(StreamSplit(str(path), "paired", 4, 0), Tokenization(toy_tok, max_length=64), DropLog(),
                               kl=False, out_dir=None, micro=micro, accum=2, world=world, rank=rank, seed=0,
                               pad_id=toy_tok.pad_token_id, layout="padded", device="cpu", total_steps=3)

    def sequences(batch):  # padded layout: row i is sequence i (chosen rows, then rejected), unpadded here
        seqs = batch.seqs
        return [ids[mask.bool()].tolist() for ids, mask in zip(seqs.input_ids, seqs.attention_mask)]

    one = [sequences(b) for b in source(1, 0, 4).micro_batches(0)]  # 2 micro-batches of 4 pairs: 8 rows each
    r0 = [sequences(b) for b in source(2, 0, 2).micro_batches(0)]  # 2 micro-batches of 2 pairs: 4 rows each
    r1 = [sequences(b) for b in source(2, 1, 2).micro_batches(0)]
    for m in range(2):
        # micro-batch m of one process (W=1, M=4) holds pairs 4m..4m+3; with W=2, M=2, rank r's holds
        # pairs (2m + r)·2 ... + 2: rank 0 pairs 4m, 4m+1 and rank 1 pairs 4m+2, 4m+3
        chosen, rejected = one[m][:4], one[m][4:]
        assert r0[m] == chosen[:2] + rejected[:2] and r1[m] == chosen[2:] + rejected[2:]
