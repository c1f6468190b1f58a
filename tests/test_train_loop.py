"""Short real training runs on the toy task: learning, logs, saved models, LoRA, the frozen reference,
schedules, gradient accumulation and non-finite steps."""

from __future__ import annotations

import copy
import gc
import json
import math
import uuid
from types import SimpleNamespace

import pytest
import torch

import preftune
from preftune.data.tokenize import Tokenization
from preftune.errors import PreftuneError
from preftune.logprobs import naive_sequence_logps
from preftune.losses import LossOutput, LossSpec
from preftune.runlog import read_metrics
from preftune.trainer import steps as steps_mod
from preftune.trainer.optim import build_scheduler

STEP_KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected", "grad_norm", "learning_rate", "tokens_per_second"}
SUMMARY_KEYS = {"train_runtime_s", "samples_per_second", "tokens_per_second", "peak_rss_mb", "final_loss"}


def train_records(run_dir):
    return [r for r in read_metrics(run_dir) if r["split"] == "train"]


def same_logits(a, b, ids) -> None:
    a.eval()
    b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, rtol=0, atol=1e-6)


# ---- a DPO run from an SFT-ish start learns ----------------------------------------------------------------


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, toy_tok, make_model, sft_rows, train_pairs, eval_pairs):
    """SFT for a few steps, then DPO with held-out evaluation; the in-memory model is trained in place."""
    root = tmp_path_factory.mktemp("dpo-run")
    cache = str(root / "cache")  # module fixtures run before the per-test PREFTUNE_CACHE fixture
    model = make_model(seed=0)
    preftune.train({
        "model": model, "tokenizer": toy_tok, "data": {"train": sft_rows}, "loss": {"name": "sft"},
        "training": {"output_dir": str(root / "sft"), "learning_rate": 3e-3, "max_steps": 15,
                     "per_device_batch_size": 8, "max_length": 64, "progress_bar": False, "save_model": False},
    }, log=lambda *_: None)
    lines: list[str] = []
    summary = preftune.train({
        "model": model, "tokenizer": toy_tok, "data": {"train": train_pairs, "eval": eval_pairs},
        "loss": {"name": "dpo", "beta": 0.1}, "reference": {"cache_dir": cache},
        "training": {"output_dir": str(root / "dpo"), "learning_rate": 1e-3, "max_steps": 20, "eval_every": 5,
                     "per_device_batch_size": 8, "max_length": 64, "progress_bar": False, "warmup_ratio": 0.1},
    }, log=lines.append)
    return SimpleNamespace(model=model, summary=summary, run_dir=root / "dpo", lines=lines, cache=cache)


def test_dpo_improves_heldout_preference_accuracy(dpo_run):
    evals = [r for r in read_metrics(dpo_run.run_dir) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [5, 10, 15, 20]
    final = dpo_run.summary["final_eval_metrics"]["rewards/accuracies"]
    assert final == evals[-1]["rewards/accuracies"]
    # Before the first step the policy is the reference: every margin is 0 and accuracy is chance, 0.5
    # (test_initial_margins_are_zero). On 64 held-out pairs 0.75 is far outside what chance gives.
    assert final >= 0.75, evals
    assert evals[-1]["rewards/margins"] > 0
    assert dpo_run.summary["eval_examples"] == 64


def test_initial_margins_are_zero(dpo_config, make_model, train_pairs, eval_pairs):
    """With learning rate 0 nothing moves: the policy is the reference, every reward is 0 up to fp32 rounding
    (the reference was scored in other batches, so padding differs), and accuracy is chance, 0.5 in expectation."""
    cfg = dpo_config(make_model(seed=0), train_pairs[:8], eval=eval_pairs[:16], training={"learning_rate": 0.0,
                                                                                      "max_steps": 1})
    metrics = preftune.train(cfg, log=lambda *_: None)["final_eval_metrics"]
    assert abs(metrics["rewards/chosen"]) < 1e-5 and abs(metrics["rewards/rejected"]) < 1e-5
    assert abs(metrics["rewards/margins"]) < 1e-5
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_metrics_jsonl_has_every_step_key(dpo_run):
    records = train_records(dpo_run.run_dir)
    assert [r["step"] for r in records] == list(range(1, 21))
    for r in records:
        missing = STEP_KEYS - set(r)
        assert not missing, (r["step"], missing)
        assert all(math.isfinite(r[k]) for k in STEP_KEYS)
        assert 0.0 <= r["rewards/accuracies"] <= 1.0
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-5)
        assert r["tokens_per_second"] > 0 and r["grad_norm"] >= 0


