"""Config checks: ranges, every problem reported at once, TRL's names pointed home, keys in the wrong section,
loss hyperparameters as the loss spec states them, and switching the loss from the command line."""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from pathlib import Path

import pytest

from preftune import cli
from preftune.config import (
    TRL_NAMES,
    Config,
    TrainingConfig,
    field_docs,
    to_config,
    validate,
)
from preftune.config_checks import loss_takers
from preftune.config_reader import Interval
from preftune.errors import ConfigError
from preftune.losses import LossSpec

BASE = {"model": "some/model", "loss": {"name": "dpo", "beta": 0.1},
        "training": {"output_dir": "out", "learning_rate": 1e-5}}


def tree(**sections) -> dict:
    """BASE with sections merged in (``loss`` replaced whole)."""
    out = copy.deepcopy(BASE)
    for key, value in sections.items():
        out[key] = {**out[key], **value} if key in out and key != "loss" and isinstance(value, dict) else value
    return out


def problems_of(config, overrides=None, **kw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        to_config(config, overrides, **kw)
    return getattr(info.value, "problems", [str(info.value)])


# ---- ranges ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("section", "key", "value", "expected"), [
    ("training", "max_grad_norm", -1, "training.max_grad_norm: -1 is outside [0, ∞)"),  # would be gradient ascent
    ("training", "per_device_batch_size", 0, "training.per_device_batch_size: 0 is outside [1, ∞)"),
    ("training", "gradient_accumulation_steps", 0, "training.gradient_accumulation_steps: 0 is outside [1, ∞)"),
    ("training", "logging_every", 0, "training.logging_every: 0 is outside [1, ∞)"),
    ("training", "max_steps", 0, "training.max_steps: 0 is outside [1, ∞)"),  # 0 used to run a full epoch
    ("training", "max_steps", -1, "training.max_steps: -1 is outside [1, ∞)"),  # TRL's "unset"; ours is null
    ("training", "num_epochs", -1, "training.num_epochs: -1 is outside (0, ∞)"),
    ("training", "warmup_ratio", 2, "training.warmup_ratio: 2 is outside [0, 1]"),
    ("training", "learning_rate", -1e-5, "training.learning_rate: -1e-05 is outside [0, ∞)"),
    ("training", "seed", -3, "training.seed: -3 is outside [0, 4294967295]"),  # numpy refuses negative seeds
    ("training", "adam_betas", [0.9, 1.0], "training.adam_betas[1]: 1 is outside [0, 1)"),
    ("data", "eval_fraction", 1.0, "data.eval_fraction: 1 is outside [0, 1)"),
    ("lora", "r", 0, "lora.r: 0 is outside [1, ∞)"),
    ("engine", "chunk_size", -1, "engine.chunk_size: -1 is outside [0, ∞)"),
    ("monitor", "reward_max_fraction", 0.5, "monitor.reward_max_fraction: 0.5 is outside (0.5, 1]"),
    ("loss", "weights", [1.0, -0.5], "loss.weights[1]: -0.5 is outside [0, ∞)"),
])
def test_out_of_range_value_is_refused_with_its_range(section, key, value, expected):
    config = tree(**{section: {key: value}}) if section != "loss" else tree(
        loss={"name": ["dpo", "sft"], "beta": 0.1, key: value})
    assert problems_of(config) == [expected]


@pytest.mark.parametrize(("key", "value"), [
    ("max_steps", None),  # null: num_epochs decides
    ("max_grad_norm", None), ("max_grad_norm", 0),  # no clipping
    ("save_total_limit", 0),  # keep every checkpoint
    ("eval_every", 0), ("save_every", 0), ("warmup_ratio", 1), ("num_epochs", 0.5),
    ("learning_rate", 0.0),  # weights stay put: an evaluation-only run
])
def test_documented_sentinels_and_edges_are_accepted(key, value):
    assert getattr(to_config(tree(training={key: value})).training, key) == value


def test_nan_is_outside_every_range():
    assert problems_of(tree(training={"weight_decay": float("nan")})) == ["training.weight_decay: nan is outside [0, ∞)"]


def test_every_numeric_field_declares_its_range():
    """A new int or float field without ``within(...)`` fails here (its range belongs next to its docstring)."""
    def numeric(tp) -> bool:
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType, list) else (tp,)
        return any(a in (int, float) or (typing.get_origin(a) is list and numeric(a)) for a in args)

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            sections = [a for a in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(a)]
            if sections:
                yield from walk(sections[0], f"{prefix}{f.name}.")
            elif numeric(hints[f.name]):
                yield f"{prefix}{f.name}", f.metadata.get("range")

    fields = dict(walk(Config))
    assert len(fields) > 30 and "training.warmup_ratio" in fields
    assert [key for key, rng in fields.items() if rng is None] == []


