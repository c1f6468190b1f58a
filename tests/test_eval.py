"""`preftune eval`: hand-computed accuracies and win rates, a model against itself, and agreement with the numbers
training logs for the same model and pairs (through the CLI, with the toy verifier as judge)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import preftune
from preftune.eval.evaluate import evaluate_model, format_table
from preftune.eval.preference_accuracy import PairScores, preference_metrics
from preftune.eval.win_rate import length_controlled, win_rate


def test_preference_metrics_hand_computed():
    # pair 1: policy chosen −1 (ref −1.5), rejected −3 (ref −2): margin 0.5·((0.5) − (−1)) = 0.75
    # pair 2: policy chosen −2 (ref −2),   rejected −1 (ref −2): margin 0.5·((0)   − (1))  = −0.5
    policy = PairScores(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]), torch.tensor([2, 2]),
                        torch.tensor([4, 1]))
    reference = PairScores(torch.tensor([-1.5, -2.0]), torch.tensor([-2.0, -2.0]), torch.tensor([2, 2]),
                           torch.tensor([4, 1]))
    out = preference_metrics(policy, reference, beta=0.5)
    assert out["accuracy_implicit_reward"] == 0.5
    assert out["margin"]["mean"] == pytest.approx((0.75 - 0.5) / 2)
    assert out["margin"]["max"] == pytest.approx(0.75) and out["margin"]["min"] == pytest.approx(-0.5)
    assert out["accuracy_logp"] == 0.5  # log-prob margins 2 and −1
    # per token: chosen −1/2 vs rejected −3/4 (wins); chosen −2/2 vs rejected −1/1 (tie: half)
    assert out["accuracy_logp_per_token"] == pytest.approx(0.75)
    assert out["chosen_perplexity"] == pytest.approx(math.exp(3 / 4))  # −(−1 − 2) / (2 + 2) tokens
    assert out["chosen_reward"] == pytest.approx(0.5 * (0.5 + 0) / 2)
    no_ref = preference_metrics(policy, None, beta=0.5)
    assert no_ref["accuracy_implicit_reward"] is None and no_ref["margin"]["mean"] == pytest.approx(0.5)


def test_win_rate_counts_ties_half():
    res = win_rate(["A", "A", "B", "tie"], [5, 5, 5, 5], [5, 5, 5, 5])
    assert (res["wins"], res["losses"], res["ties"]) == (2, 1, 1)
    assert res["win_rate"] == pytest.approx(2.5 / 4)
    # equal lengths: length explains nothing, the length-controlled figure stays at the raw one
    assert res["lc_win_rate"] == pytest.approx(0.625, abs=0.01)
    assert win_rate(["A"] * 3, [9, 1, 5], [5, 5, 5])["lc_win_rate"] == 1.0


def test_length_controlled_win_rate_discounts_wins_bought_by_length():
    # The model wins 7 of 8 prompts where it answered 6 tokens longer and 1 of 4 where it answered 6 shorter:
    # raw 8/12. Δ has mean 2 and sd √32, so x = ±tanh(6/√32) = ±0.786, and with two groups the fit is exact:
    # a + 0.786 b = logit(7/8) = 1.946, a − 0.786 b = logit(1/4) = −1.099, so a = 0.424, b = 1.94 and the
    # win rate at equal length is σ(0.424) = 0.604 (λ = 0.01 moves it in the third decimal).
    outcomes = [1.0] * 7 + [0.0] + [1.0] + [0.0] * 3
    diffs = [6.0] * 8 + [-6.0] * 4
    res = length_controlled(outcomes, diffs)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    a, b = (logit(7 / 8) + logit(1 / 4)) / 2, (logit(7 / 8) - logit(1 / 4)) / 2 / math.tanh(6 / math.sqrt(32))
    assert res["b"] == pytest.approx(b, abs=0.02) and res["a"] == pytest.approx(a, abs=0.01)
    assert res["lc_win_rate"] == pytest.approx(1 / (1 + math.exp(-a)), abs=0.003)
    assert res["lc_win_rate"] < 8 / 12
    # the same outcomes with no length difference: the fit is the raw rate (up to the light regularization)
    flat = length_controlled(outcomes, [0.0] * 12)
    assert flat["lc_win_rate"] == pytest.approx(8 / 12, abs=0.005) and flat["b"] == pytest.approx(0.0, abs=1e-9)


def test_model_against_itself(toy_tok, make_model, eval_pairs):
    """Reference = the model: every margin is exactly 0 (accuracy 0.5: ties count half), KL exactly 0, every
    verdict a tie, both sides generate the same."""
    from preftune.judges.spec import make_judge

    model = make_model(0)
    res = evaluate_model(model, toy_tok, eval_pairs[:12], reference=model, judge=make_judge("toy-verifier"),
                         num_prompts=6, max_new_tokens=8, log=lambda *_: None)
    assert res["preference"]["accuracy_implicit_reward"] == 0.5
    assert res["preference"]["margin"]["max"] == 0.0 == res["preference"]["margin"]["min"]
    assert all(v == 0.0 for v in res["generation"]["kl"].values())
    assert res["generation"]["model"] == res["generation"]["reference"]
    judge = res["judge"]
    assert judge["ties"] == 6 and judge["win_rate"] == 0.5 == judge["lc_win_rate"]
    table = format_table(res)
    assert "win rate vs reference (0W 0L 6T)" in table and "KL to reference" in table


@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy_tok, make_model, sft_rows, train_pairs, eval_pairs):
    """A short SFT then DPO run; the SFT model (the reference) and the DPO model saved as directories."""
    root = tmp_path_factory.mktemp("eval-run")
    model = make_model(0)
    preftune.train({"model": model, "tokenizer": toy_tok, "data": {"train": sft_rows}, "loss": {"name": "sft"},
                    "monitor": {"enabled": False},
                    "training": {"output_dir": str(root / "sft"), "learning_rate": 3e-3, "max_steps": 15,
                                 "per_device_batch_size": 8, "max_length": 64, "progress_bar": False,
                                 "save_model": False}}, log=lambda *_: None)
    reference = copy.deepcopy(model)
    reference.save_pretrained(root / "ref")
    toy_tok.save_pretrained(root / "ref")
    summary = preftune.train({
        "model": model, "tokenizer": toy_tok, "data": {"train": train_pairs, "eval": eval_pairs},
        "loss": {"name": "dpo", "beta": 0.1}, "monitor": {"num_prompts": 4, "max_new_tokens": 8},
        "reference": {"cache_dir": str(root / "cache")},
        "training": {"output_dir": str(root / "dpo"), "learning_rate": 1e-3, "max_steps": 10,
                     "per_device_batch_size": 8, "max_length": 64, "progress_bar": False},
    }, log=lambda *_: None)
    pairs = root / "eval_pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in eval_pairs))
    return root, summary, pairs


def test_cli_agrees_with_training_metrics(trained, capsys, toy_tok):
    """`preftune eval` on the saved DPO model and its SFT reference reproduces the trainer's final held-out
    accuracy, margins and rewards (same pairs, same beta), and the verifier judge's mean score is the share of
    greedy responses the toy verifier accepts (recomputed here through the rollout generator)."""
    from preftune import toy
    from preftune.cli import main
    from preftune.models import load_causal_lm
    from preftune.rollout.generate import HFBackend, Job

    root, summary, pairs = trained
    out = root / "eval.json"
    rc = main(["eval", str(root / "dpo" / "final"), "--data", str(pairs), "--reference", str(root / "ref"),
               "--judge", "toy-verifier", "--num-prompts", "16", "--max-new-tokens", "12", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "preference accuracy, implicit reward" in printed and f"wrote {out}" in printed
    res = json.loads(out.read_text())
    final = summary["final_eval_metrics"]
    pref = res["preference"]
    assert pref["pairs"] == summary["eval_examples"] == 64
    assert pref["accuracy_implicit_reward"] == pytest.approx(final["rewards/accuracies"], abs=1e-9)
    assert pref["margin"]["mean"] == pytest.approx(final["rewards/margins"], abs=1e-5)
    assert pref["chosen_reward"] == pytest.approx(final["rewards/chosen"], abs=1e-5)
    assert pref["rejected_reward"] == pytest.approx(final["rewards/rejected"], abs=1e-5)

    prompts = list(dict.fromkeys(r["prompt"] for r in map(json.loads, pairs.read_text().splitlines())))[:16]
    backend = HFBackend(load_causal_lm(str(root / "dpo" / "final")), toy_tok, max_new_tokens=12)
    texts = [s.text for s in backend.sample([Job(p, 0.0, 0) for p in prompts])]
    expected = sum(toy.verify(p, t) for p, t in zip(prompts, texts)) / len(prompts)
    judge = res["judge"]
    assert judge["model_score"] == pytest.approx(expected)
    assert judge["wins"] + judge["losses"] + judge["ties"] == 16
    assert set(res["generation"]["kl"]) == {"kl/k1_token", "kl/k3_token", "kl/k1_seq", "kl/k3_seq"}
    assert res["generation"]["kl"]["kl/k3_seq"] >= 0


def test_cli_errors_are_one_line(tmp_path, capsys, saved_model_dir):
    from preftune.cli import main

    assert main(["eval", str(saved_model_dir), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "data file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "completion": "y", "label": true}\n')
    assert main(["eval", str(saved_model_dir), "--data", str(bad)]) == 2
    assert "no usable preference pairs" in capsys.readouterr().err
