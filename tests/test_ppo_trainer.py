"""PPO through the trainer: the critic, the rollout source (GAE, whitening, epochs x minibatches, KL early stop)
and the loss on the spec contract, on tiny random models with simple reward functions (tests/ppo_rewards.py).

The pure math (gae, whiten, the clipped losses, kl_penalty_rewards, the adaptive controller) is tested by hand in
tests/test_advantages.py and tests/losses/test_ppo.py; the engine's values and entropies in test_ppo_engine.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import preftune
from preftune import advantages as adv
from preftune.config import LossConfig, to_config
from preftune.data.batch import PPOBatch, padded
from preftune.data.layouts import LAYOUTS
from preftune.data.tokenize import Tokenization, TokenizedGroup
from preftune.errors import ConfigError
from preftune.logprobs import LogpModel, ValueHead, decoder_of, hidden_size_of
from preftune.losses.ppo import kl_penalty_rewards
from preftune.models import load_reward_model
from preftune.trainer.sanity import check_hyperparameters
from preftune.trainer.steps import Objective, ppo_step

pytestmark = pytest.mark.usefixtures("one_thread")

REWARDS = str(Path(__file__).parent / "ppo_rewards.py")
MAX_LENGTH = 48


@pytest.fixture(scope="module")
def prompts():
    from preftune import toy

    train, held = toy.split_items(0, 64, 8)
    return [{"prompt": it.prompt} for it in train], [{"prompt": it.prompt} for it in held]


@pytest.fixture
def ppo_config(toy_tok, tmp_path, prompts):
    """Factory: a PPO config for ``preftune.train``; keyword sections are merged into the defaults."""

    def make(model, *, loss=None, rollout=None, training=None, reward="words", **sections) -> dict:
        cfg = {
            "model": model, "tokenizer": toy_tok,
            "data": {"train": prompts[0]},
            "loss": {"name": "ppo", "kl_coef": 0.05, **(loss or {})},
            "rollout": {"num_generations": 2, "max_new_tokens": 6, "ppo_epochs": 2, "minibatches": 2,
                        **(rollout or {})},
            "reward": reward if isinstance(reward, dict) else {"functions": [f"{REWARDS}:{reward}"]},
            "training": {"output_dir": str(tmp_path / "run"), "learning_rate": 1e-2, "per_device_batch_size": 2,
                         "max_steps": 4, "max_length": MAX_LENGTH, "progress_bar": False, "save_model": False,
                         **(training or {})},
        }
        for key, value in sections.items():
            cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
        return cfg

    return make


def train_records(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def checkpoint_state(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").read_text())


# ---- the policy gradient -----------------------------------------------------------------------------------


def test_constant_reward_gives_zero_policy_gradient(ppo_config, make_model, tmp_path):
    # γ = λ = 1, no KL penalty, and a critic that starts at V ≡ 0: every token's advantage is the return, 1.0,
    # so whitening over the rollout gives exactly 0 and the clipped surrogate's gradient is exactly 0. One
    # rollout (2 epochs x 2 minibatches = 4 steps) leaves the policy bitwise where it was while the separate
    # critic learns the constant.
    model = make_model(seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = ppo_config(model, reward="constant", loss={"kl_coef": 0.0},
                     rollout={"gamma": 1.0, "gae_lambda": 1.0, "critic": "policy"},
                     training={"save_every": 2})
    preftune.train(cfg, log=lambda *_: None)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    records = train_records(tmp_path / "run")
    assert len(records) == 4 and all(r["loss/policy"] == 0.0 for r in records)
    assert records[0]["ppo/advantages_std"] == 0.0 and records[0]["ppo/returns_mean"] == 1.0
    critic = torch.load(tmp_path / "run" / "checkpoints" / "step-00000002" / "trainable.pt")
    assert critic["critic.head.weight"].abs().sum() > 0  # the value head moved toward the return
    assert records[-1]["value/error"] < records[0]["value/error"]

    # Control: a reward that varies between samples moves the policy.
    model = make_model(seed=0)
    preftune.train(ppo_config(model, training={"output_dir": str(tmp_path / "varied")}), log=lambda *_: None)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def _clip_batch(model, head):
    """A micro-batch of 3 prompts x 2 completions whose π_old and V_old are shifted from the current model's."""
    groups = [TokenizedGroup([2, 11, 9], [[12, 13, 14], [16, 17]]), TokenizedGroup([2, 20], [[21, 22], [24]]),
              TokenizedGroup([2, 30, 31], [[34, 35, 36, 37], [38]])]
    seqs = LAYOUTS["packed"](groups, 0)
    S, ts = seqs.num_sequences, seqs.target_seq
    engine = LogpModel(model, chunk_size=4, critic=head)
    with torch.no_grad():
        tok, _, values = engine(*seqs.model_args(), per_token=True, values=True)
    logps, vals = padded(tok, ts, S), padded(values, ts, S)  # (S, T)
    mask = padded(torch.ones_like(tok), ts, S)
    g = torch.Generator().manual_seed(0)
    # log π − log π_old ∈ {−0.5, 0, +0.5}: ratios 0.61 and 1.65 fall outside 1 ± 0.2, 1 inside
    shift = (torch.randint(0, 3, logps.shape, generator=g) - 1).float() * 0.5
    advantages = torch.randn(logps.shape, generator=g)
    v_shift = (torch.randint(0, 2, vals.shape, generator=g) * 2 - 1).float() * 0.5  # V − V_old = ±0.5 > c
    returns = vals + torch.randn(vals.shape, generator=g)
    batch = PPOBatch(seqs, old_logps=(logps - shift) * mask, old_values=(vals - v_shift) * mask,
                     advantages=advantages * mask, returns=returns * mask, mask=mask, seq_mask=torch.ones(S),
                     step_sequences=float(S), step_tokens=float(mask.sum()))
    return engine, batch


