"""Advantage estimators (preftune/advantages.py): hand-worked numbers and naive loop twins.

Each estimator is compared with a plain-Python twin (lists and loops, no tensors) on random data with missing
scores and ragged masks, to 1e-5 in fp32.
"""

import math
import random

import pytest
import torch

from preftune.advantages import combine_rewards, gae, group_relative, rloo, whiten

NAN = float("nan")

# --- naive twins ------------------------------------------------------------------------------------------


def _scored(row):
    return [x for x in row if not math.isnan(x)]


def _mean(xs):
    return sum(xs) / len(xs)


def _sample_std(xs):
    if len(xs) < 2:
        return 0.0
    mu = _mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def naive_group_relative(rows, scale, eps=1e-4):
    everything = [x for row in rows for x in _scored(row)]
    out = []
    for row in rows:
        scored = _scored(row)
        res = []
        for x in row:
            if math.isnan(x):
                res.append(0.0)
                continue
            a = x - _mean(scored)
            if scale == "group":
                a /= _sample_std(scored) + eps
            elif scale == "batch":
                a /= _sample_std(everything) + eps
            res.append(a)
        out.append(res)
    return out


def naive_rloo(rows):
    out = []
    for row in rows:
        res = []
        for j, x in enumerate(row):
            others = [y for k, y in enumerate(row) if k != j and not math.isnan(y)]
            res.append(0.0 if math.isnan(x) or not others else x - _mean(others))
        out.append(res)
    return out


def normalize_advantages(advantages):
    """The textbook seed's version (/work/shared/seeds/001, mistake 5), numpy replaced by plain Python."""
    mean = sum(advantages) / len(advantages)
    std = math.sqrt(sum((a - mean) ** 2 for a in advantages) / len(advantages)) + 1e-8  # np.std: ddof 0
    return [(a - mean) / std for a in advantages]


def naive_gae(rewards, values, mask, gamma, lam):
    adv, ret = [], []
    for r, v, m in zip(rewards, values, mask):
        real = [t for t in range(len(m)) if m[t]]
        a_row, r_row = [0.0] * len(m), [0.0] * len(m)
        a = 0.0
        for k in reversed(range(len(real))):
            t = real[k]
            v_next = v[real[k + 1]] if k + 1 < len(real) else 0.0  # the value after the last token is 0
            a = r[t] + gamma * v_next - v[t] + gamma * lam * a
            a_row[t], r_row[t] = a, a + v[t]
        adv.append(a_row)
        ret.append(r_row)
    return adv, ret


def _random_rewards(p, g, seed, missing=0.2):
    rng = random.Random(seed)
    return [[NAN if rng.random() < missing else rng.choice([0.0, 1.0, rng.gauss(0, 2)]) for _ in range(g)] for _ in range(p)]


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


# --- group_relative --------------------------------------------------------------------------------------


def test_group_relative_hand_computed_uses_the_sample_std_like_trl():
    # group [1, 0, 1, 0]: mean 0.5; Σ(r − 0.5)² = 4·0.25 = 1
    #   sample std (n − 1 = 3, TRL's nanstd / torch.std): sqrt(1/3) = 0.577350 → A = ±0.5/(0.577350 + 1e-4) = ±0.865876
    #   population std (n = 4) would be 0.5                                     → A = ±0.5/0.5001 = ±0.999800
    # group [2, 2, 2, 2]: std 0 → A = 0/(0 + 1e-4) = 0 (no signal, finite)
    adv = group_relative(_t([[1.0, 0.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0]]))
    assert adv[0].tolist() == pytest.approx([0.865876, -0.865876, 0.865876, -0.865876], abs=1e-5)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert torch.equal(adv, group_relative(_t([[1.0, 0.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0]]), scale="group"))


def test_group_relative_none_and_batch_scales():
    rows = [[1.0, 0.0, 1.0, 0.0], [3.0, 1.0, 1.0, 1.0]]
    # none (Dr. GRPO): r − group mean. group 0 mean 0.5 → ±0.5; group 1 mean 6/4 = 1.5 → [1.5, −0.5, −0.5, −0.5]
    assert group_relative(_t(rows), scale="none").tolist() == [[0.5, -0.5, 0.5, -0.5], [1.5, -0.5, -0.5, -0.5]]
    # batch: group means, ONE std over all 8: mean 8/8 = 1; Σ(r − 1)² = 0+1+0+1 + 4+0+0+0 = 6;
    #   sample std sqrt(6/7) = 0.925820 → A = (r − group mean)/(0.925820 + 1e-4) = 0.5/0.925920 = 0.540004,
    #   1.5/0.925920 = 1.620011
    got = group_relative(_t(rows), scale="batch")
    assert got[0].tolist() == pytest.approx([0.540004, -0.540004, 0.540004, -0.540004], abs=1e-5)
    assert got[1].tolist() == pytest.approx([1.620011, -0.540004, -0.540004, -0.540004], abs=1e-5)


