"""A reward model (``AutoModelForSequenceClassification`` with one output) as a judge and a reward function.

    score(x, y) = r_φ(x, y)                      the head's logit on the last non-pad token
    P(a ≻ b)    = σ(r_φ(x, a) − r_φ(x, b))       Bradley–Terry, the model reward models are trained under
                                                 (Ouyang et al., arXiv:2203.02155v1, Eq. 1)

The verdict's winner is the higher score and its confidence σ(|r_a − r_b|), the Bradley–Terry probability that
the winner is the better response. Each response is scored alone, so the verdict cannot depend on order.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch

from preftune.judges._hf import encode, length_sorted_batches, load_model_and_tokenizer, model_device, pad
from preftune.judges.base import ScoreBasedJudge, ScoreItem
from preftune.models import INPUT_FORMAT_KEY  # what `preftune train` (task: reward) records in the config

INPUT_FORMATS = ("chat", "plain", "preftune")


class RewardModelJudge(ScoreBasedJudge):
    """Score (prompt, response) pairs with a sequence-classification reward model, in padded batches.

    Args:
        model: a path or hub id, or a loaded ``...ForSequenceClassification`` with ``num_labels == 1``.
        tokenizer: required with a loaded model; loaded from ``model`` when that is a path.
        batch_size: sequences per forward pass.
        max_length: longest input in tokens; longer inputs keep their LAST ``max_length`` tokens, because the
            response (at the end) is what is being scored.
        device / dtype: where and in what precision to run (e.g. ``"cuda"``, ``"bfloat16"``).
        separator: between prompt and response in the ``plain`` format.
        tie_margin: |r_a − r_b| at or below this is a tie.
        name: label in reports and ensembles.
        input_format: how (prompt, response) becomes tokens:
            ``chat``      the tokenizer's chat template (user turn = prompt, assistant turn = response);
            ``plain``     prompt + separator + response, with the tokenizer's special tokens;
            ``preftune``  as ``preftune train`` tokenizes a text row (``data.tokenize``): ``tok(prompt)`` with
                          its special tokens, then ``tok(response)`` without, then EOS;
            ``auto``      ``preftune`` for a reward model trained by ``preftune train`` (its config records
                          it), else ``chat`` when the tokenizer has a template, else ``plain``.

    If the model config has no ``pad_token_id`` it is set to the tokenizer's (pad, else EOS): the model finds
    each sequence's last token by looking for pad ids, so batching needs one.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        batch_size: int = 8,
        max_length: int | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        separator: str = "\n",
        tie_margin: float = 0.0,
        name: str | None = None,
        input_format: str = "auto",
    ) -> None:
        label = name or (Path(str(model)).name if isinstance(model, str | Path) else type(model).__name__)
        super().__init__(label, tie_margin)
        from transformers import AutoModelForSequenceClassification

        self.model, self.tokenizer = load_model_and_tokenizer(
            model, tokenizer, AutoModelForSequenceClassification, device, dtype
        )
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"a reward model has one output; this one has num_labels={self.model.config.num_labels}"
            )
        if self.model.config.pad_token_id is None:
            pad_id = self.tokenizer.pad_token_id
            self.model.config.pad_token_id = pad_id if pad_id is not None else self.tokenizer.eos_token_id
        if self.model.config.pad_token_id is None:
            raise ValueError(
                "neither the model nor the tokenizer defines a pad or EOS token; set pad_token_id"
            )
        self.batch_size = batch_size
        self.max_length = max_length
        self.separator = separator
        if input_format == "auto":
            trained = getattr(self.model.config, INPUT_FORMAT_KEY, None)
            input_format = trained or ("chat" if getattr(self.tokenizer, "chat_template", None) else "plain")
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of auto, {', '.join(INPUT_FORMATS)}; got {input_format!r}")
        self.input_format = input_format
        self._tokenization = None

    def confidence_from_margin(self, margin: float) -> float:
        """σ(|r_a − r_b|): the Bradley–Terry probability that the higher-scored response is better."""
        return 1.0 / (1.0 + math.exp(-margin))

    def encode(self, prompt: str, response: str) -> list[int]:
        """Token ids the model scores for one (prompt, response), truncated from the left to ``max_length``."""
        if self.input_format == "preftune":
            ids = self._train_ids(prompt, response)
        elif self.input_format == "chat":
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            ids = encode(self.tokenizer, messages, prompt + self.separator + response, generation_prompt=False)
        else:
            ids = list(self.tokenizer(prompt + self.separator + response)["input_ids"])
        return ids[-self.max_length :] if self.max_length else ids

    def _train_ids(self, prompt: str, response: str) -> list[int]:
        """prompt + completion ids exactly as the trainer builds them for a text row (no truncation here)."""
        from preftune.data.formats import UnpairedRecord
        from preftune.data.tokenize import Tokenization

        if self._tokenization is None:
            self._tokenization = Tokenization(self.tokenizer, max_length=sys.maxsize)
        single = self._tokenization.single(UnpairedRecord(prompt, response, True))
        return single.prompt_ids + single.completion_ids

    @torch.inference_mode()
    def _score_many(self, items: list[ScoreItem]) -> list[float]:
        """Right-padded, length-sorted batches; equal to scoring one by one (tested to 1e-5 in fp32)."""
        seqs = [self.encode(p, r) for p, r in items]
        scores = [0.0] * len(seqs)
        device = model_device(self.model)
        for idx in length_sorted_batches([len(s) for s in seqs], self.batch_size):
            ids, mask = pad([seqs[i] for i in idx], self.model.config.pad_token_id, "right", device)  # (b, T)
            logits = self.model(input_ids=ids, attention_mask=mask).logits  # (b, 1)
            for i, value in zip(idx, logits[:, 0].float().tolist()):
                scores[i] = value
        return scores
