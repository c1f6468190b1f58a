"""Reading preference data from files, hub ids or in-memory datasets, losing nothing.

Every row keeps its source and line so that a rejected row can be found again. A malformed file line (bad
JSON, bad UTF-8, a JSON value that is not an object) is an error naming file and line, unless the caller asks
to collect such lines (the validator does).

Formats: ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` files (or a glob of them, read in sorted order), a
directory written by ``Dataset.save_to_disk``, a ``datasets.Dataset``, a hub id (``org/name``, ``org/name:split``
or ``org/name:subset:split``; ``streaming=True`` streams it instead of downloading it whole), or a list of sources
(``preftune.data.sources``), read one after the other.

JSONL and CSV are read as bytes, one line at a time, and a line longer than ``max_row_bytes`` is skipped
without being held in memory: it comes back as ``RawRow(data=None, reason="row_too_large")`` whether or not
errors are collected, so the loader counts it as a drop rather than stopping (one 50 MB row used to cost
gigabytes of peak memory on its way to being dropped). ``.json`` arrays, Parquet and datasets are read by
their libraries and have no such limit.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.data.sources import (
    FILE_SUFFIXES,
    Source,
    as_sources,
    expand_glob,
    is_local_path,
    is_source_list,
)
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
        raw: the text of a row that could not be used (the line or CSV record as read; undecodable bytes become
            U+FFFD), for reports; for a row too large to read, its first ``PREVIEW_CHARS`` characters.
        reason: why ``data`` is None: ``"malformed_line"`` or ``"row_too_large"``.
    """

    data: dict[str, Any] | None
    source: str
    line: int
    error: str | None = None
    raw: str | None = None
    reason: str = "malformed_line"

    @property
    def drop_reason(self) -> str:
        """The reason a loader records for a row without data: ``"malformed_line: <why>"`` or ``"row_too_large"``."""
        return self.reason if self.reason == "row_too_large" else f"{self.reason}: {self.error}"


MAX_ROW_BYTES = 8 * 2**20
"""Default limit on one JSONL line or CSV line, in bytes (8 MiB, about two million tokens of text)."""
PREVIEW_CHARS = 1000


def read_rows(source: Any, *, split: str = "train", collect_errors: bool = False,
              max_row_bytes: int = MAX_ROW_BYTES, subset: str | None = None, streaming: bool = False
              ) -> Iterator[RawRow]:
    """Yield every row of ``source`` with its provenance, streaming where the format allows.

    Args:
        source: a path or glob, a hub id (``name``, ``name:split`` or ``name:subset:split``), a
            :class:`~preftune.data.sources.Source` or a list of sources, or a ``datasets.Dataset`` / list of dicts.
        split: split to read from a hub id or a ``DatasetDict`` directory when the id names none.
        collect_errors: yield malformed lines as ``RawRow(data=None, error=...)`` instead of raising.
        max_row_bytes: JSONL / CSV lines longer than this are skipped unread and yielded as
            ``RawRow(data=None, reason="row_too_large")`` (always, also without ``collect_errors``).
        subset: the hub dataset's configuration (``load_dataset(name, subset)``) when the id names none.
        streaming: read a hub dataset as a stream (``load_dataset(..., streaming=True)``), never whole.
    """
    common = dict(collect_errors=collect_errors, max_row_bytes=max_row_bytes, streaming=streaming)
    if isinstance(source, Source):
        yield from read_rows(source.path, split=source.split or split, subset=source.name, **common)
        return
    if is_source_list(source):
        for one in as_sources(source):
            yield from read_rows(one, split=split, **common)
        return
    if isinstance(source, (str, os.PathLike)) and any(c in os.fspath(source) for c in "*?["):
        files = expand_glob(os.fspath(source))
        if not files:
            raise DataError(f"{os.fspath(source)}: no file matches this pattern")
        for f in files:
            yield from read_rows(f, split=split, collect_errors=collect_errors, max_row_bytes=max_row_bytes)
        return
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
        yield from reader[suffix](path, collect_errors, max_row_bytes)
    elif is_local_path(text):
        raise DataError(f"{text}: no such file or directory")
    else:
        yield from _read_hub(text, split, subset, streaming)


def _malformed(path: Path, line: int, why: str, raw: str | None, collect: bool) -> RawRow:
    if not collect:
        raise DataError(f"{path}:{line}: {why}")
    return RawRow(None, str(path), line, error=why, raw=raw)


def _too_large(path: Path, line: int, size: int, limit: int, head: bytes) -> RawRow:
    preview = head[:PREVIEW_CHARS * 4].decode("utf-8", "replace")[:PREVIEW_CHARS]
    return RawRow(None, str(path), line, error=f"{size} bytes, more than the {limit}-byte limit", raw=preview,
                  reason="row_too_large")


