"""bf16 weight casts per optimizer step: ``engine.cast_once`` on vs off, preftune.train on the 135M shape.

    python benchmarks/bf16_casts.py --threads 1 --repeats 2 --steps 3
    python benchmarks/bf16_casts.py --threads 1 --repeats 1 --steps 3 --precision fp32   # fp32: nothing to cast

Builds SmolLM2-135M's shape (576 hidden, 30 layers, 49152 vocabulary, tied embeddings; random weights) and
``steps x 8`` random pairs with ``benchmarks/vs_trl.py``'s helpers in ``--workdir``, then runs DPO
(2 pairs x 4 accumulation, max_length 512, precomputed reference) in a fresh subprocess per run, the two
settings interleaved A/B/A/B. Per-step time: the time between consecutive ``on_step`` callbacks (steps 2..N;
step 1 also pays the first touch of every buffer). A last pair of runs profiles step 2 alone
(``torch.profiler``) for the share of ``aten::copy_`` (casts) in the step's self CPU time and the number of
``aten::_to_copy`` calls. Results: ``--out`` (JSON) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_trl import MODELS, build_model_dir, build_pairs  # noqa: E402

BATCH, ACCUM, MAX_LENGTH = 2, 4, 512


class StepClock:
    """on_step timestamps; with ``profile_step``, a torch.profiler run over that step alone."""

    def __init__(self, profile_step: int | None):
        self.times, self.cpu, self.profile_step, self.prof = [], [], profile_step, None

    def on_step(self, step, metrics, state):
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())  # this process's CPU time: the measure least disturbed by others
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.result, self.prof = self.prof.key_averages(), None
        if self.profile_step is not None and step == self.profile_step - 1:
            import torch.profiler

            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.__enter__()


def worker(a) -> dict:
    import torch

    import preftune

    torch.set_num_threads(a.threads)
    clock = StepClock(2 if a.profile else None)
    run_dir = Path(a.run_dir)
    config = {
        "model": str(a.model_dir), "data": {"train": str(a.data)}, "loss": {"name": "dpo", "beta": 0.1},
        "reference": {"precompute": True, "cache_dir": str(run_dir / "refcache")},
        "engine": {"cast_once": a.cast_once == "on"},
        "training": {"output_dir": str(run_dir), "learning_rate": 1e-6, "per_device_batch_size": BATCH,
                     "gradient_accumulation_steps": ACCUM, "max_steps": a.steps, "max_length": MAX_LENGTH,
                     "precision": a.precision, "allow_slow_bf16": True, "save_model": False,
                     "progress_bar": False, "logging_every": 1},
    }
    summary = preftune.train(config, log=lambda *m: print(*m, file=sys.stderr), callbacks=[clock])
    steps = [b - a_ for a_, b in zip(clock.times, clock.times[1:])]
    cpu = [b - a_ for a_, b in zip(clock.cpu, clock.cpu[1:])]
    out = {"step_s": steps, "step_cpu_s": cpu, "train_loop_s": summary["train_loop_s"], "peak_rss_mb": summary["peak_rss_mb"],
           "final_loss": summary["final_loss"]}
    if a.profile:
        rows = {e.key: e for e in clock.result}
        total = sum(e.self_cpu_time_total for e in clock.result)
        copy = rows["aten::copy_"].self_cpu_time_total if "aten::copy_" in rows else 0
        out.update(copy_share=copy / total, copy_s=copy / 1e6, profiled_s=total / 1e6,
                   to_copy_calls=rows["aten::_to_copy"].count if "aten::_to_copy" in rows else 0)
    return out


def launch(a, cast_once: str, work: Path, model_dir: Path, data: Path, profile: bool) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"run-{cast_once}-", dir=work))
    result = run_dir / "result.json"
    cmd = [sys.executable, __file__, "--worker", "--cast-once", cast_once, "--model-dir", str(model_dir),
           "--data", str(data), "--run-dir", str(run_dir), "--result", str(result), "--steps", str(a.steps),
           "--threads", str(a.threads), "--precision", a.precision] + (["--profile"] if profile else [])
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    return json.loads(result.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/preftune_bf16_casts"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    for name in ("--cast-once", "--model-dir", "--data", "--run-dir", "--result"):
        p.add_argument(name, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        Path(a.result).write_text(json.dumps(worker(a)))
        return 0
    a.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir("smol135m", a.workdir)
    data = build_pairs(a.workdir / f"pairs-{a.steps}.jsonl", a.steps * BATCH * ACCUM, MODELS["smol135m"]["vocab_size"])
    runs = {"on": [], "off": []}
    for _ in range(a.repeats):
        for setting in ("on", "off"):
            runs[setting].append(launch(a, setting, a.workdir, model_dir, data, profile=False))
            print(setting, json.dumps(runs[setting][-1]), flush=True)
    profiles = {} if a.no_profile else {s: launch(a, s, a.workdir, model_dir, data, profile=True) for s in ("on", "off")}
    print(f"\n{a.precision}, {a.threads} thread(s), {a.repeats} runs each, steps 2..{a.steps} of each run")
    print("| engine.cast_once | step s (median) | step CPU s (median) | step s (all) | aten::copy_ share | copy_ s "
          "| _to_copy calls | peak RSS MiB | final loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in ("on", "off"):
        steps = [x for r in runs[s] for x in r["step_s"]]
        cpu = statistics.median(x for r in runs[s] for x in r["step_cpu_s"])
        prof = profiles.get(s, {})
        share = f"{prof['copy_share']:.1%}" if prof else "-"
        print(f"| {s} | {statistics.median(steps):.2f} | {cpu:.2f} | {', '.join(f'{x:.2f}' for x in steps)} | {share} | "
              f"{prof.get('copy_s', 0):.2f} | {prof.get('to_copy_calls', '-')} | "
              f"{max(r['peak_rss_mb'] for r in runs[s]):.0f} | {runs[s][0]['final_loss']:.6f} |")
    if a.out:
        a.out.write_text(json.dumps({"runs": runs, "profiles": profiles, "threads": a.threads,
                                     "precision": a.precision}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
