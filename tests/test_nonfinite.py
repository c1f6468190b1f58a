"""Non-finite values never become a result: a stop on repeated non-finite losses keeps the last good checkpoint
(and says how to resume from it with a lower learning rate), and weights made non-finite by an update stop the run
before anything is saved."""

from __future__ import annotations

import json

import pytest
import torch

import preftune
from preftune.errors import PreftuneError
from preftune.trainer import build
from preftune.trainer import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")
STEP4 = "checkpoints/step-00000004"


def names(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def diverging_at(step: int, policy):
    """A paired step that, at training step ``step``, first blows the embedding up to |w| ~ 1e30 (a diverging
    update) and from then on gives the non-finite losses that follow from it."""
    real, calls = build.STEPS["paired"], []

    def step_fn(objective, logp_fn, batch, reference_fn):
        calls.append(1)
        if len(calls) == step:
            with torch.no_grad():
                policy.get_input_embeddings().weight.mul_(1e30)
        losses, metrics = real(objective, logp_fn, batch, reference_fn)
        return (losses * float("nan") if len(calls) >= step else losses), metrics

    return step_fn


@pytest.fixture
def make(dpo_config, make_model, train_pairs):
    def make_cfg(**training):
        base = {"max_steps": 8, "save_every": 2, "lr_scheduler": "constant", "max_nonfinite_steps": 3}
        return dpo_config(make_model(seed=0), train_pairs[:24], training={**base, **training})

    return make_cfg


def test_a_nonfinite_stop_keeps_the_last_good_checkpoint_and_resumes_with_a_new_rate(make, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_build = build.build_run

    def poisoned(cfg, resume, log, **kwargs):
        run = real_build(cfg, resume, log, **kwargs)
        run.step_fn = diverging_at(5, run.policy)
        return run

    from preftune.trainer import loop

    monkeypatch.setattr(loop, "build_run", poisoned)
    with pytest.raises(PreftuneError) as e:
        preftune.train(make(), log=lambda *_: None)
    text = str(e.value)
    good = run_dir / STEP4
    assert "3 consecutive non-finite steps at step 7; stopped without saving these weights" in text
    assert f"--resume {good} --set training.learning_rate=" in text and "\n" not in text
    # before: a step-6 checkpoint of the diverged weights (|w| ~ 1e30), which evicted step 2
    assert names(run_dir) == ["step-00000002", "step-00000004"]
    weights = torch.load(good / "trainable.pt")
    assert max(w.abs().max().item() for w in weights.values()) < 100
    assert json.loads((run_dir / "run.json").read_text())["stop"]["reason"] == "nonfinite"

    monkeypatch.undo()
    with pytest.raises(PreftuneError, match=r"loss.beta: 0.1 there, 0.2 now.*only training.learning_rate may change"):
        cfg = make(learning_rate=5e-4)
        cfg["loss"]["beta"] = 0.2
        preftune.train(cfg, resume=True, log=lambda *_: None)
    lines = []
    preftune.train(make(learning_rate=5e-4), resume=str(good), log=lines.append)
    assert any("training.learning_rate 0.001 -> 0.0005 (accepted after the non-finite stop at step 7)" in line
               for line in lines), lines
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = {r["step"]: r["learning_rate"] for r in records if r["split"] == "train"}
    assert rates[4] == pytest.approx(1e-3) and all(rates[s] == pytest.approx(5e-4) for s in (5, 6, 7, 8)), rates


def test_an_infinite_learning_rate_never_saves_nan_weights(dpo_config, make_model, train_pairs, tmp_path):
    """Before: an all-NaN final/, nonfinite_steps 0, exit 0."""
    cfg = dpo_config(make_model(seed=0), train_pairs[:24], training={"learning_rate": float("inf"), "max_steps": 3,
                                                                    "save_model": True, "save_every": 1})
    with pytest.raises(PreftuneError, match="learning_rate"):
        preftune.train(cfg, log=lambda *_: None)
    assert not (tmp_path / "run" / "final").exists()
    assert not list((tmp_path / "run").glob("checkpoints/step-*"))


def test_cli_infinite_learning_rate_exits_2(tmp_path, saved_model_dir, pairs_jsonl, capsys):
    from preftune.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {saved_model_dir}\ndata: {{train: {pairs_jsonl}}}\nloss: {{beta: 0.1}}\n"
                   f"training: {{output_dir: {tmp_path / 'out'}, learning_rate: .inf, max_steps: 2, "
                   "per_device_batch_size: 4, max_length: 64, progress_bar: false}\n")
    assert main(["train", str(cfg)]) == 2
    assert not (tmp_path / "out" / "final").exists()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "learning_rate" in err[0], err


def test_weights_made_nonfinite_by_an_update_stop_the_run(make, tmp_path, monkeypatch):
    """Independent of how: an optimizer step that leaves one NaN in the weights at step 3."""
    real = build.build_optimizer

    def poisoning(model, tc, *args, **kwargs):
        opt, count = real(model, tc, *args, **kwargs), []

        def poison(optimizer, args, kwargs):
            count.append(1)
            if len(count) == 3:
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).view(-1)[7] = float("nan")

        opt.register_step_post_hook(poison)
        return opt

    monkeypatch.setattr(build, "build_optimizer", poisoning)
    with pytest.raises(PreftuneError, match=r"the update made the weights non-finite at step 3.*step-00000002"):
        preftune.train(make(save_model=True), log=lambda *_: None)
    assert names(tmp_path / "run") == ["step-00000002"]
    assert not (tmp_path / "run" / "final").exists()


def test_a_checkpoint_of_nonfinite_weights_is_never_written(tmp_path, make_model):
    model = make_model(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(PreftuneError, match="the weights are not finite"):
        ckpt.save_checkpoint(tmp_path, 2, model, opt, sched, {}, keep=2)
    assert not list(tmp_path.glob("checkpoints/*"))


def test_parameters_finite_matches_the_naive_check():
    ts = [torch.randn(50, 7), torch.randn(3)]
    assert ckpt.parameters_finite(ts)
    ts[0][3, 3] = 3e38  # finite, but the fast sum overflows: confirmed element-wise
    ts[0][3, 4] = 3e38
    assert ckpt.parameters_finite(ts) == all(bool(t.isfinite().all()) for t in ts) is True
    for bad in (float("nan"), float("inf"), -float("inf")):
        ts[1][0] = bad
        assert ckpt.parameters_finite(ts) is False