def test_train_summary_keys(dpo_run):
    on_disk = json.loads((dpo_run.run_dir / "train_summary.json").read_text())
    assert SUMMARY_KEYS <= set(on_disk)
    for key in SUMMARY_KEYS:
        assert isinstance(on_disk[key], float) and on_disk[key] > 0, key
    assert on_disk["final_loss"] == pytest.approx(train_records(dpo_run.run_dir)[-1]["loss"])
    assert on_disk["steps"] == 20 and on_disk["nonfinite_steps"] == 0
    assert on_disk["final_loss"] == pytest.approx(dpo_run.summary["final_loss"])


def test_final_model_loads_and_matches_in_memory(dpo_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = dpo_run.run_dir / "final"
    loaded = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    ids = torch.tensor([tok("repeat : cat dog owl")["input_ids"]])
    same_logits(loaded, dpo_run.model, ids)
    assert tok.chat_template  # the tokenizer (with its template) is saved beside the model


# ---- LoRA --------------------------------------------------------------------------------------------------

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def test_lora_adapter_saved_and_loads_with_peft(dpo_config, make_model, train_pairs, tmp_path):
    from peft import PeftModel

    model = make_model(seed=3)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = dpo_config(model, train_pairs[:32], lora=LORA,
                     training={"learning_rate": 1e-2, "max_steps": 4, "save_model": True})
    preftune.train(cfg, log=lambda *_: None)
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    assert not (final / "model.safetensors").exists()  # the adapter only, not a full copy

    # the base weights are untouched; the adapter is what trained
    for name, p in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base_before[name.replace("base_layer.", "")]), name
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())

    loaded = PeftModel.from_pretrained(make_model(seed=3), final)
    same_logits(loaded, model, torch.tensor([[2, 11, 12, 13, 14, 15]]))


def _sequences_of_batch(batch):
    """(prompt, completion) token lists of each sequence of a padded batch."""
    batch = batch.seqs
    out = []
    lengths = torch.bincount(batch.target_seq, minlength=batch.num_sequences).tolist()
    for s in range(batch.num_sequences):
        real = int(batch.attention_mask[s].sum())
        row = batch.input_ids[s, :real].tolist()
        out.append((tuple(row[: real - lengths[s]]), tuple(row[real - lengths[s] :])))
    return out


def test_lora_reference_is_adapter_disabled_without_a_copy(dpo_config, make_model, toy_tok, train_pairs,
                                                           monkeypatch):
    rows = train_pairs[:16]
    model = make_model(seed=4)
    # The base model's log-probs of every sequence, computed before training (and before LoRA exists).
    tokenized = [Tokenization(toy_tok, max_length=64).pair(r) for r in _pair_records(rows)]
    seqs = [(p.prompt_ids, c) for p in tokenized for c in (p.chosen_ids, p.rejected_ids)]
    with torch.no_grad():
        base, _ = naive_sequence_logps(model, seqs)
    expected = {(tuple(p), tuple(c)): v for (p, c), v in zip(seqs, base.tolist())}

    deep_copied = []
    real_deepcopy = copy.deepcopy

    def spy_deepcopy(obj, *args, **kwargs):
        if isinstance(obj, torch.nn.Module):
            deep_copied.append(type(obj).__name__)
        return real_deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", spy_deepcopy)
    seen = SimpleNamespace(ref_err=[], policy_gap=[], llamas=None)
    real_step = steps_mod.STEPS["paired"]

    def spy_step(objective, logp_fn, batch, reference_fn):
        assert reference_fn is not None  # precompute off: the reference runs every step
        ref, _ = reference_fn(batch)
        want = torch.tensor([expected[s] for s in _sequences_of_batch(batch)])
        seen.ref_err.append((ref - want).abs().max().item())
        with torch.no_grad():
            policy, _ = logp_fn(batch)
        seen.policy_gap.append((policy - want).abs().max().item())
        if seen.llamas is None:
            seen.llamas = _llamas() - existing
        return real_step(objective, logp_fn, batch, reference_fn)

    monkeypatch.setitem(steps_mod.STEPS, "paired", spy_step)
    # The padded layout: _sequences_of_batch reads sequences back from one row each.
    cfg = dpo_config(model, rows, lora=LORA, reference={"precompute": False}, engine={"layout": "padded"},
                     training={"learning_rate": 1e-2, "max_steps": 4})
    existing = _llamas()  # this test's model, and any another test still holds
    assert id(model) in existing
    preftune.train(cfg, log=lambda *_: None)

    assert len(seen.ref_err) == 4
    assert max(seen.ref_err) < 1e-5  # reference == base model, adapter disabled, at every step
    assert seen.policy_gap[0] < 1e-5  # LoRA B starts at 0: the policy starts as the base
    assert seen.policy_gap[-1] > 1e-3  # ... and moves away while the reference does not
    assert seen.llamas == set(), "a second LlamaForCausalLM exists during LoRA training"
    assert deep_copied == []


