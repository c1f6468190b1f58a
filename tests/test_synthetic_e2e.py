"""The synthetic-data loop end to end on the toy task, through the CLI where there is one:

    SFT model --preftune generate (4 per prompt)--> GEN --preftune judge (toy verifier | trained reward model)-->
    pairs --preftune train (DPO)--> a policy whose greedy answers pass the verifier more often

The SFT model (a 0.1M-parameter Llama, 1200 steps) echoes the words of held-out prompts but signs off
("..., hope this helps !") on about a third of them, which the verifier rejects. Sampling 4 responses per
train prompt at temperatures 0.7 and 1.0 gives prompts with both a plain and a signed-off (or garbled) answer;
best-vs-worst pairs by the verifier teach DPO to answer plainly. A reward model trained on the toy pairs from
the SFT model's weights judges the same generations; its held-out accuracy is reported and its pairs train a
second DPO run. Generation accuracy: greedy, verified with ``toy.verify`` on 100 held-out prompts.

DPO runs with the NLL term on chosen (``loss.name: [dpo, sft]``, RPO): the pairs share the whole echo and differ
only in the sign-off, and plain DPO on them lowers the chosen likelihood with the rejected one until the tiny
model loses the echo itself (greedy accuracy 0.67 -> 0.12 at lr 1e-3, 0.75 at 1e-4 for 3 epochs, 0.30 for 6);
the NLL term holds the chosen side up (0.98).

The toy tokenizer's WordPiece decoder joins punctuation on decode ("elk, hope this helps!"), which does not
tokenize back (``elk,`` is ``<unk>``), so generated texts would reach training as ``<unk>``s; the tokenizer
used here decodes without that clean-up so that generate -> judge -> train round-trips.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

import preftune
from preftune import toy
from preftune.cli import main as cli_main
from preftune.rollout.generate import generate_responses


def round_trip_tokenizer():
    """The toy tokenizer, decoding ``elk , hope`` as written (no clean-up of spaces before punctuation)."""
    from tokenizers import decoders

    tok = toy.build_tokenizer()
    tok.backend_tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return tok


def generation_accuracy(model_dir, tokenizer, items) -> float:
    from preftune.models import load_causal_lm

    model = load_causal_lm(str(model_dir))
    rows = generate_responses(model, tokenizer, [it.prompt for it in items], n=1, temperatures=[0.0],
                              max_new_tokens=16, batch_size=50)
    return sum(toy.verify(r["prompt"], r["responses"][0]["text"]) for r in rows) / len(items)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_generate_judge_dpo_raises_generation_accuracy(tmp_path, write_jsonl, capsys):
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    toy_tok = round_trip_tokenizer()  # saved with the SFT model: generate, judge and train all use it
    train_items, test_items = toy.split_items(seed=0, n_train=2000, n_test=100)
    quiet = lambda *_: None  # noqa: E731

    # ---- SFT ---------------------------------------------------------------------------------------------
    preftune.train({
        "model": toy.build_model(toy_tok, seed=0), "tokenizer": toy_tok,
        "data": {"train": toy.sft_rows(train_items, seed=0)}, "loss": {"name": "sft"},
        "training": {"output_dir": str(tmp_path / "sft"), "learning_rate": 3e-3, "max_steps": 1200,
                     "per_device_batch_size": 16, "warmup_ratio": 0.05, "max_length": 48, "progress_bar": False},
    }, log=quiet)
    sft = tmp_path / "sft" / "final"
    before = generation_accuracy(sft, toy_tok, test_items)
    t_sft = time.perf_counter()

    # ---- generate 4 responses per prompt; judge with the verifier ------------------------------------------
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": it.prompt} for it in train_items[:400]])
    gen, verifier_pairs = tmp_path / "gen.jsonl", tmp_path / "pairs_verifier.jsonl"
    assert cli_main(["generate", "--model", str(sft), "--prompts", str(prompts), "--n", "4", "--temperatures",
                     "0.7,1.0", "--max-new-tokens", "16", "--backend", "hf", "--device", "cpu", "--batch-size", "64",
                     "--out", str(gen)]) == 0
    assert cli_main(["judge", str(gen), "--judge", "toy-verifier", "--pairs", "best-vs-worst",
                     "--out", str(verifier_pairs)]) == 0
    pairs = read_jsonl(verifier_pairs)
    assert all(toy.verify(p["prompt"], p["chosen"]) and not toy.verify(p["prompt"], p["rejected"]) for p in pairs)

    # ---- a reward model on the toy pairs (the SFT model's body, a new head); judge with it too ---------------
    rm = tmp_path / "rm"
    rm_summary = preftune.train({
        "task": "reward", "model": str(sft),
        "data": {"train": toy.pair_rows(train_items[:1200], seed=1), "eval": toy.pair_rows(test_items, seed=2)},
        "loss": {"center_coef": 0.01},
        "training": {"output_dir": str(rm), "learning_rate": 1e-3, "max_steps": 75, "per_device_batch_size": 16,
                     "eval_every": 15, "max_length": 48, "progress_bar": False},
        "monitor": {"early_stopping_metric": "eval/rewards/accuracies", "patience": 2},
    }, log=quiet)
    rm_accuracy = rm_summary["best"]["value"]
    rm_pairs = tmp_path / "pairs_rm.jsonl"
    assert cli_main(["judge", str(gen), "--judge", f"{{type: reward_model, model: {rm / 'best'}}}",
                     "--pairs", "best-vs-worst", "--min-margin", "1.0", "--out", str(rm_pairs)]) == 0
    by_rm = read_jsonl(rm_pairs)
    rm_agrees = sum(toy.verify(p["prompt"], p["chosen"]) >= toy.verify(p["prompt"], p["rejected"])
                    for p in by_rm) / len(by_rm)
    t_data = time.perf_counter()

    # ---- DPO (+ NLL on chosen) on each judge's pairs, from the SFT model ------------------------------------
    def dpo(name, pairs_path):
        preftune.train({
            "model": str(sft), "data": {"train": str(pairs_path)}, "loss": {"name": ["dpo", "sft"], "beta": 0.5},
            "training": {"output_dir": str(tmp_path / name), "learning_rate": 3e-4, "num_epochs": 3,
                         "per_device_batch_size": 8, "max_length": 48, "progress_bar": False},
        }, log=quiet)
        return generation_accuracy(tmp_path / name / "final", toy_tok, test_items)

    after_verifier = dpo("dpo_verifier", verifier_pairs)
    after_rm = dpo("dpo_rm", rm_pairs)
    with capsys.disabled():
        print(f"\nsynthetic loop: SFT greedy accuracy {before:.2f} -> DPO on {len(pairs)} verifier pairs "
              f"{after_verifier:.2f}, on {len(by_rm)} reward-model pairs {after_rm:.2f}; reward model held-out "
              f"accuracy {rm_accuracy:.3f} (best at step {rm_summary['best']['step']}, stopped: "
              f"{rm_summary['stopped'] or 'no'}), its pairs agree with the verifier on {rm_agrees:.2f}; "
              f"SFT {t_sft - t0:.0f}s, data {t_data - t_sft:.0f}s, DPO {time.perf_counter() - t_data:.0f}s")
    assert rm_accuracy >= 0.9
    assert rm_agrees >= 0.9
    assert after_verifier >= before + 0.2
    assert after_rm >= before + 0.2
