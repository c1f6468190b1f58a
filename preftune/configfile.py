"""A run's resolved configuration as plain data: ``config.yaml`` in the run directory and the hyperparameters
the trackers get.

A neutral room, like :mod:`preftune.runlog`: the trainer writes through :func:`write_config`; the report, the
model card and ``preftune push`` read through :func:`read_config`, never the trainer. (Checkpoints keep a flat
form of the same config, with data-file digests, to check what a resume may change:
``preftune.trainer.runconfig``; this file is the one a person reads or runs again.)

``config.yaml`` holds every field of the checked :class:`~preftune.config.Config`, defaults filled in, in the
layout ``preftune train`` reads back (loss hyperparameters directly under ``loss:``). An object passed from
Python (a loaded model, tokenizer or dataset, a list of rows) is written as a one-line description, never
pickled: the file stays a text record, and ``preftune train config.yaml`` on it fails on that key, naming it,
instead of training on something else::

    model: '<in memory: LlamaForCausalLM, 102,464 parameters, from ./toy-model>'
    data: {train: '<in memory: list of 160 rows, blake2b 3f2a...>', ...}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from pathlib import Path
from typing import Any

import yaml

CONFIG_FILE = "config.yaml"


def describe(value: Any) -> str:
    """One line that names an in-memory object: its type, size and where it came from or a content hash."""
    kind = type(value).__name__
    if hasattr(value, "parameters") and hasattr(value, "state_dict"):  # a torch / transformers model
        origin = getattr(getattr(value, "config", None), "_name_or_path", "") or getattr(value, "name_or_path", "")
        # LoRA layers a run injected into the caller's model are not part of what was passed
        n = sum(p.numel() for name, p in value.named_parameters() if "lora_" not in name)
        return f"<in memory: {kind}, {n:,} parameters" + (
            f", from {origin}>" if origin else ">")
    if hasattr(value, "convert_tokens_to_ids"):  # a tokenizer
        origin = getattr(value, "name_or_path", "")
        return f"<in memory: {kind}, vocabulary {len(value):,}" + (f", from {origin}>" if origin else ">")
    if hasattr(value, "_fingerprint") and hasattr(value, "column_names"):  # datasets.Dataset
        return (f"<in memory: datasets.{kind}, {len(value):,} rows, columns {', '.join(value.column_names)}, "
                f"fingerprint {value._fingerprint}>")
    if isinstance(value, (list, tuple)):
        return f"<in memory: {kind} of {len(value):,} rows, blake2b {rows_hash(value)}>"
    return f"<in memory: {kind}>"


def rows_hash(rows) -> str:
    """blake2b (16 hex digits) of rows as canonical JSON: the same rows in the same order, the same hash."""
    h = hashlib.blake2b(digest_size=8)
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def _plain(value: Any, objects: bool = False) -> Any:
    """YAML-safe data; ``objects``: the field takes a path or an object (typed ``Any``), so anything but a
    path-like scalar is an in-memory object and is described."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Path):
        return str(value)
    if objects:
        return describe(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return describe(value)


def config_tree(cfg) -> dict:
    """The config as nested plain data (the ``config.yaml`` layout); in-memory objects described."""
    hints = typing.get_type_hints(type(cfg))
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "params" and isinstance(value, dict):  # loss hyperparameters sit beside `name`
            out.update({k: _plain(v) for k, v in value.items()})
        elif dataclasses.is_dataclass(value):
            out[f.name] = config_tree(value)
        else:
            out[f.name] = _plain(value, objects=hints.get(f.name) is Any)
    return out


def flat_params(tree: dict, prefix: str = "") -> dict[str, bool | int | float | str]:
    """Dotted keys with scalar values, as trackers take hyperparameters: ``{"training.learning_rate": 5e-6}``.

    None becomes ``"null"`` and a list its YAML flow text (TensorBoard's hparams take only bool, int, float,
    str); an absent section (``lora: null``) is one ``"null"`` entry.
    """
    out: dict[str, bool | int | float | str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
        elif value is None:
            out[name] = "null"
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return out


def write_config(run_dir: str | Path, tree: dict) -> Path:
    """Write ``run_dir/config.yaml`` (rewritten at each start: a resumed run records the config it ran with)."""
    path = Path(run_dir) / CONFIG_FILE
    path.write_text(yaml.safe_dump(tree, sort_keys=False, allow_unicode=True, width=110), encoding="utf-8")
    return path


def read_config(run_dir: str | Path) -> dict | None:
    """``run_dir/config.yaml`` as a dict, or None when the run has none (a run of an older version)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        return None
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