def test_config_doc_shows_ranges():
    types_ = {key: typ for key, typ, _, _ in field_docs()}
    assert types_["training.warmup_ratio"] == "float in [0, 1]"
    assert types_["training.max_steps"] == "int in [1, ∞) or null"
    assert types_["training.adam_betas"] == "list of float in [0, 1)"
    assert types_["training.precision"] == "'fp32' | 'bf16'"  # not numeric: no range


def test_interval_parse_contains_and_str():
    half = Interval.parse("(0, 1]")
    assert (0.0 in half, 0.5 in half, 1.0 in half, 1.5 in half) == (False, True, True, False)
    assert str(half) == "(0, 1]" and str(Interval.parse("[1, inf)")) == "[1, ∞)"
    assert 1e300 in Interval.parse("[0, ∞)") and -1 not in Interval.parse("[0, ∞)")
    with pytest.raises(ValueError):
        Interval.parse("0..1")


def test_ranges_apply_to_config_objects_built_in_python():
    training = TrainingConfig(output_dir="o", learning_rate=1e-5, warmup_ratio=2.0, max_grad_norm=-0.5)
    config = Config(model="m", loss=to_config(tree()).loss, training=training)
    assert problems_of(config) == ["training.warmup_ratio: 2 is outside [0, 1]",
                                   "training.max_grad_norm: -0.5 is outside [0, ∞)"]


# ---- all problems at once ----------------------------------------------------------------------------------


def test_every_problem_is_reported_in_one_error():
    config = tree(training={"max_grad_norm": -1, "per_device_batch_size": 0, "warmup_ratio": 2, "seed": "x",
                            "save_steps": 10},
                  lora={"alpah": 16, "dropout": 1.0}, loss={"name": "dpo", "betta": 0.1}, zzz="red")
    with pytest.raises(ConfigError) as info:
        to_config(config)
    expected = [
        "training.max_grad_norm: -1 is outside [0, ∞)",
        "training.per_device_batch_size: 0 is outside [1, ∞)",
        "training.warmup_ratio: 2 is outside [0, 1]",
        "training.seed: expected an integer, got 'x'",
        "unknown key 'training.save_steps': 'save_steps' is TRL's name, use 'training.save_every'",
        "unknown key 'lora.alpah'. Did you mean 'lora.alpha'?",
        "lora.dropout: 1 is outside [0, 1)",
        "unknown key 'loss.betta'. Did you mean 'loss.beta'?",  # and beta is then not also "missing"
    ]
    listing = [p for p in info.value.problems if p.startswith("unknown key 'zzz'.")]
    assert listing and listing[0].startswith("unknown key 'zzz'. Valid keys: model, task, tokenizer, model_dtype, attn_implementation,")
    assert sorted(p for p in info.value.problems if p not in listing) == sorted(expected)
    text = str(info.value)
    assert text.startswith("9 problems in the config: (1) ") and "\n" not in text  # the CLI prints one line
    assert all(f") {p}" in text for p in expected)


def test_a_misspelt_required_key_is_one_problem_not_two():
    config = tree()
    config["training"]["learning_rat"] = config["training"].pop("learning_rate")
    assert problems_of(config) == ["unknown key 'training.learning_rat'. Did you mean 'training.learning_rate'?"]
    config = tree(training={"learning_rate": "fast"})  # given but bad: not also "missing"
    assert problems_of(config) == ["training.learning_rate: expected a number, got 'fast'"]


def test_checks_across_fields_join_the_parse_problems():
    config = tree(training={"warmup_ratio": -1, "max_length": 64}, data={"max_prompt_length": 64})
    assert problems_of(config) == [
        "training.warmup_ratio: -1 is outside [0, 1]",
        "data.max_prompt_length: 64 leaves no room for a response within training.max_length 64 (prompt + response)",
    ]


def test_a_check_whose_input_is_bad_does_not_run():
    # The loss check needs `task`; a bad task is one problem, not also a wrong default loss's complaints.
    assert problems_of(tree(task="rewrd", loss={})) == [
        "task: expected one of 'policy' | 'reward', got 'rewrd' (did you mean 'reward'?)"]


