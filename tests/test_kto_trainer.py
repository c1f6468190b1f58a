"""KTO in the trainer: unpaired and paired data, the KL reference point z0, class weights, odd batch sizes.

Runs use the untrained toy Llama (about 0.1M parameters) for a few steps: these tests check plumbing and
hand-computed numbers, not learning (tests/test_methods.py checks that KTO learns).
"""

import json
import math
from types import SimpleNamespace

import pytest
import torch

import preftune
from preftune import toy
from preftune.data.prepare import mismatched
from preftune.data.tokenize import TokenizedSingle
from preftune.trainer.steps import balanced_weights, kl_reference_point

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def items():
    return toy.split_items(seed=0, n_train=60, n_test=12)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def unpaired_rows(pairs):
    rows = []
    for r in pairs:
        rows.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        rows.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    return rows


def run(tmp_path, train, *, eval=None, loss=None, log=None, **training):
    tok = toy.build_tokenizer()
    config = {
        "model": toy.build_model(tok), "tokenizer": tok,
        "data": {"train": train, "eval": eval},
        "loss": {"name": "kto", "beta": 0.1, **(loss or {})},
        "reference": {"cache_dir": str(tmp_path / "refcache")},
        "training": {"output_dir": str(tmp_path / "run"), "learning_rate": 1e-3, "max_steps": 3,
                     "per_device_batch_size": 4, "progress_bar": False, "save_model": False, **training},
    }
    summary = preftune.train(config, log=log if log is not None else (lambda *a: None))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return summary, records


# ---- pure pieces ------------------------------------------------------------------------------------------


def test_balanced_weights_hand_computed():
    # 30 desirable, 90 undesirable: λ_D·30/(λ_U·90) must reach [1, 4/3]; the minority rises to the middle, 7/6:
    # λ_D = 7/6 · 90/30 = 3.5, λ_U = 1 -> 3.5·30/90 = 1.1667.
    assert balanced_weights(30, 90) == (3.5, 1.0)
    # 90 desirable, 30 undesirable: ratio 3 > 4/3, so λ_U = 90/(7/6 · 30) = 2.5714 (4 decimals), λ_D = 1.
    assert balanced_weights(90, 30) == (1.0, 2.5714)
    # 100 vs 90: ratio 1.11 is already in [1, 4/3]: both stay 1.
    assert balanced_weights(100, 90) == (1.0, 1.0)
    # A number is kept: λ_U = 2 fixed, λ_D auto = 7/6 · 2 · 60/60 = 2.3333.
    assert balanced_weights(60, 60, "auto", 2.0) == (2.3333, 2.0)
    for n_d, n_u in [(1, 999), (999, 1), (7, 3), (3, 7), (50, 51)]:
        d, u = balanced_weights(n_d, n_u)
        assert 1.0 <= d * n_d / (u * n_u) <= 4.0 / 3.0
        assert min(d, u) == 1.0


def test_kl_reference_point_is_a_clamped_detached_batch_mean():
    batch = SimpleNamespace(ref_logps=torch.tensor([-3.0, -5.0, -4.0]))
    policy = torch.tensor([-2.0, -5.5, -3.0], requires_grad=True)

    def logp_fn(b):
        return policy * 1.0, torch.ones(3)

    # (−2 − −3) + (−5.5 − −5) + (−3 − −4) = 1 − 0.5 + 1 = 1.5; mean 0.5
    z0 = kl_reference_point(logp_fn, batch, None, across_processes=False)
    assert z0.item() == pytest.approx(0.5) and not z0.requires_grad
    batch.ref_logps = torch.tensor([0.0, 0.0, 0.0])  # policy below reference: mean −3.5, clamped
    assert kl_reference_point(logp_fn, batch, None, across_processes=False).item() == 0.0