def test_ratio_and_value_clipping_bound_the_update_through_the_step(make_model):
    model = make_model(seed=1).float()
    head = ValueHead(hidden_size_of(model))
    with torch.no_grad():
        head.linear.weight.normal_(generator=torch.Generator().manual_seed(3))
    engine, batch = _clip_batch(model, head)
    objective = Objective.from_config(LossConfig(name="ppo", params={"clip_ratio": 0.2, "value_clip": 0.2,
                                                                     "vf_coef": 0.5, "kl_coef": 0.0}))
    losses, metrics = ppo_step(objective, lambda b: engine(*b.model_args(), **b.model_kwargs()), batch, None)
    batch.reduce(losses, 1).backward()
    got = {n: p.grad.clone() for n, p in [*model.named_parameters(), *head.named_parameters()]}
    model.zero_grad(), head.zero_grad()

    # The formulas with the clipped tokens taken out by hand: a token whose ratio left 1 ± ε in the direction
    # its advantage pushes contributes a constant (no gradient); a value whose clipped error is the larger one
    # likewise. What remains: −ρ·A / N and vf_coef · ½(V − R)² / N.
    tok, _, values = engine(*batch.model_args(), per_token=True, values=True)
    S, ts, m = batch.seqs.num_sequences, batch.seqs.target_seq, batch.mask.bool()
    logps, vals = padded(tok, ts, S), padded(values, ts, S)
    ratio = torch.exp(logps - batch.old_logps)
    A = batch.advantages
    clipped = ((ratio > 1.2) & (A > 0)) | ((ratio < 0.8) & (A < 0))
    v_clip = torch.maximum(torch.minimum(vals, batch.old_values + 0.2), batch.old_values - 0.2)
    value_clipped = (v_clip - batch.returns) ** 2 > (vals - batch.returns) ** 2
    assert clipped[m].any() and (~clipped)[m].any() and value_clipped[m].any() and (~value_clipped)[m].any()
    N = batch.step_tokens
    policy_term = (-(ratio * A))[m & ~clipped].sum() / N
    value_term = 0.5 * 0.5 * ((vals - batch.returns) ** 2)[m & ~value_clipped].sum() / N
    (policy_term + value_term).backward()
    for n, p in [*model.named_parameters(), *head.named_parameters()]:
        torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)
    # and the clip fractions the step logs count those tokens (per-sequence means)
    per_seq = (clipped & m).float().sum(1) / m.float().sum(1)
    torch.testing.assert_close(metrics["policy/clip_frac"], per_seq)


# ---- the rollout source ------------------------------------------------------------------------------------


