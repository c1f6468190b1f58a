"""--resume continues only the run it was given: the recorded config must agree on every key that changes the math,
a missing checkpoint is an error, a corrupt one falls back (latest) or is named (explicit path), and a kill's
half-written last line of metrics.jsonl / samples.jsonl breaks neither --resume nor report."""

from __future__ import annotations

import json

import pytest
import torch

import preftune
from preftune.errors import PreftuneError
from preftune.runlog import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")
STEP2, STEP4 = "checkpoints/step-00000002", "checkpoints/step-00000004"


@pytest.fixture
def first(dpo_config, make_model, train_pairs, tmp_path):
    """A finished 6-step run in tmp/run with checkpoints at steps 2 and 4; returns (trained model, config maker)."""

    def make(model=None, train=None, **training):
        base = {"max_steps": 6, "save_every": 2, "warmup_ratio": 0.2, "lr_scheduler": "cosine"}
        return dpo_config(model or make_model(seed=0), train or train_pairs[:24], training={**base, **training})

    model = make_model(seed=0)
    preftune.train(make(model), log=lambda *_: None)
    return model, make


def test_a_changed_learning_rate_or_beta_is_refused_with_the_keys(first, tmp_path):
    """Before: the run resumed and the saved optimizer silently brought back the old learning rate."""
    _, make = first
    cfg = make(learning_rate=1e-4)
    cfg["loss"]["beta"] = 0.5
    with pytest.raises(PreftuneError) as e:
        preftune.train(cfg, resume=True, log=lambda *_: None)
    text = str(e.value)
    assert "training.learning_rate: 0.001 there, 0.0001 now" in text
    assert "loss.beta: 0.1 there, 0.5 now" in text
    assert "\n" not in text


def test_a_smaller_max_steps_is_refused(first):
    """Before: exit 0, with the step-4 checkpoint's later weights saved as the result of a 3-step run."""
    _, make = first
    with pytest.raises(PreftuneError, match=r"training.max_steps: 6 there, 3 now"):
        preftune.train(make(max_steps=3), resume=True, log=lambda *_: None)


def test_safe_keys_may_change_and_the_result_is_bitwise_the_same(first, tmp_path, make_model):
    finished, make = first
    model = make_model(seed=0)
    cfg = make(model, output_dir=str(tmp_path / "again"), eval_every=1, logging_every=3, save_every=1,
               save_total_limit=5, progress_bar=True, max_nonfinite_steps=7)
    cfg["monitor"] = {"num_prompts": 0, "patience": 50}
    lines = []
    preftune.train(cfg, resume=str(tmp_path / "run" / STEP4), log=lines.append)
    assert any("resumed from" in line and "at step 4" in line for line in lines)
    for (name, a), b in zip(finished.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name


def test_the_global_batch_decides_not_its_split(first, tmp_path):
    _, make = first
    # 2 per device x 2 accumulation = the 4 per step the run was trained with: the same math
    preftune.train(make(per_device_batch_size=2, gradient_accumulation_steps=2, output_dir=str(tmp_path / "a")),
                   resume=str(tmp_path / "run" / STEP4), log=lambda *_: None)
    with pytest.raises(PreftuneError, match=r"training.global_batch: 4 there, 2 now"):
        preftune.train(make(per_device_batch_size=2, output_dir=str(tmp_path / "b")),
                       resume=str(tmp_path / "run" / STEP4), log=lambda *_: None)


def test_changed_data_under_the_same_path_is_refused(dpo_config, make_model, train_pairs, tmp_path, write_jsonl):
    data = write_jsonl(tmp_path / "pairs.jsonl", train_pairs[:24])
    cfg = dpo_config(make_model(seed=0), str(data), training={"max_steps": 4, "save_every": 2})
    preftune.train(cfg, log=lambda *_: None)
    write_jsonl(data, train_pairs[1:25])  # same file name, other rows
    with pytest.raises(PreftuneError, match=r"data.train: '<file pairs.jsonl, \d+ bytes, blake2b \w+>' there"):
        preftune.train(dpo_config(make_model(seed=0), str(data), training={"max_steps": 4, "save_every": 2}),
                       resume=True, log=lambda *_: None)


def test_resume_without_a_checkpoint_is_an_error(dpo_config, make_model, train_pairs, tmp_path):
    """Before: a silent fresh start."""
    cfg = dpo_config(make_model(seed=0), train_pairs[:24], training={"max_steps": 2})
    with pytest.raises(PreftuneError, match=r"--resume: no checkpoint in .*nothing has run there yet"):
        preftune.train(cfg, resume=True, log=lambda *_: None)
    preftune.train(cfg, log=lambda *_: None)  # save_every 0: a finished run with no checkpoint
    with pytest.raises(PreftuneError, match=r"--resume: no checkpoint in .*checkpoints"):
        preftune.train(cfg, resume=True, log=lambda *_: None)


def test_a_corrupt_latest_checkpoint_falls_back_to_the_older_one(first, tmp_path, make_model):
    finished, make = first
    broken = tmp_path / "run" / STEP4 / "optimizer.pt"
    broken.write_bytes(broken.read_bytes()[:100])  # truncated, as a full disk or a kill can leave it
    model = make_model(seed=0)
    lines = []
    preftune.train(make(model), resume=True, log=lines.append)
    text = "\n".join(lines)
    assert f"checkpoint file {broken} is unreadable" in text and "falling back to the older checkpoint" in text
    assert "at step 2" in text
    for (name, a), b in zip(finished.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name  # resumed from step 2: still the uninterrupted result


def test_a_corrupt_explicit_checkpoint_is_named(first, tmp_path):
    _, make = first
    broken = tmp_path / "run" / STEP4 / "trainable.pt"
    broken.write_bytes(b"")
    with pytest.raises(PreftuneError, match=rf"checkpoint file {broken} is unreadable"):
        preftune.train(make(), resume=str(tmp_path / "run" / STEP4), log=lambda *_: None)


def test_cli_corrupt_checkpoint_is_one_line_and_exit_2(tmp_path, saved_model_dir, pairs_jsonl, capsys):
    from preftune.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"model": str(saved_model_dir), "data": {"train": str(pairs_jsonl)},
                               "loss": {"beta": 0.1},
                               "training": {"output_dir": str(tmp_path / "out"), "learning_rate": 1e-3,
                                            "max_steps": 3, "save_every": 2, "per_device_batch_size": 4,
                                            "max_length": 64, "progress_bar": False, "save_model": False}}))
    assert main(["train", str(cfg)]) == 0
    rng = tmp_path / "out" / STEP2 / "rng.pt"
    rng.write_bytes(b"PK\x03\x04 not really a zip")
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume", str(tmp_path / "out" / STEP2)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(err) == 1 and err[0].startswith("error: ") and str(rng) in err[0], err


