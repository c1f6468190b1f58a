"""A whole split tokenized through ``datasets.map``, cached on disk, so a big set tokenizes once.

    records -> a Dataset of JSON text columns -> map(Tokenization rules, batched, num_proc)
            -> CACHE/<key>.arrow (datasets' own cache file: the second run's map loads it and tokenizes nothing)

The key hashes the tokenization fingerprint (tokenizer, chat template, lengths, truncation side: every rule
``Tokenization`` applies) and every record's content, so changed rows or rules never hit a stale file. Each row
goes through the same ``Tokenization.pair`` / ``single`` as the record-by-record path (``Tokenization.all``),
so both give the same ids and the same drops; the map also returns which rows were truncated, so the counts a
run prints are the same whether the rows were tokenized now or read from the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

from preftune.data.formats import DropLog, PairRecord, Skip, UnpairedRecord
from preftune.data.tokenize import Tokenization, TokenizedPair, TokenizedSingle, record_row

CACHE_VERSION = "1"


def default_cache_dir() -> Path:
    return Path(os.environ.get("PREFTUNE_CACHE", Path.home() / ".cache" / "preftune")) / "tokenized"


def _columns(records: list) -> dict[str, list]:
    """The records as JSON text columns (a prompt is a string or a message list: Arrow wants one type)."""
    cols: dict[str, list] = {"pair": [], "prompt": [], "a": [], "b": [], "label": [], "tools": []}
    for rec in records:
        pair = isinstance(rec, PairRecord)
        cols["pair"].append(pair)
        cols["prompt"].append(json.dumps(rec.prompt, ensure_ascii=False))
        cols["a"].append(json.dumps(rec.chosen if pair else rec.completion, ensure_ascii=False))
        cols["b"].append(json.dumps(rec.rejected, ensure_ascii=False) if pair else "")
        cols["label"].append(True if pair else bool(rec.label))
        cols["tools"].append(json.dumps(rec.tools, ensure_ascii=False) if rec.tools else "")
    return cols


def cache_key(columns: dict[str, list], fingerprint: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{CACHE_VERSION}|{fingerprint}|{len(columns['pair'])}".encode())
    for row in zip(*(columns[k] for k in ("pair", "prompt", "a", "b", "label", "tools"))):
        h.update(json.dumps(row, ensure_ascii=False).encode())
        h.update(b"\x00")
    return h.hexdigest()


def tokenize_batch(batch: dict[str, list], tokenization: Tokenization) -> dict[str, list]:
    """``datasets.map`` function: one batch of JSON columns -> ids, the drop reason ("" if kept) and which
    rows were truncated. Module-level, so ``num_proc`` workers can pickle it."""
    out: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "drop": [], "truncated_prompt": [],
                            "truncated_completion": []}
    stats = tokenization.stats.truncated
    for pair, prompt, a, b, label, tools in zip(batch["pair"], batch["prompt"], batch["a"], batch["b"],
                                               batch["label"], batch["tools"]):
        tools = json.loads(tools) if tools else None
        before = (stats["prompt"], stats["completion"])
        p = c = r = []
        try:
            if pair:
                ex = tokenization.pair(PairRecord(json.loads(prompt), json.loads(a), json.loads(b), tools=tools))
                p, c, r = ex.prompt_ids, ex.chosen_ids, ex.rejected_ids
            else:
                ex = tokenization.single(UnpairedRecord(json.loads(prompt), json.loads(a), label, tools=tools))
                p, c = ex.prompt_ids, ex.completion_ids
            reason = ""
        except Skip as skip:
            reason = str(skip)
        out["prompt_ids"].append(p)
        out["chosen_ids"].append(c)
        out["rejected_ids"].append(r)
        out["drop"].append(reason)
        out["truncated_prompt"].append(stats["prompt"] - before[0])
        out["truncated_completion"].append(stats["completion"] - before[1])
    return out


def tokenize_records(records: list, tokenization: Tokenization, drops: DropLog, *, cache_dir: str | Path | None = None,
                     num_proc: int | None = None) -> tuple[list, list[bool]]:
    """(tokenized examples of the records that tokenize, whether each record was kept), through the cache.

    Dropped records are recorded in ``drops`` with their reason; truncations are added to
    ``tokenization.stats``. ``cache_dir`` default: ``$PREFTUNE_CACHE/tokenized``.
    """
    if not records:
        return [], []
    import datasets

    cols = _columns(records)
    key = cache_key(cols, tokenization.fingerprint)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    num_proc = num_proc if num_proc and num_proc > 1 and len(records) >= 2 * num_proc else None
    counts = Counter(tokenization.stats.truncated)  # the map may count in this process: its columns are the truth
    data = datasets.Dataset.from_dict(cols).map(
        tokenize_batch, batched=True, batch_size=1000, num_proc=num_proc, fn_kwargs={"tokenization": tokenization},
        remove_columns=list(cols), cache_file_name=str(root / f"{key}.arrow"), load_from_cache_file=True,
        new_fingerprint=key, desc="tokenizing")
    table = data.data  # the Arrow table (memory-mapped from the cache file)
    column = {name: table.column(name).to_pylist() for name in data.column_names}
    # Counter addition keeps positive counts only, as the record-by-record path never records a zero.
    tokenization.stats.truncated = counts + Counter(prompt=sum(column["truncated_prompt"]),
                                                    completion=sum(column["truncated_completion"]))
    examples, kept = [], []
    for i, rec in enumerate(records):
        reason = column["drop"][i]
        kept.append(not reason)
        if reason:
            drops.drop(rec.source, rec.line, reason, record_row(rec))
        elif isinstance(rec, PairRecord):
            examples.append(TokenizedPair(column["prompt_ids"][i], column["chosen_ids"][i], column["rejected_ids"][i],
                                          rec.source, rec.line, rec.group))
        else:
            examples.append(TokenizedSingle(column["prompt_ids"][i], column["chosen_ids"][i], rec.label, rec.source,
                                            rec.line, rec.group))
    return examples, kept