def _naive(model, decoder, head, prompt, completion, temperature):
    """Per-token log-probs at the temperature and values of one sequence, full logits, no packing."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / temperature
        logp = logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        values = None
        if decoder is not None:
            values = head(decoder(input_ids=ids).last_hidden_state[0, len(prompt) - 1 : -1]).squeeze(-1)
    return logp, values


def test_gae_through_the_source_matches_advantages_gae(ppo_config, make_model, toy_tok, tmp_path, prompts):
    # The rollout of step 1 (sampled by the initial policy, kept in the step-1 checkpoint) recomputed from
    # scratch: π_old from the initial policy, π_ref from a separate reference model, V_old from a critic started
    # from a reward model, the missing-EOS penalty on the scores, then kl_penalty_rewards -> gae -> whiten.
    make_model(seed=0).save_pretrained(tmp_path / "policy")
    make_model(seed=7).save_pretrained(tmp_path / "ref")
    rm = load_reward_model(make_model(seed=5), toy_tok)
    with torch.no_grad():
        rm.score.weight.normal_(generator=torch.Generator().manual_seed(1))  # values clearly away from 0
    rm.save_pretrained(tmp_path / "rm")
    T, kl, gamma, lam = 0.9, 0.1, 0.95, 0.9
    cfg = ppo_config(str(tmp_path / "policy"), loss={"kl_coef": kl},
                     rollout={"critic": str(tmp_path / "rm"), "temperature": T, "gamma": gamma, "gae_lambda": lam,
                              "max_new_tokens": 4},
                     reward={"functions": [f"{REWARDS}:words"], "missing_eos_penalty": 0.5},
                     reference={"model": str(tmp_path / "ref")}, training={"max_steps": 2, "save_every": 1})
    preftune.train(cfg, log=lambda *_: None)
    r = checkpoint_state(tmp_path / "run", 1)["source"]["rollout"]

    policy = preftune.models.load_causal_lm(str(tmp_path / "policy"))
    reference = preftune.models.load_causal_lm(str(tmp_path / "ref"))
    critic = load_reward_model(str(tmp_path / "rm"), toy_tok)
    tokenization = Tokenization(toy_tok, max_length=MAX_LENGTH)
    flat = [(u, k) for u in range(len(r["indices"])) for k in range(2)]
    width = max(len(r["completions"][u][k]) for u, k in flat)
    grid = {key: torch.zeros(len(flat), width) for key in ("old", "ref", "values", "mask")}
    scores = torch.zeros(len(flat))
    truncated = 0
    for s, (u, k) in enumerate(flat):
        prompt_ids = tokenization.prompt_ids(prompts[0][r["indices"][u]]["prompt"])
        completion = r["completions"][u][k]
        n = len(completion)
        grid["old"][s, :n], grid["values"][s, :n] = _naive(policy, decoder_of(critic), critic.score, prompt_ids,
                                                           completion, T)
        grid["ref"][s, :n] = _naive(reference, None, None, prompt_ids, completion, T)[0]
        grid["mask"][s, :n] = 1.0
        ended = completion[-1] == toy_tok.eos_token_id
        text = toy_tok.decode([t for t in completion if t != toy_tok.eos_token_id], skip_special_tokens=True)
        scores[s] = 0.1 * len(text.split()) - (0.0 if ended else 0.5)  # words, minus the missing-EOS penalty
        truncated += not ended
        torch.testing.assert_close(torch.tensor(r["old_logps"][u][k]), grid["old"][s, :n], atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(r["old_values"][u][k]), grid["values"][s, :n], atol=1e-5, rtol=0)
    assert truncated > 0  # the penalty was exercised
    torch.testing.assert_close(torch.tensor(r["scores"]).reshape(-1), scores, atol=1e-6, rtol=0)

    rewards = kl_penalty_rewards(scores, grid["old"], grid["ref"], grid["mask"], kl_coef=kl)
    advantages, returns = adv.gae(rewards, grid["values"], grid["mask"], gamma=gamma, lam=lam)
    whitened = adv.whiten(advantages, grid["mask"])
    for s, (u, k) in enumerate(flat):
        n = len(r["completions"][u][k])
        torch.testing.assert_close(torch.tensor(r["returns"][u][k]), returns[s, :n], atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(r["advantages"][u][k]), whitened[s, :n], atol=1e-5, rtol=0)
    m = grid["mask"].bool()
    stats = r["stats"]  # logged before whitening, with the KL to the reference per sequence
    assert stats["ppo/advantages_mean"] == pytest.approx(advantages[m].mean().item(), abs=1e-5)
    assert stats["ppo/advantages_std"] == pytest.approx(advantages[m].std(unbiased=False).item(), abs=1e-5)
    kl_seq = ((grid["old"] - grid["ref"]) * grid["mask"]).sum(1)
    assert stats["ppo/kl_ref"] == pytest.approx(kl_seq.mean().item(), abs=1e-5)
    ev = 1 - (returns - grid["values"])[m].var(unbiased=False) / returns[m].var(unbiased=False)
    assert stats["ppo/explained_variance"] == pytest.approx(ev.item(), abs=1e-4)
    share = (kl * kl_seq.abs()).sum() / ((kl * kl_seq.abs()).sum() + scores.abs().sum())
    assert stats["ppo/kl_penalty_share"] == pytest.approx(share.item(), abs=1e-5)


def test_epochs_times_minibatches_steps_per_rollout(ppo_config, make_model, tmp_path):
    # 2 epochs x 3 minibatches: each rollout (3 minibatches x 2 prompts = 6 prompts, 2 samples each) serves 6
    # optimizer steps; the second rollout is sampled at step 7.
    cfg = ppo_config(make_model(seed=0), rollout={"ppo_epochs": 2, "minibatches": 3}, training={"max_steps": 12})
    summary = preftune.train(cfg, log=lambda *_: None)
    assert summary["steps"] == 12
    records = train_records(tmp_path / "run")
    assert [r["ppo/rollout"] for r in records] == [0.0] * 6 + [1.0] * 6
    assert [r["ppo/epoch"] for r in records] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0] * 2
    assert [r["time/generate_s"] > 0 for r in records] == [True] + [False] * 5 + [True] + [False] * 5
    assert records[0]["policy/ratio_mean"] == 1.0 and records[0]["policy/approx_kl_k3"] == 0.0  # π = π_old exactly
    assert records[6]["ppo/previous_rollout_steps"] == 6.0


def test_each_epoch_serves_every_sample_once_in_shuffled_minibatches(ppo_config, make_model):
    from preftune.trainer.build import build_run

    cfg = to_config(ppo_config(make_model(seed=0), rollout={"ppo_epochs": 3, "minibatches": 2},
                               training={"gradient_accumulation_steps": 2, "max_steps": 6}))
    run = build_run(cfg, None, lambda *_: None)
    source = run.source
    epochs = []
    for step in range(6):
        batches = list(source.micro_batches(step))
        assert len(batches) == 2  # the accumulation micro-batches of one minibatch step
        tokens = sum(float(b.mask.sum()) for b in batches)
        assert all(b.step_tokens == tokens for b in batches)  # the step-global normalizer
        seen = []
        for b in batches:
            for s in range(b.seqs.num_sequences):
                seen.append(tuple(b.seqs.target_ids[b.seqs.target_seq == s].tolist()))
        if step % 2 == 0:
            epochs.append([])
        epochs[-1].append(seen)
    rollout = sorted(tuple(c) for g in source._rollout["completions"] for c in g)
    assert source._rollout["start"] == 0  # one rollout for the 3 x 2 steps
    for minibatches in epochs:
        assert sorted(s for mb in minibatches for s in mb) == rollout  # every sample once per epoch
    assert [mb for mb in epochs[0]] != [mb for mb in epochs[1]]  # reshuffled between epochs


def test_kl_early_stop_ends_the_epochs_of_a_rollout(ppo_config, make_model, tmp_path):
    # The first step of a rollout has ratio 1 (KL 0); the second has moved, so a bound of 1e-9 stops every
    # rollout after 2 of its 3 epochs' steps.
    cfg = ppo_config(make_model(seed=0), rollout={"ppo_epochs": 3, "minibatches": 1, "early_stop_kl": 1e-9},
                     training={"max_steps": 6})
    preftune.train(cfg, log=lambda *_: None)
    records = train_records(tmp_path / "run")
    assert [r["ppo/rollout"] for r in records] == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]
    assert records[2]["ppo/previous_rollout_steps"] == 2.0
    assert all(r["policy/approx_kl_k3"] > 1e-9 for r in records[1::2])
    cfg = ppo_config(make_model(seed=0), rollout={"ppo_epochs": 3, "minibatches": 1},
                     training={"max_steps": 6, "output_dir": str(tmp_path / "no_stop")})
    preftune.train(cfg, log=lambda *_: None)
    assert [r["ppo/rollout"] for r in train_records(tmp_path / "no_stop")] == [0.0] * 3 + [1.0] * 3


def test_metrics_warnings_and_adaptive_kl(ppo_config, make_model, tmp_path, quiet_log):
    cfg = ppo_config(make_model(seed=0), loss={"kl_coef": 0.5, "clip_ratio": 0.5, "target_kl": 0.01},
                     rollout={"whiten_advantages": False, "ppo_epochs": 1, "minibatches": 1},
                     training={"max_steps": 3, "save_every": 2})
    preftune.train(cfg, log=quiet_log)
    warnings = [line for line in quiet_log if line.startswith("warning:")]
    assert any("loss.clip_ratio = 0.5 is outside the usual range for ppo (0.1-0.3)" in w for w in warnings)
    assert any("loss.kl_coef = 0.5 is outside the usual range for ppo (0.01-0.2)" in w for w in warnings)
    assert any("rollout.whiten_advantages = false" in w for w in warnings)
    records = train_records(tmp_path / "run")
    for key in ("policy/approx_kl_k1", "policy/approx_kl_k3", "policy/clip_frac", "loss/value", "loss/policy",
                "value/error", "value/clip_frac", "entropy", "ppo/explained_variance", "ppo/returns_mean",
                "ppo/advantages_mean", "ppo/advantages_std", "reward/mean", "ppo/kl_penalty_share", "ppo/kl_ref",
                "ppo/kl_coef", "grad_norm"):
        assert key in records[-1], key
    betas = [r["ppo/kl_coef"] for r in records]
    assert betas[0] == 0.5 and betas[1] != betas[0]  # the controller moved β after the first rollout
    state = checkpoint_state(tmp_path / "run", 2)["source"]["kl"]
    assert state["target"] == 0.01 and state["value"] == pytest.approx(betas[2])


def test_config_checks():
    base = {"model": "m", "training": {"output_dir": "x", "learning_rate": 1e-5},
            "reward": {"functions": ["a.py:f"]}}
    with pytest.raises(ConfigError, match="add a `rollout:` section"):
        to_config({**base, "loss": {"name": "ppo"}})
    with pytest.raises(ConfigError, match="rollout.num_iterations: 2 is a GRPO option; ppo ignores it"):
        to_config({**base, "loss": {"name": "ppo"}, "rollout": {"num_iterations": 2}})
    with pytest.raises(ConfigError, match="rollout.ppo_epochs: 2 is a PPO option; grpo ignores it"):
        to_config({**base, "loss": {"name": "grpo"}, "rollout": {"ppo_epochs": 2}})
    with pytest.raises(ConfigError, match="loss.target_kl: the adaptive KL coefficient multiplies loss.kl_coef"):
        to_config({**base, "loss": {"name": "ppo", "kl_coef": 0, "target_kl": 6}, "rollout": {}})
    with pytest.raises(ConfigError, match="clip_ratio"):
        to_config({**base, "loss": {"name": "ppo", "clip_ratio": 1.5}, "rollout": {}})
    ok = to_config({**base, "loss": {"name": "ppo"}, "rollout": {"num_generations": 1}})
    assert check_hyperparameters(ok) == []  # the defaults are the usual values


# ---- LoRA, the monitor --------------------------------------------------------------------------------------


def test_lora_reference_is_the_base_and_the_value_head_trains_in_full(ppo_config, make_model, tmp_path):
    cfg = ppo_config(make_model(seed=0), lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                     rollout={"ppo_epochs": 1, "minibatches": 1}, training={"max_steps": 3, "save_every": 2})
    preftune.train(cfg, log=lambda *_: None)
    records = train_records(tmp_path / "run")
    # The adapter starts at zero: the adapter-disabled base IS the first rollout's policy, KL exactly 0.
    assert records[0]["ppo/kl_ref"] == 0.0 and records[2]["ppo/kl_ref"] != 0.0
    weights = torch.load(tmp_path / "run" / "checkpoints" / "step-00000002" / "trainable.pt")
    assert {"critic.linear.weight", "critic.linear.bias"} <= set(weights)
    assert weights["critic.linear.weight"].abs().sum() > 0
    policy = [n for n in weights if n.startswith("policy.")]
    assert policy and all("lora_" in n for n in policy)  # only the adapter of the policy trains


def test_monitor_max_kl_stops_the_run(ppo_config, make_model, tmp_path, prompts):
    cfg = ppo_config(make_model(seed=0), data={"train": prompts[0], "eval": prompts[1]},
                     training={"max_steps": 8, "eval_every": 2, "learning_rate": 5e-2},
                     monitor={"num_prompts": 4, "max_kl": 1e-6})
    summary = preftune.train(cfg, log=lambda *_: None)
    assert summary["stopped"] and summary["stopped"].startswith("max_kl")
    assert summary["steps"] < 8


# ---- exact resume -------------------------------------------------------------------------------------------

SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
import preftune
model_dir, out, resume, rewards = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
prompts = [{"prompt": f"repeat : {w} {v} {u}"} for w in ("red", "cat", "plum", "owl") for v in ("dog", "bee")
           for u in ("gold", "pear")]
preftune.train({
    "model": model_dir, "data": {"train": prompts},
    "loss": {"name": "ppo", "kl_coef": 0.05, "target_kl": 0.5},
    "rollout": {"num_generations": 2, "max_new_tokens": 6, "ppo_epochs": 2, "minibatches": 2},
    "reward": {"functions": [rewards + ":words"]},
    "training": {"output_dir": out, "learning_rate": 1e-2, "max_steps": 6, "save_every": 1,
                 "per_device_batch_size": 2, "max_length": 48, "progress_bar": False, "save_total_limit": 2},
}, resume=True if resume else None, log=lambda *a: print(*a, flush=True))
"""


