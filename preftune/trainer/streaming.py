"""The experience source of a streamed training split (``data.streaming``): the static source's contract,
drawn from a stream instead of an in-memory set.

Step k's global batch is the next M·W·A usable examples of the stream (``data.stream``: seeded shuffle buffer,
weighted interleaving), tokenized as they are drawn with the run's ``Tokenization`` (rows it drops are counted
and the next record is taken), and laid out like the static source's: micro-batch m on rank r holds examples
``(m·W + r)·M ... + M`` of the step. Every process reads and tokenizes the whole global batch and keeps its
slice, so no process depends on another's reading. ``state_dict`` is the cursor's position plus the drop
counts and how many dropped rows ``dropped.jsonl`` holds; a resumed run replays the stream to that position
(``Cursor.load_state_dict``) and cuts ``dropped.jsonl`` back to that count, so it sees the batches and
records the drops an uninterrupted run would.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from preftune.data.batch import PreferenceBatch
from preftune.data.formats import DropLog, Skip
from preftune.data.outputs import json_line
from preftune.data.prepare import ExampleSet, mismatched, prepare_eval, unusable_part
from preftune.data.stream import Cursor, StreamSplit
from preftune.data.tokenize import record_row
from preftune.errors import PreftuneError

CHECK_ROWS = 10_000
"""Rows of the stream's start the data check reads before training."""


class StreamedExamples:
    """``source.data`` of a stream: its length is the number of examples drawn so far (a stream has no
    known length)."""

    def __init__(self):
        self.count = 0
        self.examples: list = []

    def __len__(self) -> int:
        return self.count


