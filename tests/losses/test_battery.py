"""One battery over every registered loss: the contract of preftune/losses/base.py, checked per spec.

Inputs are built from the spec alone (data kind, needs_reference, needs_lengths, needs_kl), so a newly
registered loss is tested without touching this file — unless it introduces a hyperparameter with no default
and no sample value below, which fails loudly on purpose. The spec's declared ranges are checked here too:
every bound refuses the value just past it, and a refused β really trains the wrong way (or not at all).
"""

import inspect
import math

import pytest
import torch

from preftune.losses import registered_losses

# Policy-gradient losses take per-token tensors and step counts, not sequence log-probs: their own battery is
# tests/losses/test_policy.py (gradient invariance, hand-computed values); PPO's is tests/losses/test_ppo.py.
SPECS = {n: s for n, s in registered_losses().items() if s.data not in ("policy", "ppo")}
NAMES = sorted(SPECS)

# Values for hyperparameters that have no default (and a few that do, to exercise non-trivial settings), and
# for trainer-maintained inputs (spec.state), which the battery passes as the trainer would.
SAMPLE_HYPERPARAMETERS = {
    "beta": 0.1,
    "label_smoothing": 0.1,
    "gamma": 0.5,
    "lam": 0.1,
}
SAMPLE_STATE = {"delta": 0.05}

# The contract's input names, by data kind (the trainer calls spec.fn with exactly these keywords).
PAIRED = ("policy_chosen_logps", "policy_rejected_logps")
PAIRED_REF = ("reference_chosen_logps", "reference_rejected_logps")
PAIRED_LEN = ("chosen_lengths", "rejected_lengths")

# aot's losses are per quantile of the batch, not per example (documented in its docstring).
BATCH_COUPLED = {"aot"}
# apo_down lowers the chosen likelihood by design; raising π_w alone does not lower its loss.
CHOSEN_UP_NOT_MONOTONE = {"apo_down"}


def expected_inputs(spec):
    if spec.data == "paired":
        names = (
            PAIRED + (PAIRED_REF if spec.needs_reference else ()) + (PAIRED_LEN if spec.needs_lengths else ())
        )
    elif spec.data == "unpaired":
        names = ("policy_logps",) + (("reference_logps",) if spec.needs_reference else ()) + ("labels",)
        names += ("kl",) if spec.needs_kl else ()
    elif spec.data == "reward":  # reward-model losses take scores (one per sequence), not log-probs
        names = ("chosen_scores", "rejected_scores", "margin")
    else:
        names = ("policy_chosen_logps",) + (("chosen_lengths",) if spec.needs_lengths else ())
    return names


def hyperparameters(spec):
    """Sample values for the spec's hyperparameters (its defaults where the battery has none)."""
    values = {}
    for name in spec.hyperparameters:
        if name in SAMPLE_HYPERPARAMETERS:
            values[name] = SAMPLE_HYPERPARAMETERS[name]
        else:
            assert name not in spec.required, (
                f"{spec.name}: add a sample value for required hyperparameter {name!r} to the battery"
            )
    return values


def state(spec):
    for name in spec.state:
        assert name in SAMPLE_STATE, f"{spec.name}: add a sample value for trainer state {name!r} to the battery"
    return {name: SAMPLE_STATE[name] for name in spec.state}


def make_inputs(spec, policy, reference, lengths=None, labels=None, requires_grad=False):
    """Inputs of the right kind. policy, reference: (2, B) float tensors (row 0 chosen/desirable side)."""
    B = policy.shape[1]
    if lengths is None:
        lengths = torch.arange(B * 2).reshape(2, B) % 7 + 1  # (2, B) token counts 1..7
    if labels is None:
        labels = torch.arange(B) % 2 == 0  # (B,) alternate desirable / undesirable
    policy = policy.clone().requires_grad_(requires_grad)
    if spec.data == "paired":
        inputs = dict(policy_chosen_logps=policy[0], policy_rejected_logps=policy[1])
        if spec.needs_reference:
            inputs.update(reference_chosen_logps=reference[0], reference_rejected_logps=reference[1])
        if spec.needs_lengths:
            inputs.update(chosen_lengths=lengths[0], rejected_lengths=lengths[1])
    elif spec.data == "reward":  # the policy rows stand in for the chosen and rejected scores
        inputs = dict(chosen_scores=policy[0], rejected_scores=policy[1])
    elif spec.data == "unpaired":
        inputs = dict(policy_logps=policy[0], labels=labels)
        if spec.needs_reference:
            inputs["reference_logps"] = reference[0]
        if spec.needs_kl:
            inputs["kl"] = torch.tensor(0.3)
    else:
        inputs = dict(policy_chosen_logps=policy[0])
        if spec.needs_lengths:
            inputs["chosen_lengths"] = lengths[0]
    return inputs, policy


