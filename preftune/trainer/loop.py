"""The training loop: build a run, then run its steps.

    build (``build.py``) -> steps: micro-batches from the source, accumulate, clip, step, log, evaluate,
    checkpoint -> final eval and save

Method differences live in ``steps.py`` (one step function per data kind), in the loss registry and in the
experience source; the loop asks the :class:`~preftune.trainer.steps.Objective` what it needs and never matches
loss names. What differs between training a policy and a reward model (``task``) is the model kind
(``models.MODEL_KINDS``): how it loads and what its forward returns (sequence log-probs or scores).
"""

from __future__ import annotations

import json
import resource
import time
import warnings
from pathlib import Path

import torch

from preftune.config import to_config
from preftune.data.packing import epoch_order  # noqa: F401  (re-exported: the order tests read it here)
from preftune.models import save_pretrained
from preftune.trainer import rundir
from preftune.trainer.build import Run, build_run
from preftune.trainer.callbacks import Hooks
from preftune.trainer.casts import cast_window
from preftune.trainer.checkpoint import parameters_finite
from preftune.trainer.console import Progress, console
from preftune.trainer.heap import reuse_freed_memory
from preftune.trainer.metrics import MetricSums
from preftune.trainer.parallel import eval_rounds
from preftune.trainer.record import closing_on_error, data_record, end_of_run, preflight


def train(config, *, resume: str | bool | None = None, overwrite: bool = False, log=print,
          callbacks=None) -> dict:
    """Run one training job; returns the summary also written to ``output_dir/train_summary.json``.

    ``config`` is a :class:`~preftune.config.Config`, a dict or a YAML path. ``config.model`` may be a loaded
    model and ``config.data.train`` a ``datasets.Dataset``. ``resume``: True/"latest" or a checkpoint path
    (``"auto"``: the newest checkpoint if there is one, else a fresh start replacing an attempt without one);
    ``overwrite``: replace the previous run in ``output_dir`` (a used directory is refused without one of them).
    ``callbacks``: objects with ``on_step`` / ``on_eval`` / ``on_save`` / ``on_end`` (:mod:`.callbacks`).
    """
    cfg = to_config(config)
    preflight(cfg, callbacks)
    try:
        with reuse_freed_memory(cfg.engine.reuse_freed_memory and not torch.cuda.is_available()):
            run = build_run(cfg, resume, console(log), overwrite=overwrite)
            run.hooks = Hooks.for_run(callbacks, run)
            with closing_on_error(run):
                return finish(run, run_steps(run))
    finally:
        rundir.release(cfg.training.output_dir)  # the run directory's lock, however the run ended


