"""GRPO through the trainer, the math: the global normalizer end to end for every aggregation mode, REINFORCE at
ρ = 1, μ > 1 reuse and resume in the middle of a reused rollout, temperature-matched log-probs, the reference
only at β > 0 (frozen or the adapter-disabled base), entropy from the chunked head. The rollout options,
metrics, bad input and the quickstart: ``test_grpo_rollout.py``.

Most runs use a random tiny model (its samples are distinct garbage of many lengths, ideal for controlled
rewards) and the deterministic reward functions of ``tests/grpo_rewards.py``. Plots are skipped (they cost
seconds per run).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from grpo_helpers import AGGREGATIONS, REWARDS, built, grpo_config, prompt_rows, records, spy_on_gradients

import preftune
from preftune.config import to_config
from preftune.data.batch import GroupBatch, padded
from preftune.data.layouts import LAYOUTS
from preftune.data.tokenize import TokenizedGroup
from preftune.generation import SamplingParams, generate
from preftune.logprobs import LogpModel, token_logps
from preftune.trainer.steps import Objective, policy_step

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    monkeypatch.setattr("preftune.trainer.loop._plots", lambda run_dir, say: None)


@pytest.fixture
def grpo(toy_tok, tmp_path):
    return grpo_config(toy_tok, tmp_path)


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
    engine = LogpModel(model, chunk_size=3)
    tok, _, ent = engine(*seqs.model_args(), per_token=True, temperature=temperature, entropy=True,
                         entropy_grad=False)  # fused into the log-prob pass, detached (GRPO's metric)
    _, _, ent_grad = engine(*seqs.model_args(), per_token=True, temperature=temperature, entropy=True)  # PPO's
    torch.testing.assert_close(ent, ent_grad.detach(), atol=1e-5, rtol=0)
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