class StreamingSource:
    """Micro-batches from a :class:`~preftune.data.stream.Cursor` (see the module docstring)."""

    static = True  # fixed data (not generated), though too big to precompute a reference for

    def __init__(self, split: StreamSplit, tokenization, drops: DropLog, *, kl: bool, out_dir: Path | None,
                 micro: int, accum: int, world: int, rank: int, seed: int, pad_id: int, layout: str, device,
                 total_steps: int):
        self.split, self.tokenization, self.drops, self.kl = split, tokenization, drops, kl
        self.micro, self.accum, self.world, self.rank = micro, accum, world, rank
        self.seed, self.pad_id, self.layout, self.device = seed, pad_id, layout, device
        self.per_step = micro * world * accum
        self.steps_per_epoch = total_steps  # unknown for a stream: sized by training.max_steps
        self.cursor = Cursor(split, drops)
        self.data = StreamedExamples()
        self.next_step = 0
        self.dropped_file = None if out_dir is None else Path(out_dir) / "dropped.jsonl"
        self.written = 0  # lines of dropped.jsonl
        self._flushed = 0  # rows of drops.rows (the eval set's first) already in the file
        self._mode = "w"  # a fresh run starts the file; a resumed one continues its cut-back file

    def epoch(self, step: int) -> float:
        """The stream's pass (the loop's ``epoch`` metric): whole passes so far."""
        return float(self.cursor.epoch)

    def _draw(self) -> list:
        """The next global batch: ``per_step`` usable examples, each tokenized as it is drawn."""
        out = []
        while len(out) < self.per_step:
            rec = self.cursor.next()
            try:
                out.append(self.tokenization.pair(rec) if hasattr(rec, "chosen") else self.tokenization.single(rec))
            except Skip as skip:
                self.drops.drop(rec.source, rec.line, str(skip), record_row(rec))
        self.data.count += len(out)
        return out

    def micro_batches(self, step: int) -> Iterator[PreferenceBatch]:
        if step != self.next_step:
            raise PreftuneError(f"a streamed split is read in order: step {step} asked after step "
                                f"{self.next_step - 1}")
        examples = ExampleSet(self._draw())
        if self.kl:  # KTO's mismatched completions, within the step's batch
            examples.kl_examples = mismatched(examples.examples, self.seed + step)
        self.next_step = step + 1
        self._flush()
        for m in range(self.accum):
            at = (m * self.world + self.rank) * self.micro
            yield examples.batch(list(range(at, at + self.micro)), self.pad_id, self.layout).to(self.device)

    def _flush(self) -> None:
        """Append the rows dropped since the last flush to ``dropped.jsonl`` (main process)."""
        new = self.drops.rows[self._flushed:]
        if (new or self._mode == "w") and self.dropped_file is not None:
            with open(self.dropped_file, self._mode, encoding="utf-8") as f:
                f.writelines(json_line(r) for r in new)
            self._mode = "a"
        self.written += len(new)
        self._flushed = len(self.drops.rows)

    def metrics(self, step: int) -> dict[str, float]:
        return {"data/examples_drawn": float(self.data.count), "data/dropped_rows": float(self.drops.dropped)}

    def evaluate(self, step: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {"cursor": self.cursor.state_dict(), "next_step": self.next_step, "drawn": self.data.count,
                "read": self.drops.read, "counts": dict(self.drops.counts), "written": self.written}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.cursor.load_state_dict(state["cursor"])
        self.next_step, self.data.count = state["next_step"], state["drawn"]
        self.drops.read, self.drops.counts = state["read"], Counter(state["counts"])
        # the file's first lines are the eval set's drops and the stream's up to the checkpoint; rows past it are
        # met again, so they are cut
        self.written, self._flushed, self._mode = state["written"], len(self.drops.rows), "a"
        if self.dropped_file is not None and self.dropped_file.exists():
            lines = self.dropped_file.read_text(encoding="utf-8").splitlines(keepends=True)[: self.written]
            self.dropped_file.write_text("".join(lines), encoding="utf-8")


class PreparedStream:
    """What ``build_run`` gets for a streamed split: ``data`` for messages, ``source(**geometry)`` for the loop."""

    def __init__(self, split: StreamSplit, tokenization, drops: DropLog, kl: bool, out_dir: Path | None,
                 total_steps: int):
        self.split, self.tokenization, self.drops, self.kl = split, tokenization, drops, kl
        self.out_dir, self.total_steps = out_dir, total_steps
        self.data = StreamedExamples()

    def source(self, **geometry) -> StreamingSource:
        source = StreamingSource(self.split, self.tokenization, self.drops, kl=self.kl, out_dir=self.out_dir,
                                 total_steps=self.total_steps, **geometry)
        self.data = source.data
        return source


def prepare_stream(cfg, objective, tokenization, out_dir: Path | None, say) -> tuple[PreparedStream, ExampleSet,
                                                                                      DropLog]:
    """(the streamed train split, the eval set loaded whole, the drop log both write to).

    The data check reads the stream's first ``CHECK_ROWS`` rows (tokenizing them too, so data whose rows would
    all drop is refused) before any model loads; the eval set goes through ``prepare_data`` as usual.
    """
    from preftune.data.validate import validate_records

    dc = cfg.data
    split = StreamSplit(dc.train, objective.data, dc.shuffle_buffer, cfg.training.seed)
    checked = DropLog()
    head = split.head(CHECK_ROWS, checked)
    probe = copy.copy(tokenization)  # its truncation counts are not the run's
    probe.stats = type(tokenization.stats)()
    examples, first_drop, alive = [], {}, set()
    for rec in head:
        try:
            examples.append(probe.pair(rec) if hasattr(rec, "chosen") else probe.single(rec))
            alive.add((rec.source, rec.line))
        except Skip as skip:
            first_drop.setdefault((rec.source, rec.line), (str(skip), record_row(rec)))
    gone = DropLog()
    for (source, line), (reason, row) in first_drop.items():  # a row counts as dropped when all of it drops
        if (source, line) not in alive:
            gone.drop(source, line, reason, row)
    checked.extend(unusable_part(gone, everything=not examples))
    report = validate_records(head, checked, source=f"the first {checked.read} rows of the stream")
    for line in report.summary().splitlines():
        say(f"data check: {line}")
    report.require_usable(dc.allow_unusable)
    for line in objective.setup(examples):  # data-dependent loss settings, from the checked rows
        say(f"loss: {line}")
    drops = DropLog()
    evals = prepare_eval(dc, objective.data, tokenization, cfg.training.seed, drops, kl=objective.needs_kl)
    names = ", ".join(getattr(s, "label", "<memory>") for s in split.sources)
    say(f"data: streaming {names} (shuffle buffer {dc.shuffle_buffer}); eval {len(evals)}")
    return PreparedStream(split, tokenization, drops, objective.needs_kl, out_dir, cfg.training.max_steps), evals, drops