def run_steps(run: Run) -> dict:
    """The optimizer steps from ``run.start_step`` to ``run.total_steps``; returns the step totals."""
    tc, acc = run.cfg.training, run.accelerator
    accum, world = tc.gradient_accumulation_steps, acc.num_processes
    per_step = tc.per_device_batch_size * world * accum
    run.say(f"training: {len(run.source.data)} examples, {run.total_steps} steps of {per_step} "
            f"({tc.per_device_batch_size} x {world} processes x {accum} accumulation), loss {run.cfg.loss.name}, "
            f"{tc.precision}" + (f", {run.cfg.model_dtype} weights" if run.cfg.model_dtype != "fp32" else "")
            + (f", {run.parallel.name}" if run.parallel.sharded else ""))
    bar = Progress(tc.progress_bar and run.main, run.total_steps, run.start_step)
    totals = {"last_train": {}, "eval": {}, "tokens": 0, "samples": 0, "train_time": 0.0, "source_time": 0.0}
    consecutive_bad = 0
    for step in range(run.start_step, run.total_steps):
        t0 = time.perf_counter()
        # -- forward and backward over the accumulation micro-batches
        sums, tokens, bad = MetricSums(), 0, False
        source_time, t_next = 0.0, time.perf_counter()
        with cast_window(run) as casts:  # the bf16 weight copies, made once for the window (closed before the step)
            for m, batch in enumerate(run.source.micro_batches(step)):
                source_time += time.perf_counter() - t_next
                with run.parallel.accumulate(m == accum - 1):  # gradients synchronised on the last micro-batch
                    with casts.forward():
                        losses, metrics = run.step_fn(run.objective, run.logp_fn, batch, run.reference_fn)
                    loss = batch.reduce(losses, accum)
                    bad = bad or not torch.isfinite(loss).item()
                    run.parallel.backward(loss)
                sums.add(batch.kept({"loss": losses, **metrics}))
                tokens += batch.num_tokens
                t_next = time.perf_counter()
        source_time += time.perf_counter() - t_next
        totals["source_time"] += source_time
        if not sums.sums:  # the source had nothing to learn from at this step (e.g. every reward tied)
            _no_signal(run, step)
            _evaluate_and_checkpoint(run, step + 1, totals)
            if run.monitor.stop_reason:
                break
            continue
        # -- clip and update, unless some process saw a non-finite loss or gradient
        params = [p for p in run.trainable.parameters() if p.requires_grad]
        grad_norm = run.parallel.clip(params, tc.max_grad_norm)
        if _any_process(acc, bad or not torch.isfinite(grad_norm).item()):
            run.optimizer.zero_grad(set_to_none=True)
            run.nonfinite_total, consecutive_bad = run.nonfinite_total + 1, consecutive_bad + 1
            _nonfinite(run, step, consecutive_bad)
            continue
        consecutive_bad = 0
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        if _any_process(acc, not parameters_finite(params)):  # e.g. an infinite learning rate: nothing to skip
            raise run.claim.nonfinite_stop(step + 1, run.main, "the update made the weights non-finite")

        # -- log, evaluate, checkpoint
        dt = time.perf_counter() - t0
        done, total_tokens = step + 1, tokens * world
        totals["train_time"] += dt
        totals["tokens"] += total_tokens
        totals["samples"] += per_step
        values = sums.means(acc)
        values.update(run.source.metrics(step))
        if not run.source.static:
            values["time/train_s"] = dt - source_time
        values.update(grad_norm=float(grad_norm), learning_rate=run.scheduler.get_last_lr()[0],
                      tokens_per_second=total_tokens / dt,
                      epoch=run.source.epoch(step) if hasattr(run.source, "epoch") else step / run.source.steps_per_epoch)
        totals["last_train"] = values
        if hasattr(run.source, "after_step"):  # a source that adapts to training (PPO's early stop) sees the step
            run.source.after_step(step, values)
        if run.writer and (done % tc.logging_every == 0 or done == run.total_steps):
            run.writer.write(done, "train", values)
        run.monitor.after_step(done, values, run.writer)
        run.hooks.on_step(done, values)
        bar.step(values, totals["tokens"] / totals["train_time"])  # tokens/s of training time alone
        _evaluate_and_checkpoint(run, done, totals)
        if run.monitor.stop_reason:  # monitor.max_kl or early stopping; the eval of this step was the last
            break
    bar.close()
    return totals


def _any_process(accelerator, flag: bool) -> bool:
    """Whether ``flag`` holds on any process (so that all skip an update together)."""
    value = torch.tensor([float(flag)], device=accelerator.device)
    if accelerator.num_processes > 1:
        value = accelerator.reduce(value, reduction="sum")
    return value.item() > 0


def _evaluate_and_checkpoint(run: Run, done: int, totals: dict) -> None:
    """The evaluation and checkpoint due after ``done`` steps (the final ones are :func:`finish`'s)."""
    tc = run.cfg.training
    if tc.eval_every and done % tc.eval_every == 0 and done != run.total_steps:
        totals["eval"] = evaluate(run, done)
    if tc.save_every and done % tc.save_every == 0 and done != run.total_steps:
        path = run.checkpoint(done)
        if run.accelerator.num_processes > 1:
            run.accelerator.wait_for_everyone()
        run.hooks.on_save(done, path)


def _no_signal(run: Run, step: int) -> None:
    """A step without a single usable example on any process: no update (the schedule still advances, so a
    resumed run stays aligned); the source's metrics are logged (``rollout/pairs`` 0) and counted in
    ``train_summary.json`` (``no_signal_steps``). The user is told why once, not at every such step."""
    run.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # torch's "scheduler before optimizer" notice: intended here
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        run.scheduler.step()
    values = {**run.source.metrics(step), "learning_rate": run.scheduler.get_last_lr()[0]}
    run.no_signal_total += 1
    if run.no_signal_total == 1:
        run.say(f"warning: step {step + 1}: {values.get('rollout/why', 'no usable examples')}: no learning "
                "signal, update skipped (further such steps are skipped silently and counted as no_signal_steps "
                "in train_summary.json; a reward that never varies within a prompt's samples never trains)")
    done, tc = step + 1, run.cfg.training
    if run.writer and (done % tc.logging_every == 0 or done == run.total_steps):
        run.writer.write(done, "train", {k: v for k, v in values.items() if not isinstance(v, str)})


