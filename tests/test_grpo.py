"""GRPO through the trainer: the global normalizer end to end, REINFORCE at ρ = 1, μ > 1 reuse and resume,
temperature-matched log-probs, the rollout options (masked truncation, missing-EOS and soft overlong
penalties, dynamic sampling), no-signal steps, the reference only at β > 0, the metrics, and bad input.

Most runs use a random tiny model (its samples are distinct garbage of many lengths, ideal for controlled
rewards) and the deterministic reward functions of ``tests/grpo_rewards.py``; the runs that must learn start
from an SFT toy model. Plots are skipped (they cost seconds per run); the report test draws them itself.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import preftune
from preftune import toy
from preftune.config import to_config
from preftune.data.batch import GroupBatch, padded
from preftune.data.layouts import LAYOUTS
from preftune.data.tokenize import TokenizedGroup
from preftune.errors import ConfigError, PreftuneError
from preftune.generation import SamplingParams, generate
from preftune.logprobs import LogpModel, token_logps
from preftune.rewards import soft_overlong_penalty
from preftune.runlog import read_metrics
from preftune.trainer.build import build_run
from preftune.trainer.steps import Objective, policy_step

pytestmark = pytest.mark.usefixtures("one_thread")

REWARDS = Path(__file__).with_name("grpo_rewards.py")
AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    monkeypatch.setattr("preftune.trainer.loop._plots", lambda run_dir, say: None)


def prompt_rows(n: int) -> list[dict]:
    return [{"prompt": it.prompt} for it in toy.split_items(0, n, 0)[0]]


@pytest.fixture
def grpo(toy_tok, tmp_path):
    """Factory: a GRPO config dict; ``fn`` names reward functions of ``grpo_rewards.py``; sections merge in."""

    def make(model, train, *, fn=("varied",), loss=None, rollout=None, reward=None, training=None, **sections):
        cfg = {
            "model": model, "tokenizer": toy_tok, "data": {"train": train},
            "loss": {"name": "grpo", **(loss or {})},
            "rollout": {"num_generations": 4, "max_new_tokens": 6, **(rollout or {})},
            "reward": {"functions": [f"{REWARDS}:{f}" for f in fn], **(reward or {})},
            "training": {"output_dir": str(tmp_path / "run"), "learning_rate": 1e-3, "per_device_batch_size": 4,
                         "max_steps": 1, "max_length": 64, "progress_bar": False, "save_model": False,
                         **(training or {})},
        }
        for key, value in sections.items():
            cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
        return cfg

    return make


def records(run_dir: Path, split: str = "train") -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["split"] == split]


def spy_on_gradients(monkeypatch) -> list[list[torch.Tensor]]:
    """Every optimizer step's gradients, read where the loop clips them (as the accumulation test does)."""
    real_clip = torch.nn.utils.clip_grad_norm_
    grads: list[list[torch.Tensor]] = []

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        grads.append([p.grad.detach().clone() for p in params])
        return real_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    return grads


def built(cfg):
    """A built run (its source, model and parts) without running any step."""
    return build_run(to_config(cfg), None, lambda *_: None)


