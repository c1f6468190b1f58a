"""How a run is spread over processes: one process, DDP, FSDP2 / FSDP or DeepSpeed ZeRO-2 / ZeRO-3, as
``accelerate launch`` set it up (``examples/accelerate/*.yaml``). The loop calls the engine through
:class:`Parallel`, which keeps what differs between them in one place:

    prepare       DDP: the scoring module is wrapped alone (the optimizer stays a plain torch optimizer);
                  FSDP / DeepSpeed: module and optimizer are prepared together (``accelerator.prepare``), since
                  the engine shards or replaces the optimizer's parameters
    accumulate    DDP / FSDP: gradient sync only on the last micro-batch (``no_sync``); DeepSpeed: the engine is
                  told which micro-batch ends the window (``accelerator.accumulate``) and steps itself there
    backward      the loss is already divided by the accumulation count (``batch.reduce``); DeepSpeed would divide
                  again, so it is told not to (``scale_wrt_gas=False``)
    clip          ``clip_grad_norm_`` over the trainable parameters (FSDP2: over their DTensor shards, the norm
                  then read as a plain tensor); DeepSpeed clips itself (``gradient_clipping`` is set to
                  ``training.max_grad_norm``) and reports the norm
    save          ``final/``: the full state dict gathered on every process
                  (``accelerator.get_state_dict``: FSDP's full state dict, ZeRO-3's consolidated 16-bit one),
                  written by the main process; checkpoints of a sharded engine: ``accelerator.save_state``
                  (each process writes its shard), beside the usual schedule, RNG and position
    reference     a frozen reference copy is sharded like the policy under FSDP and ZeRO-3 (DeepSpeed
                  inference engine / ``fully_shard``), replicated otherwise

Where the two engines depart from the plain loop: under DeepSpeed the optimizer update runs inside the last
micro-batch's backward, before the loop sees the gradient norm, so a non-finite step is counted (and repeated
ones stop the run) but its update is not withheld; and generation (monitor samples, on-policy sources) needs
whole weights on one process, so it is off where weights are sharded (FSDP, ZeRO-3).

On a CPU-only machine accelerate never selects FSDP or DeepSpeed by itself (it picks ``MULTI_CPU``, DDP over
gloo, and ignores the engine's config): :func:`make_accelerator` starts DeepSpeed's process group over gloo and
gives FSDP the state accelerate gives it on GPUs, so the same launch line runs, slowly, on CPUs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path

import torch

from preftune.errors import PreftuneError
from preftune.fsio import TMP, publish_dir
from preftune.trainer import checkpoint as ckpt


def _env(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def make_accelerator(*, micro: int, accum: int, max_grad_norm: float | None, say=print):
    """The run's ``Accelerator``, with the engine ``accelerate launch`` asked for configured to the training
    settings (DeepSpeed's micro-batch, accumulation and clipping come from ``training:``, not its own file)."""
    from accelerate import Accelerator, PartialState

    cuda = torch.cuda.is_available()
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
    if _env("ACCELERATE_USE_DEEPSPEED"):
        if not cuda and launched:
            # accelerate leaves the backend unset on CPU and then counts one process: name gloo for it.
            PartialState(cpu=False, backend="gloo")
        accelerator = Accelerator()
        _configure_deepspeed(accelerator, micro, accum, max_grad_norm, say)
        return accelerator
    # cpu=True without CUDA: accelerate only forms a multi-process CPU group (gloo) when told it is on CPU.
    accelerator = Accelerator(cpu=not cuda)
    if _env("ACCELERATE_USE_FSDP") and not cuda and accelerator.num_processes > 1:
        _fsdp_on_cpu(accelerator)
    return accelerator


def _configure_deepspeed(accelerator, micro: int, accum: int, max_grad_norm: float | None, say) -> None:
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ours = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
            "train_batch_size": micro * accum * accelerator.num_processes, "gradient_clipping": max_grad_norm or 0.0}
    for key, value in ours.items():
        if ds.get(key, "auto") not in ("auto", value) and key != "train_batch_size" and accelerator.is_main_process:
            say(f"note: DeepSpeed's {key}: {ds[key]} replaced by {value} from the training config")
        ds[key] = value
    accelerator.gradient_accumulation_steps = accum


