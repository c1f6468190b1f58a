"""Where the peak RSS of a preftune DPO run goes: RSS sampled every 10 ms and the peak of each phase.

    python benchmarks/memory_breakdown.py --precision bf16 --steps 2            # the 135M benchmark shape
    python benchmarks/memory_breakdown.py --precision fp32 --engine reuse_freed_memory=false

Builds the model and pairs of ``benchmarks/vs_trl.py`` (under /tmp/preftune_mem, reused), then runs
``preftune.train`` with that benchmark's settings (2 pairs x 4 accumulation, max_length 512, reference
precomputed into a fresh cache) in a subprocess. A thread in that process reads ``/proc/self/statm``; phase
marks come from the trainer's log lines, the reference pass, every ``backward`` and every optimizer step.
Printed: the RSS at each mark, the peak between consecutive marks, and ``ru_maxrss``. RSS measures the heap,
not live tensors: with ``reuse_freed_memory`` (the default) freed blocks stay mapped, so a phase's peak is the
high-water mark so far.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_trl import ACCUM, BATCH, BETA, LR, MAX_LENGTH, MODELS, build_model_dir, build_pairs  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_mib() -> tuple[float, float]:
    """(bytes malloc has handed out and not got back, bytes free inside its heaps), MiB; glibc's mallinfo2."""
    try:
        f = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return float("nan"), float("nan")
    f.restype = _Mallinfo2
    m = f()
    return (m.uordblks + m.hblkhd) / 2**20, m.fordblks / 2**20


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


class Sampler:
    """RSS every ``period`` seconds in a daemon thread, and named marks; ``phases()`` gives each span's peak."""

    def __init__(self, period: float = 0.01):
        self.samples: list[tuple[float, float, float]] = []  # (time, RSS, malloc in use)
        self.marks: list[tuple[float, str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period):
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), rss_mib(), heap_mib()[0]))
            time.sleep(period)

    def mark(self, name: str) -> None:
        self.marks.append((time.perf_counter(), name, rss_mib(), *heap_mib()))

    def phases(self) -> list[dict]:
        self._stop.set()
        self._thread.join()
        out, start = [], self.samples[0][0] if self.samples else 0.0
        for k, (t, name, rss, used, free) in enumerate(self.marks):
            end = self.marks[k + 1][0] if k + 1 < len(self.marks) else float("inf")
            span = [(r, u) for s, r, u in self.samples if t <= s < end]
            peak, used_peak = max([r for r, _ in span] + [rss]), max([u for _, u in span] + [used])
            out.append({"t_s": round(t - start, 2), "mark": name, "rss_mib": round(rss), "peak_until_next": round(peak),
                        "malloc_used_mib": round(used), "malloc_free_mib": round(free),
                        "used_peak_until_next": round(used_peak)})
        return out


def _marked(s: Sampler, name: str, fn):
    def wrapper(*args, **kwargs):
        s.mark(f"{name} start")
        out = fn(*args, **kwargs)
        s.mark(f"{name} end")
        return out

    return wrapper


def worker(a) -> None:
    import torch
    import torch.optim.optimizer as hooks

    torch.set_num_threads(a.threads)
    import accelerate  # noqa: F401  (as vs_trl's worker: libraries imported first)
    import datasets  # noqa: F401
    import transformers  # noqa: F401

    import preftune
    import preftune.trainer.loop  # noqa: F401
    from preftune.trainer import build

    s = Sampler()
    s.mark("imports done")
    original_ref = build.reference_logps

    def reference_logps(*args, **kwargs):
        s.mark("reference pass start")
        out = original_ref(*args, **kwargs)
        s.mark("reference pass end")
        return out

    build.reference_logps = reference_logps
    for name in ("load_model", "Monitor", "build_optimizer", "build_scheduler"):
        setattr(build, name, _marked(s, name, getattr(build, name)))
    build.Parallel.prepare = _marked(s, "Parallel.prepare", build.Parallel.prepare)
    original_backward = torch.Tensor.backward
    count = {"backward": 0, "step": 0}

    def backward(self, *args, **kwargs):
        count["backward"] += 1
        s.mark(f"backward {count['backward']} start")
        out = original_backward(self, *args, **kwargs)
        s.mark(f"backward {count['backward']} end")
        return out

    torch.Tensor.backward = backward
    hooks.register_optimizer_step_pre_hook(
        lambda opt, *_: s.mark(f"optimizer step {count['step'] + 1} start"))

    def after_step(opt, *_):
        count["step"] += 1
        s.mark(f"optimizer step {count['step']} end")

    hooks.register_optimizer_step_post_hook(after_step)
    config = {
        "model": str(a.model_dir), "data": {"train": str(a.data)},
        "loss": {"name": "dpo", "beta": BETA},
        "reference": {"precompute": True, "cache_dir": str(a.run_dir / "refcache")},
        "training": {"output_dir": str(a.run_dir), "learning_rate": LR, "per_device_batch_size": BATCH,
                     "gradient_accumulation_steps": ACCUM, "max_steps": a.steps, "max_length": MAX_LENGTH,
                     "precision": a.precision, "allow_slow_bf16": True, "save_model": False,
                     "progress_bar": False, "logging_every": 1},
        "engine": json.loads(a.engine_json),
    }
    if a.model_dtype != "fp32":
        config["model_dtype"] = a.model_dtype
    preftune.train(config, log=lambda *m: s.mark("log: " + " ".join(map(str, m))[:70]))
    s.mark("train returned")
    result = {"phases": s.phases(), "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print("RESULT " + json.dumps(result))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="smol135m")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--model-dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--work", type=Path, default=Path("/tmp/preftune_mem"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--engine-json", default="{}", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    a.work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(a.model, a.work)
    data = a.work / "pairs.jsonl"
    if not data.exists():
        build_pairs(data, 24, MODELS[a.model]["vocab_size"])
    engine = {}
    for kv in a.engine:
        k, v = kv.split("=", 1)
        engine[k] = json.loads(v) if v not in ("true", "false") else v == "true"
    run_dir = a.work / f"mem-{a.precision}-{a.model_dtype}-{os.getpid()}"
    cmd = [sys.executable, __file__, "--worker", "--model-dir", str(model_dir), "--data", str(data),
           "--run-dir", str(run_dir), "--precision", a.precision, "--model-dtype", a.model_dtype,
           "--steps", str(a.steps), "--threads", str(a.threads), "--engine-json", json.dumps(engine)]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        return 1
    result = json.loads(line[len("RESULT "):])
    print(f"{a.model} precision {a.precision}, model_dtype {a.model_dtype}, engine {engine or 'defaults'}, "
          f"{a.steps} steps, {a.threads} thread(s)")
    print(f"{'t s':>7} {'RSS':>6} {'peak to next':>12} {'malloc used':>11} {'peak to next':>12} "
          f"{'heap free':>9}  mark (MiB)")
    for ph in result["phases"]:
        print(f"{ph['t_s']:7.1f} {ph['rss_mib']:6d} {ph['peak_until_next']:12d} {ph['malloc_used_mib']:11d} "
              f"{ph['used_peak_until_next']:12d} {ph['malloc_free_mib']:9d}  {ph['mark']}")
    print(f"ru_maxrss: {result['ru_maxrss_mib']:.0f} MiB (children: "
          f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