def test_group_relative_missing_scores_are_masked_out_and_get_zero():
    # [1, NaN, 0, 1]: scored [1, 0, 1], mean 2/3; Σ(r − 2/3)² = 1/9 + 4/9 + 1/9 = 2/3; sample std sqrt((2/3)/2) = 0.577350
    #   A = (1 − 2/3)/0.577450 = 0.577250, (0 − 2/3)/0.577450 = −1.154500; the NaN completion: 0
    adv = group_relative(_t([[1.0, NAN, 0.0, 1.0]]))
    assert adv[0].tolist() == pytest.approx([0.577250, 0.0, -1.154500, 0.577250], abs=1e-5)
    # the same through a mask (the masked value 123 is ignored, not averaged in)
    masked = group_relative(_t([[1.0, 123.0, 0.0, 1.0]]), mask=torch.tensor([[True, False, True, True]]))
    assert torch.allclose(masked, adv)
    # a group with a single scored completion: no sample std, advantage 0; an all-missing group: 0, no NaN
    lone = group_relative(_t([[NAN, 5.0, NAN], [NAN, NAN, NAN]]))
    assert lone.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_relative_matches_naive_twin(scale):
    rows = _random_rewards(6, 5, seed=1)
    expected = naive_group_relative(rows, scale)
    assert group_relative(_t(rows), scale=scale).tolist() == [pytest.approx(r, abs=1e-5) for r in expected]


def test_group_relative_rejects_bad_input():
    with pytest.raises(ValueError, match="scale"):
        group_relative(_t([[1.0, 0.0]]), scale="global")
    with pytest.raises(ValueError, match=r"\(P, G\)"):
        group_relative(torch.zeros(4))


# --- rloo ------------------------------------------------------------------------------------------------


def test_rloo_hand_computed():
    # [1, 0, 0, 1]: A_0 = 1 − (0+0+1)/3 = 2/3; A_1 = 0 − (1+0+1)/3 = −2/3 (= 4/3·(r − 0.5))
    # [4, NaN, 1]: scored k = 2: A_0 = 4 − 1 = 3; A_2 = 1 − 4 = −3; the NaN one 0
    adv = rloo(_t([[1.0, 0.0, 0.0, 1.0], [4.0, NAN, 1.0, NAN]]))
    assert adv[0].tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3], abs=1e-6)
    assert adv[1].tolist() == pytest.approx([3.0, 0.0, -3.0, 0.0], abs=1e-6)


def test_rloo_matches_naive_twin_and_needs_two_completions():
    rows = _random_rewards(7, 4, seed=2)
    assert rloo(_t(rows)).tolist() == [pytest.approx(r, abs=1e-5) for r in naive_rloo(rows)]
    with pytest.raises(ValueError, match="G ≥ 2"):
        rloo(_t([[1.0], [0.0]]))


# --- whiten ----------------------------------------------------------------------------------------------


def test_whiten_hand_computed_population_std_like_the_seed():
    # [1, 2, 3, 4]: mean 2.5; population var (1.5² + 0.5² + 0.5² + 1.5²)/4 = 5/4 → std 1.118034
    #   → (x − 2.5)/1.118034 = [−1.341641, −0.447214, 0.447214, 1.341641]
    x = _t([1.0, 2.0, 3.0, 4.0])
    assert whiten(x).tolist() == pytest.approx([-1.341641, -0.447214, 0.447214, 1.341641], abs=1e-5)
    assert whiten(x).tolist() == pytest.approx(normalize_advantages([1.0, 2.0, 3.0, 4.0]), abs=1e-6)
    # shift_mean=False keeps the mean: + 2.5
    assert whiten(x, shift_mean=False).tolist() == pytest.approx([1.158359, 2.052786, 2.947214, 3.841641], abs=1e-5)


def test_whiten_masked_is_global_and_matches_the_seed_on_the_unmasked_entries():
    torch.manual_seed(0)
    values = torch.randn(5, 7)
    lengths = [7, 3, 1, 5, 6]
    mask = torch.tensor([[t < n for t in range(7)] for n in lengths])
    flat = [values[i, t].item() for i in range(5) for t in range(7) if mask[i, t]]
    got = whiten(values, mask)
    assert got[mask].tolist() == pytest.approx(normalize_advantages(flat), abs=1e-5)  # row-major, like flat
    assert got[~mask].abs().sum() == 0
    # masked garbage does not move the statistics
    noisy = values.masked_fill(~mask, 1e6)
    assert torch.allclose(whiten(noisy, mask), got)
    assert whiten(values, torch.zeros_like(mask)).abs().sum() == 0