# ---- the normalizer is global --------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_gradient_is_the_same_for_any_split_of_the_step(grpo, make_model, monkeypatch, tmp_path, aggregation):
    # One step of 4 prompts x 4 samples: per_device 4 x accumulation 1, 2 x 2 and 1 x 4. The rollout is the same
    # (one generation call per step, seeded per prompt position), the completions have different lengths, so a
    # per-micro-batch normalizer (TRL's for grpo / bnpo / dr_grpo) would give three different gradients.
    grads = spy_on_gradients(monkeypatch)
    lengths = []
    for micro, accum in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"{micro}x{accum}"
        preftune.train(grpo(make_model(seed=5), prompt_rows(8), loss={"aggregation": aggregation},
                            training={"output_dir": str(out), "per_device_batch_size": micro,
                                      "gradient_accumulation_steps": accum}), log=lambda *_: None)
        rec = records(out)[0]
        lengths.append((rec["completions/mean_length"], rec["completions/max_length"]))
    assert lengths[0] == lengths[1] == lengths[2]  # the same rollout
    assert lengths[0][0] < lengths[0][1]  # of different lengths: the normalizer matters
    assert len(grads) == 3
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads[0])


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_on_policy_step_is_reinforce(make_model, aggregation):
    # ρ = 1 (π_old = π detached), β = 0: ∇L = −Σ_i A_i Σ_t w_it ∇log π(y_it), with w_it the aggregation's weight
    # of token t of sequence i (grpo: 1/(S·|o_i|), bnpo / dapo: 1/N, dr_grpo: 1/(S·L_max)); at temperature 0.7.
    model = make_model(seed=2).float()
    groups = [TokenizedGroup([2, 11, 9], [[12, 13], [12, 14, 15], [16], [17, 18, 19, 20]]),
              TokenizedGroup([2, 20], [[21, 22, 23], [24], [25, 26], [27, 28]])]
    seqs = LAYOUTS["packed"](groups, 0)
    advantages = torch.tensor([0.5, -1.0, 1.5, 0.25, -0.75, 2.0, -0.5, 1.0])  # (S,), sequence u + k·P
    lengths = torch.tensor([len(c) for k in range(4) for g in groups for c in [g.completions[k]]], dtype=torch.float)
    S, N, L = 8, float(lengths.sum()), 6
    batch = GroupBatch(seqs, advantages=advantages, seq_mask=torch.ones(S), step_sequences=S, step_tokens=N,
                       max_length=L, temperature=0.7)
    engine = LogpModel(model, chunk_size=4)
    objective = Objective.from_config(to_config({"model": "m", "loss": {"name": "grpo", "aggregation": aggregation},
                                                 "rollout": {}, "reward": {"functions": ["x.py:f"]},
                                                 "training": {"output_dir": "x", "learning_rate": 0.0}}).loss)
    losses, metrics = policy_step(objective, lambda b: engine(*b.model_args(), **b.model_kwargs()), batch, None)
    batch.reduce(losses, 1).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    tok, _ = engine(*seqs.model_args(), per_token=True, temperature=0.7)  # (N,)
    logp = padded(tok, seqs.target_seq, S)  # (S, T)
    per_seq_weight = {"grpo": 1 / (S * lengths), "bnpo": torch.full((S,), 1 / N), "dapo": torch.full((S,), 1 / N),
                      "dr_grpo": torch.full((S,), 1 / (S * L))}[aggregation]  # (S,)
    (-(advantages * per_seq_weight)[:, None] * logp).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)
    assert metrics["ratio_mean"].tolist() == pytest.approx([1.0] * S)
    assert metrics["clip_low_frac"].sum() == 0 and metrics["clip_high_frac"].sum() == 0


# ---- μ > 1: one rollout, several updates -----------------------------------------------------------------------