def _byte_lines(f, limit: int) -> Iterator[tuple[int, bytes, int]]:
    """(1-based line number, line, size without the newline) for each line of binary file ``f``.

    A line of more than ``limit`` bytes comes back as its first ``limit + 1`` bytes with its true size: the rest
    is read in 64 KiB pieces and thrown away, so memory stays bounded by ``limit``.
    """
    lineno = 0
    while line := f.readline(limit + 1):
        lineno += 1
        if line.endswith(b"\n"):
            yield lineno, line, len(line) - 1
        elif len(line) <= limit:  # the last line, without a newline
            yield lineno, line, len(line)
        else:
            size = len(line)
            while piece := f.readline(2**16):
                size += len(piece)
                if piece.endswith(b"\n"):
                    size -= 1
                    break
            yield lineno, line, size


def _read_jsonl(path: Path, collect: bool, limit: int) -> Iterator[RawRow]:
    # Read bytes so that a bad UTF-8 sequence is reported with its line rather than failing the whole file.
    with open(path, "rb") as f:
        for lineno, raw, size in _byte_lines(f, limit):
            if size > limit:
                yield _too_large(path, lineno, size, limit, raw)
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield _malformed(path, lineno, f"not valid UTF-8 ({e.reason} at byte {e.start})",
                                 raw.decode("utf-8", "replace").rstrip("\n"), collect)
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


def _read_json(path: Path, collect: bool, limit: int) -> Iterator[RawRow]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        # A file of one object per line is JSONL whatever its suffix says.
        if e.msg == "Extra data":
            yield from _read_jsonl(path, collect, limit)
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


def _read_parquet(path: Path, collect: bool, limit: int) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            row += 1
            yield RawRow(rec, str(path), row)


class _CsvLines:
    """The text lines the csv module parses, decoded one line at a time from bytes, remembering for the current
    record its text, its first line that is not valid UTF-8 and its first line over the size limit."""

    TOO_LARGE = "row_too_large\n"  # stands in for a skipped line: one plain cell, so the record stays a record

    def __init__(self, f, limit: int) -> None:
        self._lines = _byte_lines(f, limit)
        self.limit = limit
        self.text: list[str] = []
        self.bad_utf8: tuple[int, str] | None = None
        self.too_large: tuple[int, int, bytes] | None = None

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        lineno, raw, size = next(self._lines)
        if size > self.limit:
            self.too_large = self.too_large or (lineno, size, raw)
            return self.TOO_LARGE
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.bad_utf8 = self.bad_utf8 or (lineno, f"not valid UTF-8 ({e.reason} at byte {e.start})")
            text = raw.decode("utf-8", "replace")
        if lineno == 1:
            text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not part of the first column name
        self.text.append(text)
        return text

    def take(self) -> tuple[str, tuple[int, str] | None, tuple[int, int, bytes] | None]:
        """The current record's text and problems; starts the next record."""
        out = ("".join(self.text).strip("\r\n"), self.bad_utf8, self.too_large)
        self.text, self.bad_utf8, self.too_large = [], None, None
        return out


def _read_csv(path: Path, collect: bool, limit: int) -> Iterator[RawRow]:
    csv.field_size_limit(max(csv.field_size_limit(), limit))  # a long cell below the row limit is not an error
    with open(path, "rb") as f:
        lines = _CsvLines(f, limit)
        reader = csv.DictReader(lines)
        try:
            if reader.fieldnames is None:
                return
            text, bad, big = lines.take()
            if bad or big:
                raise DataError(f"{path}:1: the header line is "
                                + (bad[1] if bad else f"longer than the {limit}-byte limit"))
            for rec in reader:
                text, bad, big = lines.take()
                if big:
                    yield _too_large(path, big[0], big[1], limit, big[2])
                elif bad:
                    yield _malformed(path, bad[0], bad[1], text, collect)
                elif None in rec:  # more cells than header fields
                    yield _malformed(path, reader.line_num, "more cells than header columns", text, collect)
                else:
                    yield RawRow(dict(rec), str(path), reader.line_num)
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


def parse_hub_id(text: str, split: str, subset: str | None = None) -> tuple[str, str | None, str]:
    """(name, subset, split) of ``name``, ``name:split`` or ``name:subset:split``; the id's parts win over the
    ``split`` / ``subset`` defaults."""
    parts = text.split(":")
    if len(parts) > 3 or not all(parts):
        raise DataError(f"{text}: expected a hub id as name, name:split or name:subset:split")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    return parts[0], subset, parts[1] if len(parts) == 2 else split


def _read_hub(text: str, split: str, subset: str | None = None, streaming: bool = False) -> Iterator[RawRow]:
    import datasets

    name, subset, split = parse_hub_id(text, split, subset)
    label = f"{name}[{subset + ':' if subset else ''}{split}]"
    try:
        ds = datasets.load_dataset(name, subset, split=split, streaming=streaming)
    except Exception as e:  # offline, unknown id, gated: one readable line
        raise DataError(
            f"could not load dataset {name!r} ({f'subset {subset!r}, ' if subset else ''}split {split!r}) from the "
            f"hub: {type(e).__name__}: {e}. Check the id, the network, or pass a local file path."
        ) from None
    for i, row in enumerate(ds, start=1):
        yield RawRow(row, label, i)
