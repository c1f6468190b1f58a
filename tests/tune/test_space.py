"""The sweep's search space and the drivers' settings: parsed, and refused before the first trial, naming the key."""

from __future__ import annotations

import pytest
import yaml

from preftune.cli import main
from preftune.errors import ConfigError
from preftune.tune.settings import IterateSettings, SweepSettings, parse_settings
from preftune.tune.space import apply_params, grid_size, parse_space
from preftune.tune.sweep import prepare

TREE = {"model": "m", "loss": {"name": "dpo", "beta": 0.1},
        "training": {"output_dir": "out", "learning_rate": 1e-5}}


def test_space_forms_and_apply():
    dims = parse_space({"loss.beta": [0.01, 0.1], "training.learning_rate": {"log_uniform": [1e-7, "1e-5"]},
                        "training.warmup_ratio": {"uniform": [0, 0.1]},
                        "training.gradient_accumulation_steps": {"int": [1, 4]},
                        "lora": [None, {"r": 8, "alpha": 16}]}, TREE, sampler="tpe")
    by = {d.key: d for d in dims}
    assert by["loss.beta"].kind == "categorical" and by["loss.beta"].choices == [0.01, 0.1]
    assert (by["training.learning_rate"].kind, by["training.learning_rate"].low,
            by["training.learning_rate"].high) == ("log_uniform", 1e-7, 1e-5)  # "1e-5" read as a number
    assert by["training.gradient_accumulation_steps"].distribution().high == 4
    assert by["lora"].encoded and not by["loss.beta"].encoded  # mappings go to Optuna as JSON strings
    assert by["lora"].decode(by["lora"].distribution().choices[1]) == {"r": 8, "alpha": 16}
    out = apply_params(TREE, {"loss.beta": 0.5, "lora.r": 8, "training.warmup_ratio": 0.05})
    assert out["loss"] == {"name": "dpo", "beta": 0.5} and out["lora"] == {"r": 8}
    assert out["training"]["warmup_ratio"] == 0.05 and TREE["loss"]["beta"] == 0.1  # a copy
    assert grid_size(parse_space({"loss.beta": [1, 2, 3], "training.seed": [0, 1]}, TREE, sampler="grid")) == 6


@pytest.mark.parametrize("space, message", [
    ({"training.learnig_rate": [1e-5]}, "sweep.training.learnig_rate: not a config field. Did you mean "
                                        "'training.learning_rate'?"),
    ({"trainng.seed": [1]}, "sweep.trainng.seed: not a config field. Did you mean 'training.seed'?"),
    ({"trails": 5}, "sweep.trails: not a config field. Did you mean 'trials'?"),
    ({"lora.rr": [8]}, "sweep.lora.rr: not a config field. Did you mean 'lora.r'?"),
    ({"loss.betta": [0.1]}, "sweep.loss.betta: not a hyperparameter of loss dpo. Did you mean 'loss.beta'?"),
    ({"loss.name": ["dpo", "ipo"], "loss.gamma": [0.1]}, "sweep.loss.gamma: not a hyperparameter of loss dpo/ipo"),
    ({"loss.beta": []}, "sweep.loss.beta: empty list of values"),
    ({"loss.beta": {"uniform": [0.5, 0.5]}}, "sweep.loss.beta: empty range [0.5, 0.5]"),
    ({"training.learning_rate": {"log_uniform": [1e-5, 1e-7]}}, "sweep.training.learning_rate: empty range"),
    ({"training.learning_rate": {"log_uniform": [0, 1e-5]}}, "sweep.training.learning_rate: log_uniform range "
                                                             "[0, 1e-05] reaches zero or below"),
    ({"loss.beta": {"log_uniform": [-1, 1]}}, "reaches zero or below"),
    ({"training.max_steps": {"int": [1, 2.5]}}, "sweep.training.max_steps: int bounds must be integers"),
    ({"loss.beta": {"normal": [0, 1]}}, "sweep.loss.beta: expected a list of values or one of"),
    ({"training.precision": ["fp32", "fp16"]}, "sweep.training.precision: the value 'fp16' is refused by the "
                                               "config"),
    ({"training.max_steps": {"int": [1, 4]}, "loss.beta": {"uniform": [0, 1]}, "x": 1}, "sweep.x: not a config"),
])
def test_space_refusals_name_the_key(space, message):
    with pytest.raises(ConfigError) as e:
        parse_space(space, TREE, sampler="tpe")
    assert message in str(e.value)


