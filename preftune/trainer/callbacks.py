"""Callbacks: the caller's code at fixed points of a run (the Hugging Face Trainer habit).

    class Watch:
        def on_eval(self, step, metrics, state):
            print(step, metrics["rewards/accuracies"])

    preftune.train("config.yaml", callbacks=[Watch()])

A callback is any object with one or more of these methods, called in this order:

    on_step(step, metrics, state)   after every optimizer step that updated the weights (a skipped non-finite
                                    step calls nothing). ``step``: optimizer steps done, from 1. ``metrics``:
                                    this step's train values, reduced over processes (loss, rewards/*, logps/*,
                                    grad_norm, learning_rate, tokens_per_second, epoch, the loss's own terms):
                                    the ``train`` record of metrics.jsonl, also on steps that ``logging_every``
                                    does not write.
    on_eval(step, metrics, state)   after each evaluation (every ``training.eval_every`` steps, and the final one
                                    at the last step), once the monitor has run: ``metrics`` is the ``eval``
                                    record (loss, rewards/*, ...).
    on_save(step, path, state)      after a checkpoint is written (``path``: ``checkpoints/step-N``) and after the
                                    final model (``output_dir/final``); ``path`` is None on processes other than
                                    the main one, which writes nothing.
    on_end(summary, state)          once, at the very end: ``summary`` is the dict ``train`` returns (also in
                                    train_summary.json); the report and model card are written by then.

``state`` (:class:`TrainState`) is the same object at every call: ``config`` (the checked Config), ``run_dir``,
``total_steps``, ``is_main_process``, ``model`` (the model being trained: the ``PeftModel`` with LoRA; it may be
read or saved, not replaced) and ``tokenizer``. Callbacks run on every process, with the same step and metrics
(write files only when ``state.is_main_process``). An exception in a callback stops the run and propagates,
as in the Hugging Face Trainer. Hugging Face method names (``on_step_end``, ``on_evaluate``, ``on_train_end``,
``on_log``) are not called: a callback with only those is an error that names the equivalents.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError

HOOKS = ("on_step", "on_eval", "on_save", "on_end")
HF_NAMES = {"on_step_end": "on_step", "on_evaluate": "on_eval", "on_train_end": "on_end", "on_log": "on_step"}


class Callback:
    """A base class with every hook doing nothing, for those who like to subclass (duck typing works too)."""

    def on_step(self, step: int, metrics: dict, state: TrainState) -> None:
        pass

    def on_eval(self, step: int, metrics: dict, state: TrainState) -> None:
        pass

    def on_save(self, step: int, path: Path | None, state: TrainState) -> None:
        pass

    def on_end(self, summary: dict, state: TrainState) -> None:
        pass


@dataclass
class TrainState:
    """What a callback sees of the run (see the module docstring)."""

    config: Any
    run_dir: Path
    total_steps: int
    is_main_process: bool
    model: Any
    tokenizer: Any


def check_callbacks(callbacks) -> list:
    """The callbacks as a list (one callback alone is taken as a list of one); an object with none of the hooks
    is an error that names it."""
    if callbacks is not None and any(hasattr(callbacks, h) for h in (*HOOKS, *HF_NAMES)):
        callbacks = [callbacks]
    out = list(callbacks or [])
    for i, cb in enumerate(out):
        if not any(callable(getattr(cb, h, None)) for h in HOOKS):
            hf = [f"{name} -> {ours}" for name, ours in HF_NAMES.items() if hasattr(cb, name)]
            hint = f" (Hugging Face names are called differently here: {', '.join(hf)})" if hf else ""
            raise PreftuneError(f"callbacks[{i}]: {type(cb).__name__} has none of {', '.join(HOOKS)}{hint}")
    return out


class Hooks:
    """Calls each callback's hook, in the order the callbacks were given; the loop calls one method per point."""

    def __init__(self, callbacks=(), state: TrainState | None = None):
        self.callbacks = check_callbacks(callbacks)
        self.state = state

    @classmethod
    def for_run(cls, callbacks, run) -> Hooks:
        return cls(callbacks, TrainState(run.cfg, run.run_dir, run.total_steps, run.main, run.policy, run.tokenizer))

    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if callable(fn):
                fn(*args, self.state)

    def on_step(self, step: int, metrics: dict) -> None:
        self._call("on_step", step, dict(metrics))  # a copy: a callback cannot change what the loop logs

    def on_eval(self, step: int, metrics: dict) -> None:
        self._call("on_eval", step, dict(metrics))

    def on_save(self, step: int, path: Path | None) -> None:
        self._call("on_save", step, path)

    def on_end(self, summary: dict) -> None:
        self._call("on_end", summary)
