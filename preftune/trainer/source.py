"""Experience sources: where the loop's micro-batches come from.

The contract (``../ARCHITECTURE.md``, "Experience source"): for optimizer step ``step`` a source yields this
process's ``gradient_accumulation_steps`` micro-batches, as a function of (seed, step) and the current weights
alone, so a resumed run sees exactly the batches an uninterrupted one would. ``static`` says whether the
batches are fixed data (only then may reference log-probs be precomputed); an on-policy source generates from
the current policy and scores its reference live. ``metrics(step)`` returns what the source measured for the
step (generation time, rewards, ...), logged beside the loss; ``evaluate(step)`` the source's own held-out
metrics (an on-policy source: rewards of greedy samples on held-out prompts). The loop never knows which
method it runs.

Optional parts: ``after_step(step, values)`` receives the step's logged metrics (averaged over processes), for
a source that adapts to training (PPO ends its epochs over a rollout early on a KL bound). ``companions``, a
dict of modules that train beside the policy (PPO's critic), comes with ``forward(engine) -> module``, the
training forward holding them: the run then trains policy and companions with one optimizer, one gradient
clip and one checkpoint (``trainer.build``); ``learning_rates``, {companion name: peak rate}, gives a companion
its own rate.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from preftune.data.batch import PreferenceBatch
from preftune.data.packing import epoch_order, length_grouped_order, unit_length
from preftune.data.prepare import ExampleSet


class ExperienceSource(Protocol):
    static: bool
    steps_per_epoch: int

    def micro_batches(self, step: int) -> Iterator: ...

    def metrics(self, step: int) -> dict[str, float]: ...

    def evaluate(self, step: int) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class StaticSource:
    """A fixed example set, shuffled per epoch: micro-batch m of step k on rank r holds the examples at
    ``order[(k·A + m)·M·W + r·M : ... + M]`` of its epoch's order (A accumulation steps, M per device, W
    processes), so the global batch of a step is the same whatever W and M are, for a fixed M·W·A.

    ``group_by_length``: each epoch's order keeps runs of M·W consecutive examples of similar length. A
    weighted mixture (``data.weights``) draws each epoch's order by its weights instead (``mixture_order``).
    """

    static = True

    def __init__(self, data: ExampleSet, *, micro: int, accum: int, world: int, rank: int, seed: int, pad_id: int,
                 layout: str, device, group_by_length: bool = False):
        self.data, self.micro, self.accum, self.world, self.rank = data, micro, accum, world, rank
        self.seed, self.pad_id, self.layout, self.device = seed, pad_id, layout, device
        self.per_step = micro * world * accum
        self.steps_per_epoch = len(data) // self.per_step
        self._lengths = [unit_length(e) for e in data.examples] if group_by_length else None
        self._order, self._epoch = [], None

    def order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._order = (self.data.mixture_order(self.seed, epoch) if getattr(self.data, "weights", None) else
                           epoch_order(len(self.data), self.seed, epoch) if self._lengths is None else
                           length_grouped_order(self._lengths, self.micro * self.world, self.seed, epoch))
            self._epoch = epoch
        return self._order

    def micro_batches(self, step: int) -> Iterator[PreferenceBatch]:
        epoch, k = divmod(step, self.steps_per_epoch)
        order = self.order(epoch)
        for m in range(self.accum):
            at = (k * self.accum + m) * self.micro * self.world + self.rank * self.micro
            yield self.data.batch(order[at : at + self.micro], self.pad_id, self.layout).to(self.device)

    def metrics(self, step: int) -> dict[str, float]:
        return {}

    def evaluate(self, step: int) -> dict[str, float]:
        return {}  # the held-out examples are the loop's (``loop.evaluate``)

    def state_dict(self) -> dict:
        return {}  # the order is a function of (seed, epoch)

    def load_state_dict(self, state: dict) -> None:
        pass
