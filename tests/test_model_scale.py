"""Model scale: bf16 weights with fp32 master weights, the loading options, QLoRA's refusal off CUDA, and
``preftune export --merge``."""

from __future__ import annotations

import json

import pytest
import torch

import preftune
from preftune import hardware
from preftune.errors import ConfigError, PreftuneError
from preftune.models import cast_weights, quantization_refusal
from preftune.runlog import read_metrics
from preftune.trainer.optim import MasterAdamW, build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


class Opt:
    weight_decay, learning_rate, adam_betas = 0.0, 1e-3, [0.9, 0.999]

    def __init__(self, master_weights=True):
        self.master_weights = master_weights


def _run_constant_gradient(master: bool, steps: int = 10) -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
    layer = torch.nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    torch.nn.init.ones_(layer.weight)
    opt = build_optimizer(layer, Opt(master))
    for _ in range(steps):
        layer.weight.grad = torch.full_like(layer.weight, -1.0)
        opt.step()
        opt.zero_grad()
    return layer, opt


def test_master_weights_keep_updates_bf16_rounds_away():
    """w = 1 in bf16, AdamW at lr 1e-3 with a constant gradient g = -1: m̂ = g and v̂ = g² after bias
    correction, so every step moves w by lr·m̂/(√v̂ + ε) = 1e-3 upwards. bf16 has 8 significant bits: the spacing
    at 1.0 is 2^-7 = 0.0078125, so 1 + 1e-3 rounds back to 1 every step without masters. With fp32 masters,
    10 steps give m = 1.010 and w = round_bf16(1.010) = 1 + 2^-7 = 1.0078125."""
    plain, opt = _run_constant_gradient(master=False)
    assert not isinstance(opt, MasterAdamW) and plain.weight.item() == 1.0
    mastered, opt = _run_constant_gradient(master=True)
    assert isinstance(opt, MasterAdamW)
    assert opt.state_dict()["masters"][0].item() == pytest.approx(1.010, abs=1e-6)
    assert mastered.weight.dtype == torch.bfloat16 and mastered.weight.item() == 1.0078125
    state = opt.state_dict()["state"][0]
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32


def test_master_weights_round_trip_through_state_dict():
    """A resumed optimizer continues from the saved fp32 masters, not from the rounded bf16 weights."""
    layer, opt = _run_constant_gradient(master=True, steps=3)
    state = opt.state_dict()
    fresh = torch.nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    torch.nn.init.zeros_(fresh.weight)
    again = build_optimizer(fresh, Opt(True))
    again.load_state_dict(state)
    assert again.state_dict()["masters"][0].item() == pytest.approx(1.003, abs=1e-6)
    assert fresh.weight.item() == layer.weight.item()


def test_window_gradients_accumulate_in_fp32():
    """4 micro-batches of a bf16 weight w with gradients 1, 2^-9, 2^-9, 2^-9 (loss = w·x, so dL/dw = x). Summed in
    bf16 (8 significant bits, spacing 2^-7 at 1.0) each 1 + 2^-9 rounds back to 1: the window's gradient would be
    1.0. The fp32 sum is 1 + 3·2^-9 = 1.005859375 exactly, in the master's .grad; no bf16 .grad is kept. Clipping
    (Parallel.clip) reads the masters: the norm is 1.005859375 and the master gradient is scaled to max_norm 0.5."""
    from preftune.trainer.parallel import Parallel

    layer = torch.nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    torch.nn.init.ones_(layer.weight)
    opt = build_optimizer(layer, Opt(True))
    for x in (1.0, 2**-9, 2**-9, 2**-9):
        layer(torch.tensor([[x]], dtype=torch.bfloat16)).sum().backward()
        assert layer.weight.grad is None  # moved into the fp32 sum by the hook
    (master,) = opt.gradient_params([layer.weight])
    assert master.dtype == torch.float32 and master.grad.item() == 1.005859375
    parallel = Parallel.__new__(Parallel)  # clip's one-process path needs only the optimizer
    parallel.deepspeed, parallel.optimizer = False, opt
    assert parallel.clip([layer.weight], 0.5).item() == pytest.approx(1.005859375)
    assert master.grad.item() == pytest.approx(0.5, rel=1e-5)
    opt.step()
    opt.zero_grad()
    assert master.grad.item() == 0.0 and layer.weight.grad is None  # the fp32 buffer is kept, zeroed


