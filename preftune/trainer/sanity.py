"""Hyperparameter sanity: values far from what the papers use get one warning line each, never an error.

The usual ranges of loss hyperparameters are declared by each loss's spec (``LossSpec.typical`` and
``extra_warnings``, read through :meth:`~preftune.losses.LossSpec.sanity_warnings`); this module adds the checks
that are about training, not about a loss: the learning rate of a full fine-tune, and PPO advantages left
unnormalized (``rollout.whiten_advantages``).
"""

from __future__ import annotations

# Full fine-tuning with a preference loss: 5e-7..5e-6 is usual; above 1e-5 the policy drifts fast.
MAX_FULL_FT_LR = 1e-5


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def check_hyperparameters(cfg) -> list[str]:
    """Warnings (one line each) for loss hyperparameters outside their usual ranges and a high learning rate.

    In a weighted mix every component judges the shared ``loss:`` values; a key is warned about once, by the
    first component that finds it unusual (each spec's lines start with ``loss.<key> =``).
    """
    from preftune.losses import get_loss

    names = cfg.loss.name if isinstance(cfg.loss.name, list) else [cfg.loss.name]
    specs = [get_loss(n) for n in names]
    warnings, warned = [], set()
    for spec in specs:
        for line in spec.sanity_warnings(cfg.loss.params):
            key = line.split(" = ", 1)[0]
            if key not in warned:
                warned.add(key)
                warnings.append(line)
    rollout = getattr(cfg, "rollout", None)
    if any(s.data == "ppo" for s in specs) and rollout is not None and not rollout.whiten_advantages:
        warnings.append("rollout.whiten_advantages = false: PPO's advantages are not normalized, so the step size "
                        "follows the reward's scale and offset (seed 001 #5); whitening over the rollout is usual")
    lr = _number(cfg.training.learning_rate)
    preference = any(s.data != "sft" for s in specs)
    if preference and cfg.lora is None and lr is not None and lr > MAX_FULL_FT_LR:
        warnings.append(f"training.learning_rate = {lr:g} is high for full fine-tuning with a preference loss "
                        f"(usual 5e-7 to 5e-6, at most {MAX_FULL_FT_LR:g}; LoRA takes about 10x more)")
    return warnings
