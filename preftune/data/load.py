"""Reading preference data from files, hub ids or in-memory datasets, losing nothing.

Every row keeps its source and line so that a rejected row can be found again. A malformed file line (bad
JSON, bad UTF-8, a JSON value that is not an object) is an error naming file and line, unless the caller asks
to collect such lines (the validator does).

Formats: ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` files, a directory written by
``Dataset.save_to_disk``, a ``datasets.Dataset``, or a hub id (``org/name`` with optional ``:split``).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError


class DataError(PreftuneError, ValueError):
    """Unusable input data; the message names the file and line."""


@dataclass
class RawRow:
    """One row as read, before any interpretation.

    Attributes:
        data: the row's fields (None when the line could not be parsed and errors are collected).
        source: file path or hub id the row came from.
        line: 1-based line in the file (JSONL, CSV) or 1-based row number (JSON array, Parquet, datasets).
        error: why the line could not be parsed (only when collecting errors).
        raw: the undecodable text of a malformed line, for reports (only when collecting errors).
    """

    data: dict[str, Any] | None
    source: str
    line: int
    error: str | None = None
    raw: str | None = None


FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def is_local_path(source: str) -> bool:
    return os.path.exists(source) or source.endswith(FILE_SUFFIXES) or source.startswith((".", "/", "~"))


def read_rows(source: Any, *, split: str = "train", collect_errors: bool = False) -> Iterator[RawRow]:
    """Yield every row of ``source`` with its provenance, streaming where the format allows.

    Args:
        source: a path, a hub id (``name`` or ``name:split``), or a ``datasets.Dataset`` / list of dicts.
        split: split to read from a hub id or a ``DatasetDict`` directory when the id names none.
        collect_errors: yield malformed lines as ``RawRow(data=None, error=...)`` instead of raising.
    """
    if isinstance(source, list):
        for i, row in enumerate(source, start=1):
            yield RawRow(dict(row), "<memory>", i)
        return
    if not isinstance(source, (str, os.PathLike)):  # datasets.Dataset or any iterable of mappings
        for i, row in enumerate(source, start=1):
            yield RawRow(dict(row), "<dataset>", i)
        return
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        yield from _read_saved_dataset(path, split)
    elif path.exists():
        reader = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}
        suffix = path.suffix.lower()
        if suffix not in reader:
            raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")
        yield from reader[suffix](path, collect_errors)
    elif is_local_path(text):
        raise DataError(f"{text}: no such file or directory")
    else:
        yield from _read_hub(text, split)


def _malformed(path: Path, line: int, why: str, raw: str | None, collect: bool) -> RawRow:
    if not collect:
        raise DataError(f"{path}:{line}: {why}")
    return RawRow(None, str(path), line, error=why, raw=raw)


def _read_jsonl(path: Path, collect: bool) -> Iterator[RawRow]:
    # Read bytes so that a bad UTF-8 sequence is reported with its line rather than failing the whole file.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield _malformed(path, lineno, f"not valid UTF-8 ({e.reason} at byte {e.start})",
                                 raw.decode("utf-8", "replace"), collect)
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield _malformed(path, lineno, f"malformed JSON ({e.msg}, column {e.colno})", text.rstrip("\n"), collect)
                continue
            if not isinstance(obj, dict):
                yield _malformed(path, lineno, f"expected a JSON object, got {type(obj).__name__}",
                                 text.rstrip("\n"), collect)
                continue
            yield RawRow(obj, str(path), lineno)


def _read_json(path: Path, collect: bool) -> Iterator[RawRow]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        # A file of one object per line is JSONL whatever its suffix says.
        if e.msg == "Extra data":
            yield from _read_jsonl(path, collect)
            return
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
    if isinstance(obj, dict):  # {"data": [...]} or {"train": [...]} wrappers
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON array of objects (or an object holding one array)")
        obj = lists[0]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON array of objects")
    for i, row in enumerate(obj, start=1):
        if not isinstance(row, dict):
            yield _malformed(path, i, f"row {i} is {type(row).__name__}, expected an object", json.dumps(row), collect)
            continue
        yield RawRow(row, str(path), i)


def _read_parquet(path: Path, collect: bool) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            row += 1
            yield RawRow(rec, str(path), row)


def _read_csv(path: Path, collect: bool) -> Iterator[RawRow]:
    with open(path, newline="", encoding="utf-8", errors="strict") as f:
        reader = csv.DictReader(f)
        try:
            for rec in reader:
                if None in rec:  # more cells than header fields
                    yield _malformed(path, reader.line_num, "more cells than header columns", None, collect)
                    continue
                yield RawRow(dict(rec), str(path), reader.line_num)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{reader.line_num + 1}: not valid UTF-8 ({e.reason})") from None
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def _read_saved_dataset(path: Path, split: str) -> Iterator[RawRow]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r}; splits are {', '.join(ds)}")
        ds = ds[split]
    for i, row in enumerate(ds, start=1):
        yield RawRow(row, f"{path}[{split}]", i)


def _read_hub(name: str, split: str) -> Iterator[RawRow]:
    import datasets

    if ":" in name:
        name, split = name.rsplit(":", 1)
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown id, gated: one readable line
        raise DataError(
            f"could not load dataset {name!r} (split {split!r}) from the hub: {type(e).__name__}: {e}. "
            "Check the id, the network, or pass a local file path."
        ) from None
    for i, row in enumerate(ds, start=1):
        yield RawRow(row, f"{name}[{split}]", i)
