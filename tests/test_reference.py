"""Reference log-probs: computed once, cached on disk, and never a stale hit."""

from __future__ import annotations

import re

import torch

import preftune
from preftune.data.formats import to_pair
from preftune.data.tokenize import Tokenization
from preftune.logprobs import naive_sequence_logps
from preftune.trainer import reference as refcache


def run(dpo_config, model, rows, lines, tmp_path, name, **training):
    cfg = dpo_config(model, rows, training={"output_dir": str(tmp_path / name), "max_steps": 1, **training})
    del lines[:]
    preftune.train(cfg, log=lines.append)
    return " ".join(lines)


def key_of(text: str) -> str:
    match = re.search(r"reference log-probs \(train\): (?:cache hit|computed .* cached as) ([0-9a-f]{32})", text)
    assert match, text
    return match.group(1)


def test_second_run_hits_cache_and_changes_miss(dpo_config, make_model, train_pairs, tmp_path, quiet_log,
                                                monkeypatch):
    import os
    from pathlib import Path

    rows = train_pairs[:16]
    first = run(dpo_config, make_model(seed=0), rows, quiet_log, tmp_path, "a")
    assert "cache hit" not in first
    key = key_of(first)
    cache_file = Path(os.environ["PREFTUNE_CACHE"]) / "reference" / f"{key}.pt"
    assert cache_file.exists()

    # Same weights (a fresh model from the same seed), same data, same rules: a hit with the same key.
    second = run(dpo_config, make_model(seed=0), rows, quiet_log, tmp_path, "b")
    assert f"reference log-probs (train): cache hit {key}" in second

    # Different weights, data, or tokenization rules: computed again under a new key, never the old one.
    other_weights = run(dpo_config, make_model(seed=1), rows, quiet_log, tmp_path, "c")
    other_data = run(dpo_config, make_model(seed=0), train_pairs[16:32], quiet_log, tmp_path, "d")
    other_length = run(dpo_config, make_model(seed=0), rows, quiet_log, tmp_path, "e", max_length=48)
    other_precision = run(dpo_config, make_model(seed=0), rows, quiet_log, tmp_path, "f", precision="bf16", allow_slow_bf16=True)
    keys = {key}
    for text in (other_weights, other_data, other_length, other_precision):
        assert "cache hit" not in text, text
        keys.add(key_of(text))
    assert len(keys) == 5


def test_one_changed_weight_changes_the_fingerprint(make_model):
    a, b = make_model(seed=0), make_model(seed=0)
    assert refcache.model_fingerprint(a) == refcache.model_fingerprint(b)
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-6
    assert refcache.model_fingerprint(a) != refcache.model_fingerprint(b)


def test_lora_adapter_weights_do_not_change_the_fingerprint(make_model):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(make_model(seed=0), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    before = refcache.model_fingerprint(peft)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.add_(1.0)
    assert refcache.model_fingerprint(peft) == before  # the reference is the adapter-disabled base


def test_key_depends_on_examples_and_rules(toy_tok, train_pairs):
    t64, t32 = Tokenization(toy_tok, max_length=64), Tokenization(toy_tok, max_length=32)
    ex = [t64.pair(to_pair(r)) for r in train_pairs[:4]]
    base = refcache.cache_key("m", ex, t64.fingerprint, "fp32")
    assert base == refcache.cache_key("m", list(ex), t64.fingerprint, "fp32")
    assert base != refcache.cache_key("m2", ex, t64.fingerprint, "fp32")
    assert base != refcache.cache_key("m", ex[:3], t64.fingerprint, "fp32")
    assert base != refcache.cache_key("m", ex[::-1], t64.fingerprint, "fp32")  # order matters: rows are by index
    assert base != refcache.cache_key("m", ex, t32.fingerprint, "fp32")
    assert base != refcache.cache_key("m", ex, t64.fingerprint, "bf16")


def test_cached_values_are_the_reference_logps(dpo_config, make_model, toy_tok, train_pairs, tmp_path, quiet_log):
    import os
    from pathlib import Path

    rows = train_pairs[:12]
    model = make_model(seed=0)
    t = Tokenization(toy_tok, max_length=64)
    pairs = [t.pair(to_pair(r)) for r in rows]
    with torch.no_grad():
        chosen, _ = naive_sequence_logps(model, [(p.prompt_ids, p.chosen_ids) for p in pairs])
        rejected, _ = naive_sequence_logps(model, [(p.prompt_ids, p.rejected_ids) for p in pairs])
    key = key_of(run(dpo_config, model, rows, quiet_log, tmp_path, "a"))
    cached = torch.load(Path(os.environ["PREFTUNE_CACHE"]) / "reference" / f"{key}.pt")
    assert cached.shape == (12, 2)
    torch.testing.assert_close(cached, torch.stack([chosen, rejected], dim=1), rtol=0, atol=1e-5)


def test_corrupt_cache_file_is_a_miss(dpo_config, make_model, train_pairs, tmp_path, quiet_log):
    import os
    from pathlib import Path

    rows = train_pairs[:8]
    key = key_of(run(dpo_config, make_model(seed=0), rows, quiet_log, tmp_path, "a"))
    (Path(os.environ["PREFTUNE_CACHE"]) / "reference" / f"{key}.pt").write_bytes(b"not a tensor")
    again = run(dpo_config, make_model(seed=0), rows, quiet_log, tmp_path, "b")
    assert "cache hit" not in again and key_of(again) == key


def test_cache_dir_setting_overrides_environment(dpo_config, make_model, train_pairs, tmp_path, quiet_log):
    cfg = dpo_config(make_model(seed=0), train_pairs[:8], reference={"cache_dir": str(tmp_path / "mine")},
                     training={"max_steps": 1})
    preftune.train(cfg, log=quiet_log)
    assert len(list((tmp_path / "mine").glob("*.pt"))) == 1


def test_same_weights_different_rope_is_not_a_cache_hit(saved_model_dir):
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(saved_model_dir)
    b = AutoModelForCausalLM.from_pretrained(saved_model_dir,
                                             rope_parameters={"rope_type": "default", "rope_theta": 100.0})
    ids = torch.tensor([[2, 11, 12, 13, 14, 15, 16, 17]])
    with torch.no_grad():
        assert not torch.allclose(a(input_ids=ids).logits, b(input_ids=ids).logits, atol=1e-5)
    assert refcache.model_fingerprint(a) != refcache.model_fingerprint(b)
