"""Hand-computed values for preftune.losses.sft."""

import pytest
import torch

from preftune.losses import sft


def test_sft_mean_token_nll():
    # −π_w/|y_w|: −(−6)/3 = 2;  −(−1.5)/1 = 1.5;  −(−10)/4 = 2.5
    out = sft(policy_chosen_logps=torch.tensor([-6.0, -1.5, -10.0]), chosen_lengths=torch.tensor([3, 1, 4]))
    assert out.losses.tolist() == pytest.approx([2.0, 1.5, 2.5], abs=1e-6)
    assert out.chosen_rewards is None and out.rejected_rewards is None and out.rewards is None


def test_sft_empty_completion_counts_as_one_token():
    # |y| = 0 is clamped to 1: −0/1 = 0 (an empty completion has Σ log p = 0), never 0/0 = NaN
    out = sft(policy_chosen_logps=torch.tensor([0.0]), chosen_lengths=torch.tensor([0]))
    assert out.losses.item() == 0.0
