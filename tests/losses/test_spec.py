"""The LossSpec API other rooms code against: hyperparameters read from the signature, check_params,
resolve_params, sanity_warnings, reward_scale, check_combined_params, and Range. Exact messages for a few
hand-picked cases (the battery checks every registered loss generically)."""

import math

import pytest
import torch

from preftune.losses import LossOutput, LossSpec, Range, check_combined_params, get_loss


def test_hyperparameters_required_and_defaults_come_from_the_signature():
    dpo = get_loss("dpo")
    assert dpo.hyperparameters == ("beta", "label_smoothing")
    assert dpo.required == ("beta",)  # no safe default for β
    assert dpo.defaults == {"label_smoothing": 0.0}
    bco = get_loss("bco_pair")
    assert bco.hyperparameters == ("beta",) and bco.state == ("delta",)  # δ: a running mean the trainer keeps
    assert get_loss("sft").hyperparameters == ()


def test_check_params_messages():
    dpo = get_loss("dpo")
    assert dpo.check_params({"beta": 0.1}) == []
    assert dpo.check_params({"beta": "5e-2"}) == []  # PyYAML reads 5e-2 as a string
    assert dpo.check_params({"betta": 0.1}) == [
        "unknown key 'loss.betta' for dpo. Did you mean 'loss.beta'? dpo takes: beta, label_smoothing",
        "missing required key 'loss.beta' (dpo has no safe default; it needs beta > 0)",
    ]
    [negative] = dpo.check_params({"beta": -0.5})
    assert negative.startswith("loss.beta = -0.5 is not allowed for dpo; it needs beta > 0: ")
    assert "learns the rejected side" in negative
    [zero] = dpo.check_params({"beta": 0})
    assert zero.startswith("loss.beta = 0 is not allowed for dpo")
    assert dpo.check_params({"beta": True}) == ["loss.beta must be a number for dpo, got True"]
    [half] = dpo.check_params({"beta": 0.1, "label_smoothing": 0.5})
    assert "needs 0 <= label_smoothing < 0.5" in half
    assert get_loss("bco_pair").check_params({"beta": 0.1, "delta": 0.3}) == [
        "loss.delta is maintained by the trainer for bco_pair (an input computed during training, not a "
        "hyperparameter); remove it"]


def test_auto_only_where_the_spec_allows_it():
    kto = get_loss("kto")
    assert kto.check_params({"beta": 0.1, "desirable_weight": "auto", "undesirable_weight": "auto"}) == []
    assert kto.check_params({"beta": "auto"}) == ["loss.beta must be a number for kto, got 'auto'"]
    assert kto.check_params({"beta": 0.1, "undesirable_weight": 0}) == [
        "loss.undesirable_weight = 0 is not allowed for kto; it needs undesirable_weight > 0: a class weight; 0 "
        "would discard the class and below 0 it is trained the wrong way"]


def test_resolve_params_coerces_fills_defaults_and_ignores_other_losses_keys():
    kto = get_loss("kto")
    got = kto.resolve_params({"beta": "1e-1", "desirable_weight": "auto", "gamma": 3})
    assert got == {"beta": 0.1, "desirable_weight": "auto", "undesirable_weight": 1.0}
    with pytest.raises(ValueError, match="missing required key 'loss.beta'"):
        kto.resolve_params({})


def test_sanity_warnings():
    dpo = get_loss("dpo")
    assert dpo.sanity_warnings({"beta": 0.1}) == []
    [line] = dpo.sanity_warnings({"beta": 5.0})
    assert line.startswith("loss.beta = 5 is outside the usual range for dpo (0.01-0.5): ")
    assert dpo.sanity_warnings({"beta": -1.0}) == []  # illegal: check_params's business, not a warning
    simpo = get_loss("simpo")
    # γ = 5 at β = 2: outside 0.3-1.6 and γ/β = 2.5 outside 0.3-0.5
    assert simpo.sanity_warnings({"beta": 2.0, "gamma": 5.0}) == [
        "loss.gamma = 5 is outside the usual range for simpo: 0.3-1.6 at β 2-2.5, or γ/β 0.3-0.5 at β 10 "
        "(Meng et al., 2405.14734)"]
    assert simpo.sanity_warnings({"beta": 10.0, "gamma": 3.0}) == []  # γ/β = 0.3, the β = 10 recipes


def test_reward_scale():
    assert get_loss("dpo").reward_scale == "beta"
    assert get_loss("orpo").reward_scale == "lam"  # rewards λ·m
    assert get_loss("sft").reward_scale is None and get_loss("bradley_terry").reward_scale is None


def test_check_combined_params_shares_one_mapping():
    dpo, bco, sft = get_loss("dpo"), get_loss("bco_pair"), get_loss("sft")
    assert check_combined_params([dpo, bco, sft], {"beta": 0.1}) == []
    # β missing: one line per component that needs it; a key no component takes: once
    assert check_combined_params([dpo, bco, sft], {"gama": 1}) == [
        "unknown key 'loss.gama' for dpo/bco_pair/sft. dpo/bco_pair/sft takes: beta, label_smoothing",
        "missing required key 'loss.beta' (dpo has no safe default; it needs beta > 0)",
        "missing required key 'loss.beta' (bco_pair has no safe default; it needs beta > 0)",
    ]
    # a key one component takes is not unknown to the mix, and is range-checked by the component that takes it
    [bad] = check_combined_params([get_loss("kto"), sft], {"beta": 0.1, "desirable_weight": -1})
    assert bad.startswith("loss.desirable_weight = -1 is not allowed for kto")
    assert check_combined_params([dpo], {"betta": 1}) == dpo.check_params({"betta": 1})


def test_range_membership_and_text():
    r = Range(0.0, 0.5, high_open=True)
    assert 0.0 in r and 0.4999 in r and 0.5 not in r and -1e-12 not in r and math.nan not in r
    assert r.describe("eps") == "0 <= eps < 0.5"
    assert Range(0.0, None, low_open=True).describe("beta") == "beta > 0"
    assert Range(None, 1.0).describe("tau") == "tau <= 1"
    assert math.inf not in Range()


def _toy(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, *, beta: float,
         tau: float = 2.0) -> LossOutput:
    return LossOutput(losses=policy_chosen_logps - policy_rejected_logps)


def test_a_spec_must_declare_a_legal_range_per_hyperparameter():
    with pytest.raises(ValueError, match="no legal range for 'tau'"):
        LossSpec(name="toy", fn=_toy, needs_reference=False, ranges={"beta": Range(0.0, None, low_open=True)})
    with pytest.raises(ValueError, match="the default tau = 2.0 is outside its own legal range"):
        LossSpec(name="toy", fn=_toy, needs_reference=False, ranges={"beta": Range(), "tau": Range(0.0, 1.0)})
    with pytest.raises(ValueError, match="reward_scale names 'gamma'"):
        LossSpec(name="toy", fn=_toy, needs_reference=False, ranges={"beta": Range(), "tau": Range()},
                 reward_scale="gamma")


def test_optional_and_literal_hyperparameters_are_type_checked():
    # grpo: epsilon_high: float | None, importance_sampling: Literal["token", "sequence"]
    grpo = get_loss("grpo")
    assert grpo.check_params({"epsilon_high": None}) == [] and grpo.check_params({"epsilon_high": "0.28"}) == []
    assert grpo.check_params({"epsilon_high": "abc"}) == [
        "loss.epsilon_high must be a number or null for grpo, got 'abc'"]
    assert grpo.check_params({"importance_sampling": "tok"}) == [
        "loss.importance_sampling must be one of 'token', 'sequence' for grpo, got 'tok'"]