def call(spec, inputs, **overrides):
    return spec.fn(**inputs, **{**hyperparameters(spec), **overrides}, **state(spec))


def random_logps(B, seed, scale=20.0):
    g = torch.Generator().manual_seed(seed)
    return -scale * torch.rand(2, B, generator=g)  # (2, B) in (−scale, 0]


# --- the registry and the spec ----------------------------------------------------------------------------


def test_registry_holds_every_loss_the_readme_lists():
    # The README's Methods table, plus the reward-model loss of docs/reward_models.md.
    wanted = {
        "dpo", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
        "apo_zero", "apo_down", "discopop", "kto", "orpo", "simpo", "sft", "bradley_terry",
    }  # fmt: skip
    assert wanted <= set(SPECS)


@pytest.mark.parametrize("name", NAMES)
def test_spec_fields(name):
    spec = SPECS[name]
    assert spec.name == name
    assert spec.data in ("paired", "unpaired", "sft", "reward")
    assert spec.description and "\n" not in spec.description
    if spec.needs_kl:
        assert spec.data == "unpaired"
    doc = inspect.getdoc(spec.fn)
    assert doc and "arXiv" in doc, f"{name}: docstring must cite the paper with its arXiv id"


@pytest.mark.parametrize("name", NAMES)
def test_signature_matches_spec(name):
    spec = SPECS[name]
    params = inspect.signature(spec.fn).parameters.values()
    keyword_only = tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
    inputs = tuple(p.name for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY)
    assert inputs == expected_inputs(spec)  # the tensor inputs the trainer passes, by data kind
    assert sorted(spec.hyperparameters + spec.state) == sorted(keyword_only)
    assert set(spec.required) | set(spec.defaults) == set(spec.hyperparameters)
    assert not set(spec.required) & set(spec.defaults)


# --- shapes, reduction, detached rewards ------------------------------------------------------------------


@pytest.mark.parametrize("B", [1, 3, 5, 8])
@pytest.mark.parametrize("name", NAMES)
def test_shapes_not_reduced_and_rewards_detached(name, B):
    spec = SPECS[name]
    inputs, _ = make_inputs(spec, random_logps(B, 0), random_logps(B, 1), requires_grad=True)
    out = call(spec, inputs)
    assert out.losses.shape == (B,)
    assert out.losses.requires_grad
    if spec.data in ("paired", "reward"):
        assert out.chosen_rewards is not None and out.rejected_rewards is not None
    if spec.data == "unpaired":
        assert out.rewards is not None
    for tensor in (out.chosen_rewards, out.rejected_rewards, out.rewards, *out.metrics.values()):
        if tensor is not None:
            assert tensor.shape == (B,)
            assert not tensor.requires_grad


@pytest.mark.parametrize("name", sorted(set(NAMES) - BATCH_COUPLED))
def test_examples_do_not_interact(name):
    # Changing example 0 leaves the losses of examples 1.. unchanged (per-example, not batch-coupled).
    spec = SPECS[name]
    policy, reference = random_logps(4, 2), random_logps(4, 3)
    before = call(spec, make_inputs(spec, policy, reference)[0]).losses
    policy[:, 0] -= 3.0
    after = call(spec, make_inputs(spec, policy, reference)[0]).losses
    assert torch.equal(before[1:], after[1:])