def _start(python, script, model_dir, out, resume=False):
    return subprocess.Popen([python, str(script), str(model_dir), str(out), "1" if resume else "0", REWARDS],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_mid_rollout_then_resume_equals_uninterrupted(tmp_path, python, saved_model_dir):
    from safetensors.torch import load_file

    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    killed, full = tmp_path / "killed", tmp_path / "full"
    uninterrupted = _start(python, script, saved_model_dir, full)
    victim = _start(python, script, saved_model_dir, killed)
    target = killed / "checkpoints" / "step-00000003"  # inside the first rollout (steps 1-4)
    deadline = time.monotonic() + 240
    while not target.exists():
        if victim.poll() is not None:
            pytest.fail(f"the run ended before its step-3 checkpoint:\n{victim.stdout.read()}")
        assert time.monotonic() < deadline, "no step-3 checkpoint within 240 s"
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    victim.stdout.close()
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    state = json.loads((target / "trainer_state.json").read_text())
    assert state["source"]["rollout"]["start"] == 0 and state["source"]["kl"]["value"] != 0.05

    resumed = _start(python, script, saved_model_dir, killed, resume=True)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    out, _ = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, out
    a, b = load_file(killed / "final" / "model.safetensors"), load_file(full / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    losses = [(r["step"], r["loss"]) for r in train_records(killed)]
    assert [s for s, _ in losses] == list(range(1, 7))
    assert losses == [(r["step"], r["loss"]) for r in train_records(full)]


def test_critic_choices_and_its_learning_rate(ppo_config, make_model, tmp_path):
    from preftune.trainer.build import build_run

    cfg = to_config(ppo_config(make_model(seed=0), rollout={"critic": "policy", "critic_learning_rate": 3e-2},
                               training={"learning_rate": 1e-3}))
    run = build_run(cfg, None, lambda *_: None)
    critic = {id(p) for p in run.source.critic.parameters()}
    rates = {(id(p) in critic, g["lr"]) for g in run.optimizer.param_groups for p in g["params"]}
    assert rates == {(False, 1e-3), (True, 3e-2)}  # the policy at its rate, the critic at its own
    assert {n.split(".")[0] for n, _ in run.trainable.named_parameters()} == {"policy", "critic"}
    with pytest.raises(ConfigError, match="rollout.critic 'no/such/reward-model'"):
        build_run(to_config(ppo_config(make_model(seed=0), rollout={"critic": "no/such/reward-model"},
                                       training={"output_dir": str(tmp_path / "bad")})), None, lambda *_: None)


def test_dropout_is_off_in_rollout_and_training_passes(ppo_config, make_model, tmp_path):
    model = make_model(seed=0)
    model.model.layers[0].mlp.add_module("drop", torch.nn.Dropout(0.5))  # an nn.Dropout (never called here)
    for m in model.modules():  # transformers' attention applies this rate functionally, in train mode
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    cfg = ppo_config(model, rollout={"ppo_epochs": 1, "minibatches": 1}, training={"max_steps": 1})
    preftune.train(cfg, log=lambda *_: None)
    assert model.model.layers[0].mlp.drop.p == 0.0
    assert all(m.attention_dropout == 0.0 for m in model.modules() if hasattr(m, "attention_dropout"))
    first = train_records(tmp_path / "run")[0]
    assert first["policy/ratio_mean"] == 1.0 and first["policy/approx_kl_k1"] == 0.0  # deterministic passes