def _fsdp_on_cpu(accelerator) -> None:
    """What ``AcceleratorState`` does for FSDP on an accelerator device (accelerate 1.x, ``state.py``): the
    distributed type becomes FSDP and the plugin is built from the ``FSDP_*`` variables ``accelerate launch``
    set. On CPU accelerate stops at ``MULTI_CPU``; torch's ``fully_shard`` itself runs over gloo."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    for shared in (AcceleratorState._shared_state, PartialState._shared_state):
        shared["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    if accelerator.state.fsdp_plugin is not plugin:
        raise PreftuneError("FSDP on CPU: accelerate's state did not take the FSDP plugin (accelerate version?)")


class Parallel:
    """The engine of one run (read from the accelerator after :func:`make_accelerator`)."""

    def __init__(self, accelerator):
        from accelerate.utils import DistributedType

        self.acc = accelerator
        kind = accelerator.distributed_type
        self.deepspeed = kind == DistributedType.DEEPSPEED
        self.fsdp = kind == DistributedType.FSDP
        self.fsdp2 = self.fsdp and getattr(accelerator, "is_fsdp2", False)
        self.zero_stage = accelerator.state.deepspeed_plugin.zero_stage if self.deepspeed else 0
        self.engine = None  # the prepared module
        self.optimizer = None

    @property
    def name(self) -> str:
        if self.deepspeed:
            return f"DeepSpeed ZeRO-{self.zero_stage}"
        if self.fsdp:
            return "FSDP2" if self.fsdp2 else "FSDP"
        return "DDP" if self.acc.num_processes > 1 else "one process"

    @property
    def sharded(self) -> bool:
        """FSDP or DeepSpeed: the engine owns the optimizer's parameters and checkpoints are written by all."""
        return self.deepspeed or self.fsdp

    @property
    def shards_weights(self) -> bool:
        """No process holds the whole weights between forwards (FSDP, ZeRO-3): no generation, gathered saves."""
        return self.fsdp or self.zero_stage == 3

    # ---- building ---------------------------------------------------------------------------------------
    def prepare(self, module: torch.nn.Module, optimizer, policy: torch.nn.Module):
        """(prepared scoring module, optimizer). ``policy`` is the model inside ``module`` (its layer classes
        are what FSDP wraps one by one)."""
        self.optimizer = optimizer  # clip asks it where the gradients are (fp32 masters: optim.MasterAdamW)
        if not self.sharded:
            self.engine = self.acc.prepare_model(module)
            return self.engine, optimizer
        if self.fsdp and getattr(module, "_no_split_modules", None) is None:
            module._no_split_modules = getattr(policy, "_no_split_modules", None)  # FSDP's per-layer wrap
        self.engine, optimizer = self.acc.prepare(module, optimizer)
        if self.zero_stage == 3:
            _register_head(self.engine, policy)
        return self.engine, optimizer

    def prepare_reference(self, module: torch.nn.Module) -> torch.nn.Module:
        """A frozen reference scoring module, sharded like the policy where the policy is (FSDP, ZeRO-3)."""
        if self.zero_stage == 3:
            return _deepspeed_inference(self.acc, module)
        if self.fsdp2:
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            if getattr(module, "_no_split_modules", None) is None:
                module._no_split_modules = getattr(getattr(module, "model", None), "_no_split_modules", None)
            return fsdp2_prepare_model(self.acc, module)
        if self.fsdp:
            raise PreftuneError("a live reference copy under FSDP1 is not supported: use FSDP2 (fsdp_version: 2), "
                                "LoRA, or reference.precompute: true")
        return module

    # ---- stepping ---------------------------------------------------------------------------------------
    def accumulate(self, last: bool):
        """The context of one micro-batch: gradients synchronised only on the last of the window."""
        if self.deepspeed:
            return self.acc.accumulate(self.engine)
        return contextlib.nullcontext() if last else self.acc.no_sync(self.engine)

    def backward(self, loss: torch.Tensor) -> None:
        if self.deepspeed:
            self.acc.backward(loss, scale_wrt_gas=False)  # batch.reduce already divided by the window
        else:
            self.acc.backward(loss)

    def clip(self, params: list[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
        """Clip the gradients of ``params`` to ``max_norm`` (None / 0: no clipping); the global norm before.
        Where the optimizer keeps a weight's gradient elsewhere (``MasterAdamW``: in its fp32 master), there."""
        if self.deepspeed:
            norm = self.engine.get_global_grad_norm()
            return torch.tensor(float("nan") if norm is None else float(norm))
        holders = getattr(self.optimizer, "gradient_params", None)  # bf16 weights: their fp32 masters hold .grad
        norm = torch.nn.utils.clip_grad_norm_(holders(params) if holders else params, max_norm or float("inf"))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a replicated DTensor

    # ---- saving -----------------------------------------------------------------------------------------
    def full_state_dict(self, policy: torch.nn.Module) -> dict | None:
        """The policy's full state dict under its own names (called on every process; None off the main one
        where the engine gathers to rank 0 only), or None when the weights are whole already."""
        if not self.shards_weights:
            return None
        state = self.acc.get_state_dict(self.engine, unwrap=True)
        if state is None:
            return {}
        prefix = "model."  # the scoring module (LogpModel / ScoreModel) holds the policy as ``model``
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        first: dict[int, str] = {}
        for name, p in policy.named_parameters(remove_duplicate=False):  # tied weights: gathered twice, saved once
            if first.setdefault(id(p), name) != name:
                state.pop(name, None)
        return state

    def save_state(self, directory: Path) -> None:
        """The sharded engine's model and optimizer state (every process writes its part)."""
        self.acc.save_state(str(directory))

    def load_state(self, directory: Path) -> None:
        if not directory.exists():
            raise PreftuneError(f"checkpoint {directory.parent} was not written under {self.name} "
                                "(no engine state): resume it with the launch it was written with")
        self.acc.load_state(str(directory))


def _register_head(engine, policy: torch.nn.Module) -> None:
    """ZeRO-3 gathers a module's parameters around that module's own forward; the log-prob engine reads the
    LM head's weight outside ``lm_head.forward`` (the chunked head), so the weight is registered as an
    external parameter of the scoring module, gathered for its whole forward and backward."""
    import deepspeed

    head = policy.get_output_embeddings() if hasattr(policy, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        deepspeed.zero.register_external_parameter(engine.module, head.weight)


def _deepspeed_inference(accelerator, module: torch.nn.Module) -> torch.nn.Module:
    """A frozen module under ZeRO-3 with no optimizer (TRL's ``prepare_deepspeed`` recipe): its parameters are
    partitioned like the policy's, gathered layer by layer in each forward."""
    import copy

    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    config["zero_optimization"] = {**config.get("zero_optimization", {}), "stage": 3}
    engine, *_ = deepspeed.initialize(model=module, config=config)
    engine.eval()
    inner = getattr(module, "model", None)
    if inner is not None:
        _register_head(engine, inner)
    return engine


# ---- checkpoints of a sharded engine ----------------------------------------------------------------------

ENGINE_DIR = "engine"  # accelerate.save_state's directory inside checkpoints/step-N


def save_sharded_checkpoint(parallel: Parallel, run_dir: Path, step: int, scheduler, state: dict, keep: int) -> Path:
    """``checkpoints/step-N`` of a sharded run, written by every process: ``engine/`` (``accelerator.save_state``:
    model and optimizer shards, or the full state when the engine's state-dict type says so), then by the
    main process the schedule, RNG and ``trainer_state.json``, the swap that publishes it and the pruning of
    this run's older checkpoints (``checkpoint.prune``)."""
    acc = parallel.acc
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".{final.name}{TMP}sharded"  # one name every process agrees on; a leftover is a temp dir
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    parallel.save_state(tmp / ENGINE_DIR)
    acc.wait_for_everyone()
    if acc.is_main_process:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(ckpt.rng_state(), tmp / "rng.pt")
        (tmp / ckpt.STATE).write_text(json.dumps({**state, "step": step, "engine": parallel.name}, indent=1))
        publish_dir(tmp, final)  # fsync, then swap: complete or absent
        ckpt.prune(Path(run_dir), state.get("run_id"), step, keep)
    acc.wait_for_everyone()
    return final


def load_sharded_checkpoint(parallel: Parallel, path: Path, scheduler) -> dict:
    """Restore a sharded run's model, optimizer, schedule and RNG from ``path``; returns the loop state."""
    parallel.load_state(Path(path) / ENGINE_DIR)
    scheduler.load_state_dict(torch.load(Path(path) / "scheduler.pt"))
    ckpt.set_rng_state(torch.load(Path(path) / "rng.pt", weights_only=False))
    return json.loads((Path(path) / ckpt.STATE).read_text())


def eval_rounds(mine: int, total: int, world: int, batch: int, sharded: bool) -> int:
    """Evaluation batches this process runs: its own ⌈mine / batch⌉, or under a sharded engine, where every
    forward is a collective, the most any process needs (⌈⌈total / world⌉ / batch⌉; the extra ones are
    discarded), so no process waits for a forward the others never run."""
    if not sharded:
        return math.ceil(mine / batch)
    return math.ceil(math.ceil(total / world) / batch)
