"""The training loop: one function, read top to bottom.

    setup -> data -> models -> reference log-probs -> optimizer -> (resume) -> steps -> final eval and save

Method differences live in ``steps.py`` (one step function per data kind) and in the loss registry; the
loop asks the :class:`Objective` what it needs and never matches loss names. What differs between training a
policy and a reward model (``task``) is the model kind (``models.MODEL_KINDS``): how it loads and what its
forward returns (sequence log-probs or scores); the steps below are the same.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import random
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from preftune.config import check_loss_params, to_config
from preftune.data.load import is_local_path
from preftune.data.packing import length_grouped_order, unit_length
from preftune.data.tokenize import Tokenization
from preftune.errors import PreftuneError
from preftune.logprobs import LogpModel
from preftune.models import (
    MODEL_KINDS,
    apply_lora,
    freeze,
    load_causal_lm,
    load_tokenizer,
    reference_mode,
    save_pretrained,
)
from preftune.monitor.monitor import Monitor
from preftune.trainer import checkpoint as ckpt
from preftune.trainer import reference as refcache
from preftune.trainer.data import ExampleSet, prepare_data
from preftune.trainer.heap import reuse_freed_memory
from preftune.trainer.metrics import MetricSums, MetricWriter
from preftune.trainer.optim import build_optimizer, build_scheduler
from preftune.trainer.sanity import check_hyperparameters
from preftune.trainer.steps import STEPS, Objective


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a function of (seed, epoch) alone, so a resumed run sees the same."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def train(config, *, resume: str | bool | None = None, log=print) -> dict:
    """Run one training job; returns the summary also written to ``output_dir/train_summary.json``.

    ``config`` is a :class:`~preftune.config.Config`, a dict or a YAML path. ``config.model`` may be a loaded
    model and ``config.data.train`` a ``datasets.Dataset``. ``resume``: True/"latest" or a checkpoint path.
    """
    cfg = to_config(config)
    with reuse_freed_memory(cfg.engine.reuse_freed_memory and not torch.cuda.is_available()):
        return _train(cfg, resume, log)


def _train(cfg, resume, log) -> dict:
    from accelerate import Accelerator

    # ---- setup -------------------------------------------------------------------------------------------
    check_loss_params(cfg)
    objective = Objective.from_config(cfg.loss)
    kind = MODEL_KINDS[cfg.task]  # a policy (log-probs) or a reward model (scores)
    tc = cfg.training
    run_dir = Path(tc.output_dir)
    # cpu=True without CUDA: accelerate only forms a multi-process CPU group (gloo) when told it is on CPU.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device, main = accelerator.device, accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    say = log if main else (lambda *_: None)
    for warning in check_hyperparameters(cfg):
        say(f"warning: {warning}")
    seed_everything(tc.seed)
    t_start = time.perf_counter()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    bf16 = tc.precision == "bf16"

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)

    # ---- data and models ---------------------------------------------------------------------------------
    for source in (cfg.data.train, cfg.data.eval):  # fail on a missing file before loading any model
        if isinstance(source, (str, Path)) and is_local_path(str(source)) and not Path(source).expanduser().exists():
            raise PreftuneError(f"data file not found: {source}")
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.model)
    tokenization = Tokenization(tokenizer, max_length=tc.max_length, max_prompt_length=cfg.data.max_prompt_length,
                                truncation_mode=cfg.data.truncation_mode)
    train_set, eval_set, drops = prepare_data(cfg.data, objective.data, tokenization, tc.seed,
                                              run_dir if main else None, say, kl=objective.needs_kl)
    for line in objective.setup(train_set.examples):  # data-dependent loss settings (e.g. auto class weights)
        say(f"loss: {line}")
    policy = kind.load(cfg.model, tokenizer).to(device)  # the model that trains: policy or reward model
    if cfg.engine.compile and device.type == "cpu" and not any(map(shutil.which, ("g++", "c++", "clang++"))):
        raise PreftuneError("engine.compile on CPU needs a C++ compiler (g++ or clang++) for inductor's kernels; "
                            "install one or set engine.compile: false")
    if cfg.engine.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora is not None:
        policy = apply_lora(policy, cfg.lora, tc.seed, kind.lora_task)
    policy.train()
    pad_id = tokenizer.pad_token_id
    layout, chunk = kind.layout or cfg.engine.layout, cfg.engine.chunk_size

    # ---- reference log-probs -----------------------------------------------------------------------------
    # Precomputed: once, before the first step (the policy *is* the reference then), cached on disk.
    # Otherwise: a frozen separate model, or the adapter-disabled policy, or (full FT) a frozen copy.
    reference_fn, ref_model = None, None
    if objective.needs_reference:
        ref_model = freeze(load_causal_lm(cfg.reference.model).to(device)) if cfg.reference.model else None
        if cfg.reference.precompute:
            source = ref_model if ref_model is not None else policy
            for name, dataset in (("train", train_set), ("eval", eval_set)):
                dataset.ref = _reference_logps(source, dataset, tokenization, cfg, pad_id, autocast, accelerator, say,
                                               name)
                if dataset.kl_examples is not None:  # mismatched sequences for the KL estimate
                    dataset.kl_ref = _reference_logps(source, ExampleSet(dataset.kl_examples), tokenization, cfg,
                                                      pad_id, autocast, accelerator, say, f"{name} KL")
            ref_model = None  # freed: the reference lives on as numbers
        else:
            if ref_model is None and cfg.lora is None:
                ref_model = freeze(copy.deepcopy(policy))
            ref_logp = LogpModel(ref_model if ref_model is not None else policy, chunk, cfg.engine.compile)

            def reference_fn(batch):
                with reference_mode(ref_logp.model):
                    return ref_logp(*batch.model_args())

    # ---- monitor: fixed held-out prompts and the reference's outputs on them (before any step) -------------
    # A reward model does not generate: it keeps the health checks, alarms, early stopping and the best model.
    watched = cfg if kind.generates else dataclasses.replace(
        cfg, monitor=dataclasses.replace(cfg.monitor, num_prompts=0))
    monitor = Monitor(watched, policy, tokenizer, eval_set, ref_model, accelerator, say)

    # ---- optimizer, schedule, resume ---------------------------------------------------------------------
    model = accelerator.prepare_model(kind.forward(policy, cfg.engine))
    optimizer = build_optimizer(policy, tc)
    micro, accum = tc.per_device_batch_size, tc.gradient_accumulation_steps
    per_step = micro * world * accum
    steps_per_epoch = len(train_set) // per_step
    if steps_per_epoch == 0:
        raise PreftuneError(f"{len(train_set)} training examples are fewer than one optimizer step needs "
                            f"({micro} per device x {world} processes x {accum} accumulation)")
    total_steps = tc.max_steps or max(1, math.ceil(tc.num_epochs * steps_per_epoch))
    scheduler = build_scheduler(optimizer, tc, total_steps)
    start_step, nonfinite_total = 0, 0
    resume_from = ckpt.resolve_resume(resume, run_dir)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, policy, optimizer, scheduler)
        start_step, nonfinite_total = state["step"], state.get("nonfinite_steps", 0)
        objective.load_state_dict(state.get("objective", {}))
        say(f"resumed from {resume_from} at step {start_step}")
    writer = _open_writer(run_dir, start_step, resume_from is not None) if main else None
    step_fn = STEPS[objective.data]

    def logp_fn(batch):
        return model(*batch.model_args())

    def evaluate(step: int) -> dict:
        if not len(eval_set):
            return {}
        model.eval()
        sums = MetricSums()
        mine = list(range(rank, len(eval_set), world))
        with torch.no_grad(), autocast():
            for start in range(0, len(mine), micro * 2):
                batch = eval_set.batch(mine[start : start + micro * 2], pad_id, layout).to(device)
                losses, metrics = step_fn(objective, logp_fn, batch, reference_fn)
                sums.add({"loss": losses, **metrics})
        model.train()
        values = sums.means(accelerator)
        if writer:
            writer.write(step, "eval", values)
        monitor.after_eval(step, values, writer)  # health, KL, alarms, samples, best model, early stopping
        return values

    # ---- the steps ---------------------------------------------------------------------------------------
    say(f"training: {len(train_set)} examples, {total_steps} steps of {per_step} "
        f"({micro} x {world} processes x {accum} accumulation), loss {cfg.loss.name}, {tc.precision}")
    bar = _progress(tc.progress_bar and main, total_steps, start_step)
    last_train, eval_values, consecutive_bad = {}, {}, 0
    tokens_seen, samples_seen, train_time = 0, 0, 0.0
    lengths = [unit_length(e) for e in train_set.examples] if cfg.engine.group_by_length else None
    order, order_epoch = [], None
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        epoch, k = divmod(step, steps_per_epoch)
        if epoch != order_epoch:  # a function of (seed, epoch) alone, so a resumed run sees the same batches
            order, order_epoch = (epoch_order(len(train_set), tc.seed, epoch) if lengths is None else
                                  length_grouped_order(lengths, micro * world, tc.seed, epoch)), epoch
        sums, tokens, bad = MetricSums(), 0, False
        for m in range(accum):
            at = (k * accum + m) * micro * world + rank * micro
            batch = train_set.batch(order[at : at + micro], pad_id, layout).to(device)
            sync = contextlib.nullcontext() if m == accum - 1 else accelerator.no_sync(model)
            with sync:
                with autocast():
                    losses, metrics = step_fn(objective, logp_fn, batch, reference_fn)
                loss = losses.float().mean() / accum
                bad = bad or not torch.isfinite(loss).item()
                accelerator.backward(loss)
            sums.add({"loss": losses, **metrics})
            tokens += batch.num_tokens
        params = [p for p in policy.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm or float("inf"))
        flag = torch.tensor([float(bad or not torch.isfinite(grad_norm).item())], device=device)
        if world > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        if flag.item() > 0:  # skip the update, keep the weights
            optimizer.zero_grad(set_to_none=True)
            nonfinite_total, consecutive_bad = nonfinite_total + 1, consecutive_bad + 1
            say(f"step {step + 1}: non-finite loss or gradient, update skipped ({consecutive_bad} in a row)")
            if consecutive_bad >= tc.max_nonfinite_steps:
                if main:
                    ckpt.save_checkpoint(run_dir, step, policy, optimizer, scheduler,
                                         {"nonfinite_steps": nonfinite_total, "objective": objective.state_dict()},
                                         tc.save_total_limit)
                raise PreftuneError(
                    f"{consecutive_bad} consecutive non-finite steps at step {step + 1}; stopped with a checkpoint. "
                    "Likely causes: learning rate too high, beta too large or too small, or rows with extreme "
                    "lengths; check dropped.jsonl and lower training.learning_rate."
                )
            continue
        consecutive_bad = 0
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # -- log, evaluate, checkpoint
        dt = time.perf_counter() - t0
        train_time += dt
        total_tokens = tokens * world
        tokens_seen += total_tokens
        samples_seen += per_step
        last_train = sums.means(accelerator)
        last_train.update(grad_norm=float(grad_norm), learning_rate=scheduler.get_last_lr()[0],
                          tokens_per_second=total_tokens / dt, epoch=step / steps_per_epoch)
        done = step + 1
        if writer and (done % tc.logging_every == 0 or done == total_steps):
            writer.write(done, "train", last_train)
        monitor.after_step(done, last_train, writer)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{last_train['loss']:.4f}", margin=f"{last_train.get('rewards/margins', 0):.3f}",
                            acc=f"{last_train.get('rewards/accuracies', 0):.2f}", tok_s=f"{total_tokens / dt:.0f}")
        if tc.eval_every and done % tc.eval_every == 0 and done != total_steps:
            eval_values = evaluate(done)
        if tc.save_every and done % tc.save_every == 0 and done != total_steps and main:
            ckpt.save_checkpoint(run_dir, done, policy, optimizer, scheduler,
                                 {"nonfinite_steps": nonfinite_total, "objective": objective.state_dict()},
                                 tc.save_total_limit)
        accelerator.wait_for_everyone() if world > 1 and tc.save_every and done % tc.save_every == 0 else None
        if monitor.stop_reason:  # monitor.max_kl or early stopping; the eval of this step was the last
            break
    if bar is not None:
        bar.close()

    # ---- finish ------------------------------------------------------------------------------------------
    if not monitor.stop_reason:
        eval_values = evaluate(total_steps) or eval_values
    model_dir = run_dir / "final"
    if main and tc.save_model:
        save_pretrained(policy, tokenizer, model_dir)
    runtime = time.perf_counter() - t_start
    summary = {
        "train_runtime_s": runtime,
        "train_loop_s": train_time,
        "samples_per_second": samples_seen / runtime if runtime else 0.0,
        "tokens_per_second": tokens_seen / runtime if runtime else 0.0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_loss": last_train.get("loss"),
        "steps": monitor.stopped_at or total_steps,
        "stopped": monitor.stop_reason,
        "nonfinite_steps": nonfinite_total,
        "train_examples": len(train_set),
        "eval_examples": len(eval_set),
        "dropped_rows": dict(drops.counts),
        "final_train_metrics": last_train,
        "final_eval_metrics": eval_values,
        "task": cfg.task,
        "model_dir": str(model_dir) if tc.save_model else None,
        "best": monitor.best,
    }
    if torch.cuda.is_available():
        summary["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if main:
        (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
        writer.close()
        _plots(run_dir, say)
    accelerator.wait_for_everyone()
    return summary


def _reference_logps(source, dataset: ExampleSet, tokenization: Tokenization, cfg, pad_id, autocast, accelerator,
                     say, name: str) -> torch.Tensor | None:
    """Reference log-probs of every example: from the disk cache, or computed (sharded over processes)."""
    if not len(dataset):
        return None
    cache_dir = Path(cfg.reference.cache_dir) if cfg.reference.cache_dir else refcache.default_cache_dir()
    key = refcache.cache_key(refcache.model_fingerprint(source), dataset.examples, tokenization.fingerprint,
                             cfg.training.precision)
    cached = refcache.load_cached(cache_dir, key, len(dataset))
    if cached is not None:
        say(f"reference log-probs ({name}): cache hit {key}")
        return cached
    t0 = time.perf_counter()
    logp = LogpModel(source, cfg.engine.chunk_size)  # eager: one no-grad pass rarely repays a compilation
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = list(range(rank, len(dataset), world))

    def batch_fn(indices):
        return dataset.batch(indices, pad_id, cfg.engine.layout, with_ref=False).to(accelerator.device)

    def logp_fn(batch):
        return logp(*batch.model_args())

    with reference_mode(source), autocast():
        part = refcache.compute_reference_logps(logp_fn, dataset.examples, batch_fn,
                                                max(1, cfg.training.per_device_batch_size * 2), mine)
    if world > 1:
        import torch.distributed as dist

        parts = [None] * world
        dist.all_gather_object(parts, (mine, part))
        values = torch.zeros((len(dataset), *part.shape[1:]))
        for idx, vals in parts:
            values[torch.tensor(idx, dtype=torch.long)] = vals
    else:
        values = part
    if accelerator.is_main_process:
        refcache.store_cached(cache_dir, key, values)
    say(f"reference log-probs ({name}): computed for {len(dataset)} examples in {time.perf_counter() - t0:.1f}s, "
        f"cached as {key}")
    return values


def _open_writer(run_dir: Path, start_step: int, resumed: bool) -> MetricWriter:
    if resumed and (run_dir / "metrics.jsonl").exists():  # drop records past the checkpoint: they will be redone
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= start_step]
        (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    return MetricWriter(run_dir, append=resumed)


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)


def _plots(run_dir: Path, say) -> None:
    from preftune.report.html import write_report
    from preftune.report.plots import plot_run

    try:
        paths = plot_run(run_dir)
        say(f"plots: {', '.join(p.name for p in paths)}")
        say(f"report: {write_report(run_dir, paths)}")
    except Exception as e:  # a plot failure must never lose a finished run
        say(f"plots skipped: {type(e).__name__}: {e}")
