"""One sweep trial, run as ``python -m preftune.tune.trial TRIAL_DIR`` by the sweep driver.

Reads ``TRIAL_DIR/trial.json`` (the run's full training config and the scoring settings), trains
(``preftune.train``, resuming from the run's newest checkpoint when a retried trial finds one), scores the
final model against the reference on the held-out prompts (:func:`preftune.tune.scoring.score_model`) and
writes ``scores.json``. On an error it writes the one-line message to ``error.txt`` (the traceback to the log)
and exits 1. It exits at once when the driver that started it is gone (``PREFTUNE_TRIAL_PARENT``), so a
killed sweep leaves no training behind.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from pathlib import Path

from preftune.tune.files import read_json, write_json, write_text


def _watch_parent(parent: int) -> None:
    """Exit when the process that started this one is gone (re-parented, or its pid no longer exists)."""

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def run(tdir: Path) -> dict:
    import torch

    from preftune.tune import adapter
    from preftune.tune.scoring import score_model

    adapter.quiet_progress_bars()
    spec = read_json(tdir / "trial.json")
    if spec is None:
        raise FileNotFoundError(f"{tdir / 'trial.json'} not found")
    config, score = spec["config"], spec["score"]
    summary = adapter.train(config, resume=True, log=print)
    policy = adapter.load_model(Path(config["training"]["output_dir"]) / "final")
    reference = adapter.load_model(score["reference_model"])
    tokenizer = adapter.load_tokenizer(config.get("tokenizer"), config["model"])
    prompts = adapter.read_prompts(score["prompts"])
    judge = adapter.make_judge(score["judge"])
    with torch.no_grad():
        scores = score_model(policy, reference, tokenizer, prompts, judge, max_new_tokens=score["max_new_tokens"],
                             seed=score["seed"])
    scores["train"] = {k: summary.get(k) for k in ("steps", "final_loss", "train_runtime_s", "stopped")}
    write_json(tdir / "scores.json", scores)
    return scores


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m preftune.tune.trial TRIAL_DIR", file=sys.stderr)
        return 2
    parent = os.environ.get("PREFTUNE_TRIAL_PARENT")
    if parent:
        _watch_parent(int(parent))
    tdir = Path(argv[0])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    write_text(tdir / "runner.pid", f"{os.getpid()}\n")
    try:
        scores = run(tdir)
    except Exception as e:  # recorded on the trial; the sweep goes on
        from preftune.errors import PreftuneError

        traceback.print_exc()
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        known = isinstance(e, PreftuneError) and text  # a user error reads as is, as the CLI prints it
        write_text(tdir / "error.txt", (text if known else f"{type(e).__name__}: {text}".rstrip(": ")) + "\n")
        return 1
    print(f"trial: {len(scores)} scores written to {tdir / 'scores.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
