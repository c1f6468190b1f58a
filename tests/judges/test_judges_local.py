"""Local judges on tiny randomly initialized Llamas: reward model (scores) and causal LM (letter probs)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from preftune.judges import LMJudge, RewardModelJudge, build_judge

PAIRS = [
    ("what is the capital of france", "paris", "the capital of france is paris. the answer is 42."),
    ("which answer is better", "a", "b b b"),
    ("answer with a single letter", "the answer is a", "clarity and safety"),
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def single_score(judge: RewardModelJudge, prompt: str, response: str) -> float:
    ids = torch.tensor([judge.encode(prompt, response)])
    with torch.no_grad():
        return judge.model(input_ids=ids).logits[0, 0].item()


def test_reward_model_batches_equal_one_by_one(tiny_reward_model, tiny_tokenizer):
    judge = RewardModelJudge(tiny_reward_model, tiny_tokenizer, batch_size=4)
    items = [(p, r) for p, a, b in PAIRS for r in (a, b)]  # 6 lengths -> padded batches of 4 and 2
    batched = judge.score_many(items)
    alone = [single_score(judge, p, r) for p, r in items]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(batched)) == len(batched)  # distinct inputs, distinct scores


def test_reward_model_verdict_is_bradley_terry(tiny_reward_model, tiny_tokenizer):
    judge = RewardModelJudge(tiny_reward_model, tiny_tokenizer)
    prompt, a, b = PAIRS[0]
    s_a, s_b = judge.score(prompt, a), judge.score(prompt, b)
    v = judge.judge(prompt, a, b)
    assert v.winner == ("A" if s_a > s_b else "B")
    assert v.confidence == pytest.approx(1 / (1 + math.exp(-abs(s_a - s_b))))  # σ(|r_a − r_b|)
    assert judge.position_stats.as_dict()["flipped"] == 0 and v.orders is None  # order-invariant: one pass


def test_reward_model_uses_the_chat_template(tiny_reward_model, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    judge = RewardModelJudge(tiny_reward_model, tok, batch_size=3)
    text = "<s>user: which answer is better</s><s>assistant: b b b</s>"
    assert judge.encode("which answer is better", "b b b") == tok(text, add_special_tokens=False)["input_ids"]
    full = judge.encode(PAIRS[0][0], PAIRS[0][2])
    short = RewardModelJudge(tiny_reward_model, tok, max_length=12).encode(PAIRS[0][0], PAIRS[0][2])
    assert len(full) > 12 and short == full[-12:]  # truncated from the left: the response end stays
    items = [(p, r) for p, a, b in PAIRS for r in (a, b)]
    assert judge.score_many(items) == pytest.approx([single_score(judge, p, r) for p, r in items], abs=1e-5)


def letter_share(judge: LMJudge, prompt: str, first: str, second: str) -> float:
    """p̂_A computed by hand from one unpadded forward pass."""
    ids = torch.tensor([judge.encode(prompt, first, second)])
    with torch.no_grad():
        probs = torch.softmax(judge.model(input_ids=ids).logits[0, -1].float(), -1)
    p_a, p_b = probs[judge.letter_ids["A"]].sum().item(), probs[judge.letter_ids["B"]].sum().item()
    return p_a / (p_a + p_b)


def test_lm_judge_letter_probs_batched_equal_one_by_one(tiny_causal_lm, tiny_tokenizer):
    judge = LMJudge(tiny_causal_lm, tiny_tokenizer, batch_size=2)
    assert all(len(ids) == 1 for ids in judge.letter_ids.values())  # "A" and " A" are one token here
    swapped = [(p, b, a) for p, a, b in PAIRS]
    shares = [a / (a + b) for a, b in judge.letter_probs(PAIRS + swapped)]  # left-padded batches
    assert shares == pytest.approx([letter_share(judge, *it) for it in PAIRS + swapped], abs=1e-5)


def test_lm_judge_asks_both_orders(tiny_causal_lm, tiny_tokenizer):
    judge = LMJudge(tiny_causal_lm, tiny_tokenizer)
    verdicts = judge.judge_many(PAIRS)
    for (prompt, a, b), v in zip(PAIRS, verdicts):
        first, second = (letter_share(judge, prompt, a, b), letter_share(judge, prompt, b, a))
        ab, ba = v.orders
        assert ab.winner == ("A" if first > 0.5 else "B") and ab.confidence == pytest.approx(
            max(first, 1 - first)
        )
        assert ba.winner == ("A" if second > 0.5 else "B")
        # Agreement means response_a won as A in (a, b) and as B in (b, a).
        agree = (first > 0.5) != (second > 0.5)
        assert v.flipped == (not agree) and v.winner == (ab.winner if agree else "tie")
    flips = sum(v.flipped for v in verdicts)
    assert judge.position_stats.as_dict() == {"compared": 3, "flipped": flips, "failed": 0, "rate": flips / 3}


def test_lm_judge_with_chat_template_and_tie_margin(tiny_causal_lm, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    judge = LMJudge(tiny_causal_lm, tok, tie_margin=1.0)  # every |p̂_A − p̂_B| <= 1: always a tie
    assert tok.decode(judge.encode("q", "x", "y")).replace(" ", "").endswith("assistant:")
    v = judge.judge("q", "x", "y")
    assert v.winner == "tie" and all(o.winner == "tie" for o in v.orders)


def test_build_judge_loads_local_models_from_disk(
    tmp_path, tiny_reward_model, tiny_causal_lm, tiny_tokenizer
):
    for sub, model in (("rm", tiny_reward_model), ("lm", tiny_causal_lm)):
        model.save_pretrained(tmp_path / sub)
        tiny_tokenizer.save_pretrained(tmp_path / sub)
    rm = build_judge({"type": "reward_model", "model": str(tmp_path / "rm"), "batch_size": 2})
    direct = RewardModelJudge(tiny_reward_model, tiny_tokenizer)
    items = [(p, a) for p, a, _ in PAIRS]
    assert rm.score_many(items) == pytest.approx(direct.score_many(items), abs=1e-5)
    lm = build_judge({"type": "lm", "model": str(tmp_path / "lm"), "name": "tiny"})
    assert lm.name == "tiny" and lm.judge(*PAIRS[0]).winner in ("A", "B", "tie")