@pytest.mark.parametrize(("sections", "expected"), [
    ({"data": {"eval": "e.jsonl", "eval_fraction": 0.1}},
     "data.eval_fraction: 0.1 would be ignored because data.eval is given; set one of them"),
    ({"training": {"adam_betas": [0.9, 0.99, 0.999]}}, "training.adam_betas: expected 2 values (beta1, beta2), got 3"),
    ({"monitor": {"early_stopping_metric": "loss"}},
     "monitor.early_stopping_metric: expected 'eval/<key>' or 'monitor/<key>' (a metrics.jsonl split and key, e.g. "
     "eval/loss), got 'loss'"),
    ({"loss": {"name": ["dpo", "kto"], "beta": 0.1}},
     "loss.name: dpo/kto mix data kinds (paired, unpaired): combine losses of one kind"),
    ({"loss": {"name": ["grpo", "sft"]}}, "loss.name: grpo/sft: the sft term combines with paired losses only (it "
                                          "trains the chosen side of a pair with the policy's log-probs)"),
    ({"data": {"reward_margin": "ratings"}}, "data.reward_margin: ratings is for reward models (`task: reward`)"),
    ({"rollout": {}}, "reward: an on-policy run (a `rollout:` section) needs `reward.functions` (e.g. "
                      "['my_rewards.py:score']) or `reward.judge`"),
])
def test_config_only_checks_live_in_the_config(sections, expected):
    assert problems_of(tree(**sections)) == [expected]


def test_cli_prints_every_problem_on_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\nloss: {beta: 0.1}\ntraining: {output_dir: o, learning_rate: 1e-5, max_steps: 0,\n"
                    "  logging_every: 0}\n")
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: 2 problems in the config: (1) training.max_steps: 0 is outside [1, ∞); "
                   "(2) training.logging_every: 0 is outside [1, ∞)"]


# ---- TRL's names and keys in the wrong section --------------------------------------------------------------


@pytest.mark.parametrize(("where", "key", "expected"), [
    ("training", "save_steps", "unknown key 'training.save_steps': 'save_steps' is TRL's name, use "
                               "'training.save_every'"),
    ("", "save_steps", "unknown key 'save_steps': 'save_steps' is TRL's name, use 'training.save_every'"),
    ("training", "per_device_train_batch_size", "unknown key 'training.per_device_train_batch_size': "
     "'per_device_train_batch_size' is TRL's name, use 'training.per_device_batch_size' (with a `rollout:` it "
     "counts prompts, each with its whole group; GRPOTrainer's counts completions)"),
    ("training", "num_train_epochs", "unknown key 'training.num_train_epochs': 'num_train_epochs' is TRL's name, "
                                     "use 'training.num_epochs'"),
    ("", "loss_type", "unknown key 'loss_type': 'loss_type' is TRL's name, use 'loss.name' (TRL's 'sigmoid' is "
                      "'dpo'; GRPOTrainer's loss_type is 'loss.aggregation')"),
    ("", "num_generations", "unknown key 'num_generations'. Did you mean 'rollout.num_generations'?"),
    ("", "reward_funcs", "unknown key 'reward_funcs': 'reward_funcs' is TRL's name, use 'reward.functions'"),
    ("training", "bf16", "unknown key 'training.bf16': 'bf16' is TRL's name, use 'training.precision: bf16'"),
    ("", "logging_steps", "unknown key 'logging_steps': 'logging_steps' is TRL's name, use 'training.logging_every'"),
    ("", "eval_steps", "unknown key 'eval_steps': 'eval_steps' is TRL's name, use 'training.eval_every'"),
    ("", "lr_scheduler_type", "unknown key 'lr_scheduler_type': 'lr_scheduler_type' is TRL's name, use "
                              "'training.lr_scheduler'"),
    # TRL's flat names that are ours too are found in their section:
    ("", "learning_rate", "unknown key 'learning_rate'. Did you mean 'training.learning_rate'?"),
    ("", "beta", "unknown key 'beta'. Did you mean 'loss.beta'?"),
    ("", "output_dir", "unknown key 'output_dir'. Did you mean 'training.output_dir'?"),
    ("", "warmup_ratio", "unknown key 'warmup_ratio'. Did you mean 'training.warmup_ratio'?"),
    ("", "max_length", "unknown key 'max_length'. Did you mean 'training.max_length'?"),
    ("training", "gradient_checkpointing", "unknown key 'training.gradient_checkpointing'. Did you mean "
                                           "'engine.gradient_checkpointing'?"),
    ("training", "max_prompt_length", "unknown key 'training.max_prompt_length'. Did you mean "
                                      "'data.max_prompt_length'?"),
    # a key of another section, whatever the source:
    ("training", "beta", "unknown key 'training.beta'. Did you mean 'loss.beta'?"),
    ("data", "precompute", "unknown key 'data.precompute'. Did you mean 'reference.precompute'?"),
    ("training", "eval_fractoin", "unknown key 'training.eval_fractoin'. Did you mean 'data.eval_fraction'?"),
])
def test_foreign_and_misplaced_keys_are_pointed_home(where, key, expected):
    config = tree()
    (config.setdefault(where, {}) if where else config)[key] = 1
    assert problems_of(config) == [expected]