def _kl_worker(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    # rank 0: mean log-ratio 2.0; rank 1: −1.0. Across processes (2 − 1)/2 = 0.5, then clamped (stays 0.5);
    # clamping each process first would give (2 + 0)/2 = 1.0 instead.
    batch = SimpleNamespace(ref_logps=torch.zeros(2))
    value = torch.full((2,), 2.0 if rank == 0 else -1.0)
    z0 = kl_reference_point(lambda b: (value, torch.ones(2)), batch, None, across_processes=True)
    out[rank] = z0.item()
    dist.destroy_process_group()


def test_kl_reference_point_is_averaged_across_processes():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.get_context("spawn").Manager().dict()
    mp.spawn(_kl_worker, args=(2, port, out), nprocs=2)
    assert out[0] == pytest.approx(0.5) and out[1] == pytest.approx(0.5)


def test_mismatched_pairs_every_prompt_with_another_prompts_completion():
    # Paired rows unpaired: examples 2k and 2k+1 share a prompt; a mismatch must never stay within the prompt.
    examples = []
    for k in range(7):
        examples += [TokenizedSingle([1, k], [10 + k], True), TokenizedSingle([1, k], [20 + k], False)]
    kl = mismatched(examples, seed=0)
    assert [e.prompt_ids for e in kl] == [e.prompt_ids for e in examples]
    owner = {tuple(e.completion_ids): tuple(e.prompt_ids) for e in examples}
    assert all(owner[tuple(m.completion_ids)] != tuple(m.prompt_ids) for m in kl)
    assert sorted(m.completion_ids for m in kl) == sorted(e.completion_ids for e in examples)  # a permutation
    assert mismatched(examples, seed=0) == kl  # fixed: the reference side is cached once


# ---- through the trainer ----------------------------------------------------------------------------------


def test_unpaired_jsonl_trains_and_logs_kl(tmp_path, items):
    train_items, test_items = items
    path = write_jsonl(tmp_path / "kto.jsonl", unpaired_rows(toy.pair_rows(train_items, seed=1)))
    summary, records = run(tmp_path, path, max_steps=4)
    train = [r for r in records if r["split"] == "train"]
    assert summary["train_examples"] == 120 and len(train) == 4
    assert all(r["kl"] >= 0.0 and math.isfinite(r["loss"]) for r in train)
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # step 1: the policy is the reference
    assert any(r["kl"] > 0 for r in train[1:])  # z0 is estimated per step, not stuck at 0
    assert {"rewards/desirable", "rewards/undesirable"} <= set(train[0])


def test_paired_data_is_unpaired_and_eval_pairs_are_ranked(tmp_path, items):
    train_items, test_items = items
    train = write_jsonl(tmp_path / "pairs.jsonl", toy.pair_rows(train_items, seed=1))
    evals = write_jsonl(tmp_path / "eval.jsonl", toy.pair_rows(test_items, seed=2))
    summary, records = run(tmp_path, train, eval=evals)
    assert summary["train_examples"] == 2 * 60  # each pair -> one desirable, one undesirable completion
    assert summary["eval_examples"] == 12  # held-out pairs stay pairs
    final = summary["final_eval_metrics"]
    assert 0.0 <= final["rewards/accuracies"] <= 1.0 and final["kl"] >= 0.0
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins"} <= set(final)


def test_eval_fraction_holds_out_whole_pairs(tmp_path, items):
    train_items, _ = items
    tok = toy.build_tokenizer()
    config = {
        "model": toy.build_model(tok), "tokenizer": tok,
        "data": {"train": toy.pair_rows(train_items, seed=1), "eval_fraction": 0.2},
        "loss": {"name": "kto", "beta": 0.1},
        "reference": {"cache_dir": str(tmp_path / "refcache")},
        "training": {"output_dir": str(tmp_path / "run"), "learning_rate": 1e-3, "max_steps": 1,
                     "per_device_batch_size": 4, "progress_bar": False, "save_model": False},
    }
    summary = preftune.train(config, log=lambda *a: None)
    assert summary["eval_examples"] == 12 and summary["train_examples"] == 2 * 48
    assert "rewards/accuracies" in summary["final_eval_metrics"]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batch_size_one_and_odd(tmp_path, items, batch_size):
    # Peers fail here: KL mismatching within the micro-batch needs B >= 2, and odd B breaks half-splits.
    train_items, test_items = items
    summary, records = run(tmp_path, unpaired_rows(toy.pair_rows(train_items[:15], seed=1)),
                           eval=toy.pair_rows(test_items[:5], seed=2), per_device_batch_size=batch_size,
                           gradient_accumulation_steps=2, max_steps=3)
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 3 and all(math.isfinite(r["loss"]) and r["kl"] >= 0 for r in train)
    assert summary["nonfinite_steps"] == 0 and summary["eval_examples"] == 5


def imbalanced_rows(items) -> list[dict]:
    """8 desirable and 24 undesirable completions of the toy task."""
    pairs = toy.pair_rows(items[0][:24], seed=1)
    rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in pairs[:8]]
    return rows + [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in pairs]


def test_auto_weights_are_printed_and_used(tmp_path, items):
    rows = imbalanced_rows(items)
    lines = []
    _, records = run(tmp_path, rows, loss={"desirable_weight": "auto", "undesirable_weight": "auto"},
                     log=lambda *a: lines.append(" ".join(map(str, a))), per_device_batch_size=32, max_steps=1)
    # 8 desirable, 24 undesirable: λ_D = 7/6 · 24/8 = 3.5, λ_U = 1 (ratio 3.5·8/24 = 1.167).
    text = "\n".join(lines)
    assert "8 desirable, 24 undesirable" in text
    assert "desirable_weight=3.5, undesirable_weight=1" in text
    # Step 1: policy = reference, so ρ = 0 and z0 = 0, and each loss is λ·σ(0) = λ/2. The one batch holds all
    # 32 completions: mean = (8 · 3.5 · 0.5 + 24 · 1 · 0.5) / 32 = (14 + 12) / 32 = 0.8125.
    assert records[0]["loss"] == pytest.approx(0.8125, abs=1e-4)


def test_imbalance_without_auto_prints_the_weights_but_keeps_the_given_ones(tmp_path, items):
    rows = imbalanced_rows(items)
    lines = []
    _, records = run(tmp_path, rows, log=lambda *a: lines.append(" ".join(map(str, a))),
                     per_device_batch_size=32, max_steps=1)
    text = "\n".join(lines)
    assert "λ_D·n_D/(λ_U·n_U) = 0.333 is outside [1, 4/3]" in text
    assert "desirable_weight=3.5, undesirable_weight=1" in text
    assert records[0]["loss"] == pytest.approx(0.5, abs=1e-4)  # λ_D = λ_U = 1: every loss σ(0) = 0.5


def test_auto_is_only_for_class_weights(tmp_path, items):
    from preftune.errors import ConfigError

    with pytest.raises(ConfigError, match="loss.beta"):
        run(tmp_path, toy.pair_rows(items[0], seed=1), loss={"beta": "auto"})
