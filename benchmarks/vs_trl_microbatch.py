"""One DPO micro-batch, TRL's collator + fused head against preftune's packed engine, in one process
(``python benchmarks/vs_trl.py --microbatch N``; the model shape comes from ``vs_trl.MODELS``)."""

from __future__ import annotations

import random
import time


def microbatch_ab(shape: dict, specials: int, precision: str, repeats: int) -> dict:
    """CPU seconds of one DPO micro-batch (2 pairs, forward + backward) on the same model, alternating TRL's
    collator + fused LM head (as ``DPOTrainer`` runs it, with its policy-side extra outputs) and preftune's
    packed layout + chunked head. Median over ``repeats`` after one warm-up each."""
    import statistics

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import add_fused_lm_head

    from preftune.config import EngineConfig
    from preftune.data.layouts import LAYOUTS
    from preftune.data.tokenize import TokenizedPair
    from preftune.logprobs import sequence_logps

    torch.manual_seed(0)
    rng = random.Random(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=True,
                                         rope_theta=100000.0, attn_implementation="sdpa"))
    model.train()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))

    def ids(n):
        return [rng.randrange(specials, shape["vocab_size"]) for _ in range(n)]

    pairs = [TokenizedPair(ids(rng.randint(110, 150)), ids(rng.randint(150, 210)) + [2],
                           ids(rng.randint(150, 210)) + [2]) for _ in range(2 * (repeats + 1))]
    collator = DataCollatorForPreference(pad_token_id=0)
    engine = EngineConfig()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def trl(two):
        batch = collator([{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids}
                          for p in two])
        completion = batch.pop("completion_mask")
        labels = batch["input_ids"].masked_fill(completion == 0, -100)
        with autocast:
            logps = model(**batch, labels=labels, fused_lm_head=True, use_cache=False).log_probs.sum(1)
        logps.sum().backward()

    def preftune(two):
        with autocast:
            logps, _ = sequence_logps(model, LAYOUTS[engine.layout](two, 0), engine.chunk_size)
        logps.sum().backward()

    times = {"trl": [], "preftune": []}
    for i in range(repeats + 1):
        for name, fn in (("trl", trl), ("preftune", preftune)):
            t0 = time.process_time()
            fn(pairs[2 * i : 2 * i + 2])
            if i:
                times[name].append(time.process_time() - t0)
            model.zero_grad(set_to_none=True)
    out = {name: statistics.median(v) for name, v in times.items()}
    out["ratio"] = out["trl"] / out["preftune"]
    return out