def test_loss_section_suggestions_cross_sections_and_losses():
    assert problems_of(tree(loss={"name": "dpo", "beta": 0.1, "learning_rate": 1e-5})) == [
        "unknown key 'loss.learning_rate'. Did you mean 'training.learning_rate'?"]
    assert problems_of(tree(loss={"name": "dpo", "beta": 0.1, "gamma": 0.5})) == [
        "unknown key 'loss.gamma': dpo does not take it (simpo takes it); dpo takes: beta, label_smoothing"]
    assert problems_of(tree(loss={"name": "dpo", "beta": 0.1, "loss_type": "sigmoid"})) == [
        "unknown key 'loss.loss_type': 'loss_type' is TRL's name, use 'loss.name' (TRL's 'sigmoid' is 'dpo'; "
        "GRPOTrainer's loss_type is 'loss.aggregation')"]
    assert problems_of(tree(loss={"name": "sft", "zzz": 1})) == ["unknown key 'loss.zzz'. sft takes: none."]


def test_trl_table_points_only_at_real_keys():
    known = {key for key, *_ in field_docs()} | {f"loss.{hp}" for hp in loss_takers()}  # loss keys too
    for name, target in TRL_NAMES.items():
        assert not any(k.rsplit(".", 1)[-1] == name for k in known), f"{name} is ours: it needs no pointer"
        pointed = re.match(r"'([a-z_.]+)[':]", target)
        if pointed and "." in pointed[1]:
            assert pointed[1] in known, (name, target)


# ---- loss hyperparameters from the loss spec ---------------------------------------------------------------


def test_mix_takes_the_union_of_its_losses_hyperparameters():
    cfg = to_config(tree(loss={"name": ["dpo", "simpo"], "beta": 0.1, "gamma": 0.5, "label_smoothing": 0.1}))
    assert cfg.loss.params == {"beta": 0.1, "gamma": 0.5, "label_smoothing": 0.1}
    assert problems_of(tree(loss={"name": ["dpo", "simpo"], "beta": 0.1, "gamma": 0.5, "desirable_weight": 1})) == [
        "unknown key 'loss.desirable_weight': dpo/simpo does not take it (kto takes it); dpo/simpo takes: beta, "
        "label_smoothing, gamma"]


def test_each_loss_checks_its_keys_through_its_spec():
    # Required keys, types, legal ranges and "auto" are the loss spec's to judge (LossSpec.check_params).
    assert problems_of(tree(loss={"name": "dpo", "beta": "high"})) == ["loss.beta must be a number for dpo, got 'high'"]
    assert problems_of(tree(loss={"name": "simpo", "gamma": 0.5})) == [
        "missing required key 'loss.beta' (simpo has no safe default; it needs beta > 0)"]
    [message] = problems_of(tree(loss={"name": "dpo", "beta": -1}))
    assert message.startswith("loss.beta = -1 is not allowed for dpo; it needs beta > 0")
    cfg = to_config(tree(loss={"name": "kto", "beta": 0.1, "desirable_weight": "auto"}))
    assert cfg.loss.params["desirable_weight"] == "auto"  # left for the trainer to choose from the data
    assert problems_of(tree(loss={"name": "kto", "beta": "auto"})) == ["loss.beta must be a number for kto, got 'auto'"]
    [message] = problems_of(tree(loss={"name": "bco_pair", "beta": 0.1, "delta": 0.5}))
    assert message.startswith("loss.delta is maintained by the trainer for bco_pair")


def test_in_a_mix_each_loss_is_asked_about_its_own_keys(monkeypatch):
    asked = []
    real = LossSpec.check_params

    def recording(self, params):
        asked.append((self.name, dict(params)))
        return real(self, params)

    monkeypatch.setattr(LossSpec, "check_params", recording)
    problems = problems_of(tree(loss={"name": ["dpo", "sft"], "beta": 0.1, "label_smoothing": 0.1, "gamma": 0.5}))
    assert asked == [("dpo", {"beta": 0.1, "label_smoothing": 0.1}), ("sft", {})]
    # a key no loss of the mix takes is the config's to report, with the loss that does take it
    assert problems == ["unknown key 'loss.gamma': dpo/sft does not take it (simpo takes it); dpo/sft takes: beta, "
                        "label_smoothing"]
    asked.clear()
    # a misspelt required key is checked under the name it suggests, so it is not also "missing"
    assert problems_of(tree(loss={"name": "dpo", "betta": -1}))[0] == (
        "unknown key 'loss.betta'. Did you mean 'loss.beta'?")
    assert asked == [("dpo", {"beta": -1})]