def _nonfinite(run: Run, step: int, consecutive: int) -> None:
    """A skipped update: say so; after ``training.max_nonfinite_steps`` in a row, stop. The weights of that
    moment may already be diverging, so no checkpoint is written: the error names the last good one."""
    run.say(f"step {step + 1}: non-finite loss or gradient, update skipped ({consecutive} in a row)")
    if consecutive >= run.cfg.training.max_nonfinite_steps:
        raise run.claim.nonfinite_stop(step + 1, run.main, f"{consecutive} consecutive non-finite steps")


def evaluate(run: Run, step: int) -> dict:
    """Held-out metrics at ``step`` (sharded over processes), written as an ``eval`` record; then the monitor."""
    acc, micro = run.accelerator, run.cfg.training.per_device_batch_size
    pad_id = run.tokenizer.pad_token_id
    run.model.eval()
    sums = MetricSums()
    mine = list(range(acc.process_index, len(run.eval_set), acc.num_processes))
    rounds = eval_rounds(len(mine), len(run.eval_set), acc.num_processes, micro * 2, run.parallel.sharded)
    with torch.no_grad(), run.autocast():
        for start in range(0, rounds * micro * 2, micro * 2):
            idx = mine[start : start + micro * 2]  # empty: a sharded engine's extra forward, discarded
            batch = run.eval_set.batch(idx or [0], pad_id, run.layout).to(acc.device)
            losses, metrics = run.step_fn(run.objective, run.logp_fn, batch, run.reference_fn)
            if idx:
                sums.add({"loss": losses, **metrics})
        values = {**(sums.means(acc) if len(run.eval_set) else {}), **run.source.evaluate(step)}
    run.model.train()
    if not values:
        return {}
    if run.writer:
        run.writer.write(step, "eval", values)
    run.monitor.after_eval(step, values, run.writer)  # health, KL, alarms, samples, best model, early stopping
    run.hooks.on_eval(step, values)
    return values


def finish(run: Run, totals: dict) -> dict:
    """The final evaluation, the saved model, ``train_summary.json``, the plots, report and model card (and the
    push); returns the summary."""
    cfg, tc = run.cfg, run.cfg.training
    eval_values = totals["eval"]
    if not run.monitor.stop_reason:
        eval_values = evaluate(run, run.total_steps) or eval_values
    model_dir = run.run_dir / "final"
    if tc.save_model:
        gathered = run.parallel.full_state_dict(run.policy)  # every process: a sharded engine gathers the weights
        full = {} if gathered is None else {"state_dict": gathered}
        if run.main:  # into a temporary directory, then swapped in: never half a model
            run.claim.publish_model("final", lambda tmp: save_pretrained(run.policy, run.tokenizer, tmp, **full))
        run.hooks.on_save(run.monitor.stopped_at or run.total_steps, model_dir if run.main else None)
    runtime, loop_s = time.perf_counter() - run.t_start, totals["train_time"]
    summary = {
        "train_runtime_s": runtime,
        "train_loop_s": loop_s,  # the optimizer steps alone: no setup, reference pass, evaluation or saving
        "samples_per_second": totals["samples"] / loop_s if loop_s else 0.0,
        "tokens_per_second": totals["tokens"] / loop_s if loop_s else 0.0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_loss": totals["last_train"].get("loss"),
        "steps": run.monitor.stopped_at or run.total_steps,
        "stopped": run.monitor.stop_reason,
        "nonfinite_steps": run.nonfinite_total,
        "no_signal_steps": run.no_signal_total,
        "source_s": totals["source_time"],
        "train_examples": len(run.source.data),
        "eval_examples": len(run.eval_set),
        "dropped_rows": dict(run.drops.counts),
        "final_train_metrics": totals["last_train"],
        "final_eval_metrics": eval_values,
        "task": cfg.task,
        "model_dir": str(model_dir) if tc.save_model else None,
        "best": run.monitor.best,
        "data": data_record(run),
    }
    if torch.cuda.is_available():
        summary["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if run.main:
        (run.run_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
        run.writer.close()
        _plots(run.run_dir, run.say)
        end_of_run(run)  # the model card in final/, then the push (training.push_to_hub)
    run.monitor.close()
    run.accelerator.wait_for_everyone()
    run.hooks.on_end(summary)
    return summary


def _plots(run_dir: Path, say) -> None:
    from preftune.report.html import write_report
    from preftune.report.plots import plot_run

    try:
        paths = plot_run(run_dir)
        say(f"plots: {', '.join(p.name for p in paths)}")
        say(f"report: {write_report(run_dir, paths)}")
    except Exception as e:  # a plot failure must never lose a finished run
        say(f"plots skipped: {type(e).__name__}: {e}")
