"""engine.cast_once: under bf16, each fp32 weight (and the LM head) is cast once per optimizer step, not once per
micro-batch, with the same gradients, and never served stale after the weights change."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import preftune
from preftune.data.collate import collate_padded
from preftune.data.tokenize import TokenizedPair
from preftune.logprobs import LogpModel, head_casts, token_logps
from preftune.runlog import read_metrics
from preftune.trainer.casts import CastWindow

ACCUM = 3


def random_pairs(tok, n: int, seed: int) -> list[TokenizedPair]:
    """Pairs of random tokens: prompts of 2-6 tokens, completions of 5-9 (more than one head chunk of 4)."""
    g = torch.Generator().manual_seed(seed)

    def seq(lo, hi):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return torch.randint(len(tok.special_tokens_map) + 3, len(tok), (length,), generator=g).tolist()

    return [TokenizedPair(seq(2, 6), seq(5, 9), seq(5, 9)) for _ in range(n)]


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


class WeightCasts(TorchDispatchMode):
    """Counts the bf16 casts (``aten._to_copy``) whose input is one of ``params``' storage."""

    def __init__(self, params):
        super().__init__()
        self.ptrs, self.count = {p.data_ptr() for p in params}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16:
            self.count += args[0].data_ptr() in self.ptrs
        return func(*args, **kwargs)


def window(model, batches, enabled: bool, counter=None):
    """ACCUM micro-batches of -Σ logp into the fp32 .grad, as run_steps does: (per-micro-batch losses, grads)."""
    logp = LogpModel(model, chunk_size=4)
    model.zero_grad(set_to_none=True)
    losses = []
    with CastWindow(bf16, "cpu", enabled) as casts, counter or torch.autocast("cpu", enabled=False):
        for batch in batches:
            with casts.forward():
                loss = -logp(*batch.model_args())[0].sum() / len(batches)
            loss.backward()
            losses.append(loss.item())
    return losses, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_window_gives_the_per_micro_batch_gradients_bitwise(make_model, toy_tok):
    """Same bf16 copies, same products: the accumulated fp32 gradients are bitwise those of one autocast region
    per micro-batch (the head's several chunks included: chunk_size 4 < the completion tokens)."""
    model = make_model(seed=3)
    batches = [collate_padded(random_pairs(toy_tok, 2, seed=s), toy_tok.pad_token_id) for s in range(ACCUM)]
    losses_on, on = window(model, batches, True)
    losses_off, off = window(model, batches, False)
    assert losses_on == losses_off
    for name in off:
        assert torch.equal(on[name], off[name]), name
    assert all(g.dtype == torch.float32 for g in on.values()) and any(g.abs().sum() > 0 for g in on.values())


def test_each_weight_is_cast_once_per_window(make_model, toy_tok):
    """Per micro-batch the model casts its 2-D weights (7 per layer x 2 layers, autocast) and the tied head twice
    (forward and backward of the chunked head): 14 + 2 = 16 casts, so 3 micro-batches cast 48 times without the
    window; with it, each of the 15 distinct weights is cast once: 15."""
    model = make_model(seed=3)
    batches = [collate_padded(random_pairs(toy_tok, 2, seed=s), toy_tok.pad_token_id) for s in range(ACCUM)]
    counts = {}
    for enabled in (False, True):
        counter = WeightCasts(list(model.parameters()))
        window(model, batches, enabled, counter)
        counts[enabled] = counter.count
    assert counts == {False: 3 * 16, True: 15}


def test_a_changed_weight_is_cast_again():
    """Inside head_casts the head's copy is reused while the weight is unchanged and recast after an in-place
    update (what optimizer.step does): the log-probs after the update are those of a fresh cast."""
    torch.manual_seed(0)
    head = torch.nn.Linear(3, 5, bias=False)
    hidden, targets = torch.randn(6, 3), torch.randint(0, 5, (6,))

    def logps():
        with torch.no_grad(), bf16():
            return token_logps(hidden, head, targets, chunk_size=4)

    before = logps()
    with torch.no_grad():
        head.weight.mul_(-2.0)
    after = logps()  # outside any window: a fresh cast of the new weights
    with torch.no_grad():
        head.weight.div_(-2.0)
    with head_casts():
        assert torch.equal(logps(), before) and torch.equal(logps(), before)  # the cached copy, same values
        with torch.no_grad():
            head.weight.mul_(-2.0)
        assert torch.equal(logps(), after)  # not the stale copy of the old weights
    assert not torch.equal(before, after)


def test_training_with_and_without_the_window_is_the_same(tmp_path, dpo_config, make_model, train_pairs):
    """3 optimizer steps of 3 micro-batches in bf16: every step's loss and gradient norm are the same with and
    without engine.cast_once, so steps 2 and 3 saw the updated weights, not step 1's copies."""
    records = {}
    for on in (True, False):
        cfg = dpo_config(make_model(seed=4), train_pairs[:36], engine={"cast_once": on},
                         training={"output_dir": str(tmp_path / str(on)), "precision": "bf16", "allow_slow_bf16": True,
                                   "gradient_accumulation_steps": ACCUM, "max_steps": 3, "learning_rate": 1e-2})
        preftune.train(cfg, log=lambda *_: None)
        records[on] = [(r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / str(on)) if r["split"] == "train"]
    assert len(records[True]) == 3
    assert records[True] == records[False]
    assert len({loss for loss, _ in records[True]}) == 3  # the weights moved between steps
