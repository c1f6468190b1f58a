"""Cost of the finite-weights check after every optimizer update (``trainer.checkpoint.parameters_finite``).

    python benchmarks/param_check.py [--threads 1]

For the toy model (hidden 32) and the ``tiny`` benchmark Llama's shape (hidden 256, 4 layers; 3.2M parameters with
the toy's vocabulary) it trains a few DPO steps
with ``preftune.train`` and reports the mean step time (``train_loop_s / steps``) beside the time of one check
over the trainable weights; for the SmolLM2-135M shape (134.5M parameters) it times the check alone (a step of
that model on this CPU takes ~20 s: ``vs_trl.py`` in RESULTS.md).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def check_seconds(model, repeat: int) -> float:
    from preftune.trainer.checkpoint import parameters_finite

    params = [p for p in model.parameters() if p.requires_grad]
    parameters_finite(params)  # warm up
    t = time.perf_counter()
    for _ in range(repeat):
        assert parameters_finite(params)
    return (time.perf_counter() - t) / repeat


def step_seconds(model, tok, rows, steps: int) -> float:
    import preftune

    with tempfile.TemporaryDirectory() as out:
        summary = preftune.train({"model": model, "tokenizer": tok, "data": {"train": rows}, "loss": {"beta": 0.1},
                                  "training": {"output_dir": out, "learning_rate": 1e-4, "max_steps": steps,
                                               "per_device_batch_size": 2, "gradient_accumulation_steps": 4,
                                               "max_length": 128, "progress_bar": False, "save_model": False}},
                                 log=lambda *_: None)
    return summary["train_loop_s"] / summary["steps"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    from preftune import toy

    tok = toy.build_tokenizer()
    rows = toy.pair_rows(toy.split_items(0, 160, 64)[0], 0)
    toy_model = toy.build_model(tok, seed=0, hidden=32, layers=2)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=4, pad_token_id=0))
    tiny.resize_token_embeddings(len(tok))
    for name, model in (("toy", toy_model), ("tiny", tiny)):
        n = sum(p.numel() for p in model.parameters())
        step = step_seconds(model, tok, rows, steps=6)
        check = check_seconds(model, repeat=50)
        print(f"{name}: {n / 1e6:.2f}M parameters, step {step * 1e3:.1f} ms, check {check * 1e3:.3f} ms "
              f"({100 * check / step:.2f}% of a step)")
    smol = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                        tie_word_embeddings=True))
    n = sum(p.numel() for p in smol.parameters())
    check = check_seconds(smol, repeat=5)
    print(f"smol135m: {n / 1e6:.1f}M parameters, check {check * 1e3:.1f} ms ({100 * check / 20:.2f}% of a ~20 s step)")


if __name__ == "__main__":
    main()