def test_grid_needs_lists():
    with pytest.raises(ConfigError, match="sweep.loss.beta: sampler grid needs a list of values"):
        parse_space({"loss.beta": {"uniform": [0, 1]}}, TREE, sampler="grid")


def test_settings_parsing():
    s, rest = parse_settings(SweepSettings, {"judge": "toy-verifier", "trials": 3, "max_kl": "5",
                                             "loss.beta": [0.1]}, "sweep", extra="return")
    assert (s.trials, s.max_kl, s.objective, rest) == (3, 5.0, "win_rate", {"loss.beta": [0.1]})
    with pytest.raises(ConfigError, match="missing required key 'sweep.judge'"):
        parse_settings(SweepSettings, {"trials": 3}, "sweep", extra="return")
    with pytest.raises(ConfigError, match="sweep.sampler: expected 'tpe' | 'random' | 'grid', got 'bayes'"):
        parse_settings(SweepSettings, {"judge": "j", "sampler": "bayes"}, "sweep", extra="return")
    with pytest.raises(ConfigError, match="unknown key 'iterate.round'. Did you mean 'iterate.rounds'?"):
        parse_settings(IterateSettings, {"round": 3, "prompts": "p", "eval_prompts": "e", "judge": "j"}, "iterate")
    it, _ = parse_settings(IterateSettings, {"prompts": "p", "eval_prompts": "e", "judge": {"type": "x"}}, "iterate")
    assert (it.rounds, it.reference, it.temperatures) == (3, "previous", [1.0])


def test_examples_and_docs():
    """The example driver configs parse and pass the checks that need no files; docs/tune.md lists every setting."""
    from pathlib import Path

    from preftune.tune import adapter
    from preftune.tune.settings import split_sections

    root = Path(__file__).resolve().parents[2]
    for name in ("iterate_toy", "iterate_smollm2", "sweep_toy", "sweep_smollm2"):
        tree, sections = split_sections(yaml.safe_load((root / "examples" / f"{name}.yaml").read_text()))
        adapter.check_train_config(tree)
        if "iterate" in sections:
            parse_settings(IterateSettings, sections["iterate"], "iterate")
        else:
            s, space = parse_settings(SweepSettings, sections["sweep"], "sweep", extra="return")
            assert len(parse_space(space, tree, sampler=s.sampler)) == 3
    doc = (root / "docs" / "tune.md").read_text()
    for cls, prefix in ((IterateSettings, "iterate"), (SweepSettings, "sweep")):
        for key, _, _, text in adapter.field_docs(cls, prefix):
            assert f"| `{key}` |" in doc and text in doc, key  # regenerate the tables when a field changes


def test_sweep_refused_before_the_first_trial(tmp_path, toy_files, saved_model_dir, capsys):
    """The CLI: one line naming the key, exit 2, and no study, no trial directory written."""
    cfg = {"model": str(saved_model_dir), "data": {"train": str(toy_files["pairs"])},
           "loss": {"name": "dpo", "beta": 0.1},
           "training": {"output_dir": str(tmp_path / "sw"), "learning_rate": 1e-3},
           "sweep": {"judge": "toy-verifier", "prompts": str(toy_files["eval"]),
                     "training.learning_rate": {"log_uniform": [0.0, 1e-3]}}}
    (tmp_path / "sw.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["sweep", str(tmp_path / "sw.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: sweep.training.learning_rate: log_uniform range [0, 0.001] reaches zero or below; its "
                   "low bound must be > 0"]
    assert not (tmp_path / "sw").exists()
    cfg["sweep"] = {"judge": "toy-verifier", "objective": "wins", "loss.beta": [0.1]}
    with pytest.raises(ConfigError, match="sweep.objective: 'wins' is not a score"):
        prepare(cfg)
    cfg["sweep"] = {"judge": "toy-verifier", "loss.beta": [0.1]}
    with pytest.raises(ConfigError, match="sweep.prompts is not set and the config has no data.eval"):
        prepare(cfg)
    plan = prepare({**cfg, "data": {"train": str(toy_files["pairs"]), "eval": str(toy_files["eval_pairs"])}},
                   trials=2, sampler="grid")
    assert plan.trials == 2 and len(plan.prompts) == 8 and plan.reference_model == str(saved_model_dir)
    assert plan.storage == f"sqlite:///{(tmp_path / 'sw' / 'sweep.db').resolve()}"
