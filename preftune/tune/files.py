"""Small file helpers of the drivers: atomic JSON / JSONL / text writes and content fingerprints."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def clean(value: Any) -> Any:
    """NaN and infinities as None, recursively: strict JSON."""
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_text(path: Path, text: str) -> Path:
    """Write to a temporary name, fsync, rename: a kill never leaves a half-written file that looks complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json(path: Path, obj: Any) -> Path:
    return write_text(path, json.dumps(clean(obj), indent=1, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    return write_text(path, "".join(json.dumps(clean(r), ensure_ascii=False, default=str) + "\n" for r in rows))


def read_json(path: Path, default: Any = None) -> Any:
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else default


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def fingerprint(path: Path) -> dict[str, Any]:
    """{"path", "sha256", "bytes", "lines"} of a data file, for lineage records."""
    data = Path(path).read_bytes()
    return {"path": str(path), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "lines": data.count(b"\n")}


def tree_hash(obj: Any) -> str:
    """sha256 (16 hex) of an object's canonical JSON: what a resumed driver compares its config with."""
    canon = json.dumps(clean(obj), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]
