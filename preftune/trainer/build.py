"""Building a run: everything the step loop needs, assembled once before the first step.

    setup -> data -> models -> reference -> monitor -> optimizer and schedule -> resume

The loop (``loop.py``) receives a :class:`Run` and never looks at the config to decide what to compute: the
objective says what a loss needs, the model kind how the model loads and scores, the source where batches
come from.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from preftune.config import check_loss_params
from preftune.configfile import config_tree
from preftune.data.prepare import ExampleSet, prepare_data
from preftune.data.prompts import prepare_prompts
from preftune.data.sources import missing_files
from preftune.data.tokenize import Tokenization, resolve_chat_template
from preftune.errors import PreftuneError
from preftune.hardware import bf16_refusal, low_precision_refusal
from preftune.logprobs import LogpModel
from preftune.models import (
    MODEL_KINDS,
    apply_lora,
    freeze,
    load_model,
    load_tokenizer,
    reference_mode,
)
from preftune.monitor.monitor import Monitor
from preftune.monitor.samples import truncate_samples
from preftune.rollout.sources import on_policy_source
from preftune.runlog import MetricWriter
from preftune.trainer import checkpoint as ckpt
from preftune.trainer import rundir
from preftune.trainer.callbacks import Hooks
from preftune.trainer.optim import build_optimizer, build_scheduler
from preftune.trainer.parallel import (
    Parallel,
    load_sharded_checkpoint,
    make_accelerator,
    save_sharded_checkpoint,
)
from preftune.trainer.reference import reference_logps
from preftune.trainer.sanity import check_hyperparameters
from preftune.trainer.source import StaticSource
from preftune.trainer.steps import STEPS, Objective
from preftune.trainer.streaming import prepare_stream


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Run:
    """The parts of one training run (built by :func:`build_run`, consumed by ``loop.run_steps``).

    Attributes:
        policy: the model that trains (not the DDP wrapper); ``model`` is its prepared scoring forward.
        trainable: every module whose parameters train: the policy, or the policy and what the source trains
            beside it (``source.companions``, e.g. PPO's critic); the optimizer, the gradient clip and the
            checkpoints hold it.
        source: the training micro-batches (:mod:`preftune.trainer.source`).
        step_fn: ``(objective, logp_fn, batch, reference_fn) -> (losses (B,), metrics)`` for the data kind.
        reference_fn: scores a batch with the live reference, or None (precomputed, or no reference needed).
        start_step / total_steps: optimizer steps already done (resume) and in all.
    """

    cfg: Any
    accelerator: Any
    say: Any
    run_dir: Path
    tokenizer: Any
    policy: torch.nn.Module
    model: torch.nn.Module
    objective: Objective
    step_fn: Any
    reference_fn: Any
    source: StaticSource
    eval_set: ExampleSet
    monitor: Monitor
    optimizer: torch.optim.Optimizer
    scheduler: Any
    writer: MetricWriter | None
    drops: Any
    layout: str
    total_steps: int
    start_step: int = 0
    nonfinite_total: int = 0
    no_signal_total: int = 0
    t_start: float = field(default_factory=time.perf_counter)
    hooks: Hooks = field(default_factory=Hooks)  # the caller's callbacks (``train(..., callbacks=)``)
    claim: rundir.RunDir | None = None  # the run directory: lock, run id, the checkpoint resumed
    trainable: torch.nn.Module | None = None
    parallel: Parallel | None = None  # the engine (DDP, FSDP, DeepSpeed): ``trainer/parallel.py``

    def __post_init__(self):
        if self.trainable is None:
            self.trainable = self.policy

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def autocast(self):
        return torch.autocast(device_type=self.accelerator.device.type, dtype=torch.bfloat16,
                              enabled=self.cfg.training.precision == "bf16")

    def logp_fn(self, batch):
        return self.model(*batch.model_args(), **batch.model_kwargs())

    def checkpoint(self, step: int) -> Path | None:
        """Write ``checkpoints/step-N`` (main process only): weights, optimizer, schedule, RNG, position. A
        sharded engine's checkpoint is written by every process (``parallel.save_sharded_checkpoint``)."""
        state = {"nonfinite_steps": self.nonfinite_total, "no_signal_steps": self.no_signal_total,
                 "objective": self.objective.state_dict(), "source": self.source.state_dict(),
                 **self.claim.checkpoint_fields()}
        if self.parallel.sharded:
            path = save_sharded_checkpoint(self.parallel, self.run_dir, step, self.scheduler, state,
                                           self.cfg.training.save_total_limit)
            return path if self.main else None
        if self.main:
            return ckpt.save_checkpoint(self.run_dir, step, self.trainable, self.optimizer, self.scheduler, state,
                                        self.cfg.training.save_total_limit)
        return None


def build_run(cfg, resume, log, overwrite: bool = False) -> Run:
    """Assemble a run from a checked config; ``resume``: True/"latest" or a checkpoint path, or None;
    ``overwrite``: replace a previous run in ``output_dir`` (see ``rundir.claim``)."""
    # ---- setup -------------------------------------------------------------------------------------------
    check_loss_params(cfg)
    objective = Objective.from_config(cfg.loss)
    kind = MODEL_KINDS[cfg.task]  # a policy (log-probs) or a reward model (scores)
    tc = cfg.training
    run_dir = Path(tc.output_dir)
    # DDP, FSDP or DeepSpeed, as `accelerate launch` set it up (on CPU too: gloo)
    accelerator = make_accelerator(micro=tc.per_device_batch_size, accum=tc.gradient_accumulation_steps,
                                   max_grad_norm=tc.max_grad_norm, say=log)
    parallel = Parallel(accelerator)
    device, main = accelerator.device, accelerator.is_main_process
    say = log if main else (lambda *_: None)
    for warning in check_hyperparameters(cfg):
        say(f"warning: {warning}")
    seed_everything(tc.seed)
    t_start = time.perf_counter()
    # the lock, a used directory refused, the checkpoint to resume and its config checked: before any loading
    claimed = rundir.claim_run(cfg, resume=resume, overwrite=overwrite, accelerator=accelerator, say=say)
    bf16 = tc.precision == "bf16"
    refusal = (bf16_refusal(device.type, tc.allow_slow_bf16) if bf16 else None) or low_precision_refusal(
        device.type, cfg.model_dtype, tc.allow_slow_bf16)
    if refusal:
        raise PreftuneError(refusal)
    if parallel.sharded and cfg.model_dtype != "fp32":
        raise PreftuneError(f"model_dtype: {cfg.model_dtype} under {parallel.name}: keep model_dtype: fp32 and set "
                            "mixed_precision: bf16 in the accelerate config; the engine keeps the fp32 masters")
    if parallel.shards_weights and cfg.rollout is not None:
        raise PreftuneError(f"on-policy training generates from whole weights, which {parallel.name} shards "
                            "across processes; use DDP or DeepSpeed ZeRO-2 for rollout runs")

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)

    # ---- data and models ---------------------------------------------------------------------------------
    for missing in missing_files(cfg.data.train) + missing_files(cfg.data.eval):  # before loading any model
        raise PreftuneError(f"data file not found: {missing}")
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.model, trust_remote_code=cfg.trust_remote_code,
                               revision=cfg.revision)
    if cfg.data.chat_template is not None:  # saved with the tokenizer, so the trained model keeps it
        tokenizer.chat_template = resolve_chat_template(cfg.data.chat_template)
    tokenization = Tokenization(tokenizer, max_length=tc.max_length, max_prompt_length=cfg.data.max_prompt_length,
                                truncation_mode=cfg.data.truncation_mode)
    on_policy, stream = cfg.rollout is not None, None
    if cfg.data.streaming:  # train read as the steps need it; the eval set whole
        stream, eval_set, drops = prepare_stream(cfg, objective, tokenization, run_dir if main else None, say)
        train_set = stream.data
    elif on_policy:  # prompts only: the responses come from the policy at every step
        train_set, eval_set, drops = prepare_prompts(cfg.data, tokenization, tc.seed, run_dir if main else None,
                                                     say)
    else:
        train_set, eval_set, drops = prepare_data(cfg.data, objective.data, tokenization, tc.seed,
                                                  run_dir if main else None, say, kl=objective.needs_kl)
        for line in objective.setup(train_set.examples):  # data-dependent loss settings (e.g. auto class weights)
            say(f"loss: {line}")
    policy = load_model(cfg, kind, tokenizer, device)  # the model that trains: policy or reward model
    if cfg.engine.compile and device.type == "cpu" and not any(map(shutil.which, ("g++", "c++", "clang++"))):
        raise PreftuneError("engine.compile on CPU needs a C++ compiler (g++ or clang++) for inductor's kernels; "
                            "install one or set engine.compile: false")
    if cfg.engine.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora is not None:
        policy = apply_lora(policy, cfg.lora, tc.seed, kind.lora_task)
    policy.train()
    pad_id = tokenizer.pad_token_id
    layout = kind.layout or cfg.engine.layout

    # ---- reference ---------------------------------------------------------------------------------------
    # Precomputed only for static data; an on-policy source's sequences exist only once sampled.
    reference_fn, ref_model, engine, deferred = None, None, [], False  # engine: the prepared policy, once made
    if objective.needs_reference:
        precompute = cfg.reference.precompute and not on_policy and stream is None
        ref_model, reference_fn = _reference(cfg, policy, [train_set, eval_set], tokenization, pad_id, autocast,
                                             accelerator, say, precompute=precompute, parallel=parallel, engine=engine)
        deferred = precompute and parallel.zero_stage == 3  # ZeRO-3: only the prepared engine has the weights

    # ---- monitor: fixed held-out prompts and the reference's outputs on them (before any step) -------------
    # A reward model does not generate: it keeps the health checks, alarms, early stopping and the best model.
    # Where the weights are sharded (FSDP, ZeRO-3) no process can generate or save the best model alone.
    watched = cfg if kind.generates and not parallel.shards_weights else dataclasses.replace(
        cfg, monitor=dataclasses.replace(cfg.monitor, num_prompts=0,
                                         save_best=cfg.monitor.save_best and not parallel.shards_weights))
    if parallel.shards_weights and cfg.monitor.enabled:
        say(f"monitor: no samples, generation KL or best model under {parallel.name} (the weights are sharded)")
    monitor = Monitor(watched, policy, tokenizer, eval_set, ref_model, accelerator, say,
                      ref_is_live=reference_fn is not None)

    # ---- source, optimizer, schedule, resume -------------------------------------------------------------
    world, rank = accelerator.num_processes, accelerator.process_index
    micro, accum = tc.per_device_batch_size, tc.gradient_accumulation_steps
    geometry = dict(micro=micro, accum=accum, world=world, rank=rank, seed=tc.seed, pad_id=pad_id, layout=layout,
                    device=device)
    if on_policy:
        source = on_policy_source(objective.data, cfg, train_set, eval_set, policy=policy, tokenizer=tokenizer,
                                  run_dir=run_dir if main else None, accelerator=accelerator, autocast=autocast,
                                  reference_fn=reference_fn, **geometry)
        eval_set = ExampleSet([])  # held-out prompts are the source's to evaluate; the monitor keeps them
    elif stream is not None:
        source = stream.source(**geometry)
    else:
        source = StaticSource(train_set, group_by_length=cfg.engine.group_by_length, **geometry)
    # A source may train modules beside the policy (``companions``: PPO's critic), inside its training forward.
    companions = getattr(source, "companions", None) or {}
    trainable = torch.nn.ModuleDict({"policy": policy, **companions}) if companions else policy
    forward = kind.forward(policy, cfg.engine)
    rates = {companions[name]: lr for name, lr in getattr(source, "learning_rates", {}).items()}
    optimizer = build_optimizer(trainable, tc, rates)  # before the engine: FSDP / DeepSpeed take it over
    model, optimizer = parallel.prepare(source.forward(forward) if companions else forward, optimizer, policy)
    engine.append(model)
    if deferred:
        _precompute(cfg, policy, [train_set, eval_set], tokenization, pad_id, autocast, accelerator, say, model)
    if source.steps_per_epoch == 0:
        raise PreftuneError(f"{len(train_set)} training {'prompts' if on_policy else 'examples'} are fewer than one "
                            "optimizer step needs "
                            f"({micro} per device x {world} processes x {accum} accumulation)")
    total_steps = tc.max_steps or max(1, math.ceil(tc.num_epochs * source.steps_per_epoch))
    scheduler = build_scheduler(optimizer, tc, total_steps)
    run = Run(cfg, accelerator, say, run_dir, tokenizer, policy, model, objective, STEPS[objective.data],
              reference_fn, source, eval_set, monitor, optimizer, scheduler, None, drops, layout, total_steps,
              t_start=t_start, claim=claimed, trainable=trainable, parallel=parallel)
    resume_from = claimed.resume_from
    if resume_from is not None:
        if parallel.sharded:  # the engine's own state, written by every process
            state = load_sharded_checkpoint(parallel, resume_from, scheduler)
        else:
            state = claimed.restore(trainable, optimizer, scheduler)  # a corrupt "latest" falls back to an older one
        resume_from = claimed.resume_from
        run.start_step, run.nonfinite_total = state["step"], state.get("nonfinite_steps", 0)
        run.no_signal_total = state.get("no_signal_steps", 0)
        objective.load_state_dict(state.get("objective", {}))
        source.load_state_dict(state.get("source", {}))
        say(f"resumed from {resume_from} at step {run.start_step}")
    claimed.commit()  # built: a previous run that --overwrite set aside can go now
    if main:  # config.yaml, metrics.jsonl and samples.jsonl (cut back to the checkpoint: those steps are
        # redone, so none is written twice; the writer cuts metrics.jsonl) and the trackers
        if resume_from is not None:
            truncate_samples(run_dir, run.start_step)
        run.writer = MetricWriter(run_dir, tc.report_to, config=config_tree(cfg),
                                  resume_step=None if resume_from is None else run.start_step)
        if hasattr(source, "writer"):  # a source that logs text (an on-policy completions table) gets the writer
            source.writer = run.writer
    return run


