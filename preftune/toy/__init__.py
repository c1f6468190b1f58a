"""The offline demo task: a locally trained tokenizer, a tiny Llama, generated data and a verifier.

Task ("echo"): the prompt asks to repeat a short list of words; the verifier accepts a response that is
exactly those words in order, with nothing after them. The SFT data answers prompts whose first word belongs
to one half of the vocabulary plainly and the others with a chatty sign-off ("... , hope this helps !"), so
the SFT model shows the preferred behaviour on roughly half of held-out prompts while learning to echo every
word. Preference pairs prefer the plain echo over a signed-off or a corrupted echo; DPO from the SFT model
should make it answer plainly everywhere.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

WORDS = (
    "apple banana cherry grape lemon mango melon peach pear plum "
    "red blue green black white brown pink gold gray orange "
    "cat dog fox owl bee cow pig hen bat elk"
).split()
VERBS = ["repeat", "echo", "copy", "say"]
SIGNOFF = ", hope this helps !"
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
# First words whose prompts the SFT data answers plainly; the others get the sign-off.
ANSWERED = set(WORDS[::2])


@dataclass
class Item:
    prompt: str
    words: list[str]
    verb: str


def split_items(seed: int = 0, n_train: int = 1200, n_test: int = 200) -> tuple[list[Item], list[Item]]:
    """Train and held-out prompts; no word list of a held-out prompt occurs in train."""
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()
    items: list[Item] = []
    while len(items) < n_train + n_test:
        words = rng.sample(WORDS, rng.randint(3, 5))
        if tuple(words) not in seen:
            seen.add(tuple(words))
            verb = rng.choice(VERBS)
            items.append(Item(f"{verb} : {' '.join(words)}", words, verb))
    return items[:n_train], items[n_train:]


def verify(prompt: str, response: str) -> bool:
    """The programmatic verifier: the response repeats the prompt's words exactly."""
    words = prompt.split(":", 1)[1].split()
    return response.split() == words


def verifier_score(prompt: str, response: str) -> float:
    """:func:`verify` as a judge's score (1.0 or 0.0); a prompt that is not the toy task's is an error."""
    if ":" not in prompt:
        from preftune.errors import PreftuneError

        raise PreftuneError(f"toy-verifier judges the toy task's prompts ('verb : words'), got {prompt[:60]!r}")
    return float(verify(prompt, response))


def substitute(words: list[str], rng: random.Random) -> str:
    """The echo with one word replaced by a word not in the list."""
    out = list(words)
    out[rng.randrange(len(out))] = rng.choice([w for w in WORDS if w not in words])
    return " ".join(out)


def drop(words: list[str], rng: random.Random) -> str:
    """The echo with one word left out."""
    out = list(words)
    del out[rng.randrange(len(out))]
    return " ".join(out)


def truncate(words: list[str], rng: random.Random) -> str:
    """The echo stopped one or two words early."""
    return " ".join(words[: len(words) - rng.randint(1, 2)])


CORRUPT = {"substitute": substitute, "drop": drop, "truncate": truncate}


def plain(it: Item) -> str:
    return " ".join(it.words)


def signed(it: Item) -> str:
    return f"{plain(it)} {SIGNOFF}"


def sft_rows(items: list[Item], seed: int, plain_share: float = 0.3) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for it in items:
        ok = it.words[0] in ANSWERED or rng.random() < plain_share
        rows.append({"prompt": it.prompt, "completion": plain(it) if ok else signed(it)})
    return rows


def pair_rows(items: list[Item], seed: int, signoff_share: float = 0.8, corruptions: str = "substitute") -> list[dict]:
    rng = random.Random(seed)
    rows = []
    kinds = corruptions.split("+")
    for it in items:
        rejected = signed(it) if rng.random() < signoff_share else CORRUPT[rng.choice(kinds)](it.words, rng)
        rows.append({"prompt": it.prompt, "chosen": plain(it), "rejected": rejected})
    return rows


def build_tokenizer():
    """A word-level tokenizer trained with `tokenizers` on the task's own text, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    corpus = WORDS + VERBS + SIGNOFF.split() + [":", "user", "assistant", "system"]
    tok.train_from_iterator([" ".join(corpus)], trainers.WordLevelTrainer(special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    # Joins word-level tokens with spaces; cleanup=False keeps " , " and " !" apart so text round-trips.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, seed: int = 0, hidden: int = 64, layers: int = 2):
    """A Llama-architecture model of about 0.1M parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)