@pytest.mark.slow
def test_bf16_weights_train_the_toy_as_well_as_fp32(tmp_path, toy_sft):
    """DPO from the session's SFT toy model (``toy_sft``), 8 pairs x 2 accumulation, 40 steps, with
    fp32 weights and with bf16 weights (fp32 masters, fp32 window sums): held-out preference accuracy on 200
    pairs within 0.05 of each other, both above 0.8 (chance 0.5); the policy starts at the reference (first loss
    ln 2 = 0.6931) and the saved model is bf16."""
    from preftune import toy

    pairs = toy.pair_rows(toy_sft.items[:640], seed=1)
    held_out = toy.pair_rows(toy_sft.held_out[:200], seed=2)

    def dpo(out, **top):
        return preftune.train({
            "model": str(toy_sft.model_dir), "data": {"train": pairs, "eval": held_out},
            "loss": {"name": "dpo", "beta": 2.0}, "reference": {"cache_dir": str(tmp_path / "refcache")},
            "training": {"output_dir": str(out), "learning_rate": 2e-4, "max_steps": 40, "per_device_batch_size": 8,
                         "gradient_accumulation_steps": 2, "warmup_ratio": 0.1, "max_length": 64,
                         "progress_bar": False, "allow_slow_bf16": True},
            **top,
        }, log=lambda *_: None)

    fp32, bf16 = dpo(tmp_path / "fp32"), dpo(tmp_path / "bf16", model_dtype="bf16")
    acc32, acc16 = (s["final_eval_metrics"]["rewards/accuracies"] for s in (fp32, bf16))
    assert acc32 >= 0.8 and acc16 >= 0.8, (acc32, acc16)
    assert abs(acc32 - acc16) <= 0.05, (acc32, acc16)
    first = [r for r in read_metrics(tmp_path / "bf16") if r["split"] == "train"][0]
    assert first["loss"] == pytest.approx(0.6931, abs=2e-3)  # the policy starts at the reference: ln 2
    assert json.loads((tmp_path / "bf16" / "final" / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16" / "final", dtype="auto")
    assert next(saved.parameters()).dtype == torch.bfloat16


def test_loaded_model_is_cast_and_keeps_fp32_rotary_tables(dpo_config, make_model, train_pairs):
    model = make_model(seed=3)
    preftune.train(dpo_config(model, train_pairs[:16], model_dtype="bf16",
                              training={"max_steps": 1, "allow_slow_bf16": True}), log=lambda *_: None)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in model.buffers()} == {torch.float32}  # as from_pretrained(dtype=bf16) leaves them
    assert model.model.embed_tokens.weight is model.lm_head.weight  # still tied


def test_lora_on_a_bf16_base_trains_fp32_adapters(dpo_config, make_model, train_pairs):
    model = make_model(seed=4)
    preftune.train(dpo_config(model, train_pairs[:16], model_dtype="bf16", lora={"r": 4, "alpha": 8},
                              training={"max_steps": 1, "allow_slow_bf16": True}), log=lambda *_: None)
    lora = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    base = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    assert lora == {torch.float32} and base == {torch.bfloat16}


def test_low_precision_weights_refused_where_the_cpu_emulates_them(dpo_config, make_model, train_pairs, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo=None: {"avx2", "fma"})
    with pytest.raises(PreftuneError, match="model_dtype: bf16 on this CPU .*no AMX or AVX512-BF16.*model_dtype: fp32"):
        preftune.train(dpo_config(make_model(seed=5), train_pairs[:16], model_dtype="bf16"), log=lambda *_: None)
    assert "allow_slow_bf16" in hardware.low_precision_refusal("cpu", "bf16", False)
    assert hardware.low_precision_refusal("cpu", "bf16", True) is None
    assert hardware.low_precision_refusal("cuda", "fp16", False) is None
    message = hardware.low_precision_refusal("cpu", "fp16", False, {"avx2", "avx512_bf16"})
    assert "no AMX-FP16 or AVX512-FP16" in message
    assert hardware.low_precision_refusal("cpu", "fp16", False, {"avx512_fp16"}) is None


def test_fp16_full_fine_tuning_is_refused_in_the_config(dpo_config, make_model):
    with pytest.raises(ConfigError, match="fp16 full fine-tuning needs loss scaling"):
        preftune.config.to_config(dpo_config("m", "a.jsonl", model_dtype="fp16"))
    preftune.config.to_config(dpo_config("m", "a.jsonl", model_dtype="fp16", lora={"r": 4}))


def test_hub_options_reach_from_pretrained(dpo_config, saved_model_dir, train_pairs, monkeypatch):
    """attn_implementation, trust_remote_code and revision are passed to the model's and tokenizer's loaders."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = {}
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, name, *args, _original=original, _key=cls.__name__, **kwargs):
            seen[_key] = dict(kwargs)
            kwargs.pop("revision", None)  # a local directory has no revisions
            return _original(klass, name, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    cfg = dpo_config(str(saved_model_dir), train_pairs[:16], training={"max_steps": 1},
                     attn_implementation="eager", trust_remote_code=True, revision="v1.0")
    cfg["tokenizer"] = None
    preftune.train(cfg, log=lambda *_: None)
    model_kwargs = seen["AutoModelForCausalLM"]
    assert model_kwargs["attn_implementation"] == "eager" and model_kwargs["trust_remote_code"] is True
    assert model_kwargs["revision"] == "v1.0" and model_kwargs["dtype"] == torch.float32
    assert seen["AutoTokenizer"] == {"trust_remote_code": True, "revision": "v1.0"}


def test_flash_attention_needs_the_padded_layout():
    with pytest.raises(ConfigError, match="flash_attention_2 takes no 4-D attention mask.*engine.layout: padded"):
        preftune.config.to_config({"model": "m", "attn_implementation": "flash_attention_2", "loss": {"beta": 0.1},
                                   "training": {"output_dir": "x", "learning_rate": 1e-3}})


def test_qlora_without_cuda_is_one_clear_message(dpo_config, saved_model_dir, train_pairs, monkeypatch):
    cfg = dpo_config(str(saved_model_dir), train_pairs[:16], lora={"r": 4, "quantization": "4bit"})
    with pytest.raises(PreftuneError) as err:
        preftune.train(cfg, log=lambda *_: None)
    assert str(err.value) == ("QLoRA (lora.quantization: 4bit) needs a CUDA GPU and bitsandbytes (pip install "
                              "bitsandbytes); this machine has no CUDA device: remove lora.quantization to train "
                              "plain LoRA")
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else object())
    assert quantization_refusal("8bit", "cuda").endswith("bitsandbytes is not installed: pip install bitsandbytes")


def test_qlora_settings_are_the_papers():
    pytest.importorskip("transformers")
    from preftune.models import quantization_config

    q = quantization_config("4bit", torch.bfloat16)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config("8bit", torch.bfloat16).load_in_8bit


def test_cast_weights_keeps_ties_and_buffers(make_model):
    model = cast_weights(make_model(seed=1), torch.float16)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.dtype == torch.float16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32 and model.config.dtype == torch.float16


# ---- export ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, saved_model_dir, train_pairs):
    out = tmp_path_factory.mktemp("lora-run")
    preftune.train({
        "model": str(saved_model_dir), "data": {"train": train_pairs[:32]}, "loss": {"name": "dpo", "beta": 0.1},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"]},
        "training": {"output_dir": str(out), "learning_rate": 2e-2, "max_steps": 4, "per_device_batch_size": 8,
                     "max_length": 64, "progress_bar": False},
    }, log=lambda *_: None)
    return out


def test_export_merge_gives_the_peft_models_logits(lora_run, saved_model_dir, tmp_path, toy_tok):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.cli import main

    out = tmp_path / "merged"
    assert main(["export", str(lora_run), "--merge", "--out", str(out)]) == 0
    assert not (out / "adapter_config.json").exists() and (out / "tokenizer.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved_model_dir), lora_run / "final").eval()
    ids = torch.tensor([toy_tok("say : owl cat dog")["input_ids"]])
    with torch.no_grad():
        want, got = peft(input_ids=ids).logits, merged(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(saved_model_dir)(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-3  # the adapter changed the model: the comparison means something
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out).chat_template == toy_tok.chat_template

    half = tmp_path / "merged-bf16"
    assert main(["export", str(lora_run), "--merge", "--out", str(half), "--dtype", "bf16"]) == 0
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_without_merge_copies_and_bad_paths_are_one_line(lora_run, tmp_path, capsys):
    from preftune.cli import main

    assert main(["export", str(lora_run), "--out", str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "adapter_config.json").exists()
    assert main(["export", str(tmp_path / "nothing"), "--merge", "--out", str(tmp_path / "x")]) == 2
    assert "neither a run directory with final/ nor a saved model" in capsys.readouterr().err
