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
from preftune.data.load import is_local_path
from preftune.data.prepare import ExampleSet, prepare_data
from preftune.data.prompts import prepare_prompts
from preftune.data.tokenize import Tokenization
from preftune.errors import PreftuneError
from preftune.hardware import bf16_refusal
from preftune.logprobs import LogpModel
from preftune.models import MODEL_KINDS, apply_lora, freeze, load_causal_lm, load_tokenizer, reference_mode
from preftune.monitor.monitor import Monitor
from preftune.monitor.samples import truncate_samples
from preftune.rollout.sources import on_policy_source
from preftune.runlog import MetricWriter, truncate_after
from preftune.trainer import checkpoint as ckpt
from preftune.trainer.optim import build_optimizer, build_scheduler
from preftune.trainer.reference import reference_logps
from preftune.trainer.sanity import check_hyperparameters
from preftune.trainer.source import StaticSource
from preftune.trainer.steps import STEPS, Objective


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Run:
    """The parts of one training run (built by :func:`build_run`, consumed by ``loop.run_steps``).

    Attributes:
        policy: the model that trains (not the DDP wrapper); ``model`` is its prepared scoring forward.
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

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def autocast(self):
        return torch.autocast(device_type=self.accelerator.device.type, dtype=torch.bfloat16,
                              enabled=self.cfg.training.precision == "bf16")

    def logp_fn(self, batch):
        return self.model(*batch.model_args(), **batch.model_kwargs())

    def checkpoint(self, step: int) -> None:
        """Write ``checkpoints/step-N`` (main process only): weights, optimizer, schedule, RNG, position."""
        if self.main:
            ckpt.save_checkpoint(self.run_dir, step, self.policy, self.optimizer, self.scheduler,
                                 {"nonfinite_steps": self.nonfinite_total, "no_signal_steps": self.no_signal_total,
                                  "objective": self.objective.state_dict(),
                                  "source": self.source.state_dict()},
                                 self.cfg.training.save_total_limit)


def build_run(cfg, resume, log) -> Run:
    """Assemble a run from a checked config; ``resume``: True/"latest" or a checkpoint path, or None."""
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
    say = log if main else (lambda *_: None)
    for warning in check_hyperparameters(cfg):
        say(f"warning: {warning}")
    seed_everything(tc.seed)
    t_start = time.perf_counter()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    bf16 = tc.precision == "bf16"
    refusal = bf16_refusal(device.type, tc.allow_slow_bf16) if bf16 else None
    if refusal:
        raise PreftuneError(refusal)

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)

    # ---- data and models ---------------------------------------------------------------------------------
    for path in (cfg.data.train, cfg.data.eval):  # fail on a missing file before loading any model
        if isinstance(path, (str, Path)) and is_local_path(str(path)) and not Path(path).expanduser().exists():
            raise PreftuneError(f"data file not found: {path}")
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.model)
    tokenization = Tokenization(tokenizer, max_length=tc.max_length, max_prompt_length=cfg.data.max_prompt_length,
                                truncation_mode=cfg.data.truncation_mode)
    on_policy = cfg.rollout is not None
    if on_policy:  # prompts only: the responses come from the policy at every step
        train_set, eval_set, drops = prepare_prompts(cfg.data, tokenization, tc.seed, run_dir if main else None,
                                                     say)
    else:
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
    layout = kind.layout or cfg.engine.layout

    # ---- reference ---------------------------------------------------------------------------------------
    # Precomputed only for static data; an on-policy source's sequences exist only once sampled.
    reference_fn, ref_model = None, None
    if objective.needs_reference:
        ref_model, reference_fn = _reference(cfg, policy, [train_set, eval_set], tokenization, pad_id, autocast,
                                             accelerator, say, precompute=cfg.reference.precompute and not on_policy)

    # ---- monitor: fixed held-out prompts and the reference's outputs on them (before any step) -------------
    # A reward model does not generate: it keeps the health checks, alarms, early stopping and the best model.
    watched = cfg if kind.generates else dataclasses.replace(
        cfg, monitor=dataclasses.replace(cfg.monitor, num_prompts=0))
    monitor = Monitor(watched, policy, tokenizer, eval_set, ref_model, accelerator, say)

    # ---- optimizer, schedule, resume ---------------------------------------------------------------------
    model = accelerator.prepare_model(kind.forward(policy, cfg.engine))
    optimizer = build_optimizer(policy, tc)
    world, rank = accelerator.num_processes, accelerator.process_index
    micro, accum = tc.per_device_batch_size, tc.gradient_accumulation_steps
    geometry = dict(micro=micro, accum=accum, world=world, rank=rank, seed=tc.seed, pad_id=pad_id, layout=layout,
                    device=device)
    if on_policy:
        source = on_policy_source(objective.data, cfg, train_set, eval_set, policy=policy, tokenizer=tokenizer,
                                  run_dir=run_dir if main else None, accelerator=accelerator, **geometry)
        eval_set = ExampleSet([])  # held-out prompts are the source's to evaluate; the monitor keeps them
    else:
        source = StaticSource(train_set, group_by_length=cfg.engine.group_by_length, **geometry)
    if source.steps_per_epoch == 0:
        raise PreftuneError(f"{len(train_set)} training {'prompts' if on_policy else 'examples'} are fewer than one "
                            "optimizer step needs "
                            f"({micro} per device x {world} processes x {accum} accumulation)")
    total_steps = tc.max_steps or max(1, math.ceil(tc.num_epochs * source.steps_per_epoch))
    scheduler = build_scheduler(optimizer, tc, total_steps)
    run = Run(cfg, accelerator, say, run_dir, tokenizer, policy, model, objective, STEPS[objective.data],
              reference_fn, source, eval_set, monitor, optimizer, scheduler, None, drops, layout, total_steps,
              t_start=t_start)
    resume_from = ckpt.resolve_resume(resume, run_dir)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, policy, optimizer, scheduler)
        run.start_step, run.nonfinite_total = state["step"], state.get("nonfinite_steps", 0)
        run.no_signal_total = state.get("no_signal_steps", 0)
        objective.load_state_dict(state.get("objective", {}))
        source.load_state_dict(state.get("source", {}))
        say(f"resumed from {resume_from} at step {run.start_step}")
    if main:
        if resume_from is not None:  # records and samples past the checkpoint are redone, so none is written twice
            truncate_after(run_dir, run.start_step)
            truncate_samples(run_dir, run.start_step)
        run.writer = MetricWriter(run_dir, append=resume_from is not None)
        if hasattr(source, "writer"):  # a source that logs text (an on-policy completions table) gets the writer
            source.writer = run.writer
    return run


def _reference(cfg, policy, sets: list[ExampleSet], tokenization, pad_id, autocast, accelerator, say, *,
               precompute: bool):
    """(reference model kept for the monitor or None, live reference scoring function or None).

    Precomputed: once, before the first step (the policy *is* the reference then), cached on disk; the numbers
    are attached to each set. Otherwise: a frozen separate model, the adapter-disabled policy (LoRA), or a
    frozen copy (full fine-tuning), scored live.
    """
    ref_model = freeze(load_causal_lm(cfg.reference.model).to(accelerator.device)) if cfg.reference.model else None
    if precompute:
        source = ref_model if ref_model is not None else policy
        for name, dataset in zip(("train", "eval"), sets):
            common = dict(cfg=cfg, tokenization_fp=tokenization.fingerprint, pad_id=pad_id, autocast=autocast,
                          accelerator=accelerator, say=say)
            dataset.ref = reference_logps(source, dataset, name=name, **common)
            if dataset.kl_examples is not None:  # mismatched sequences for the KL estimate
                dataset.kl_ref = reference_logps(source, ExampleSet(dataset.kl_examples), name=f"{name} KL", **common)
        return None, None  # the reference lives on as numbers
    if ref_model is None and cfg.lora is None:
        ref_model = freeze(copy.deepcopy(policy))
    ref_logp = LogpModel(ref_model if ref_model is not None else policy, cfg.engine.chunk_size, cfg.engine.compile)

    def reference_fn(batch):
        with reference_mode(ref_logp.model):
            return ref_logp(*batch.model_args(), **batch.model_kwargs())

    return ref_model, reference_fn
