"""Benchmark: `preftune data validate` on a generated 1-million-pair JSONL file, no tokenizer.

    python benchmarks/validate_1m.py                      # generate /tmp/preftune_1m.jsonl (reused if present)
    python benchmarks/validate_1m.py --rows 100000 --path /tmp/p100k.jsonl

The file is synthetic but shaped like real preference data: prompts of 8-60 words and responses of 20-300 words
drawn from a 20k-word vocabulary (~1.3 KB per pair), with 1% of rows each carrying a planted problem (identical,
near-identical, refusal-swapped, exact duplicate, contradiction, control character, malformed line) so the checks
do real work. The validation runs as a subprocess of this script through the real CLI entry
(``python -m preftune.data.cli validate PATH --report R.json``); wall time is measured around it and peak RSS is
``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` after it exits. Results go to stdout as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path


def _vocab(rng: random.Random, n: int = 20000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = {"".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(n * 2)}
    return sorted(words)[:n]


def generate(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    vocab = _vocab(rng)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choices(vocab, k=rng.randint(lo, hi))).capitalize() + "."

    tmp = path.with_suffix(".tmp")
    recent: list[dict] = []
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(rows):
            kind = i % 100
            if kind == 1 and recent:  # exact duplicate of a recent row
                row = dict(rng.choice(recent))
            elif kind == 2 and recent:  # contradiction: a recent row with the preference reversed
                prev = rng.choice(recent)
                row = {"prompt": prev["prompt"], "chosen": prev["rejected"], "rejected": prev["chosen"]}
            elif kind == 7:
                f.write('{"prompt": "truncated line\n')
                continue
            else:
                row = {"prompt": text(8, 60), "chosen": text(20, 300), "rejected": text(20, 300)}
                if kind == 3:
                    row["rejected"] = row["chosen"]
                elif kind == 4:
                    words = row["chosen"].split()
                    words[len(words) // 2] = "changed"
                    row["rejected"] = " ".join(words)
                elif kind == 5:
                    row["chosen"] = "I'm sorry, but I can't help with that."
                elif kind == 6:
                    row["chosen"] = row["chosen"][:10] + "\x07" + row["chosen"][10:]
                if len(recent) < 1000:
                    recent.append(row)
                else:
                    recent[rng.randrange(1000)] = row
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--path", type=Path, default=Path("/tmp/preftune_1m.jsonl"))
    ap.add_argument("--regenerate", action="store_true")
    args = ap.parse_args()

    if args.regenerate or not args.path.exists():
        t = time.perf_counter()
        generate(args.path, args.rows)
        print(f"generated {args.path} ({args.path.stat().st_size / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - t:.0f} s", file=sys.stderr)
    report = args.path.with_suffix(".report.json")
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "preftune.data.cli", "validate", str(args.path), "--report", str(report)]
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    print(proc.stdout[-4000:], file=sys.stderr)
    if proc.returncode not in (0, 1):
        print(proc.stderr, file=sys.stderr)
        return proc.returncode
    rep = json.loads(report.read_text())
    print(json.dumps({
        "rows_read": rep["rows_read"], "rows_usable": rep["rows_usable"],
        "file_mib": round(args.path.stat().st_size / 2**20), "wall_s": round(wall, 1),
        "peak_rss_mib": round(peak_kib / 1024), "exit_code": proc.returncode,
        "findings": {f["name"]: f["count"] for f in rep["findings"]},
        "python": platform.python_version(), "cpus": os.cpu_count(),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
