"""A training split read as a stream (``data.streaming``): records drawn in a seeded order without ever
holding the split in memory, and a cursor that can be saved and restored exactly.

    sources -> rows (``read_rows``: JSONL / CSV line by line, Parquet by row group, hub ids with
    ``streaming=True``) -> records of the loss's kind (``formats.normalize``; pairs given to an unpaired loss
    become two records) -> a shuffle buffer -> the cursor

**Epochs and shuffling.** Without weights the sources are read one after the other; one pass over all of them
is an epoch, and epoch e goes through a shuffle buffer of ``data.shuffle_buffer`` records seeded by
(seed, e): the buffer fills, then each record read replaces one drawn uniformly from it (the drawn one is
yielded), and what is left at the end comes out shuffled. With weights the sources are interleaved: each
record comes from source s with probability wₛ / Σ w (a seeded draw), source s's pass p is shuffled with
(seed, s, p), and a source that runs out starts its next pass; the stream never ends, and ``epoch`` counts the
passes of the first source.

**Resume.** The cursor's state is where it stands: (epoch, records taken) — per source (pass, taken) and the
draw generator's state with weights. Restoring re-reads the current pass from its start through the same
seeded buffer and skips the records already taken, without tokenizing them: exact, at the cost of reading
that much of the stream again.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np

from preftune.data.formats import DropLog, normalize
from preftune.data.load import read_rows
from preftune.data.sources import as_sources


def _rng(*parts: int) -> random.Random:
    """A generator seeded by ``parts`` alone (never by Python's per-process string hashing)."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """``items`` through a shuffle buffer of ``size``: each item read replaces a uniformly drawn one, which is
    yielded; the rest comes out shuffled at the end. ``size`` 1 keeps the order."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        out, buffer[j] = buffer[j], item
        yield out
    rng.shuffle(buffer)
    yield from buffer


class StreamSplit:
    """The records of one split, read lazily.

    Args:
        source: ``data.train``: one source or a list (``data.sources``), or in-memory rows / an iterable
            dataset (one source).
        kind: the loss's data kind ("paired", "unpaired", "sft").
        buffer: shuffle-buffer size.
        seed: the run's seed.
    """

    def __init__(self, source: Any, kind: str, buffer: int, seed: int):
        specs = as_sources(source)
        self.sources = specs if specs else [source]
        self.weights = [s.weight for s in specs] if specs and all(s.weight is not None for s in specs) else None
        self.kind, self.buffer, self.seed = kind, buffer, seed

    def _records(self, index: int, sink: list[DropLog]) -> Iterator:
        """Source ``index``'s records; each row's drops go to ``sink[0]`` as it is read (a cursor replaying
        its pass swaps the log)."""
        for raw in read_rows(self.sources[index], streaming=True):
            for rec in normalize([raw], self.kind, sink[0]):
                rec.group = index
                yield rec

    def pass_records(self, index: int | None, number: int, sink: list[DropLog]) -> Iterator:
        """Pass ``number`` of source ``index`` (weights), or epoch ``number`` of all sources chained (None)."""
        if index is None:
            chain = (rec for i in range(len(self.sources)) for rec in self._records(i, sink))
            return shuffled(chain, self.buffer, _rng(self.seed, number))
        return shuffled(self._records(index, sink), self.buffer, _rng(self.seed, index, number, 0x57))

    def head(self, n: int, drops: DropLog) -> list:
        """The first ``n`` records in file order (the data check's sample); ``drops`` gets their rows' drops."""
        out: list = []
        for i in range(len(self.sources)):
            for rec in self._records(i, [drops]):
                if len(out) >= n:
                    return out
                out.append(rec)
        return out


class Cursor:
    """Where a run stands in a :class:`StreamSplit`; ``next()`` gives the next record. Drops found while
    reading go to ``drops``; a restored cursor's replay records none (they were recorded before the checkpoint:
    the seeded buffer reads ahead exactly as it did then)."""

    def __init__(self, split: StreamSplit, drops: DropLog):
        self.split, self.drops = split, drops
        n = len(split.sources) if split.weights else 1
        self.passes, self.taken = [0] * n, [0] * n
        self._its: list[Iterator | None] = [None] * n
        self._sink = [drops]
        self._draw = np.random.default_rng([split.seed, 0x64726177]) if split.weights else None
        self._p = None if split.weights is None else np.asarray(split.weights) / float(sum(split.weights))

    @property
    def epoch(self) -> int:
        return self.passes[0]

    def _open(self, k: int) -> Iterator:
        return self.split.pass_records(k if self.split.weights else None, self.passes[k], self._sink)

    def _name(self, k: int) -> str:
        source = self.split.sources[k] if self.split.weights else None
        return getattr(source, "label", "the stream")

    def _next_of(self, k: int):
        for _ in range(2):  # the current pass, else the next one
            if self._its[k] is None:
                self._its[k] = self._open(k)
            rec = next(self._its[k], None)
            if rec is not None:
                self.taken[k] += 1
                return rec
            self._its[k], self.passes[k], self.taken[k] = None, self.passes[k] + 1, 0
        raise ValueError(f"data.train: {self._name(k)} yields no usable record")

    def next(self):
        k = 0 if self._draw is None else int(self._draw.choice(len(self._p), p=self._p))
        return self._next_of(k)

    def state_dict(self) -> dict:
        state: dict[str, Any] = {"passes": list(self.passes), "taken": list(self.taken)}
        if self._draw is not None:
            state["draw"] = self._draw.bit_generator.state
        return state

    def load_state_dict(self, state: dict) -> None:
        """Move to ``state``: each pass re-read from its start and ``taken`` records skipped (not tokenized)."""
        self.passes = list(state["passes"])
        if self._draw is not None and "draw" in state:
            self._draw.bit_generator.state = state["draw"]
        self._sink[0] = DropLog()  # the replay's drops were recorded before the checkpoint
        try:
            for k, skip in enumerate(state["taken"]):
                self._its[k], self.taken[k] = self._open(k), 0
                for _ in range(skip):
                    if next(self._its[k], None) is None:
                        raise ValueError(f"data.train changed since the checkpoint: {self._name(k)} ended "
                                         f"before record {skip} of pass {self.passes[k]}")
                self.taken[k] = skip
        finally:
            self._sink[0] = self.drops
