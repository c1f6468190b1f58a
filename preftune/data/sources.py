"""Where the rows of one split come from: one source, or several mixed by weight.

``data.train`` (and ``data.eval``) take a single source or a list of them::

    train: data/pairs.jsonl                         a file, a glob (data/*.jsonl), a directory, or a hub id:
    train: org/dataset:subset:train                 name, name:split or name:subset:split
    train:
      - {path: a.jsonl, weight: 0.7}
      - {path: org/dataset, name: subset, split: train, weight: 0.3}

A glob matches files (sorted), read in turn as one source. Without weights the rows of all sources are pooled:
each source contributes in proportion to its size. With a weight on every source an epoch draws its examples
from source i with probability wᵢ / Σ w (``mixture_order``; a streamed split interleaves the same way), so a
small source is repeated and a large one subsampled; a source that runs out starts over, reshuffled.
In-memory rows (a list of dicts, a ``datasets.Dataset``) are one source and never a list of sources.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

SPEC_KEYS = ("path", "weight", "split", "name")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def is_local_path(source: str) -> bool:
    """Whether ``source`` names a local file or directory (existing, or written like one) rather than a hub id."""
    return os.path.exists(source) or source.endswith(FILE_SUFFIXES) or source.startswith((".", "/", "~"))


@dataclass(frozen=True)
class Source:
    """One source of rows: ``path`` is a file, glob, directory or hub id; ``name`` the hub subset."""

    path: str
    weight: float | None = None
    split: str | None = None
    name: str | None = None

    @property
    def label(self) -> str:
        parts = [self.path] + [f"{k}={v}" for k, v in (("name", self.name), ("split", self.split)) if v]
        return " ".join(parts)


def is_source_list(value: Any) -> bool:
    """Whether ``value`` is a list of sources (strings, or mappings of ``path`` / ``weight`` / ``split`` /
    ``name``) rather than in-memory rows."""
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(v, (str, os.PathLike)) or (isinstance(v, dict) and "path" in v
                                                           and set(v) <= set(SPEC_KEYS)) for v in value))


def source_problems(value: Any, key: str) -> list[str]:
    """What is wrong with a list of sources under config key ``key`` (empty: nothing)."""
    if not isinstance(value, (list, tuple)) or not value or not any(isinstance(v, dict) and "path" in v
                                                                        for v in value):
        return []
    problems = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            continue
        unknown = sorted(set(item) - set(SPEC_KEYS))
        if unknown:
            problems.append(f"{key}[{i}]: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                            f"(a source takes {', '.join(SPEC_KEYS)})")
        if not isinstance(item.get("path"), str) or not item.get("path"):
            problems.append(f"{key}[{i}].path: expected a file, glob, directory or hub id")
        weight = item.get("weight")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                                   or not weight > 0 or weight == float("inf")):
            problems.append(f"{key}[{i}].weight: expected a number > 0, got {weight!r}")
        for field in ("split", "name"):
            if item.get(field) is not None and not isinstance(item[field], str):
                problems.append(f"{key}[{i}].{field}: expected a string, got {item[field]!r}")
    if problems:
        return problems
    weighted = [isinstance(v, dict) and v.get("weight") is not None for v in value]
    if any(weighted) and not all(weighted):
        missing = ", ".join(f"{key}[{i}]" for i, w in enumerate(weighted) if not w)
        problems.append(f"{key}: a weight on some sources but not on {missing}: give every source a weight "
                        "(sampling proportions), or none (rows pooled)")
    return problems


def as_sources(value: Any) -> list[Source] | None:
    """The sources of a split, or None for in-memory rows (a list of dicts, a Dataset) and no data."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return [Source(os.fspath(value))]
    if not is_source_list(value):
        return None
    return [Source(os.fspath(v)) if not isinstance(v, dict) else
            Source(str(v["path"]), None if v.get("weight") is None else float(v["weight"]), v.get("split"),
                   v.get("name")) for v in value]


def weights_of(sources: list[Source] | None) -> list[float] | None:
    """The mixing weights when every source has one (and there are several or one explicit), else None."""
    if not sources or any(s.weight is None for s in sources):
        return None
    return [float(s.weight) for s in sources]


def expand_glob(path: str) -> list[str]:
    """The files a glob pattern matches, sorted; a path without glob characters as it is."""
    if not any(c in path for c in "*?["):
        return [path]
    return sorted(glob.glob(os.path.expanduser(path), recursive=True))


def mixture_order(groups: np.ndarray, weights: list[float], seed: int, epoch: int) -> list[int]:
    """One epoch's example order for a weighted mixture: ``len(groups)`` draws, each from source s with
    probability wₛ / Σ w, taking that source's next example in its own shuffled order.

    ``groups[i]`` is example i's source. A source drawn more often than it has examples goes through its
    examples again in a new shuffle (pass p of source s in epoch e is seeded by (seed, e, s, p)); every draw is
    a function of (seed, epoch) alone, so a resumed run sees the same order. Naive equivalent::

        for k in range(n): s = rng.choice(S, p=w); order.append(next(per_source_stream[s]))
    """
    groups = np.asarray(groups)
    n, k = len(groups), len(weights)
    p = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    draws = np.random.default_rng([seed, epoch, 0x6D6978]).choice(k, size=n, p=p)  # (n,) source per slot
    order = np.empty(n, dtype=np.int64)
    for s in range(k):
        members = np.flatnonzero(groups == s)
        slots = np.flatnonzero(draws == s)
        if len(slots) == 0:
            continue
        if len(members) == 0:
            raise ValueError(f"source {s} of the mixture has no usable examples")
        passes = -(-len(slots) // len(members))
        stream = np.concatenate([members[np.random.default_rng([seed, epoch, s, q]).permutation(len(members))]
                                 for q in range(passes)])
        order[slots] = stream[: len(slots)]
    return order.tolist()


def missing_files(value: Any) -> list[str]:
    """The local paths of a split's sources that do not exist, and globs that match nothing (hub ids are not
    checked here: they fail when read, with the hub's reason)."""
    out = []
    for s in as_sources(value) or []:
        if any(c in s.path for c in "*?["):
            if not expand_glob(s.path):
                out.append(s.path)
        elif is_local_path(s.path) and not os.path.exists(os.path.expanduser(s.path)):
            out.append(s.path)
    return out
