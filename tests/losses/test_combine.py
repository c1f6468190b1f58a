"""preftune.losses.combine: weighted sums of registered losses (RPO, MPO)."""

import pytest
import torch

from preftune.losses import LossOutput, bco_pair, combine, dpo, kto, orpo, sft

# The DPO case of test_dpo.py: π_w = −10, π_l = −15, r_w = −11, r_l = −14, β = 0.1 → DPO 0.598139,
# BCO (δ = 0) 1.288793; chosen length 5 → SFT −(−10)/5 = 2.
PAIR = dict(
    policy_chosen_logps=torch.tensor([-10.0]),
    policy_rejected_logps=torch.tensor([-15.0]),
    reference_chosen_logps=torch.tensor([-11.0]),
    reference_rejected_logps=torch.tensor([-14.0]),
)
SFT = dict(policy_chosen_logps=torch.tensor([-10.0]), chosen_lengths=torch.tensor([5]))


def test_rpo_dpo_plus_alpha_sft():
    # 1.0·0.598139 + 0.5·2 = 1.598139
    out = combine([dpo(**PAIR, beta=0.1), sft(**SFT)], [1.0, 0.5], names=["dpo", "sft"])
    assert out.losses.item() == pytest.approx(1.598139, abs=1e-5)
    assert out.chosen_rewards.item() == pytest.approx(0.1, abs=1e-6)
    assert out.metrics["dpo/loss"].item() == pytest.approx(0.598139, abs=1e-5)
    assert out.metrics["sft/loss"].item() == pytest.approx(2.0, abs=1e-6)


def test_mpo_weights():
    # 0.8·0.598139 + 0.2·1.288793 + 1.0·2 = 0.478511 + 0.257759 + 2 = 2.736270
    parts = [dpo(**PAIR, beta=0.1), bco_pair(**PAIR, beta=0.1), sft(**SFT)]
    out = combine(parts, [0.8, 0.2, 1.0])
    assert out.losses.item() == pytest.approx(2.736270, abs=1e-5)
    assert set(out.metrics) == {"0/loss", "1/loss", "2/loss"}


def test_rewards_from_first_paired_output_and_metrics_prefixed():
    # sft first (no rewards), then orpo (paired rewards λ·m = 0.1·(−10/5) = −0.2): rewards come from orpo
    o = orpo(
        policy_chosen_logps=torch.tensor([-10.0]),
        policy_rejected_logps=torch.tensor([-15.0]),
        chosen_lengths=torch.tensor([5]),
        rejected_lengths=torch.tensor([5]),
        lam=0.1,
    )
    out = combine([sft(**SFT), o], [1.0, 1.0], names=["sft", "orpo"])
    assert out.chosen_rewards.item() == pytest.approx(-0.2, abs=1e-6)
    assert "orpo/nll_loss" in out.metrics and "orpo/log_odds_ratio" in out.metrics


def test_unpaired_rewards_pass_through():
    k = kto(
        policy_logps=torch.tensor([-10.0]),
        reference_logps=torch.tensor([-11.0]),
        labels=torch.tensor([True]),
        kl=torch.tensor(0.0),
        beta=0.1,
    )
    out = combine([k], [2.0])
    # 2·(1 − σ(0.1)) = 2·0.475021 = 0.950042
    assert out.losses.item() == pytest.approx(0.950042, abs=1e-5)
    assert out.rewards.item() == pytest.approx(0.1, abs=1e-6)
    assert out.chosen_rewards is None


def test_gradient_flows_through_every_component():
    pw = torch.tensor([-10.0], requires_grad=True)
    out = combine(
        [
            dpo(**{**PAIR, "policy_chosen_logps": pw}, beta=0.1),
            sft(policy_chosen_logps=pw, chosen_lengths=torch.tensor([5])),
        ],
        [1.0, 1.0],
    )
    out.losses.sum().backward()
    # d/dπ_w: DPO −β·σ(−βh) = −0.1·0.450166 = −0.045017; SFT −1/5 = −0.2; total −0.245017
    assert pw.grad.item() == pytest.approx(-0.245017, abs=1e-5)


@pytest.mark.parametrize(
    "outputs, weights, names, match",
    [
        ([], [], None, "at least one"),
        ([LossOutput(losses=torch.zeros(2))], [1.0, 2.0], None, "weights"),
        ([LossOutput(losses=torch.zeros(2)), LossOutput(losses=torch.zeros(3))], [1.0, 1.0], None, "shape"),
        ([LossOutput(losses=torch.zeros(2))] * 2, [1.0, 1.0], ["a", "a"], "unique name"),
    ],
)
def test_combine_rejects_bad_inputs(outputs, weights, names, match):
    with pytest.raises(ValueError, match=match):
        combine(outputs, weights, names=names)