def _llamas() -> set[int]:
    """ids of the LlamaForCausalLM objects alive now."""
    from transformers import LlamaForCausalLM

    gc.collect()
    return {id(o) for o in gc.get_objects() if type(o) is LlamaForCausalLM}


def _pair_records(rows):
    from preftune.data.formats import to_pair

    return [to_pair(r) for r in rows]


# ---- the frozen reference (full fine-tuning, no precompute) ------------------------------------------------


def _initial_logps(model, toy_tok, rows) -> dict:
    """The model's summed log-prob of every (prompt, completion) of ``rows``, before training (naive twin)."""
    tokenized = [Tokenization(toy_tok, max_length=64).pair(r) for r in _pair_records(rows)]
    seqs = [(p.prompt_ids, c) for p in tokenized for c in (p.chosen_ids, p.rejected_ids)]
    with torch.no_grad():
        logps, _ = naive_sequence_logps(model, seqs)
    return {(tuple(p), tuple(c)): v for (p, c), v in zip(seqs, logps.tolist())}


def test_reference_copy_is_frozen_and_never_changes(dpo_config, make_model, toy_tok, train_pairs, monkeypatch):
    from preftune.trainer import build as loop

    captured = []
    real_freeze = loop.freeze

    def spy_freeze(model):
        frozen = real_freeze(model)
        captured.append((frozen, {n: t.clone() for n, t in frozen.state_dict().items()}))
        return frozen

    # What the loss sees: the reference log-probs of every step must be the initial policy's, computed
    # independently here (a reference taken from the live policy matches at step 1 only).
    rows = train_pairs[:16]
    policy = make_model(seed=5)
    expected = _initial_logps(policy, toy_tok, rows)
    ref_err, policy_gap = [], []
    real_step = steps_mod.STEPS["paired"]

    def spy_step(objective, logp_fn, batch, reference_fn):
        ref, _ = reference_fn(batch)
        want = torch.tensor([expected[s] for s in _sequences_of_batch(batch)])
        ref_err.append((ref - want).abs().max().item())
        with torch.no_grad():
            policy_gap.append((logp_fn(batch)[0] - want).abs().max().item())
        return real_step(objective, logp_fn, batch, reference_fn)

    monkeypatch.setattr(loop, "freeze", spy_freeze)
    monkeypatch.setitem(steps_mod.STEPS, "paired", spy_step)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    preftune.train(dpo_config(policy, rows, reference={"precompute": False}, engine={"layout": "padded"},
                              training={"learning_rate": 1e-2, "max_steps": 3}), log=lambda *_: None)
    assert len(ref_err) == 3 and max(ref_err) < 1e-5, ref_err
    assert policy_gap[-1] > 1e-3  # ... while the policy itself moved: the check above could tell them apart
    assert len(captured) == 1
    ref, snapshot = captured[0]
    assert ref is not policy
    for name, t in ref.state_dict().items():
        assert torch.equal(t, snapshot[name]), f"reference weight {name} changed during training"
    assert all(not p.requires_grad for p in ref.parameters())
    assert all(p.grad is None for p in ref.parameters())
    assert not any(m.training for m in ref.modules())
    changed = [n for n, p in policy.named_parameters() if not torch.equal(p, before[n])]
    assert changed  # the policy did train
    for name, initial in before.items():  # ... and the reference is the policy as it was before training
        assert torch.equal(ref.state_dict()[name], initial), name


