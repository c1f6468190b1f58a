"""The resolved config as a run records it with each checkpoint, and which of its keys may change on resume.

``config_record`` flattens the config to ``{dotted key: JSON value}`` (loaded models, tokenizers and row lists
become short descriptions with a size or a hash; a local data file becomes the hash of its bytes, so an edited
file under the same name is caught). ``math_changes`` lists the keys that differ and change the training math:
every key that is not in :data:`SAFE_KEYS` / :data:`SAFE_PREFIXES` (default-deny, so a new config field is
compared until someone decides it is safe).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

SAFE_KEYS = frozenset({
    "training.output_dir", "training.eval_every", "training.save_every", "training.save_total_limit",
    "training.logging_every", "training.progress_bar", "training.save_model", "training.max_nonfinite_steps",
    "training.report_to", "training.push_to_hub", "training.hub_model_id",  # where results go, not the math
    # the global batch (training.global_batch) is compared instead: same global batch, same math
    "training.per_device_batch_size", "training.gradient_accumulation_steps", "training.processes",
    "data.eval", "data.allow_unusable", "reference.cache_dir",
    # exact rearrangements of the same computation (tested to 1e-5 in fp32)
    "engine.layout", "engine.chunk_size", "engine.compile", "engine.reuse_freed_memory", "engine.cast_once",
    "engine.gradient_checkpointing",
})
SAFE_PREFIXES = ("monitor.",)
AFTER_NONFINITE = frozenset({"training.learning_rate"})


DATA_KEYS = ("data.train", "data.eval")


def config_record(cfg, processes: int, *, digest_files: bool = True) -> dict[str, Any]:
    """The resolved config as flat ``{dotted key: JSON value}``; loaded objects become short descriptions.

    ``training.global_batch`` (per device x accumulation x processes) and, for local data files, a hash of their
    contents are added (``digest_files=False``: later, by :func:`with_file_digests`); ``num_epochs`` is left out
    when ``max_steps`` overrides it. Call it before the run changes anything it describes (LoRA layers are
    injected into a loaded model in place).
    """
    out: dict[str, Any] = {}

    def walk(obj, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            key, value = f"{prefix}{f.name}", getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                out[key] = "set"
                walk(value, key + ".")
            elif key == "loss.params":
                out.update({f"loss.{k}": _describe(v) for k, v in value.items()})
            else:
                out[key] = _describe(value, data=digest_files and key in DATA_KEYS)

    walk(cfg, "")
    tc = cfg.training
    out["training.processes"] = processes
    out["training.global_batch"] = tc.per_device_batch_size * tc.gradient_accumulation_steps * processes
    if tc.max_steps is not None:
        out.pop("training.num_epochs")
    return out


def with_file_digests(record: dict[str, Any], cfg) -> dict[str, Any]:
    """``record`` with each local data file of ``cfg`` replaced by the hash of its contents."""
    out = dict(record)
    for key in DATA_KEYS:
        value = getattr(cfg.data, key.split(".")[1])
        if isinstance(value, (str, Path)):
            out[key] = _describe(str(value), data=True)
    return out


def _describe(value, data: bool = False):
    if value is None or isinstance(value, (bool, int, str)):
        if data and isinstance(value, str) and Path(value).expanduser().is_file():
            return _file_digest(Path(value).expanduser())
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else repr(value)
    if isinstance(value, Path):
        return _describe(str(value), data)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        try:
            return json.loads(json.dumps(value, sort_keys=True))
        except (TypeError, ValueError):
            pass
    if isinstance(value, (list, dict)):  # rows given from Python
        text = json.dumps(value, sort_keys=True, default=str).encode()
        return f"<{len(value)} rows, blake2b {hashlib.blake2b(text, digest_size=8).hexdigest()}>"
    if isinstance(value, torch.nn.Module):
        return f"<{type(value).__name__}, {sum(p.numel() for p in value.parameters())} parameters>"
    fingerprint = getattr(value, "_fingerprint", None)  # datasets.Dataset
    size = f"{len(value)} rows, " if hasattr(value, "__len__") and fingerprint else ""
    return f"<{type(value).__name__}{', ' + size + 'fingerprint ' + fingerprint if fingerprint else ''}>"


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return f"<file {path.name}, {path.stat().st_size} bytes, blake2b {h.hexdigest()}>"


def _safe(key: str) -> bool:
    return key in SAFE_KEYS or key.startswith(SAFE_PREFIXES)


def math_changes(saved: dict, now: dict, allowed: frozenset = frozenset()) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, current value) for every key that changes the math and differs.

    Keys only one side has (a field newer than the checkpoint) are not compared; a whole section switched on or
    off (``lora``) is, as the section key itself.
    """
    return [(k, saved[k], now[k]) for k in sorted(saved.keys() & now.keys())
            if saved[k] != now[k] and not _safe(k) and k not in allowed]


def short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 70 else text[:67] + "..."
