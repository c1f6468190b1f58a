"""What the machine can do fast: native bf16 matrix units on the CPU.

On x86 CPUs bf16 matrix products are fast only with AMX (``amx_bf16``) or AVX512-BF16 (``avx512_bf16``). On a
CPU with AVX2 only, PyTorch emulates them: measured on an AMD EPYC, a (1004 x 576) @ (576 x 1536) product ran
at 98 GFLOP/s in fp32 and 1 GFLOP/s in bf16, and a bf16 DPO run that takes 5 minutes in fp32 was still going
after 25. ``precision: bf16`` (and bf16 weights, ``model_dtype: bf16``) on such a CPU is refused unless the user
insists. fp16 is the same trap on CPUs without AVX512-FP16 or AMX-FP16: on an AMD EPYC with AVX512-BF16 but no
FP16 units the same product ran at 34 GFLOP/s in fp32 and 0.8 in fp16, so ``model_dtype: fp16`` there is refused
alike.
"""

from __future__ import annotations

import platform
from pathlib import Path

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
FP16_FLAGS = ("amx_fp16", "avx512_fp16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags (Linux ``/proc/cpuinfo``); empty when unknown."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.exists() else ""
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool | None:
    """True with AMX or AVX512-BF16 (x86) or BF16 (Arm ``bf16`` feature); False without; None if unknown."""
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return None
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return any(f in flags for f in BF16_FLAGS)


def cpu_model() -> str:
    """The CPU's model name (for benchmark records)."""
    path = Path("/proc/cpuinfo")
    for line in (path.read_text(errors="replace") if path.exists() else "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_has_native_fp16(flags: set[str] | None = None) -> bool | None:
    """True with AMX-FP16 or AVX512-FP16 (x86) or Arm's ``fphp``/``asimdhp``; False without; None if unknown."""
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return None
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "asimdhp" in flags or "fphp" in flags
    return any(f in flags for f in FP16_FLAGS)


def bf16_refusal(device_type: str, allow_slow: bool, flags: set[str] | None = None, *,
                 setting: str = "precision: bf16", fix: str = "training.precision: fp32") -> str | None:
    """The one-line reason to refuse ``setting`` (bf16 compute or weights) on this machine, or None to go on."""
    if device_type != "cpu" or allow_slow or cpu_has_native_bf16(flags) is not False:
        return None
    return (f"{setting} on this CPU ({cpu_model()}) runs emulated: it has no AMX or AVX512-BF16, and bf16 "
            f"matrix products run tens of times slower than fp32 there; use {fix}, or set "
            "training.allow_slow_bf16: true to run bf16 anyway")


def low_precision_refusal(device_type: str, dtype: str, allow_slow: bool, flags: set[str] | None = None) -> str | None:
    """The one-line reason to refuse ``model_dtype: <dtype>`` (``bf16`` / ``fp16``) here, or None."""
    if dtype == "bf16":
        return bf16_refusal(device_type, allow_slow, flags, setting="model_dtype: bf16", fix="model_dtype: fp32")
    if dtype != "fp16" or device_type != "cpu" or allow_slow or cpu_has_native_fp16(flags) is not False:
        return None
    return (f"model_dtype: fp16 on this CPU ({cpu_model()}) runs emulated: it has no AMX-FP16 or AVX512-FP16, and "
            "fp16 matrix products run tens of times slower than fp32 there; use model_dtype: fp32 (fp16 is for "
            "GPUs), or set training.allow_slow_bf16: true to run it anyway")
