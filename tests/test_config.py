"""Config: YAML in, dotted overrides, unknown keys rejected with the nearest key, readable type errors.

Ranges, problems reported together, TRL's names, loss-spec checks and switching losses: test_config_checks.py.
"""

from __future__ import annotations

import copy

import pytest

from preftune.config import (
    Config,
    LossConfig,
    check_loss_params,
    field_docs,
    load_yaml,
    parse_overrides,
    to_config,
)
from preftune.errors import ConfigError

BASE = {"model": "some/model", "loss": {"name": "dpo", "beta": 0.1},
        "training": {"output_dir": "out", "learning_rate": 1e-5}}


def cfg_with(**sections) -> dict:
    """BASE with sections merged in (``loss`` replaced whole: its keys depend on the loss)."""
    tree = copy.deepcopy(BASE)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict) and key != "loss":
            tree[key] = {**tree[key], **value}
        else:
            tree[key] = value
    return tree


def error_of(tree_or_path, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        to_config(tree_or_path, overrides)
    return str(info.value)


def write(tmp_path, text: str, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---- unknown keys ------------------------------------------------------------------------------------------


def test_unknown_top_level_key_suggests_nearest():
    tree = cfg_with()
    tree["modle"] = tree.pop("model")
    assert error_of(tree) == "unknown key 'modle'. Did you mean 'model'?"


@pytest.mark.parametrize(
    ("section", "values", "expected"),
    [
        ("training", {"learning_rat": 1e-5}, "unknown key 'training.learning_rat'. Did you mean 'training.learning_rate'?"),
        ("data", {"eval_fractoin": 0.1}, "unknown key 'data.eval_fractoin'. Did you mean 'data.eval_fraction'?"),
        ("reference", {"precomute": False}, "unknown key 'reference.precomute'. Did you mean 'reference.precompute'?"),
        ("engine", {"chunksize": 8}, "unknown key 'engine.chunksize'. Did you mean 'engine.chunk_size'?"),
    ],
)
def test_unknown_nested_key_suggests_nearest(section, values, expected):
    assert error_of(cfg_with(**{section: values})) == expected


def test_unknown_key_without_near_match_lists_valid_keys():
    msg = error_of(cfg_with(engine={"zzzzzz": 1}))
    assert msg.startswith("unknown key 'engine.zzzzzz'. Valid keys:")
    assert "layout" in msg and "chunk_size" in msg


def test_unknown_key_inside_optional_section_suggests_nearest():
    assert error_of(cfg_with(lora={"alpah": 16})) == "unknown key 'lora.alpah'. Did you mean 'lora.alpha'?"


def test_unknown_loss_hyperparameter_suggests_nearest():
    msg = error_of(cfg_with(loss={"name": "dpo", "betta": 0.1}))
    assert msg == "unknown key 'loss.betta'. Did you mean 'loss.beta'?"


def test_unknown_loss_name_suggests_registered():
    msg = error_of(cfg_with(loss={"name": "dpoo", "beta": 0.1}))
    assert msg.startswith("loss.name:") and "Did you mean 'dpo'?" in msg


# ---- types -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "values", "expected"),
    [
        ("training", {"per_device_batch_size": "two"}, "training.per_device_batch_size: expected an integer, got 'two'"),
        ("training", {"learning_rate": "fast"}, "training.learning_rate: expected a number, got 'fast'"),
        ("training", {"save_model": "yes please"}, "training.save_model: expected true or false, got 'yes please'"),
        ("training", {"precision": "bf61"},
         "training.precision: expected one of 'fp32' | 'bf16', got 'bf61' (did you mean 'bf16'?)"),
        ("training", {"adam_betas": [0.9, "x"]}, "training.adam_betas[1]: expected a number, got 'x'"),
        ("data", 5, "data: expected a mapping of DataConfig fields, got 5"),
    ],
)
def test_type_errors_name_key_expected_and_got(section, values, expected):
    msg = error_of(cfg_with(**{section: values}))
    assert msg == expected
    assert "<class" not in msg and "Traceback" not in msg


def test_integral_float_accepted_for_int_and_bool_rejected_for_int():
    assert to_config(cfg_with(training={"per_device_batch_size": 4.0})).training.per_device_batch_size == 4
    assert "expected an integer" in error_of(cfg_with(training={"per_device_batch_size": True}))


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML (YAML 1.1) reads 5e-6 and 1.0e5 (no dot / no exponent sign) as *strings*; YAML 1.2 and every user
    # read them as numbers, and so does the config, loss hyperparameters (an untyped mapping) included.
    path = write(tmp_path, "model: m\ntraining:\n  output_dir: out\n  learning_rate: 5e-6\n  max_steps: 1e2\n"
                           "loss:\n  name: dpo\n  beta: 1e-1\n  label_smoothing: 1.0e-2\n"
                           "data:\n  train: 1e5x\n")
    tree = load_yaml(path)
    assert tree["training"]["learning_rate"] == 5e-6 and tree["loss"]["label_smoothing"] == 0.01
    assert tree["data"]["train"] == "1e5x"  # not a number: stays a string
    cfg = to_config(path)
    assert cfg.training.learning_rate == 5e-6 and isinstance(cfg.training.learning_rate, float)
    assert cfg.training.max_steps == 100 and isinstance(cfg.training.max_steps, int)  # integral float -> int
    assert cfg.loss.params == {"beta": 0.1, "label_smoothing": 0.01}
    assert isinstance(cfg.loss.params["beta"], float)


# ---- required keys -----------------------------------------------------------------------------------------


def test_missing_learning_rate_is_named():
    tree = cfg_with()
    del tree["training"]["learning_rate"]
    assert error_of(tree) == "missing required key 'training.learning_rate'"


def test_missing_model_and_output_dir_are_named():
    tree = cfg_with()
    del tree["model"]
    assert error_of(tree) == "missing required key 'model'"
    tree = cfg_with()
    del tree["training"]["output_dir"]
    assert error_of(tree) == "missing required key 'training.output_dir'"


def test_dpo_beta_has_no_default():
    msg = error_of(cfg_with(loss={"name": "dpo"}))
    assert msg == "missing required key 'loss.beta' (dpo has no safe default; it needs beta > 0)"
    assert error_of(cfg_with(loss={})) == msg  # the default loss (dpo) needs it too


def test_loss_params_defaults_and_weights_count():
    cfg = to_config(cfg_with(loss={"name": "dpo", "beta": 0.2}))
    assert cfg.loss.name == "dpo" and cfg.loss.params == {"beta": 0.2}
    msg = error_of(cfg_with(loss={"name": "dpo", "beta": 0.2, "weights": [1.0, 2.0]}))
    assert msg == "loss.weights has 2 values for 1 losses"


def test_check_loss_params_is_kept_for_old_callers():
    cfg = to_config(cfg_with())
    cfg.loss.params["betta"] = 1.0  # changed after reading: the alias still checks it
    with pytest.raises(ConfigError, match="unknown key 'loss.betta'. Did you mean 'loss.beta'?"):
        check_loss_params(cfg)


# ---- overrides ---------------------------------------------------------------------------------------------


def test_parse_overrides_builds_nested_tree_with_yaml_values():
    tree = parse_overrides(["training.learning_rate=1e-5", "lora=null", "lora2.target_modules=[q_proj, k_proj]",
                            "training.max_grad_norm=null", "data.train=a=b.jsonl"])
    assert tree == {
        "training": {"learning_rate": 1e-5, "max_grad_norm": None},  # YAML 1.2 numbers, as in files
        "lora": None,
        "lora2": {"target_modules": ["q_proj", "k_proj"]},
        "data": {"train": "a=b.jsonl"},  # only the first '=' splits
    }


def test_set_overrides_apply_over_yaml(tmp_path):
    path = write(tmp_path, "model: m\nlora:\n  r: 16\nloss: {beta: 0.1}\ntraining:\n  output_dir: out\n"
                           "  learning_rate: 1e-4\n")
    cfg = to_config(path, ["training.learning_rate=2e-5", "lora.r=8", "lora.target_modules=[q_proj, k_proj, v_proj]",
                           "training.max_grad_norm=null", "training.adam_betas=[0.9, 0.95]"])
    assert cfg.training.learning_rate == 2e-5
    assert cfg.lora.r == 8 and cfg.lora.alpha == 128  # other LoRA fields keep their defaults
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert cfg.training.max_grad_norm is None
    assert cfg.training.adam_betas == [0.9, 0.95]


def test_set_lora_null_turns_lora_off(tmp_path):
    path = write(tmp_path, "model: m\nlora:\n  r: 16\nloss: {beta: 0.1}\ntraining:\n  output_dir: out\n"
                           "  learning_rate: 1e-4\n")
    assert to_config(path).lora is not None
    assert to_config(path, ["lora=null"]).lora is None


def test_set_creates_a_section_absent_from_yaml(tmp_path):
    path = write(tmp_path, "model: m\ntraining:\n  output_dir: out\n  learning_rate: 1e-4\n")
    cfg = to_config(path, ["lora.r=4", "loss.name=[dpo, sft]", "loss.beta=0.3"])  # file has no loss section
    assert cfg.lora.r == 4
    assert cfg.loss.name == ["dpo", "sft"] and cfg.loss.params == {"beta": 0.3}


def test_set_rejects_unknown_key_and_malformed_item(tmp_path):
    path = write(tmp_path, "model: m\nloss: {beta: 0.1}\ntraining:\n  output_dir: out\n  learning_rate: 1e-4\n")
    assert error_of(path, ["training.warmup_ration=0.1"]) == (
        "unknown key 'training.warmup_ration'. Did you mean 'training.warmup_ratio'?")
    assert error_of(path, ["training.learning_rate"]).startswith("--set expects key.sub=value")


def test_dict_overrides_merge_deeply():
    cfg = to_config(cfg_with(training={"seed": 3}), {"training": {"max_steps": 7}})
    assert (cfg.training.seed, cfg.training.max_steps, cfg.training.learning_rate) == (3, 7, 1e-5)


# ---- YAML files --------------------------------------------------------------------------------------------


def test_bad_yaml_names_file_line_and_column(tmp_path):
    path = write(tmp_path, "model: m\ntraining:\n  output_dir: out\n  learning_rate: [1e-4\n  seed: 1\n")
    msg = error_of(path)
    assert msg.startswith(f"{path}:")
    line = int(msg[len(str(path)) + 1 :].split(":")[0])
    assert 4 <= line <= 6, msg  # the unclosed bracket (line 4) is reported where the parser gives up
    assert "invalid YAML" in msg


def test_tab_indentation_reported_at_its_line(tmp_path):
    path = write(tmp_path, "model: m\ntraining:\n\toutput_dir: out\n")
    assert error_of(path).startswith(f"{path}:3:")


def test_missing_config_file_and_non_mapping(tmp_path):
    assert error_of(tmp_path / "nope.yaml") == f"config file not found: {tmp_path / 'nope.yaml'}"
    assert "must be a mapping" in error_of(write(tmp_path, "- a\n- b\n"))


# ---- Config objects and docs -------------------------------------------------------------------------------


DPO = LossConfig(name="dpo", params={"beta": 0.1})


class _NoCopy:
    """Stands in for a loaded model: deep-copying it would double the memory of a real one."""

    copies = 0

    def __deepcopy__(self, memo):
        type(self).copies += 1
        return _NoCopy()


def test_config_object_keeps_loaded_objects():
    model, tok = _NoCopy(), _NoCopy()
    cfg = to_config(Config(model=model, tokenizer=tok, loss=DPO, training=to_config(cfg_with()).training))
    assert cfg.model is model and cfg.tokenizer is tok


def test_config_object_is_not_deep_copied():
    _NoCopy.copies = 0
    to_config(Config(model=_NoCopy(), tokenizer=_NoCopy(), loss=DPO, training=to_config(cfg_with()).training))
    assert _NoCopy.copies == 0


def test_every_field_is_documented():
    rows = field_docs()
    keys = {key for key, *_ in rows}
    assert {"training.learning_rate", "loss.name", "lora.r", "reference.precompute", "data.train"} <= keys
    assert "loss.params" not in keys and "loss.<hyperparameter>" in keys  # written directly under loss:
    undocumented = [key for key, _, _, doc in rows if not doc]
    assert undocumented == []
    required = {key for key, _, default, _ in rows if default == "required"}
    assert required == {"model", "training.output_dir", "training.learning_rate"}