def _precompute(cfg, source, sets: list[ExampleSet], tokenization, pad_id, autocast, accelerator, say,
                engine=None) -> None:
    """Reference log-probs of every example of ``sets`` (train, eval), attached to them (``dataset.ref``; the
    KL sequences' as ``dataset.kl_ref``): from the disk cache, or computed once with ``source`` (through
    ``engine`` under ZeRO-3)."""
    common = dict(cfg=cfg, tokenization_fp=tokenization.fingerprint, pad_id=pad_id, autocast=autocast,
                  accelerator=accelerator, say=say, engine=engine)
    for name, dataset in zip(("train", "eval"), sets):
        dataset.ref = reference_logps(source, dataset, name=name, **common)
        if dataset.kl_examples is not None:  # mismatched sequences for the KL estimate
            dataset.kl_ref = reference_logps(source, ExampleSet(dataset.kl_examples), name=f"{name} KL", **common)


def _reference(cfg, policy, sets: list[ExampleSet], tokenization, pad_id, autocast, accelerator, say, *,
               precompute: bool, parallel: Parallel, engine: list):
    """(separate or frozen reference model for the monitor, or None; live reference scoring function or None).

    Precomputed: once, before the first step (the policy *is* the reference then), cached on disk; the numbers
    are attached to each set. Otherwise: a frozen separate model, the adapter-disabled policy (LoRA), or a
    frozen copy (full fine-tuning), scored live. Under FSDP / ZeRO-3 a frozen model is sharded like the policy
    (``Parallel.prepare_reference``) and the adapter-disabled policy runs through the prepared engine
    (``engine[0]``, filled once the policy is prepared), since neither has whole weights on any process.
    """
    ref_model = None
    if cfg.reference.model:
        ref_model = freeze(load_model(cfg, MODEL_KINDS["policy"], None, accelerator.device, model=cfg.reference.model))
    if precompute:
        if parallel.zero_stage == 3 and ref_model is None:
            return None, None  # the policy is the reference: scored through the engine once it is prepared
        through = None  # ZeRO-3: a separate reference is scored through its own (inference) engine
        if parallel.zero_stage == 3:
            through = parallel.prepare_reference(LogpModel(ref_model, cfg.engine.chunk_size))
        _precompute(cfg, ref_model if ref_model is not None else policy, sets, tokenization, pad_id, autocast,
                    accelerator, say, through)
        return ref_model, None  # the reference lives on as numbers (a separate model only for the monitor's KL)
    if ref_model is None and cfg.lora is None:
        # ZeRO-3 partitions the weights as they load: a copy of partitions is no model, so load it again
        fresh = parallel.zero_stage == 3 and not isinstance(cfg.model, torch.nn.Module)
        ref_model = freeze(load_model(cfg, MODEL_KINDS["policy"], None, accelerator.device) if fresh
                           else copy.deepcopy(policy))
    if ref_model is not None:
        ref_logp = parallel.prepare_reference(LogpModel(ref_model, cfg.engine.chunk_size, cfg.engine.compile))
        mode_of = ref_model
    else:  # LoRA: the policy with its adapter disabled
        ref_logp = None if parallel.shards_weights else LogpModel(policy, cfg.engine.chunk_size, cfg.engine.compile)
        mode_of = policy

    def reference_fn(batch):
        with reference_mode(mode_of):
            return (ref_logp or engine[0])(*batch.model_args(), **batch.model_kwargs())

    return ref_model, reference_fn
