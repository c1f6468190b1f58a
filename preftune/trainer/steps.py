"""One step function per data kind: log-probs for a batch -> per-example losses and detached metrics.

The loop asks the :class:`Objective` what to compute; it never matches loss names. A step returns the
per-example losses (B,) (the loop reduces) and a dict of per-example detached tensors for logging.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from preftune.losses import LossOutput, LossSpec, combine, get_loss

LogpFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # batch -> (logps (S,), lengths (S,))


@dataclass
class Objective:
    """The configured loss: one registered spec or a weighted combination sharing one data kind."""

    specs: list[LossSpec]
    weights: list[float]
    params: dict

    @classmethod
    def from_config(cls, loss_cfg) -> Objective:
        names = loss_cfg.name if isinstance(loss_cfg.name, list) else [loss_cfg.name]
        specs = [get_loss(n) for n in names]
        kinds = {s.data for s in specs if s.data != "sft"} or {"sft"}
        if len(kinds) > 1:
            raise ValueError(f"losses {names} mix data kinds {sorted(kinds)}; combine losses of one kind")
        return cls(specs, list(loss_cfg.weights or [1.0] * len(specs)), dict(loss_cfg.params))

    @property
    def data(self) -> str:
        kinds = {s.data for s in self.specs if s.data != "sft"}
        return kinds.pop() if kinds else "sft"

    @property
    def needs_reference(self) -> bool:
        return any(s.needs_reference for s in self.specs)

    @property
    def needs_kl(self) -> bool:
        return any(s.needs_kl for s in self.specs)

    def __call__(self, **inputs) -> LossOutput:
        outputs = []
        for spec in self.specs:
            hp = {k: v for k, v in self.params.items() if k in spec.hyperparameters}
            names = _input_names(spec)
            outputs.append(spec.fn(**{k: inputs[k] for k in names}, **hp))
        if len(outputs) == 1:
            return outputs[0]
        return combine(outputs, self.weights, [s.name for s in self.specs])


def _input_names(spec: LossSpec) -> tuple[str, ...]:
    if spec.data == "sft":
        return ("policy_chosen_logps", "chosen_lengths")
    if spec.data == "unpaired":
        return ("policy_logps", "reference_logps", "labels", "kl")
    names = ("policy_chosen_logps", "policy_rejected_logps")
    if spec.needs_reference:
        names += ("reference_chosen_logps", "reference_rejected_logps")
    if spec.needs_lengths:
        names += ("chosen_lengths", "rejected_lengths")
    return names


def preference_accuracy(margins: torch.Tensor) -> torch.Tensor:
    """1 where chosen ranks above rejected, 0.5 for an exact tie (a coin flip), 0 otherwise. (B,) -> (B,)"""
    return (margins > 0).float() + 0.5 * (margins == 0).float()


def paired_step(objective: Objective, logp_fn: LogpFn, batch, reference_fn: LogpFn | None):
    """Pairs: sequences 0..B-1 chosen, B..2B-1 rejected (the batch contract)."""
    logps, lengths = logp_fn(batch)  # (2B,), (2B,)
    n = batch.num_sequences // 2
    inputs = {
        "policy_chosen_logps": logps[:n], "policy_rejected_logps": logps[n:],
        "chosen_lengths": lengths[:n], "rejected_lengths": lengths[n:],
    }
    if objective.needs_reference:
        if "ref_logps" in batch.extras:
            ref = batch.extras["ref_logps"]  # (2B,) precomputed
        else:
            ref, _ = reference_fn(batch)
        inputs["reference_chosen_logps"], inputs["reference_rejected_logps"] = ref[:n], ref[n:]
    out = objective(**inputs)
    metrics = {"logps/chosen": logps[:n].detach(), "logps/rejected": logps[n:].detach()}
    if out.chosen_rewards is not None:
        margins = out.chosen_rewards - out.rejected_rewards
        metrics.update({
            "rewards/chosen": out.chosen_rewards, "rewards/rejected": out.rejected_rewards,
            "rewards/margins": margins, "rewards/accuracies": preference_accuracy(margins),
        })
    metrics.update({k: v.detach() for k, v in out.metrics.items()})
    return out.losses, metrics


def sft_step(objective: Objective, logp_fn: LogpFn, batch, reference_fn: LogpFn | None):
    """Single completions trained by likelihood (SFT); paired batches use their chosen side."""
    logps, lengths = logp_fn(batch)  # (S,), (S,)
    n = batch.extras["num_examples"] if "num_examples" in batch.extras else batch.num_sequences
    n = int(n)
    out = objective(policy_chosen_logps=logps[:n], chosen_lengths=lengths[:n])
    return out.losses, {"logps/chosen": logps[:n].detach(), **{k: v.detach() for k, v in out.metrics.items()}}


def unpaired_step(objective: Objective, logp_fn: LogpFn, batch, reference_fn: LogpFn | None):
    """Unpaired completions with labels; the KL reference point comes in ``batch.extras['kl']``."""
    logps, lengths = logp_fn(batch)  # (S,)
    n = int(batch.extras["num_examples"])
    ref = batch.extras["ref_logps"] if "ref_logps" in batch.extras else reference_fn(batch)[0]
    out = objective(policy_logps=logps[:n], reference_logps=ref[:n], labels=batch.extras["labels"],
                    kl=batch.extras.get("kl", torch.zeros((), device=logps.device)))
    metrics = {"logps": logps[:n].detach()}
    if out.rewards is not None:
        metrics["rewards"] = out.rewards
    metrics.update({k: v.detach() for k, v in out.metrics.items()})
    return out.losses, metrics


STEPS = {"paired": paired_step, "sft": sft_step, "unpaired": unpaired_step}