# ---- switching the loss on the command line -----------------------------------------------------------------


@pytest.fixture
def dpo_file(tmp_path):
    path = tmp_path / "dpo.yaml"
    path.write_text("model: m\nloss: {name: dpo, beta: 0.1, label_smoothing: 0.2}\n"
                    "training: {output_dir: o, learning_rate: 1e-5}\n")
    return path


def test_set_loss_name_drops_the_old_loss_keys_with_a_notice(dpo_file):
    notes = []
    cfg = to_config(dpo_file, ["loss.name=kto"], log=notes.append)
    assert cfg.loss.name == "kto" and cfg.loss.params == {"beta": 0.1}  # beta: both take it, kept
    assert notes == ["note: loss.name=kto replaces dpo: dropped loss.label_smoothing from the config (set for dpo, "
                     "not taken by kto)"]


def test_set_loss_key_the_new_loss_does_not_take_is_refused(dpo_file):
    assert problems_of(dpo_file, ["loss.name=kto", "loss.label_smoothing=0.1"], log=lambda _: None) == [
        "unknown key 'loss.label_smoothing': kto does not take it (aot, dpo, exo_pair and 1 more take it); kto "
        "takes: beta, desirable_weight, undesirable_weight"]


def test_switching_never_drops_a_typo_or_a_same_loss_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("model: m\nloss: {name: dpo, beta: 0.1, betta: 0.2}\ntraining: {output_dir: o, learning_rate: 1}\n")
    notes = []
    # `betta` is no loss's key: still an error after switching, and nothing is said to be dropped.
    assert problems_of(path, ["loss.name=ipo"], log=notes.append) == [
        "unknown key 'loss.betta'. Did you mean 'loss.beta'?"]
    assert notes == []
    # Setting the file's own loss again changes nothing.
    assert problems_of(path, ["loss.name=dpo"], log=notes.append) == [
        "unknown key 'loss.betta'. Did you mean 'loss.beta'?"]
    assert notes == []


def test_switching_from_a_mix_drops_weights_that_no_longer_fit(tmp_path):
    path = tmp_path / "rpo.yaml"
    path.write_text("model: m\nloss: {name: [dpo, sft], weights: [1.0, 0.5], beta: 0.1}\n"
                    "training: {output_dir: o, learning_rate: 1e-5}\n")
    notes = []
    cfg = to_config(path, ["loss.name=ipo"], log=notes.append)
    assert (cfg.loss.name, cfg.loss.weights, cfg.loss.params) == ("ipo", None, {"beta": 0.1})
    assert notes == ["note: loss.name=ipo replaces dpo/sft: dropped loss.weights from the config (set for dpo/sft, "
                     "not taken by ipo)"]
    # the new loss's required key still has to come from somewhere
    path.write_text("model: m\nloss: {name: orpo, lam: 0.1}\ntraining: {output_dir: o, learning_rate: 1e-5}\n")
    assert problems_of(path, ["loss.name=simpo", "loss.gamma=0.5"], log=notes.append) == [
        "missing required key 'loss.beta' (simpo has no safe default; it needs beta > 0)"]
    assert notes[-1] == ("note: loss.name=simpo replaces orpo: dropped loss.lam from the config (set for orpo, "
                         "not taken by simpo)")


def test_validate_checks_a_config_changed_after_reading():
    cfg = to_config(tree())
    cfg.training.adam_betas = [0.9]
    with pytest.raises(ConfigError, match="expected 2 values"):
        validate(cfg)


# ---- the README stays true ----------------------------------------------------------------------------------

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_readme_config_reference_is_the_generated_one(capsys):
    """Regenerate with `PYTHONPATH=$PWD python -m preftune.cli config-doc` (the table ends the section)."""
    assert cli.main(["config-doc"]) == 0
    generated = capsys.readouterr().out
    section = README[README.index("## Configuration reference"):]
    section = section[: section.index("\n## ")]
    assert section[section.index("| key | type | default | meaning |"):].strip() == generated.strip()


def test_readme_trl_table_lists_every_pointed_name():
    table = README[README.index("**Coming from TRL.**"): README.index("**Defaults that differ from TRL's**")]
    assert [name for name in TRL_NAMES if f"`{name}" not in table] == []