def test_num_iterations_reuses_the_rollout_and_the_ratio_moves(grpo, make_model, tmp_path):
    # μ = 2, 4 steps: rollouts at steps 1 and 3 (ratio exactly 1: π_old is the training engine's own pass),
    # reused at steps 2 and 4 after an update with a large learning rate (ratio ≠ 1, tokens clipped).
    preftune.train(grpo(make_model(seed=1), prompt_rows(16), rollout={"num_iterations": 2},
                        training={"max_steps": 4, "learning_rate": 5e-2}), log=lambda *_: None)
    rec = records(tmp_path / "run")
    assert [r["step"] for r in rec] == [1, 2, 3, 4]
    fresh, reused = rec[0], rec[1]
    assert fresh["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert fresh["clip_low_frac"] == 0 and fresh["clip_high_frac"] == 0
    assert fresh["time/generate_s"] > 0 and reused["time/generate_s"] == 0  # no new samples at step 2
    assert reused["reward/mean"] == fresh["reward/mean"]  # the same rollout
    assert abs(reused["ratio_mean"] - 1.0) > 1e-3
    assert reused["clip_low_frac"] + reused["clip_high_frac"] > 0
    assert rec[2]["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and rec[2]["time/generate_s"] > 0


RESUME_SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
import preftune
model_dir, data, rewards, out, resume = sys.argv[1:6]
preftune.train({
    "model": model_dir, "data": {"train": data}, "loss": {"name": "grpo", "beta": 0.0},
    "rollout": {"num_generations": 4, "max_new_tokens": 6, "num_iterations": 2},
    "reward": {"functions": [rewards + ":varied"]},
    "training": {"output_dir": out, "learning_rate": 2e-2, "max_steps": 4, "save_every": 1, "save_total_limit": 0,
                 "per_device_batch_size": 4, "max_length": 64, "progress_bar": False},
    "monitor": {"enabled": False},
}, resume=resume if resume != "-" else None, log=lambda *a: print(*a, flush=True))
"""


@pytest.mark.slow
def test_resume_inside_a_reused_rollout_equals_uninterrupted(tmp_path, python, saved_model_dir, write_jsonl):
    from safetensors.torch import load_file

    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(24))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

    def start(out, resume="-"):
        return subprocess.Popen([python, str(script), str(saved_model_dir), str(data), str(REWARDS), str(out), resume],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    full, victim = start(tmp_path / "full"), start(tmp_path / "killed")
    # step-3: steps 1-2 used rollout A, step 3 sampled rollout B, and step 4 must train on B again.
    target = tmp_path / "killed" / "checkpoints" / "step-00000003"
    deadline = time.monotonic() + 300
    while not target.exists():
        if victim.poll() is not None:
            pytest.fail(f"the run ended before its step-3 checkpoint:\n{victim.stdout.read()}")
        assert time.monotonic() < deadline, "no step-3 checkpoint within 300 s"
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    victim.stdout.close()
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "final").exists(), "the run finished before it could be killed"
    state = json.loads((target / "trainer_state.json").read_text())
    assert state["source"]["rollout"]["step"] == 2  # the rollout in use at the kill (0-based step)
    # A control without the saved rollout: step 4 would sample afresh from the updated policy.
    forgetful = tmp_path / "forgetful-ckpt"
    import shutil

    shutil.copytree(target, forgetful)
    (forgetful / "trainer_state.json").write_text(json.dumps({**state, "source": {}}))
    outs = {}
    for name, ckpt in (("resumed", target), ("forgot", forgetful)):
        run_dir = tmp_path / "killed" if name == "resumed" else tmp_path / "forgot"
        proc = start(run_dir, str(ckpt))
        outs[name] = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, outs[name][-3000:]
    assert full.wait(timeout=300) == 0, full.stdout.read()[-3000:]
    full.stdout.close()
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    c = load_file(tmp_path / "forgot" / "final" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(a[name], c[name]) for name in a), "the control resumed to the same weights"


# ---- the sampling temperature divides the training pass's logits ---------------------------------------------


@pytest.mark.parametrize("temperature, top_k", [(0.7, 0), (1.3, 5)])
def test_training_logps_equal_the_samplers_at_the_temperature(make_model, temperature, top_k):
    model = make_model(seed=4).float()
    prompts = [[2, 11, 9], [2, 20], [2, 30, 31, 32]]
    params = SamplingParams(max_new_tokens=8, temperature=temperature, top_k=top_k, n=4, stop_ids=(3,))
    out = generate(model, prompts, params, [11, 12, 13], pad_id=0)
    groups = [TokenizedGroup(p, [c.ids for c in g]) for p, g in zip(prompts, out)]
    seqs = LAYOUTS["packed"](groups, 0)
    tok, _ = LogpModel(model, chunk_size=5)(*seqs.model_args(), per_token=True, temperature=temperature)
    got = padded(tok, seqs.target_seq, seqs.num_sequences)  # (S, T), sequence u + k·P
    for k in range(4):
        for u, g in enumerate(out):
            want = torch.tensor(g[k].logps)
            torch.testing.assert_close(got[u + k * len(prompts), : len(want)], want, atol=1e-5, rtol=0)


def test_group_batches_carry_the_rollout_temperature(grpo, make_model):
    run = built(grpo(make_model(seed=4), prompt_rows(8), rollout={"temperature": 0.6}))
    batch = next(iter(run.source.micro_batches(0)))
    assert batch.temperature == 0.6 and batch.model_kwargs()["temperature"] == 0.6


# ---- rollout options -------------------------------------------------------------------------------------------


def _truncated(rollout: dict, stop: set[int]) -> torch.Tensor:
    """(P, G) whether each completion of a rollout ran out of tokens (no stop token at its end)."""
    return torch.tensor([[not c or c[-1] not in stop for c in g] for g in rollout["completions"]])


@pytest.mark.parametrize("mask", [False, True])
def test_mask_truncated_completions(grpo, make_model, toy_tok, mask):
    # 3 new tokens at most: a random model ends few samples with EOS, so most are truncated.
    run = built(grpo(make_model(seed=3), prompt_rows(8), rollout={"max_new_tokens": 3,
                                                                 "mask_truncated_completions": mask}))
    batch = next(iter(run.source.micro_batches(0)))
    truncated = _truncated(run.source._rollout, {toy_tok.eos_token_id})  # (P, G)
    assert 0 < truncated.float().mean() < 1
    want = (~truncated).float() if mask else torch.ones_like(truncated, dtype=torch.float)
    assert batch.seq_mask.tolist() == want.T.reshape(-1).tolist()  # sequence u + k·P
    assert batch.step_sequences == want.sum()
    # masked sequences carry no loss-bearing token, and the token normalizer counts only the kept ones
    kept_tokens = sum(len(c) for g, us in zip(run.source._rollout["completions"], want.tolist())
                      for c, u in zip(g, us) if u)
    assert batch.step_tokens == kept_tokens and batch.token_mask().sum() == kept_tokens


def test_missing_eos_penalty(grpo, make_model):
    run = built(grpo(make_model(seed=3), prompt_rows(8), fn=("constant",), rollout={"max_new_tokens": 3},
                     reward={"missing_eos_penalty": 0.25}))
    out = run.source.rollouts.sample([0, 1, 2, 3], [1, 2, 3, 4])
    truncated = np.array([[c.finish_reason == "length" for c in g] for g in out["completions"]])
    assert 0 < truncated.mean() < 1
    assert out["rewards"].tolist() == np.where(truncated, 0.75, 1.0).tolist()  # 1 − 0.25 where cut


def test_soft_overlong_penalty_by_hand():
    # L_max 10, L_cache 4: no penalty up to 6 tokens, then (6 − |y|)/4: 7 → −0.25, 8 → −0.5, 10 → −1; beyond → −1
    got = soft_overlong_penalty([[5, 6, 7], [8, 10, 12]], max_length=10, buffer=4)
    assert got.tolist() == [[0.0, 0.0, -0.25], [-0.5, -1.0, -1.0]]
    half = soft_overlong_penalty([7, 9], max_length=10, buffer=4, factor=0.5)  # 0.5·(−0.25), 0.5·(−0.75)
    assert half.tolist() == [-0.125, -0.375]
    with pytest.raises(ValueError, match="buffer"):
        soft_overlong_penalty([1], max_length=4, buffer=5)


def test_soft_overlong_penalty_in_the_rollout(grpo, make_model):
    run = built(grpo(make_model(seed=3), prompt_rows(8), fn=("constant",), rollout={"max_new_tokens": 6},
                     reward={"overlong_buffer": 4, "overlong_penalty": 0.5}))
    out = run.source.rollouts.sample([0, 1, 2, 3], [1, 2, 3, 4])
    lengths = np.array([[len(c.ids) for c in g] for g in out["completions"]])  # EOS counted
    want = 1.0 + soft_overlong_penalty(lengths, max_length=6, buffer=4, factor=0.5)
    assert len(set(lengths.ravel().tolist())) > 1
    np.testing.assert_allclose(out["rewards"], want)
    with pytest.raises(ConfigError, match="reward.overlong_buffer: 8 exceeds rollout.max_new_tokens 6"):
        to_config(grpo("m", prompt_rows(8), reward={"overlong_buffer": 8}))


def test_dynamic_sampling_refills_zero_spread_groups(grpo, make_model):
    # half_flat: 'repeat' / 'echo' prompts score a constant (zero spread), 'copy' / 'say' prompts vary.
    rows = prompt_rows(64)
    flat = [r["prompt"].split()[0] in ("repeat", "echo") for r in rows]
    plain = built(grpo(make_model(seed=3), rows, fn=("half_flat",), training={"per_device_batch_size": 8}))
    list(plain.source.micro_batches(0))
    before = plain.source._metrics["rollout/frac_reward_zero_std"]
    assert before > 0
    dyn = built(grpo(make_model(seed=3), rows, fn=("half_flat",), training={"per_device_batch_size": 8},
                     rollout={"dynamic_sampling": True, "max_resample_rounds": 8}))
    list(dyn.source.micro_batches(0))
    m, rollout = dyn.source._metrics, dyn.source._rollout
    assert m["rollout/frac_reward_zero_std"] == before  # as first sampled: the same draw
    assert m["rollout/refilled_groups"] >= before * 8 and m["rollout/frac_reward_zero_std_trained"] == 0
    assert not any(flat[i] for i in rollout["indices"])  # every flat prompt was replaced
    assert len(rollout["completions"]) == 8 and all(len(g) == 4 for g in rollout["completions"])
    # capped: 0 extra rounds keeps the flat groups (their advantages are 0)
    capped = built(grpo(make_model(seed=3), rows, fn=("half_flat",), training={"per_device_batch_size": 8},
                        rollout={"dynamic_sampling": True, "max_resample_rounds": 0}))
    list(capped.source.micro_batches(0))
    assert capped.source._metrics["rollout/frac_reward_zero_std_trained"] == before


def test_all_rewards_equal_is_said_and_nothing_updates(grpo, make_model, quiet_log, tmp_path):
    model = make_model(seed=3)
    start = copy.deepcopy(model.state_dict())
    preftune.train(grpo(model, prompt_rows(8), fn=("constant",), training={"max_steps": 2}), log=quiet_log)
    assert "all rewards equal: no learning signal" in quiet_log.text()
    for name, value in model.state_dict().items():
        assert torch.equal(value, start[name]), name
    rec = records(tmp_path / "run")
    assert [r["step"] for r in rec] == [1, 2]
    assert all(r["rollout/frac_reward_zero_std"] == 1.0 and "loss" not in r for r in rec)  # no "loss 0" logged


# ---- the reference: only at β > 0, frozen or the adapter-disabled base ------------------------------------------


def no_model_copies(monkeypatch, why: str) -> None:
    """Make ``copy.deepcopy`` of a model fail (other deep copies work)."""
    real = copy.deepcopy

    def guarded(x, *args, **kwargs):
        if isinstance(x, torch.nn.Module):
            pytest.fail(why)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", guarded)


def test_beta_zero_loads_no_reference(grpo, make_model, monkeypatch, tmp_path):
    monkeypatch.setattr("preftune.trainer.build._reference", lambda *a, **k: pytest.fail("a reference at beta 0"))
    no_model_copies(monkeypatch, "a reference copy was made at beta = 0")
    preftune.train(grpo(make_model(seed=3), prompt_rows(8), loss={"beta": 0.0},
                        reference={"model": str(tmp_path / "no-such-model")}), log=lambda *_: None)  # loading fails
    assert "kl" not in records(tmp_path / "run")[0]


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}])
def test_beta_positive_scores_a_frozen_reference(grpo, make_model, monkeypatch, tmp_path, lora):
    from preftune.trainer import build
    from preftune.trainer.loop import run_steps

    if lora is not None:  # LoRA: the reference is the base with the adapter disabled, never a copy
        no_model_copies(monkeypatch, "LoRA made a reference copy")
    real_freeze, frozen_models = build.freeze, []

    def spy(model):
        frozen_models.append(model)
        return real_freeze(model)

    monkeypatch.setattr(build, "freeze", spy)
    cfg = grpo(make_model(seed=3), prompt_rows(16), loss={"beta": 0.04}, lora=lora,
               training={"max_steps": 3, "learning_rate": 2e-2})
    run = built(cfg)
    assert len(frozen_models) == (0 if lora is not None else 1)
    frozen = frozen_models[0] if frozen_models else None
    start = None if frozen is None else copy.deepcopy(frozen.state_dict())
    run_steps(run)
    kl = [r["kl"] for r in records(tmp_path / "run")]
    assert kl[0] == pytest.approx(0.0, abs=1e-7)  # the first step's policy is the reference
    assert kl[-1] > 1e-5  # the policy moved, the reference did not
    if frozen is not None:
        assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
        for name, value in frozen.state_dict().items():
            assert torch.equal(value, start[name]), name


# ---- entropy: from the chunked head, without the logits ----------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_from_the_chunked_head_matches_full_logits(make_model, temperature):
    model = make_model(seed=4).float()
    groups = [TokenizedGroup([2, 11, 9], [[12, 13], [12, 14, 15]]), TokenizedGroup([2, 20], [[21, 22, 23], [24]])]
    seqs = LAYOUTS["packed"](groups, 0)
    tok, _, ent = LogpModel(model, chunk_size=3)(*seqs.model_args(), per_token=True, temperature=temperature,
                                                 entropy=True)
    # naive: each sequence alone, full logits, H = −Σ p log p of softmax(z / T)
    want = []
    for k in range(2):
        for g in groups:
            ids = torch.tensor([g.prompt_ids + g.completions[k]])
            z = model(input_ids=ids).logits[0, len(g.prompt_ids) - 1 : -1].float() / temperature
            logp = z.log_softmax(-1)
            want.append(-(logp.exp() * logp).sum(-1))
    got = padded(ent, seqs.target_seq, seqs.num_sequences)
    for s, w in enumerate(want):
        torch.testing.assert_close(got[s, : len(w)], w, atol=1e-5, rtol=0)
    assert not ent.requires_grad
    hidden, head = torch.randn(7, 32), model.get_output_embeddings()
    targets = torch.randint(0, head.weight.shape[0], (7,))
    a = token_logps(hidden, head, targets, 0, temperature=temperature, with_entropy=True)  # the naive head
    b = token_logps(hidden, head, targets, 3, temperature=temperature, with_entropy=True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    torch.testing.assert_close(b[0], token_logps(hidden, head, targets, 3, temperature=temperature))


# ---- what a run logs -------------------------------------------------------------------------------------------


def test_metrics_completions_table_tensorboard_and_report(grpo, make_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from preftune.report.html import write_report

    rows = prompt_rows(24)
    cfg = grpo(make_model(seed=3), rows[:16], loss={"beta": 0.04, "epsilon_high": 0.28}, rollout={"max_new_tokens": 5},
               training={"max_steps": 2, "eval_every": 1, "learning_rate": 2e-2}, data={"eval": rows[16:]},
               monitor={"num_prompts": 2})
    preftune.train(cfg, log=lambda *_: None)
    run_dir = tmp_path / "run"
    last = records(run_dir)[-1]
    for key in ("loss", "entropy", "kl", "clip_low_frac", "clip_high_frac", "ratio_mean", "completion_length",
                "completions/mean_length", "completions/max_length", "rollout/truncated_fraction",
                "rollout/eos_rate", "rollout/frac_reward_zero_std", "reward/mean", "reward/std",
                "reward/varied/mean", "reward/varied/std", "advantages/std", "time/generate_s", "time/score_s",
                "time/train_s", "grad_norm"):
        assert key in last, key
    assert 0 < last["entropy"] <= math.log(len(cfg["tokenizer"])) + 1e-6
    assert last["rollout/truncated_fraction"] + last["rollout/eos_rate"] == pytest.approx(1.0)
    assert "reward/mean" in records(run_dir, "eval")[-1]  # held-out greedy samples, scored
    table = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    table = [r for r in table if r.get("kind") == "rollout"]
    assert {r["step"] for r in table} == {1, 2} and len([r for r in table if r["step"] == 2]) == 16  # 4 groups x 4
    row = table[-1]
    assert {"prompt", "completion", "reward", "scores", "advantage", "truncated"} <= set(row)
    group = [r for r in table if r["step"] == 2 and r["group"] == row["group"]]
    rewards = np.array([r["reward"] for r in group])
    want = (rewards - rewards.mean()) / (rewards.std(ddof=1) + 1e-4) if rewards.std() > 0 else 0 * rewards
    np.testing.assert_allclose([r["advantage"] for r in group], want, rtol=1e-5, atol=1e-6)  # GRPO's advantage
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert {"train/entropy", "train/rollout/frac_reward_zero_std", "train/clip_low_frac"} <= set(events.Tags()["scalars"])
    assert any(t.startswith("rollout") for t in events.Tags()["tensors"])  # the completions table (text)
    html = write_report(run_dir).read_text()
    assert "On-policy rollouts" in html and "frac_reward_zero_std" in html and "entropy" in html
    assert row["completion"].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in html


# ---- bad input: one clear line, before the first rollout ------------------------------------------------------


@pytest.mark.parametrize("ref, message", [
    ("no/such/rewards.py:fn", "file no/such/rewards.py not found"),
    (f"{REWARDS}:missing", "has no function 'missing'"),
    ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
    (f"{REWARDS}:wrong_count", "reward function wrong_count returned 2 values for 1 completions"),
    (f"{REWARDS}:not_a_number", "reward function not_a_number returned 'high' (str) for row 0"),
    (f"{REWARDS}:always_raises", "reward function always_raises raised RuntimeError: scorer offline on row 0"),
])
def test_a_broken_reward_function_fails_before_any_generation(grpo, make_model, monkeypatch, ref, message):
    monkeypatch.setattr("preftune.rollout.online.generate", lambda *a, **k: pytest.fail("generated first"))
    cfg = grpo(make_model(seed=3), prompt_rows(8))
    cfg["reward"]["functions"] = [ref]
    with pytest.raises(PreftuneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        preftune.train(cfg, log=lambda *_: None)


def test_a_reward_function_failing_on_real_samples_names_the_row(grpo, make_model):
    with pytest.raises(PreftuneError, match=r"reward function raises_on_long raised ValueError: cannot score long "
                                            r"answers on row \d+ \(prompt '.+', completion '.+'\)"):
        preftune.train(grpo(make_model(seed=3), prompt_rows(8), fn=("raises_on_long",)), log=lambda *_: None)


@pytest.mark.parametrize("change, message", [
    ({"rollout": {"num_generations": 1}}, "rollout.num_generations: 1 makes groups of one completion"),
    ({"rollout": None}, "loss grpo learns from the policy's own samples: add a `rollout:` section"),
    ({"loss": {"name": "dpo", "beta": 0.1}, "rollout": {"num_iterations": 2}},
     "rollout.num_iterations: 2 is a GRPO option"),
])
def test_group_settings_are_refused_when_the_config_is_read(grpo, change, message):
    cfg = grpo("m", prompt_rows(8))
    for key, value in change.items():
        cfg[key] = value if value is None or key == "loss" else {**cfg[key], **value}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        to_config(cfg)


# ---- the quickstart ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_policy_gradient_quickstart_meets_targets(tmp_path, toy_sft, method):
    from preftune.cli import QUICKSTARTS
    from preftune.toy import policy_quickstart as pq

    assert QUICKSTARTS[method] == f"preftune.toy.policy_quickstart:run_{method}_quickstart"
    run = {"grpo": pq.run_grpo_quickstart, "rloo": pq.run_rloo_quickstart}[method]
    report = run(tmp_path, seed=0, log=lambda *_: None, sft_dir=toy_sft.run_dir)
    before, after = report["before"]["generation_accuracy"], report["after"]["generation_accuracy"]
    print(f"{method}: generation accuracy {before:.3f} -> {after:.3f}, "
          f"{report['runs'][method]['train_runtime_s']:.0f}s of training")
    assert after >= pq.TARGETS["generation_accuracy"] == 0.90
    assert after - before >= pq.TARGETS["gain"] == 0.25
    assert report["passed"] and report["method"] == method
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["after"]["generation_accuracy"] == after and on_disk["config"][method]["rollout"][
        "advantage_estimator"] == method
    train = records(tmp_path)
    assert train[-1]["reward/mean"] > train[0]["reward/mean"]
    assert any(r.get("kind") == "rollout" for r in map(json.loads, (tmp_path / "samples.jsonl").read_text()
                                                       .splitlines()))
