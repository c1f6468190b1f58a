"""What the benchmarks record about the machine and share between their workers: the CPU, its bf16 flags, the GPU,
the device choice, and per-optimizer-step timestamps (steady-state throughput, steps 2..N).

Kept apart from ``vs_trl.py`` and ``grpo_vs_trl.py`` so both print the same machine line and store the same
``machine`` record in their JSON.
"""

from __future__ import annotations

import os
import time

from preftune.hardware import BF16_FLAGS, cpu_flags, cpu_model


def resolve_device(choice: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is False)")
    return choice


def worker_env(device: str) -> dict:
    """Environment for a worker process: on ``cpu``, hide any GPU, so both tools (TRL through ``use_cpu``,
    preftune through accelerate's default device) train on the CPU even on a GPU machine."""
    return {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}


def machine(device: str) -> dict:
    """The record stored with every table: CPU model, which of the bf16 flags /proc/cpuinfo lists, load average,
    and the GPU's name when the runs used one."""
    flags = cpu_flags()
    out = {"cpu": cpu_model(), "cpu_bf16_flags": {f: f in flags for f in BF16_FLAGS}, "device": device,
           "load_before": list(os.getloadavg())}
    if device == "cuda":
        import torch

        out["gpu"] = torch.cuda.get_device_name(0)
        out["torch_cuda"] = torch.version.cuda
    return out


def machine_line(m: dict) -> str:
    """One line for the printed table: ``CPU: AMD EPYC; bf16 flags: avx512_bf16 yes, amx_bf16 no; ...``."""
    flags = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in m["cpu_bf16_flags"].items())
    load = " ".join(f"{x:.2f}" for x in m["load_before"])
    gpu = f"; GPU: {m['gpu']} (CUDA {m['torch_cuda']})" if "gpu" in m else ""
    return f"CPU: {m['cpu']}; bf16 flags: {flags}; device: {m['device']}{gpu}; load average before: {load}"


class StepClock:
    """Timestamps (``time.perf_counter``) at the end of every optimizer step, for both tools: preftune calls
    ``on_step(step, metrics, state)`` (its callbacks API), TRL's ``TrainerCallback`` protocol calls
    ``on_step_end(args, state, control, **kw)``. On a GPU it synchronizes first, so a step's time is its kernels'
    time, not their launch. Used as a TRL callback it is wrapped by :func:`trl_step_clock` (TRL wants a
    ``TrainerCallback`` subclass)."""

    def __init__(self):
        self.times: list[float] = []

    def mark(self) -> None:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def on_step(self, step, metrics, state) -> None:  # preftune's hook
        self.mark()


def trl_step_clock(clock: StepClock):
    """A ``transformers.TrainerCallback`` that marks ``clock`` at each ``on_step_end``."""
    from transformers import TrainerCallback

    class _Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.mark()

    return _Clock()


def steady_rate(times: list[float], per_step: int) -> float | None:
    """Samples per second over steps 2..N: ``(N - 1) x per_step / (t_N - t_1)``, where ``t_k`` is the end of step
    k; setup, the reference pass and step 1 (warm-up, compilation) fall before ``t_1``. None below 2 steps."""
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) * per_step / (times[-1] - times[0])


def gpu_peak_mib() -> float | None:
    """Peak memory torch allocated on the GPU in this process (MiB), or None without one."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return torch.cuda.max_memory_allocated() / 2**20
