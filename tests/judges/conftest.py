"""Fixtures for the judge tests: the scripted chat server, the API key, tiny tokenizer and models."""

from __future__ import annotations

import pytest
import torch

from .judge_helpers import SECRET, FakeChatServer, llama_config


@pytest.fixture
def server():
    srv = FakeChatServer()
    yield srv
    srv.close()


@pytest.fixture
def api_key(monkeypatch):
    """The secret under the default variable name and under a custom one."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    return SECRET


# ---- tiny local models ----------------------------------------------------------------------------------

CORPUS = [
    "which response is better answer with a single letter a or b",
    "the capital of france is paris. the answer is 42.",
    "compare two responses to the same prompt on accuracy helpfulness clarity and safety",
    "A B A B [prompt] [response a] [response b] answer: A answer: B",
] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A BPE tokenizer of ~100 tokens trained in milliseconds; "A" and "B" are single tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = list("abcdefghijklmnopqrstuvwxyzAB0123456789.,:?![]")
    trainer = trainers.BpeTrainer(
        vocab_size=100, special_tokens=["<pad>", "<unk>", "<s>", "</s>"], initial_alphabet=alphabet
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="session")
def tiny_reward_model(tiny_tokenizer):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    return LlamaForSequenceClassification(llama_config(tiny_tokenizer, num_labels=1)).eval()


@pytest.fixture(scope="session")
def tiny_causal_lm(tiny_tokenizer):
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    return LlamaForCausalLM(llama_config(tiny_tokenizer)).eval()
