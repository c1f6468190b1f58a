"""Writing what the data tools produce: standard JSON only, never over an input, never half a file.

    json_line(obj)             one JSON line; NaN / ±Infinity become null, listed under "non_finite"
    json_text(obj, indent=2)   the same for a whole report
    refuse_overwrite(inputs, outputs)   PreftuneError when an output is an input (same path, symlink, hard link)
    AtomicJsonl(path)          write to PATH.tmp, rename on success (a crash never leaves a half-written file)
    dropped_path_for(out)      CLEAN.jsonl -> CLEAN.dropped.jsonl

Python's ``json`` reads ``NaN`` and ``Infinity`` and writes them back by default, but they are not JSON (RFC 8259):
``jq``, JavaScript and most other readers reject the whole file. A non-finite float is written as ``null``, and
the object gets a ``"non_finite"`` list of the JSON paths that held one (``"chosen_rating"``,
``"stats.length.mean_difference"``, ``"scores[2]"``), so the value is marked, not silently changed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError

NON_FINITE_KEY = "non_finite"


def finite(obj: Any, path: str = "") -> tuple[Any, list[str]]:
    """``obj`` with every NaN / ±Infinity float replaced by None, and the paths of the replaced values."""
    if isinstance(obj, float):
        return (obj, []) if math.isfinite(obj) else (None, [path or "$"])
    if isinstance(obj, dict):
        out, paths = {}, []
        for k, v in obj.items():
            out[k], p = finite(v, f"{path}.{k}" if path else str(k))
            paths += p
        return out, paths
    if isinstance(obj, (list, tuple)):
        items, paths = [], []
        for i, v in enumerate(obj):
            item, p = finite(v, f"{path}[{i}]")
            items.append(item)
            paths += p
        return items, paths
    return obj, []


def json_text(obj: Any, indent: int | None = None) -> str:
    """Standard JSON for ``obj`` (non-finite floats as null, flagged under ``"non_finite"`` in a top-level dict)."""
    try:  # the fast path: almost every object has only finite numbers
        return json.dumps(obj, ensure_ascii=False, default=str, allow_nan=False, indent=indent)
    except ValueError:
        pass
    clean, paths = finite(obj)
    if isinstance(clean, dict):
        clean[NON_FINITE_KEY] = sorted(set(clean.get(NON_FINITE_KEY) or []) | set(paths))
    return json.dumps(clean, ensure_ascii=False, default=str, allow_nan=False, indent=indent)


def json_line(obj: Any) -> str:
    """One JSONL line (with its newline) for ``obj``; see :func:`json_text`."""
    return json_text(obj) + "\n"


def dropped_path_for(out: str | Path) -> Path:
    """CLEAN.jsonl -> CLEAN.dropped.jsonl (any other name gets .dropped.jsonl appended)."""
    out = Path(out)
    if out.suffix == ".jsonl":
        return out.with_suffix(".dropped.jsonl")
    return out.with_name(out.name + ".dropped.jsonl")


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # follows symlinks, and equal inodes catch hard links
    except OSError:  # one of them does not exist yet: compare where they would be
        return a.expanduser().resolve() == b.expanduser().resolve()


def refuse_overwrite(inputs: Iterable[Any], outputs: Iterable[str | Path]) -> None:
    """Raise when an output file would replace an input: the tools write the output only after reading the input
    through, so writing over it would lose the data. In-memory inputs and hub ids are never files."""
    files = [Path(os.fspath(i)) for i in inputs if isinstance(i, (str, os.PathLike)) and os.path.exists(i)]
    for out in outputs:
        for src in files:
            if _same(Path(out), src):
                raise PreftuneError(f"output {out} is the input {src}"
                                    + ("" if str(out) == str(src) else " (the same file under another name)")
                                    + ": writing it would destroy the data being read; choose another --out")


class AtomicJsonl:
    """``with AtomicJsonl(path) as f: f.write(obj)``: JSON lines into ``path.tmp``, renamed to ``path`` only when
    the block ends without an error (and ``commit`` is not set False), so a failed run leaves no partial file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.count = 0
        self.commit = True

    def __enter__(self) -> AtomicJsonl:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.tmp, "w", encoding="utf-8")
        return self

    def write(self, obj: Any) -> None:
        self._f.write(json_line(obj))
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.commit:
            self._f.flush()
            os.fsync(self._f.fileno())
        self._f.close()
        if exc_type is None and self.commit:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
