"""A local causal LM as a pairwise judge, read from its next-token probabilities of "A" and "B".

    P_A = Σ_{t ∈ V_A} p(t | judging prompt),   P_B likewise,   p̂_A = P_A / (P_A + P_B)

V_A holds the single-token spellings of the letter ("A" and " A": after a chat template's assistant header the
letter comes bare, after "Answer:" it comes with a space). The verdict is the likelier letter with confidence
max(p̂_A, 1 − p̂_A); a tie when |p̂_A − ½| ≤ tie_margin / 2. One forward pass, no sampling, no parsing.
Small models favour one letter regardless of content, which is exactly what the both-orders wrapper
catches: such a judge shows a high ``position_stats.rate`` and yields ties, not biased pairs.
``details`` keeps P_A and P_B; when their sum is small the model is not answering with a letter at all.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from preftune.judges._hf import encode, length_sorted_batches, load_model_and_tokenizer, model_device, pad
from preftune.judges.base import Judge, PairItem, Verdict
from preftune.judges.prompts import DEFAULT_LETTER_TEMPLATE, PAIRWISE_FIELDS, fill_template, load_template


class LMJudge(Judge):
    """Pairwise verdicts from a causal LM's probabilities of answering "A" or "B".

    Args:
        model: a path or hub id, or a loaded ``...ForCausalLM``.
        tokenizer: required with a loaded model; loaded from ``model`` when that is a path.
        template / template_path: judging prompt with ``{prompt}``, ``{response_a}``, ``{response_b}``
            (default :data:`~preftune.judges.prompts.DEFAULT_LETTER_TEMPLATE`), sent as the user turn when the
            tokenizer has a chat template.
        batch_size: prompts per forward pass.
        max_length: longest input in tokens; longer inputs keep their LAST tokens (the question is at the end).
        device / dtype: where and in what precision to run.
        tie_margin: in [0, 1]; |p̂_A − p̂_B| at or below it is a tie.
        name: label in reports and ensembles.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        template: str | None = None,
        template_path: str | Path | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        tie_margin: float = 0.0,
        name: str | None = None,
    ) -> None:
        label = name or (Path(str(model)).name if isinstance(model, str | Path) else type(model).__name__)
        super().__init__(label)
        from transformers import AutoModelForCausalLM

        self.model, self.tokenizer = load_model_and_tokenizer(
            model, tokenizer, AutoModelForCausalLM, device, dtype
        )
        self.template = load_template(template, template_path, DEFAULT_LETTER_TEMPLATE, PAIRWISE_FIELDS)
        self.batch_size = batch_size
        self.max_length = max_length
        self.tie_margin = tie_margin
        self.letter_ids = {letter: self._single_token_ids(letter) for letter in ("A", "B")}
        pad_id = self.tokenizer.pad_token_id
        self.pad_id = pad_id if pad_id is not None else (self.tokenizer.eos_token_id or 0)
        # Only the last position's logits are needed; models that accept it skip the LM head elsewhere.
        self._keep = (
            {"logits_to_keep": 1}
            if "logits_to_keep" in inspect.signature(self.model.forward).parameters
            else {}
        )

    def _single_token_ids(self, letter: str) -> list[int]:
        ids = set()
        for spelling in (letter, " " + letter):
            toks = self.tokenizer(spelling, add_special_tokens=False)["input_ids"]
            if len(toks) == 1:
                ids.add(toks[0])
        if not ids:
            raise ValueError(f"the tokenizer has no single token for {letter!r}; the LM judge needs one")
        return sorted(ids)

    def encode(self, prompt: str, first: str, second: str) -> list[int]:
        """Token ids of the judging prompt with ``first`` as A and ``second`` as B."""
        text = fill_template(self.template, prompt=prompt, response_a=first, response_b=second)
        ids = encode(self.tokenizer, [{"role": "user", "content": text}], text, generation_prompt=True)
        return ids[-self.max_length :] if self.max_length else ids

    @torch.inference_mode()
    def letter_probs(self, items: list[PairItem]) -> list[tuple[float, float]]:
        """``(P_A, P_B)`` per item: next-token probability mass on each letter, in left-padded batches.

        Position ids count real tokens only, so a left-padded row sees the same positions as alone.
        """
        seqs = [self.encode(*it) for it in items]
        out: list[tuple[float, float]] = [(0.0, 0.0)] * len(seqs)
        device = model_device(self.model)
        for idx in length_sorted_batches([len(s) for s in seqs], self.batch_size):
            ids, mask = pad([seqs[i] for i in idx], self.pad_id, "left", device)  # (b, T)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (b, T)
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, **self._keep
            ).logits
            probs = torch.softmax(logits[:, -1, :].float(), dim=-1)  # (b, V)
            p_a = probs[:, self.letter_ids["A"]].sum(-1)  # (b,)
            p_b = probs[:, self.letter_ids["B"]].sum(-1)  # (b,)
            for i, a, b in zip(idx, p_a.tolist(), p_b.tolist()):
                out[i] = (a, b)
        return out

    def _judge_ordered_many(self, items: list[PairItem]) -> list[Verdict]:
        verdicts = []
        for p_a, p_b in self.letter_probs(items):
            total = p_a + p_b
            share_a = p_a / total if total > 0 else 0.5
            details = {"p_A": p_a, "p_B": p_b}
            if abs(2 * share_a - 1) <= self.tie_margin:
                verdicts.append(
                    Verdict("tie", 1.0 - abs(2 * share_a - 1), "letter probabilities close", details)
                )
            elif share_a > 0.5:
                verdicts.append(Verdict("A", share_a, f"P(A)={share_a:.3f}", details))
            else:
                verdicts.append(Verdict("B", 1.0 - share_a, f"P(B)={1 - share_a:.3f}", details))
        return verdicts
