"""Reward models (`task: reward`): the Bradley–Terry loss by hand, margins from the data, training a tiny reward
model on the toy pairs (held-out accuracy, early stopping on overfitting, best checkpoint, LoRA, an encoder),
the saved model scoring in RewardModelJudge exactly as in training, ensembles and multi-axis composites.

The toy pairs prefer the plain echo over a signed-off ("..., hope this helps !", 80%) or a one-word-substituted
echo (20%); a reward model from a random init learns the sign-off within a few dozen steps (held-out accuracy
~0.85), the substitutions need the copy skill it does not have, so 0.75 is the bar.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import preftune
from preftune import toy
from preftune.config import LossConfig, check_loss_params, to_config
from preftune.data.prepare import prepare_data
from preftune.data.tokenize import Tokenization
from preftune.errors import ConfigError
from preftune.judges import RewardModelJudge, ScoreBasedJudge, build_judge
from preftune.losses import get_loss
from preftune.losses.reward import bradley_terry
from preftune.reward import MultiAxisReward, RewardEnsemble, train_ensemble
from preftune.runlog import read_metrics
from preftune.trainer.steps import Objective, reward_step


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---- the loss, by hand ---------------------------------------------------------------------------------------


def test_bradley_terry_by_hand():
    r_w = torch.tensor([2.0, 0.0, -1.0], requires_grad=True)
    r_l = torch.tensor([1.0, 0.0, 1.0])
    out = bradley_terry(r_w, r_l)
    # r_w − r_l = [1, 0, −2]:  −log σ(1) = 0.313262,  −log σ(0) = log 2 = 0.693147,  −log σ(−2) = 2.126928
    torch.testing.assert_close(out.losses, torch.tensor([0.313262, 0.693147, 2.126928]), atol=1e-6, rtol=0)
    # d/dr_w −log σ(Δ) = −σ(−Δ) = [−0.268941, −0.5, −0.880797]
    out.losses.sum().backward()
    torch.testing.assert_close(r_w.grad, torch.tensor([-0.268941, -0.5, -0.880797]), atol=1e-6, rtol=0)
    assert torch.equal(out.chosen_rewards, r_w.detach()) and not out.chosen_rewards.requires_grad
    assert torch.equal(out.rejected_rewards, r_l) and out.metrics == {}


def test_bradley_terry_margin_and_centering_by_hand():
    r_w, r_l = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    margin = torch.tensor([0.5, -1.0])
    # Δ − m = [1 − 0.5, 0 + 1] = [0.5, 1]:  −log σ(0.5) = 0.474077,  −log σ(1) = 0.313262
    out = bradley_terry(r_w, r_l, margin)
    torch.testing.assert_close(out.losses, torch.tensor([0.474077, 0.313262]), atol=1e-6, rtol=0)
    # centering η·(r_w + r_l)² with η = 0.1: [0.1·9, 0.1·0] = [0.9, 0] on top of the margin-free [0.313262, log 2]
    out = bradley_terry(r_w, r_l, center_coef=0.1)
    torch.testing.assert_close(out.losses, torch.tensor([1.213262, 0.693147]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.metrics["center_loss"], torch.tensor([9.0, 0.0]))


def test_spec_and_config():
    spec = get_loss("bradley_terry")
    assert spec.data == "reward" and not spec.needs_reference and spec.hyperparameters == ("center_coef",)
    cfg = to_config({"task": "reward", "model": "m", "training": {"output_dir": "o", "learning_rate": 1e-5}})
    assert cfg.loss.name == "bradley_terry"  # the task's default loss
    assert to_config({"model": "m", "loss": {"beta": 0.1},  # beta: dpo has no safe default
                      "training": {"output_dir": "o", "learning_rate": 1e-5}}).loss.name == "dpo"
    with pytest.raises(ConfigError, match="is a policy loss"):
        check_loss_params(to_config({"task": "reward", "model": "m", "loss": {"name": "dpo", "beta": 0.1},
                                     "training": {"output_dir": "o", "learning_rate": 1e-5}}))
    with pytest.raises(ConfigError, match="set `task: reward`"):
        check_loss_params(to_config({"model": "m", "loss": {"name": "bradley_terry"},
                                     "training": {"output_dir": "o", "learning_rate": 1e-5}}))
    with pytest.raises(ConfigError, match="combines with paired losses only"):
        Objective.from_config(LossConfig(name=["bradley_terry", "sft"]))


# ---- margins from the data -----------------------------------------------------------------------------------


def _data_cfg(train, **extra):
    extra.setdefault("allow_unusable", True)  # one dropped row in three is "unusable" for the data check
    return to_config({"task": "reward", "model": "m", "data": {"train": train, **extra},
                      "training": {"output_dir": "o", "learning_rate": 1e-5}}).data


def test_margins_from_column_and_ratings(toy_tok):
    t = Tokenization(toy_tok, max_length=64)
    rows = [{"prompt": "say : cat dog", "chosen": "cat dog", "rejected": "cat", "margin": 1.5,
             "score_chosen": 9, "score_rejected": 5},
            {"prompt": "say : owl bee", "chosen": "owl bee", "rejected": "owl", "score_chosen": 7},
            {"prompt": "say : red pig", "chosen": "red pig", "rejected": "pig", "margin": 0.25,
             "score_chosen": 6, "score_rejected": 5}]
    train, _, drops = prepare_data(_data_cfg(rows), "reward", t, 0, None, lambda *_: None)
    # auto: rows have `margin`, so it is used; the row without one is dropped with its reason
    assert train.margins.tolist() == [1.5, 0.25] and drops.counts == {"missing_margin": 1}
    assert train.batch([1], toy_tok.pad_token_id).margin.tolist() == [0.25]
    train, _, drops = prepare_data(_data_cfg(rows, reward_margin="ratings", ratings_scale=0.5), "reward", t, 0,
                                   None, lambda *_: None)
    assert train.margins.tolist() == [0.5 * (9 - 5), 0.5 * (6 - 5)] and drops.counts == {"missing_ratings": 1}
    train, _, drops = prepare_data(_data_cfg(rows, reward_margin="none"), "reward", t, 0, None, lambda *_: None)
    assert train.margins is None and len(train) == 3 and not drops.dropped


def test_reward_step_feeds_margins_to_the_loss(toy_tok):
    t = Tokenization(toy_tok, max_length=64)
    rows = [{"prompt": "say : cat dog", "chosen": "cat dog", "rejected": "cat", "margin": 1.0},
            {"prompt": "say : owl bee", "chosen": "owl bee", "rejected": "owl", "margin": 0.0}]
    train, _, _ = prepare_data(_data_cfg(rows), "reward", t, 0, None, lambda *_: None)
    batch = train.batch([0, 1], toy_tok.pad_token_id)
    scores = torch.tensor([2.0, 0.5, 1.0, 1.0])  # chosen [2, 0.5], rejected [1, 1]

    def score_fn(b):
        return scores, torch.ones(4)

    losses, metrics = reward_step(Objective.from_config(LossConfig(name="bradley_terry")), score_fn, batch, None)
    # Δ − m = [1 − 1, −0.5 − 0] = [0, −0.5]:  −log σ(0) = 0.693147,  −log σ(−0.5) = 0.974077
    torch.testing.assert_close(losses, torch.tensor([0.693147, 0.974077]), atol=1e-6, rtol=0)
    assert metrics["rewards/accuracies"].tolist() == [1.0, 0.0]  # accuracy ignores the margin
    assert metrics["rewards/margins"].tolist() == [1.0, -0.5]


def test_score_model_batched_equals_one_at_a_time(toy_tok, train_pairs):
    from preftune.data.collate import collate_padded
    from preftune.data.formats import PairRecord
    from preftune.models import ScoreModel, load_reward_model

    model = load_reward_model(toy.build_model(toy_tok, seed=1, hidden=32), toy_tok).eval()
    t = Tokenization(toy_tok, max_length=64)
    pairs = [t.pair(PairRecord(r["prompt"], r["chosen"], r["rejected"])) for r in train_pairs[:5]]
    batch = collate_padded(pairs, toy_tok.pad_token_id)  # 10 right-padded rows of different lengths
    with torch.no_grad():
        scores, lengths = ScoreModel(model)(batch.input_ids, batch.position_ids, batch.attention_mask,
                                            batch.target_index, batch.target_ids, batch.target_seq,
                                            batch.num_sequences)
        seqs = [(q.prompt_ids, q.chosen_ids) for q in pairs] + [(q.prompt_ids, q.rejected_ids) for q in pairs]
        alone = torch.stack([model(input_ids=torch.tensor([p + c])).logits[0, 0] for p, c in seqs])
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=0)
    assert lengths.tolist() == [len(c) for _, c in seqs]


# ---- training ------------------------------------------------------------------------------------------------


def rm_config(toy_tok, out, train, eval_rows, *, model=None, training=None, **sections):
    cfg = {
        "task": "reward", "model": model if model is not None else toy.build_model(toy_tok, seed=0, hidden=32),
        "tokenizer": toy_tok, "data": {"train": train, "eval": eval_rows},
        "training": {"output_dir": str(out), "learning_rate": 3e-3, "max_steps": 60, "per_device_batch_size": 16,
                     "eval_every": 20, "max_length": 64, "progress_bar": False, **(training or {})},
        "monitor": {"early_stopping_metric": "eval/rewards/accuracies"},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


@pytest.fixture(scope="module")
def rm_data():
    train_items, test_items = toy.split_items(0, 400, 96)
    return toy.pair_rows(train_items, 0), toy.pair_rows(test_items, 1)


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory, toy_tok, rm_data):
    out = tmp_path_factory.mktemp("rm") / "run"
    summary = preftune.train(rm_config(toy_tok, out, *rm_data), log=lambda *_: None)
    return out, summary


def pair_accuracy(judge, rows) -> float:
    chosen = judge.score_many([(r["prompt"], r["chosen"]) for r in rows])
    rejected = judge.score_many([(r["prompt"], r["rejected"]) for r in rows])
    return sum((c > r) + 0.5 * (c == r) for c, r in zip(chosen, rejected)) / len(rows)


def test_reward_model_learns_heldout_accuracy(rm_run):
    out, summary = rm_run
    acc = summary["final_eval_metrics"]["rewards/accuracies"]
    print(f"reward model held-out accuracy {acc:.3f} ({summary['train_runtime_s']:.1f}s)")
    assert acc >= 0.75
    assert summary["task"] == "reward" and summary["eval_examples"] == 96
    train = [r for r in read_metrics(out) if r["split"] == "train"]
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(train[-1])
    assert not any(k.startswith("logps/") for k in train[-1])  # scores, not log-probs
    assert not (out / "samples.jsonl").exists()  # a reward model does not generate


def test_saved_reward_model_scores_in_the_judge_as_in_training(rm_run, rm_data):
    from transformers import AutoModelForSequenceClassification

    out, summary = rm_run
    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert model.config.num_labels == 1 and model.config.preftune_input_format == "preftune"
    judge = RewardModelJudge(str(out / "final"))
    assert judge.input_format == "preftune"  # recorded in the config: tokenized as training did
    # the judge ranks the held-out pairs exactly as the trainer's final evaluation did
    assert pair_accuracy(judge, rm_data[1]) == pytest.approx(summary["final_eval_metrics"]["rewards/accuracies"])
    assert summary["best"]["path"] == str(out / "best") and (out / "best" / "config.json").exists()


def test_early_stopping_on_overfitting_keeps_the_best_model(tmp_path, toy_tok, rm_data):
    # 24 training pairs, constant lr: eval loss bottoms out within ~30 steps, then rises while train accuracy
    # reaches 1.0 (overfitting); patience 3 stops the run long before max_steps.
    out = tmp_path / "es"
    summary = preftune.train(rm_config(
        toy_tok, out, rm_data[0][:24], rm_data[1][:64],
        training={"per_device_batch_size": 8, "max_steps": 120, "eval_every": 4, "lr_scheduler": "constant"},
        monitor={"early_stopping_metric": "eval/loss", "patience": 3}), log=lambda *_: None)
    events = [r for r in read_metrics(out) if r["split"] == "event"]
    stop = [e for e in events if e["name"] == "early_stopping"]
    print(f"early stopping at step {summary['steps']} of 120; best eval/loss {summary['best']['value']:.3f} at "
          f"step {summary['best']['step']}")
    assert len(stop) == 1 and summary["stopped"].startswith("early stopping")
    assert summary["steps"] < 120 and summary["steps"] == summary["best"]["step"] + 3 * 4
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["step"] == summary["best"]["step"] and best["metric"] == "eval/loss"
    assert RewardModelJudge(str(out / "best")).input_format == "preftune"


def test_resume_continues_to_the_same_reward_model(tmp_path, toy_tok, rm_data):
    def run(name, resume=None, **training):
        cfg = rm_config(toy_tok, tmp_path / name, rm_data[0][:64], rm_data[1][:32],
                        training={"max_steps": 4, "per_device_batch_size": 8, "eval_every": 0,
                                  "save_model": False, **training})
        return preftune.train(cfg, resume=resume, log=lambda *_: None)

    full = run("full")
    run("saved", save_every=2)
    resumed = run("resumed", resume=str(tmp_path / "saved" / "checkpoints" / "step-00000002"))
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], rel=1e-6)
    assert resumed["final_eval_metrics"] == pytest.approx(full["final_eval_metrics"], rel=1e-6)


def test_lora_reward_model(tmp_path, toy_tok, rm_data):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "lora"
    summary = preftune.train(rm_config(toy_tok, out, *rm_data, lora={"r": 8, "alpha": 16},
                                       training={"learning_rate": 1e-2}), log=lambda *_: None)
    assert summary["final_eval_metrics"]["rewards/accuracies"] >= 0.75
    # saved merged, as a standalone model (a classification adapter alone does not load with from_pretrained)
    assert not (out / "final" / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert not any("lora" in n for n, _ in model.named_parameters())
    acc = pair_accuracy(RewardModelJudge(model, toy_tok, input_format="preftune"), rm_data[1])
    assert acc == pytest.approx(summary["final_eval_metrics"]["rewards/accuracies"])


def test_encoder_reward_model(tmp_path, toy_tok, rm_data):
    from transformers import BertConfig, BertForMaskedLM

    path = tmp_path / "bert"
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(toy_tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=128,
                               pad_token_id=toy_tok.pad_token_id)).save_pretrained(path)
    toy_tok.save_pretrained(path)
    summary = preftune.train(rm_config(toy_tok, tmp_path / "run", *rm_data, model=str(path),
                                       training={"learning_rate": 1e-3}), log=lambda *_: None)
    assert summary["final_eval_metrics"]["rewards/accuracies"] >= 0.75
    judge = RewardModelJudge(str(tmp_path / "run" / "final"))
    assert type(judge.model).__name__ == "BertForSequenceClassification"
    assert pair_accuracy(judge, rm_data[1]) == pytest.approx(summary["final_eval_metrics"]["rewards/accuracies"])


# ---- ensembles and multi-axis rewards ------------------------------------------------------------------------


class Fixed(ScoreBasedJudge):
    """Scores from a table: response -> score."""

    def __init__(self, table, name):
        super().__init__(name)
        self.table = table

    def confidence_from_margin(self, margin):
        return sig(margin)

    def _score(self, prompt, response):
        return self.table[response]


def test_ensemble_mean_std_penalized_by_hand():
    members = [Fixed({"a": 1.0, "b": 2.0}, "m0"), Fixed({"a": 2.0, "b": 2.0}, "m1"), Fixed({"a": 3.0, "b": 2.0}, "m2")]
    ens = RewardEnsemble(members, penalty=1.0)
    a, b = ens.details_many([("p", "a"), ("p", "b")])
    # a: mean (1 + 2 + 3) / 3 = 2, std sqrt(((−1)² + 0² + 1²) / 3) = sqrt(2/3) = 0.816497, penalized 2 − 0.816497
    assert a["mean"] == pytest.approx(2.0) and a["std"] == pytest.approx(math.sqrt(2 / 3))
    assert a["penalized"] == pytest.approx(2 - math.sqrt(2 / 3)) and a["members"] == {"m0": 1.0, "m1": 2.0, "m2": 3.0}
    # b: the members agree: mean 2, std 0, penalized 2
    assert (b["mean"], b["std"], b["penalized"]) == (2.0, 0.0, 2.0)
    assert ens.score("p", "a") == pytest.approx(1.183503)
    # same mean, but the members disagree on a: the penalized score prefers b, with confidence σ(0.816497)
    v = ens.judge("p", "a", "b")
    assert v.winner == "B" and v.confidence == pytest.approx(sig(math.sqrt(2 / 3)))
    assert RewardEnsemble(members, penalty=0.0).judge("p", "a", "b").winner == "tie"  # plain means are equal
    assert RewardEnsemble(members, penalty=2.0).score("p", "a") == pytest.approx(2 - 2 * math.sqrt(2 / 3))


def test_multi_axis_composite_by_hand():
    helpful, harmless = Fixed({"a": 2.0, "b": 0.0}, "helpful"), Fixed({"a": -1.0, "b": 1.0}, "harmless")
    combo = MultiAxisReward({"helpful": (helpful, 1.0), "harmless": (harmless, 0.5)})
    a = combo.details("p", "a")
    # a: 1.0·2 + 0.5·(−1) = 1.5;  b: 1.0·0 + 0.5·1 = 0.5
    assert a == {"composite": 1.5, "axes": {"helpful": 2.0, "harmless": -1.0},
                 "weights": {"helpful": 1.0, "harmless": 0.5}}
    assert combo.score("p", "b") == 0.5 and combo.judge("p", "a", "b").winner == "A"
    # weighting harmlessness 3.0: a = 2 − 3 = −1, b = 0 + 3 = 3
    heavy = MultiAxisReward({"helpful": (helpful, 1.0), "harmless": (harmless, 3.0)})
    assert heavy.score_many([("p", "a"), ("p", "b")]) == [-1.0, 3.0]


def test_multi_axis_from_yaml(tmp_path):
    path = tmp_path / "judge.yaml"
    path.write_text("type: multi_axis\naxes:\n"
                    "  plain: {judge: {type: verifier, kind: regex, pattern: '^[a-z ]+$', fullmatch: true}, weight: 1.0}\n"
                    "  short: {judge: {type: verifier, kind: regex, pattern: '^\\S+ \\S+$'}, weight: 0.5}\n")
    judge = build_judge(path)
    assert isinstance(judge, MultiAxisReward)
    assert judge.details("p", "cat dog")["composite"] == 1.5  # 1.0·1 + 0.5·1
    assert judge.score("p", "cat dog !") == 0.0
    with pytest.raises(ValueError, match="expected {judge"):
        build_judge({"type": "multi_axis", "axes": {"x": {"judge": "path", "wieght": 1}}})


def test_train_ensemble_and_score_with_it(tmp_path, toy_tok, rm_data):
    out = tmp_path / "ens"
    cfg = rm_config(toy_tok, out, rm_data[0][:160], None, training={"max_steps": 20, "eval_every": 10},
                    data={"eval_fraction": 0.2}, loss={"center_coef": 0.01})
    manifest = train_ensemble(cfg, 2, vary="split", log=lambda *_: None)
    members = manifest["members"]
    assert [m["split_seed"] for m in members] == [0, 1] and [m["seed"] for m in members] == [0, 0]
    assert all(Path(m["path"]).exists() and m["final_eval_accuracy"] is not None for m in members)
    assert json.loads((out / "ensemble.json").read_text()) == manifest
    ens = build_judge({"type": "reward_ensemble", "members": str(out), "penalty": 1.0})
    rows = rm_data[1][:16]
    details = ens.details_many([(r["prompt"], r["chosen"]) for r in rows])
    singles = [RewardModelJudge(m["path"]).score_many([(r["prompt"], r["chosen"]) for r in rows]) for m in members]
    for i, d in enumerate(details):
        s = [singles[0][i], singles[1][i]]
        assert d["mean"] == pytest.approx(sum(s) / 2, abs=1e-5)
        assert d["std"] == pytest.approx(abs(s[0] - s[1]) / 2, abs=1e-5)  # population std of two values
        assert d["penalized"] == pytest.approx(d["mean"] - d["std"], abs=1e-6)
    assert pair_accuracy(ens, rows) > 0.5
    with pytest.raises(ConfigError, match="eval_fraction"):
        train_ensemble(rm_config(toy_tok, out, rm_data[0], rm_data[1]), 2, vary="split")
