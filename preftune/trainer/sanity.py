"""Hyperparameter sanity: values far from what the papers use get one warning line each, never an error.

The ranges are data about published settings, kept in one table; the loop prints whatever
:func:`check_hyperparameters` returns and never looks at loss names itself.
"""

from __future__ import annotations

# (low, high, where the range comes from) per loss and hyperparameter. Every loss that takes a reference
# model and a `beta` and is not listed here gets DPO_BETA.
DPO_BETA = (0.01, 1.0, "DPO-family losses use 0.01-1.0, most often 0.1 (Rafailov et al., 2305.18290v3)")
RANGES: dict[tuple[str, str], tuple[float, float, str]] = {
    ("simpo", "beta"): (2.0, 10.0, "SimPO uses 2-10 (Meng et al., 2405.14734), far above DPO's"),
    ("orpo", "lam"): (0.05, 1.0, "ORPO uses λ 0.1-1.0, 0.1 in the main runs (Hong et al., 2403.07691)"),
    ("sppo_hard", "beta"): (0.001, 1.0, "SPPO uses η = 1/β = 1e3, i.e. β = 0.001 (Wu et al., 2405.00675); "
                                        "DPO-like 0.01-1.0 also works"),
}
# SimPO γ: the paper searches 0.3-1.6 at β 2-2.5; its later β = 10 recipes keep γ/β at 0.3-0.5.
SIMPO_GAMMA = (0.3, 1.6)
SIMPO_GAMMA_OVER_BETA = (0.3, 0.5)
# Full fine-tuning with a preference loss: 5e-7..5e-6 is usual; above 1e-5 the policy drifts fast.
MAX_FULL_FT_LR = 1e-5


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def check_hyperparameters(cfg) -> list[str]:
    """Warnings (one line each) for beta, ORPO λ, SimPO γ and the learning rate outside their usual ranges."""
    from preftune.losses import get_loss

    names = cfg.loss.name if isinstance(cfg.loss.name, list) else [cfg.loss.name]
    specs = [get_loss(n) for n in names]
    params = cfg.loss.params
    warnings, seen = [], set()
    for spec in specs:
        for hp in spec.hyperparameters:
            value = _number(params.get(hp))
            rng = RANGES.get((spec.name, hp)) or (DPO_BETA if hp == "beta" and spec.needs_reference else None)
            if value is None or rng is None or (hp, rng) in seen:
                continue
            low, high, why = rng
            if not low <= value <= high:
                seen.add((hp, rng))
                warnings.append(f"loss.{hp} = {value:g} is outside the usual range for {spec.name}: {why}")
        gamma = _number(params.get("gamma"))
        if spec.name == "simpo" and gamma is not None:
            beta = _number(params.get("beta"))
            ratio_ok = bool(beta) and SIMPO_GAMMA_OVER_BETA[0] <= gamma / beta <= SIMPO_GAMMA_OVER_BETA[1]
            if not (SIMPO_GAMMA[0] <= gamma <= SIMPO_GAMMA[1] or ratio_ok):
                warnings.append(f"loss.gamma = {gamma:g} is outside the usual range for simpo: 0.3-1.6 at β 2-2.5, "
                                "or γ/β 0.3-0.5 at β 10 (Meng et al., 2405.14734)")
    lr = _number(cfg.training.learning_rate)
    preference = any(s.data != "sft" for s in specs)
    if preference and cfg.lora is None and lr is not None and lr > MAX_FULL_FT_LR:
        warnings.append(f"training.learning_rate = {lr:g} is high for full fine-tuning with a preference loss "
                        f"(usual 5e-7 to 5e-6, at most {MAX_FULL_FT_LR:g}; LoRA takes about 10x more)")
    return warnings