def test_half_written_last_lines_break_neither_resume_nor_report(first, tmp_path, capsys):
    """Before: a bare JSONDecodeError from --resume and from report."""
    from preftune.cli import main

    _, make = first
    run_dir = tmp_path / "run"
    row = {"step": 2, "index": 0, "prompt": "p", "policy": "x", "reference": "y", "policy_tokens": 1,
           "reference_tokens": 1}
    (run_dir / "samples.jsonl").write_text(json.dumps(row) + "\n")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "split": "train", "lo')
    with open(run_dir / "samples.jsonl", "a") as f:
        f.write('{"step": 5, "pro')
    assert main(["report", str(run_dir)]) == 0
    lines = []
    preftune.train(make(), resume=True, log=lines.append)
    assert any("at step 4" in line for line in lines)
    steps = [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_broken_line_elsewhere_names_the_file_and_line(first, tmp_path, capsys):
    from preftune.cli import main

    run_dir = tmp_path / "run"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = '{"step": 2, "spl\n'
    (run_dir / "metrics.jsonl").write_text("".join(lines))
    capsys.readouterr()
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{run_dir / 'metrics.jsonl'}:2: not a JSON record" in err
    for bad, message in (('[1, 2]\n', r"not a JSON record \(a list"), ('{"split": "train"}\n', "not a metrics record")):
        lines[1] = bad  # valid JSON, not a record
        (run_dir / "metrics.jsonl").write_text("".join(lines))
        with pytest.raises(PreftuneError, match=rf"metrics.jsonl:2: {message}"):
            read_metrics(run_dir)
    lines[-1] = lines[-1].rstrip("\n")[:-5] + "\n"  # a broken last line that has its newline: not a kill's
    (run_dir / "metrics.jsonl").write_text("".join(lines[:1] + lines[2:]))
    with pytest.raises(PreftuneError, match=rf"metrics.jsonl:{len(lines) - 1}: not a JSON record"):
        read_metrics(run_dir)


def test_resume_auto_continues_when_it_can_and_starts_afresh_otherwise(dpo_config, make_model, train_pairs,
                                                                        tmp_path):
    """For drivers that rerun a trial (``tune``): ``resume="auto"``."""
    def cfg(**training):
        return dpo_config(make_model(seed=0), train_pairs[:24], training={"max_steps": 4, **training})

    preftune.train(cfg(), resume="auto", log=lambda *_: None)  # fresh directory: a fresh start
    lines = []
    preftune.train(cfg(), resume="auto", log=lines.append)  # no checkpoint to continue: replaced
    assert any("--overwrite: removed the previous run" in line for line in lines)
    preftune.train(cfg(save_every=2), overwrite=True, log=lambda *_: None)
    lines.clear()
    preftune.train(cfg(save_every=2), resume="auto", log=lines.append)
    assert any("resumed from" in line and "at step 2" in line for line in lines)
