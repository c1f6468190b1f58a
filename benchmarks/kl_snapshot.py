"""What KL to the reference costs per evaluation when no reference model stays in memory.

    python benchmarks/kl_snapshot.py [--models toy,smol135m] [--threads 1] [--repeats 3]

The monitor's KL needs reference log-probs of the policy's ``monitor.num_prompts`` (16) sampled completions of
up to ``max_new_tokens`` (32) tokens. Three ways to have the reference at hand, for full fine-tuning with
precomputed reference log-probs (where the loop keeps none):

    in memory   a frozen deep copy of the model, kept for the whole run (what ``reference.precompute: false`` holds)
    cpu copy    the weights as a CPU state dict, run through the policy module (``functional_call``)
    snapshot    the weights written once to the run directory, memory-mapped at each evaluation (preftune's choice)

For each: the one-time cost (copy or write) and the reference scoring pass of one evaluation (16 prompts of 64
tokens + 32 completion tokens; median of ``--repeats``); for the snapshot also the mapping alone. The first two
hold the weights (``weights MiB``) in memory for the whole run; the snapshot holds nothing between
evaluations (its file pages are mapped for the pass, then unmapped). Models:
``toy`` (the tests' toy Llama, hidden 64) and ``smol135m`` (SmolLM2-135M's shape, random weights, built by
``vs_trl.build_model_dir``). CPU only; run on a quiet machine for stable numbers.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(kind: str, root: Path):
    import torch

    if kind == "toy":
        from preftune import toy

        tok = toy.build_tokenizer()
        return toy.build_model(tok, seed=0, hidden=64), len(tok)
    from transformers import AutoModelForCausalLM

    from benchmarks.vs_trl import MODELS, build_model_dir

    model = AutoModelForCausalLM.from_pretrained(build_model_dir(kind, root), dtype=torch.float32)
    return model, MODELS[kind]["vocab_size"]


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(kind: str, root: Path, repeats: int) -> dict:
    import torch

    from preftune.eval.drift import completion_token_logps
    from preftune.models import freeze, reference_mode
    from preftune.monitor.snapshot import AtWeights, WeightSnapshot

    model, vocab = build(kind, root)
    model.eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, vocab, (64,), generator=g).tolist() for _ in range(16)]
    completions = [torch.randint(4, vocab, (32,), generator=g).tolist() for _ in range(16)]

    def score(ref):
        with reference_mode(ref):
            return completion_token_logps(ref, prompts, completions, pad_id=0)

    nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
    out = {"model": kind, "parameters": sum(p.numel() for p in model.parameters()), "weights MiB": nbytes}
    t0 = time.perf_counter()
    frozen = freeze(copy.deepcopy(model))
    out["in memory: setup s"] = time.perf_counter() - t0  # and `weights MiB` held for the whole run
    out["in memory: per eval s"] = timed(lambda: score(frozen), repeats)
    expected = score(frozen)
    frozen = None  # freed before the next method is measured

    t0 = time.perf_counter()
    state = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    out["cpu copy: setup s"] = time.perf_counter() - t0  # and `weights MiB` held for the whole run
    out["cpu copy: per eval s"] = timed(lambda: score(AtWeights(model, state, torch.device("cpu"))), repeats)
    state = None

    with tempfile.TemporaryDirectory(dir=root) as tmp:
        t0 = time.perf_counter()
        snap = WeightSnapshot(model, Path(tmp) / ".reference-weights.pt")
        out["snapshot: setup s"] = time.perf_counter() - t0  # nothing held between evaluations

        def via_snapshot():
            with snap.model() as ref:
                return score(ref)

        def mapping_only():
            with snap.model():
                pass

        out["snapshot: per eval s"] = timed(via_snapshot, repeats)
        out["snapshot: mapping s"] = timed(mapping_only, repeats)
        got = via_snapshot()
        out["max |Δ logp| snapshot vs in memory"] = max(float((a - b).abs().max()) for a, b in zip(got, expected))
        snap.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="toy,smol135m")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "preftune-bench")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = [measure(kind, args.workdir, args.repeats) for kind in args.models.split(",")]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else f"{r[k]:,}" if isinstance(r[k], int)
                                else str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