# --- combine_rewards ---------------------------------------------------------------------------------------


def test_combine_rewards_weighted_nansum_like_trl():
    f1 = [[1.0, None, 0.0], [None, None, 2.0]]
    f2 = [[0.5, 1.0, None], [None, 3.0, 1.0]]
    # weights (2, 0.5): (0,0) 2·1 + 0.5·0.5 = 2.25; (0,1) f1 None → 0.5·1 = 0.5; (0,2) 2·0 = 0
    #                   (1,0) both None → NaN (unscorable); (1,1) 0.5·3 = 1.5; (1,2) 2·2 + 0.5·1 = 4.5
    got = combine_rewards([f1, f2], weights=[2.0, 0.5])
    assert got[0].tolist() == [2.25, 0.5, 0.0]
    assert math.isnan(got[1, 0].item()) and got[1, 1:].tolist() == [1.5, 4.5]
    # the same from an (F, P, G) tensor, default weights 1: (0,0) 1.5, (1,2) 3.0
    stacked = torch.tensor([[[1.0, NAN, 0.0], [NAN, NAN, 2.0]], [[0.5, 1.0, NAN], [NAN, 3.0, 1.0]]])
    ones = combine_rewards(stacked)
    assert ones[0].tolist() == [1.5, 1.0, 0.0] and ones[1, 2].item() == 3.0
    # sum then normalize: the unscorable completion is masked out of its group and gets advantage 0
    adv = group_relative(got)
    assert adv[1, 0].item() == 0.0 and adv[1, 1].item() == pytest.approx(-(adv[1, 2].item()), abs=1e-6)


def test_combine_rewards_rejects_mismatches():
    with pytest.raises(ValueError, match="one weight per function"):
        combine_rewards([[[1.0]], [[2.0]]], weights=[1.0])
    with pytest.raises(ValueError, match="same"):
        combine_rewards([[[1.0, 2.0]], [[2.0]]])


# --- gae -------------------------------------------------------------------------------------------------


def test_gae_three_steps_by_hand():
    # γ = 0.9, λ = 0.5 (γλ = 0.45). Row 0: r = [0, 0, 1], V = [0.5, 0.6, 0.7], V after the last token = 0
    #   δ_2 = 1 + 0.9·0   − 0.7 = 0.3
    #   δ_1 = 0 + 0.9·0.7 − 0.6 = 0.03
    #   δ_0 = 0 + 0.9·0.6 − 0.5 = 0.04
    #   A_2 = 0.3;  A_1 = 0.03 + 0.45·0.3 = 0.165;  A_0 = 0.04 + 0.45·0.165 = 0.11425
    #   returns A + V = [0.61425, 0.765, 1.0]
    # Row 1, two real tokens (the third is padding: its 9 and 5 are ignored): r = [0.2, 1.0], V = [0.1, 0.4]
    #   δ_1 = 1.0 − 0.4 = 0.6;  δ_0 = 0.2 + 0.9·0.4 − 0.1 = 0.46;  A = [0.46 + 0.45·0.6, 0.6] = [0.73, 0.6]
    #   returns [0.83, 1.0, 0]
    rewards = _t([[0.0, 0.0, 1.0], [0.2, 1.0, 9.0]])
    values = _t([[0.5, 0.6, 0.7], [0.1, 0.4, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    assert adv.tolist() == [pytest.approx([0.11425, 0.165, 0.3], abs=1e-6), pytest.approx([0.73, 0.6, 0.0], abs=1e-6)]
    assert ret.tolist() == [pytest.approx([0.61425, 0.765, 1.0], abs=1e-6), pytest.approx([0.83, 1.0, 0.0], abs=1e-6)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0)])
def test_gae_matches_naive_loop_on_ragged_masks(gamma, lam):
    torch.manual_seed(3)
    b, t_len = 6, 9
    rewards, values = torch.randn(b, t_len), torch.randn(b, t_len)
    lengths = [9, 1, 4, 0, 7, 2]
    mask = torch.tensor([[int(t < n) for t in range(t_len)] for n in lengths])
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    n_adv, n_ret = naive_gae(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    assert adv.tolist() == [pytest.approx(r, abs=1e-5) for r in n_adv]
    assert ret.tolist() == [pytest.approx(r, abs=1e-5) for r in n_ret]


def test_gae_rejects_left_padding():
    with pytest.raises(ValueError, match="right-padded"):
        gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([[1, 1, 1], [0, 1, 1]]), gamma=1.0, lam=1.0)