# --- numerical stability ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_finite_losses_and_gradients_at_extreme_logps(name):
    spec = SPECS[name]
    big = 1e4
    # every sign pattern of (policy chosen, policy rejected, reference chosen, reference rejected) at ±1e4
    signs = torch.tensor([[(i >> k) & 1 for k in range(4)] for i in range(16)], dtype=torch.float32) * 2 - 1
    policy = (big * signs[:, :2]).T.contiguous()  # (2, 16)
    reference = (big * signs[:, 2:]).T.contiguous()  # (2, 16)
    for extra in (0.0, -big):  # also the realistic side: everything very negative
        inputs, leaf = make_inputs(spec, policy + extra, reference + extra, requires_grad=True)
        out = call(spec, inputs)
        assert torch.isfinite(out.losses).all(), out.losses
        out.losses.sum().backward()
        assert torch.isfinite(leaf.grad).all(), leaf.grad


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", NAMES)
def test_finite_losses_for_random_inputs(name, seed):
    spec = SPECS[name]
    g = torch.Generator().manual_seed(seed)
    policy = -torch.rand(2, 7, generator=g) * 10 ** torch.randint(0, 4, (2, 7), generator=g)
    reference = -torch.rand(2, 7, generator=g) * 10 ** torch.randint(0, 4, (2, 7), generator=g)
    lengths = torch.randint(1, 500, (2, 7), generator=g)
    out = call(spec, make_inputs(spec, policy, reference, lengths=lengths)[0])
    assert torch.isfinite(out.losses).all()


# --- monotonicity sanity ----------------------------------------------------------------------------------


def _start(B=3):
    # A policy that currently prefers the rejected side a little: ρ_w = −1, ρ_l = +1 (β·h = −0.2 at β = 0.1).
    reference = random_logps(B, 7) - 20.0
    policy = reference + torch.tensor([[-1.0], [1.0]])
    return policy, reference


@pytest.mark.parametrize("name", NAMES)
def test_widening_the_margin_lowers_the_loss(name):
    # Raise the preferred side's policy log-prob and lower the other side's (for unpaired data: raise
    # desirable completions, lower undesirable ones; for sft: raise the chosen one).
    spec = SPECS[name]
    policy, reference = _start()
    labels = torch.tensor([True, False, True])
    before = call(spec, make_inputs(spec, policy, reference, labels=labels)[0]).losses
    step = 0.5
    better = policy.clone()
    if spec.data == "unpaired":
        better[0] += torch.where(labels, step, -step)
    else:
        better[0] += step
        better[1] -= step
    after = call(spec, make_inputs(spec, better, reference, labels=labels)[0]).losses
    assert after.sum() < before.sum()


@pytest.mark.parametrize("name", sorted(n for n in NAMES if SPECS[n].data != "unpaired"))
def test_raising_chosen_logp_alone_lowers_the_loss(name):
    spec = SPECS[name]
    policy, reference = _start()
    before = call(spec, make_inputs(spec, policy, reference)[0]).losses
    better = policy.clone()
    better[0] += 0.5
    after = call(spec, make_inputs(spec, better, reference)[0]).losses
    if name in CHOSEN_UP_NOT_MONOTONE:
        assert after.sum() > before.sum()  # apo_down: by design the chosen likelihood is pushed down
    else:
        assert after.sum() < before.sum()


# --- the declared hyperparameter ranges -------------------------------------------------------------------


def _legal_sample(spec):
    """Values check_params accepts: the battery's samples for what the loss takes (defaults fill the rest)."""
    return hyperparameters(spec)


@pytest.mark.parametrize("name", NAMES)
def test_samples_are_legal_and_typical_ranges_lie_inside_legal_ones(name):
    spec = SPECS[name]
    assert spec.check_params(_legal_sample(spec)) == []
    for key, rng in spec.typical.items():
        assert rng.low in spec.ranges[key] and rng.high in spec.ranges[key], (key, rng)


def _past(bound, open_, outward):
    """The first value on the wrong side of a bound: the bound itself if it is open, else the next float."""
    return bound if open_ else math.nextafter(bound, outward)


@pytest.mark.parametrize("name", NAMES)
def test_every_bound_refuses_the_value_just_past_it(name):
    spec = SPECS[name]
    base = _legal_sample(spec)
    for key, rng in spec.ranges.items():
        edges = []
        if rng.low is not None:
            edges.append((_past(rng.low, rng.low_open, -math.inf), _past(rng.low, not rng.low_open, math.inf)))
        if rng.high is not None:
            edges.append((_past(rng.high, rng.high_open, math.inf), _past(rng.high, not rng.high_open, -math.inf)))
        for bad, good in edges:
            problems = spec.check_params({**base, key: bad})
            assert len(problems) == 1 and problems[0].startswith(f"loss.{key} = "), (key, bad, problems)
            assert spec.check_params({**base, key: good}) == [], (key, good)
        for bad in (math.nan, math.inf):
            assert len(spec.check_params({**base, key: bad})) == 1, (key, bad)


BETA_LOSSES = sorted(n for n in NAMES if "beta" in SPECS[n].ranges)