# ---- schedule ---------------------------------------------------------------------------------------------


def _factors(kind: str, warmup_ratio: float, total: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = build_scheduler(opt, SimpleNamespace(warmup_ratio=warmup_ratio, lr_scheduler=kind), total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])  # the rate this step uses
        opt.step()
        sched.step()
    out.append(opt.param_groups[0]["lr"])
    return out


def test_schedule_shapes():
    # 10 steps, warmup ceil(0.2 * 10) = 2: the rate ramps 1/3, 2/3, then peaks at step 2 and decays over 8.
    lin = _factors("linear", 0.2, 10)
    assert lin[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lin[3:] == pytest.approx([1 - k / 8 for k in range(1, 9)])  # 7/8 ... 1/8, then 0 after the last
    cos = _factors("cosine", 0.2, 10)
    assert cos[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert cos[3:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(1, 9)])
    assert cos[6] == pytest.approx(0.5)  # half-way through the decay
    assert all(a > b for a, b in zip(cos[2:], cos[3:]))
    const = _factors("constant", 0.2, 10)
    assert const[2:] == pytest.approx([1.0] * 9)
    assert _factors("linear", 0.0, 4)[:4] == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_logged_learning_rate_follows_schedule(dpo_config, make_model, train_pairs, tmp_path):
    cfg = dpo_config(make_model(seed=0), train_pairs[:32], training={
        "learning_rate": 1e-3, "max_steps": 8, "warmup_ratio": 0.25, "lr_scheduler": "cosine",
        "per_device_batch_size": 2})
    preftune.train(cfg, log=lambda *_: None)
    logged = [r["learning_rate"] for r in train_records(tmp_path / "run")]
    # The record of step d holds the rate after d scheduler steps (the next step's), as HF Trainer logs it.
    # Warmup ceil(0.25 · 8) = 2 steps: 2/3 after step 1, the peak after step 2, then a cosine over the other 6,
    # by hand (not through build_scheduler, which the loop itself calls): 0.5·(1 + cos(π·k/6)), k = 1..6.
    expected = [1e-3 * f for f in [2 / 3, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(1, 7)]]
    assert logged == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert max(logged) == pytest.approx(1e-3) and logged[-1] == pytest.approx(0.0, abs=1e-12)


# ---- gradient accumulation --------------------------------------------------------------------------------


def test_length_grouped_batches_are_deterministic_and_cover_the_epoch(dpo_config, make_model, train_pairs,
                                                                     monkeypatch, tmp_path):
    """engine.group_by_length: each micro-batch holds examples of similar length, every example
    of the epoch is seen once, and the order is a function of the seed alone (so a resumed run sees the same)."""
    from preftune.trainer import source as loop

    seen: list[tuple[list[int], list[int]]] = []
    real = loop.length_grouped_order

    def spy(lengths, batch_size, seed, epoch, **kw):
        order = real(lengths, batch_size, seed, epoch, **kw)
        seen.append((list(lengths), order))
        return order

    monkeypatch.setattr(loop, "length_grouped_order", spy)
    cfg = dpo_config(make_model(seed=1), train_pairs[:32], training={"per_device_batch_size": 4, "max_steps": 8},
                     engine={"group_by_length": True})
    preftune.train(cfg, log=lambda *_: None)
    assert len(seen) == 1  # one epoch: the order is computed once, not per step
    lengths, order = seen[0]
    assert sorted(order) == list(range(32)) and order == real(lengths, 4, 0, 0)

    def spread(o):  # mean (longest - shortest) over the micro-batches of 4: the padding a batch carries
        return sum(max(lengths[i] for i in o[k:k + 4]) - min(lengths[i] for i in o[k:k + 4])
                   for k in range(0, 32, 4)) / 8

    assert spread(order) < spread(loop.epoch_order(32, 0, 0))


def test_accumulation_1x4_equals_4x1(dpo_config, make_model, train_pairs, monkeypatch, tmp_path):
    real_clip = torch.nn.utils.clip_grad_norm_
    grads: list[list[torch.Tensor]] = []

    def spy_clip(params, max_norm, *args, **kwargs):
        params = list(params)
        grads.append([p.grad.detach().clone() for p in params])
        return real_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy_clip)
    results = []
    for micro, accum in ((4, 1), (1, 4)):
        model = make_model(seed=6)
        out = tmp_path / f"run-{micro}x{accum}"
        cfg = dpo_config(model, train_pairs[:16], training={
            "output_dir": str(out), "per_device_batch_size": micro, "gradient_accumulation_steps": accum,
            "max_steps": 2, "learning_rate": 1e-3},
            engine={"group_by_length": False})  # (the default) length grouping would batch by micro size
        preftune.train(cfg, log=lambda *_: None)
        results.append((model, train_records(out)))
    (m4, rec4), (m1, rec1) = results
    g4, g1 = grads[0], grads[2]  # first optimizer step of each run
    for a, b in zip(g4, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads[1], grads[3]):  # second step, after an identical first update
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert [r["loss"] for r in rec4] == pytest.approx([r["loss"] for r in rec1], rel=1e-5)
    for (name, a), b in zip(m4.named_parameters(), m1.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


# ---- non-finite steps -------------------------------------------------------------------------------------

NAN_LOSS = f"test_nan_{uuid.uuid4().hex[:8]}"
_NAN = SimpleNamespace(calls=0, bad=set())


def _nan_loss(policy_chosen_logps, policy_rejected_logps) -> LossOutput:
    """−log σ(π_w − π_l), made NaN on the calls listed in ``_NAN.bad``."""
    losses = -torch.nn.functional.logsigmoid(policy_chosen_logps - policy_rejected_logps)
    if _NAN.calls in _NAN.bad:
        losses = losses * float("nan")
    _NAN.calls += 1
    return LossOutput(losses=losses)


@pytest.fixture(autouse=True)
def _nan_loss_registered(monkeypatch):
    """The NaN-on-demand loss exists only while a test of this file runs: registry-wide tests never see it."""
    from preftune.losses import base

    monkeypatch.setitem(base._REGISTRY, NAN_LOSS, LossSpec(name=NAN_LOSS, fn=_nan_loss, needs_reference=False,
                                                           description="test: NaN on demand"))


def test_single_nonfinite_step_is_skipped_and_counted(dpo_config, make_model, train_pairs, tmp_path):
    _NAN.calls, _NAN.bad = 0, {1}
    model = make_model(seed=7)
    lines: list[str] = []
    cfg = dpo_config(model, train_pairs[:16], training={"max_steps": 4})
    cfg["loss"] = {"name": NAN_LOSS}
    summary = preftune.train(cfg, log=lines.append)
    assert summary["nonfinite_steps"] == 1
    assert any("step 2: non-finite loss or gradient, update skipped" in line for line in lines)
    assert [r["step"] for r in train_records(tmp_path / "run")] == [1, 3, 4]  # step 2 is not logged
    assert math.isfinite(summary["final_loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_repeated_nonfinite_steps_stop_without_saving_them(dpo_config, make_model, train_pairs, tmp_path):
    """The stop writes no checkpoint of the weights of that moment (they may be diverging; tests/test_nonfinite.py
    checks that the last good checkpoint is kept and named); with no checkpoint before it, it says so."""
    _NAN.calls, _NAN.bad = 0, set(range(2, 100))
    model = make_model(seed=7)
    cfg = dpo_config(model, train_pairs[:16], training={"max_steps": 10, "max_nonfinite_steps": 3})
    cfg["loss"] = {"name": NAN_LOSS}
    with pytest.raises(PreftuneError) as info:
        preftune.train(cfg, log=lambda *_: None)
    msg = str(info.value)
    assert msg.startswith("3 consecutive non-finite steps at step 5; stopped without saving these weights; "
                          "no checkpoint was written before it")
    assert "learning rate" in msg
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "final").exists()
    stop = json.loads((tmp_path / "run" / "run.json").read_text())["stop"]
    assert stop["reason"] == "nonfinite" and stop["step"] == 5 and stop["last_good"] is None
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- precision and drops ----------------------------------------------------------------------------------


def test_bf16_is_refused_on_a_cpu_without_native_bf16(dpo_config, make_model, train_pairs, monkeypatch):
    """An AVX2-only CPU emulates bf16 products tens of times slower than fp32: one line says so, up front."""
    from preftune import hardware

    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo=None: {"avx2", "fma"})
    with pytest.raises(PreftuneError, match="no AMX or AVX512-BF16.*training.precision: fp32"):
        preftune.train(dpo_config(make_model(seed=8), train_pairs[:16], training={"precision": "bf16"}),
                       log=lambda *_: None)
    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo=None: {"avx2", "avx512_bf16"})
    assert hardware.bf16_refusal("cpu", False) is None and hardware.bf16_refusal("cuda", False, {"avx2"}) is None
    assert hardware.cpu_has_native_bf16({"amx_bf16"}) and not hardware.cpu_has_native_bf16({"avx2"})
    monkeypatch.undo()
    assert hardware.cpu_flags("processor : 0\nflags\t\t: fpu avx2 amx_bf16\n") == {"fpu", "avx2", "amx_bf16"}


