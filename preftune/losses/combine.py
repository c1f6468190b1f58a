"""Weighted combinations of registered losses (MPO, RPO, any dpo + λ·sft style mix).

The trainer calls each component's registered function with the inputs its spec asks for, then combines:

    RPO:  combine([dpo(...), sft(...)], [1.0, alpha], names=["dpo", "sft"])
    MPO:  combine([dpo(...), bco_pair(...), sft(...)], [0.8, 0.2, 1.0], names=["dpo", "bco_pair", "sft"])
"""

from __future__ import annotations

from collections.abc import Sequence

from preftune.losses.base import LossOutput


def combine(
    outputs: Sequence[LossOutput], weights: Sequence[float], names: Sequence[str] | None = None
) -> LossOutput:
    """Weighted sum of per-example losses; rewards from the first component that has them.

        L_i = Σ_k w_k · L_i^(k)

    Naive equivalent: ``sum(w * o.losses for o, w in zip(outputs, weights))``; this adds the checks and the
    bookkeeping. Still per example (B,), not reduced.

    Rewards: ``chosen_rewards`` / ``rejected_rewards`` of the first output that has paired rewards; failing
    that, ``rewards`` of the first output that has unpaired ones. Metrics: each component's own per-example
    loss (detached) as ``"{prefix}/loss"`` and each of its metrics as ``"{prefix}/{key}"``, where prefix is
    ``names[k]`` or, without names, the index ``k``.

    Args:
        outputs: one LossOutput per component, each with losses of the same shape (B,).
        weights: one float per component.
        names: optional names used as metric prefixes (e.g. the registry names); unique.
    """
    if not outputs:
        raise ValueError("combine needs at least one LossOutput")
    if len(weights) != len(outputs):
        raise ValueError(f"combine got {len(outputs)} outputs but {len(weights)} weights")
    prefixes = [str(k) for k in range(len(outputs))] if names is None else list(names)
    if len(prefixes) != len(outputs) or len(set(prefixes)) != len(prefixes):
        raise ValueError(
            f"combine needs one unique name per output; got {names!r} for {len(outputs)} outputs"
        )
    shape = outputs[0].losses.shape
    for prefix, out in zip(prefixes, outputs):
        if out.losses.shape != shape:
            raise ValueError(
                f"component {prefix!r} has losses of shape {tuple(out.losses.shape)}, expected {tuple(shape)}"
            )

    losses = sum(w * out.losses for out, w in zip(outputs, weights))  # (B,)
    paired = next((o for o in outputs if o.chosen_rewards is not None), None)
    unpaired = next((o for o in outputs if o.rewards is not None), None)
    metrics = {}
    for prefix, out in zip(prefixes, outputs):
        metrics[f"{prefix}/loss"] = out.losses.detach()
        for key, value in out.metrics.items():
            metrics[f"{prefix}/{key}"] = value
    return LossOutput(
        losses=losses,
        chosen_rewards=paired.chosen_rewards if paired is not None else None,
        rejected_rewards=paired.rejected_rewards if paired is not None else None,
        rewards=unpaired.rewards if paired is None and unpaired is not None else None,
        metrics=metrics,
    )