@pytest.mark.parametrize("name", BETA_LOSSES)
def test_refused_beta_trains_nothing_at_zero_and_the_wrong_way_below(name):
    """Why β ≤ 0 is refused: at β = 0 the policy gets no gradient, at β < 0 widening the margin raises the loss
    (the loss learns the rejected side). A loss that divides by β raises instead."""
    spec = SPECS[name]
    assert spec.ranges["beta"].low == 0 and spec.ranges["beta"].low_open
    assert spec.check_params({**_legal_sample(spec), "beta": 0.0}) and spec.check_params(
        {**_legal_sample(spec), "beta": -0.5})
    policy, reference = _start()
    labels = torch.tensor([True, False, True])
    try:
        inputs, leaf = make_inputs(spec, policy, reference, labels=labels, requires_grad=True)
        call(spec, inputs, beta=0.0).losses.sum().backward()
    except ValueError:
        return  # ipo, sppo_hard: the targets are ±1/(2β)
    assert torch.count_nonzero(leaf.grad) == 0, leaf.grad
    better = policy.clone()
    if spec.data == "unpaired":
        better[0] += torch.where(labels, 0.5, -0.5)
    else:
        better[0] += 0.5
        better[1] -= 0.5
    before = call(spec, make_inputs(spec, policy, reference, labels=labels)[0], beta=-0.1).losses
    after = call(spec, make_inputs(spec, better, reference, labels=labels)[0], beta=-0.1).losses
    assert after.sum() > before.sum()


@pytest.mark.parametrize("name", NAMES)
def test_unknown_missing_and_mistyped_keys_get_one_line_each(name):
    spec = SPECS[name]
    base = _legal_sample(spec)
    problems = spec.check_params({**base, "zzz_not_a_key": 1.0})
    assert len(problems) == 1 and "'loss.zzz_not_a_key'" in problems[0]
    for key in spec.required:
        problems = spec.check_params({k: v for k, v in base.items() if k != key})
        assert problems == [problems[0]] and problems[0].startswith(f"missing required key 'loss.{key}'")
    for key in spec.hyperparameters:
        problems = spec.check_params({**base, key: "abc"})
        assert len(problems) == 1 and problems[0].startswith(f"loss.{key} must be a number"), problems
        # PyYAML reads 5e-6 as a string: a string that is a number is accepted
        assert spec.check_params({**base, key: str(base.get(key, spec.defaults.get(key)))}) == [], key


@pytest.mark.parametrize("name", sorted(n for n in NAMES if SPECS[n].typical))
def test_typical_ranges_warn_once_per_unusual_value(name):
    spec = SPECS[name]
    base = _legal_sample(spec)
    for key, rng in spec.typical.items():
        mid = (rng.low + rng.high) / 2
        assert not [w for w in spec.sanity_warnings({**base, key: mid}) if w.startswith(f"loss.{key} = ")]
        # legal but unusual: ten times the typical top, or half way to the legal top when that is lower
        legal = spec.ranges[key]
        unusual = rng.high * 10 if legal.high is None or rng.high * 10 in legal else (rng.high + legal.high) / 2
        if unusual in rng:
            continue
        warnings = [w for w in spec.sanity_warnings({**base, key: unusual}) if w.startswith(f"loss.{key} = ")]
        assert len(warnings) == 1 and "\n" not in warnings[0], warnings


@pytest.mark.parametrize("name", sorted(n for n in NAMES if SPECS[n].data != "sft"))
def test_reward_scale_names_the_factor_of_the_logged_rewards(name):
    # Doubling the reward_scale hyperparameter doubles the rewards; with no reward_scale, no hyperparameter
    # changes them (the monitor divides rewards by reward_scale to get back to log-prob units).
    spec = SPECS[name]
    inputs = make_inputs(spec, random_logps(4, 11), random_logps(4, 12))[0]

    def rewards(**hp):
        out = call(spec, inputs, **hp)
        return torch.cat([r for r in (out.chosen_rewards, out.rejected_rewards, out.rewards) if r is not None])

    base = rewards()
    if spec.reward_scale is not None:
        value = hyperparameters(spec).get(spec.reward_scale, spec.defaults.get(spec.reward_scale))
        torch.testing.assert_close(rewards(**{spec.reward_scale: 2 * value}), 2 * base)
    else:
        for key in spec.hyperparameters:
            value = hyperparameters(spec).get(key, spec.defaults.get(key))
            torch.testing.assert_close(rewards(**{key: value * 2 + 0.01}), base)