def test_bf16_run_on_cpu(dpo_config, make_model, train_pairs, tmp_path):
    model = make_model(seed=8)
    summary = preftune.train(dpo_config(model, train_pairs[:16], training={"precision": "bf16", "max_steps": 2,
                                                                          "allow_slow_bf16": True}),
                             log=lambda *_: None)
    assert math.isfinite(summary["final_loss"]) and summary["nonfinite_steps"] == 0
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_train_writes_dropped_rows(dpo_config, make_model, train_pairs, tmp_path, quiet_log):
    rows = train_pairs[:30] + [{"prompt": "say : owl", "chosen": "owl", "rejected": "owl"}]
    preftune.train(dpo_config(make_model(seed=0), rows, training={"max_steps": 1}), log=quiet_log)
    dropped = [json.loads(x) for x in (tmp_path / "run" / "dropped.jsonl").read_text().splitlines()]
    assert [(d["line"], d["reason"]) for d in dropped] == [(31, "identical_responses")]
    assert any("kept 30, dropped 1 (identical_responses: 1)" in line for line in quiet_log)


def test_log_probs_the_trainer_feeds_the_loss_are_the_naive_sums(dpo_config, make_model, toy_tok, train_pairs,
                                                                  monkeypatch):
    """The link between the loop and logprobs: what a step gets from the loop's ``logp_fn`` is, per sequence,
    the naive twin's summed completion log-prob and the completion's token count (learning rate 0, so the
    weights at every step are the initial ones)."""
    rows = train_pairs[:8]
    model = make_model(seed=0)
    expected = _initial_logps(model, toy_tok, rows)
    seen = []
    real_step = steps_mod.STEPS["paired"]

    def spy_step(objective, logp_fn, batch, reference_fn):
        with torch.no_grad():
            logps, lengths = logp_fn(batch)
        seqs = _sequences_of_batch(batch)
        seen.append((logps, lengths, torch.tensor([expected[s] for s in seqs]), [len(c) for _, c in seqs]))
        return real_step(objective, logp_fn, batch, reference_fn)

    monkeypatch.setitem(steps_mod.STEPS, "paired", spy_step)
    preftune.train(dpo_config(model, rows, engine={"layout": "padded"},
                              training={"learning_rate": 0.0, "max_steps": 2}), log=lambda *_: None)
    assert len(seen) == 2
    for logps, lengths, want, want_lengths in seen:
        torch.testing.assert_close(logps.float(), want, rtol=1e-5, atol=1e-5)
        assert lengths.tolist() == want_lengths
