"""Where a decoding step of ``preftune.generation.generate`` goes, and interleaved A/B timings of whole calls.

The GRPO benchmark's 135M shape (``vs_trl.build_model_dir("smol135m")``, random weights), 2 prompts x 4
samples, 128-token prompts, 64 new tokens, temperature 1, one torch thread::

    python benchmarks/decode_profile.py ab fp32,bf16-infmode,bf16 --rounds 3    # median seconds per call
    python benchmarks/decode_profile.py profile fp32,bf16                        # torch.profiler op table

Variants: ``fp32`` (no autocast), ``bf16`` (the run's bf16 autocast around the call, as the on-policy sources do)
and ``bf16-infmode`` (the same, but decoding under ``inference_mode``, which turns autocast's weight cache off:
what the code did before it chose ``no_grad`` under autocast).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_trl import build_model_dir  # noqa: E402

VARIANTS = ("fp32", "bf16", "bf16-infmode")


def setup(workdir: Path):
    from transformers import AutoModelForCausalLM

    from preftune.generation import SamplingParams

    model = AutoModelForCausalLM.from_pretrained(build_model_dir("smol135m", workdir / "models"),
                                                 dtype=torch.float32)
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 49152) for _ in range(128)] for _ in range(2)]
    return model, prompts, SamplingParams(max_new_tokens=64, temperature=1.0, n=4, stop_ids=(2,))


def call(name: str, model, prompts, params) -> float:
    """Seconds of one ``generate`` call under variant ``name``."""
    from preftune import generation

    real = generation.torch.is_autocast_enabled
    if name == "bf16-infmode":  # generate then picks inference_mode, as it did before
        generation.torch.is_autocast_enabled = lambda *a: False
    ctx = contextlib.nullcontext() if name == "fp32" else torch.autocast("cpu", dtype=torch.bfloat16)
    try:
        with ctx:
            t = time.perf_counter()
            generation.generate(model, prompts, params, [1, 2], pad_id=0, batch_size=8)
            return time.perf_counter() - t
    finally:
        generation.torch.is_autocast_enabled = real


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["ab", "profile"])
    p.add_argument("variants", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "preftune_decode_profile"))
    a = p.parse_args(argv)
    names = a.variants.split(",")
    if bad := [n for n in names if n not in VARIANTS]:
        p.error(f"unknown variant {bad[0]!r}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(1)
    model, prompts, params = setup(Path(a.workdir))
    if a.mode == "profile":
        from torch.profiler import ProfilerActivity, profile

        for n in names:
            call(n, model, prompts, params)  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                call(n, model, prompts, params)
            print(f"===== {n}\n{prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=25)}")
        return 0
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:
        call(n, model, prompts, params)  # warm-up
    for r in range(a.rounds):  # interleaved, the order reversed every other round
        for n in names if r % 2 == 0 else names[::-1]:
            times[n].append(call(n, model, prompts, params))
    for n in names:
        med = sorted(times[n])[len(times[n]) // 2]
        print(f"{n:14s} {[round(x, 2) for x in times[n]]} median {med:.2f} s, {1000 * med / 64:.0f} ms a step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
