"""Is the run healthy? Pure functions over metric records, the dicts ``metrics.jsonl`` holds.

Two questions, asked at every evaluation by :class:`preftune.monitor.Monitor` and answerable offline from a
run's ``metrics.jsonl``:

**Margin health** (:func:`diagnose`), from the eval records and the train records between evaluations. With
c, r the mean log-ratios log π − log π_ref of chosen and rejected on the eval pairs, in nats (the logged
implicit rewards divided by the loss's β; for losses without a reference, the change of log π since the first
evaluation) and m = c − r, the latest evaluation is:

    overfitting   train accuracy (mean since the previous eval) ≥ 0.95, the train margin still rising, and
                  eval accuracy at least 0.03 below its best so far
    both_falling  c < −0.25, r < c, c lower than at the previous eval, and the chosen drop is at least half
                  the margin (−c ≥ m / 2, i.e. chosen fell by at least a third of what rejected fell): the loss
                  falls because rejected falls faster, while the preferred answers lose likelihood too
    stuck         |m| < 0.25 nats at the last two evaluations: the policy does not separate the pairs (the
                  rewards' sign may already be right: accuracy is not the test)
    healthy       none of these; "growing" while m rises by more than 5% per evaluation, then "plateau"

checked in that order; thresholds live in :class:`Thresholds`. Measuring in nats rather than in β-scaled
rewards keeps a tiny β (margins near zero in reward units while the policy moves far) from reading as stuck.

**Reward-hacking alarms** (:func:`check_alarms`), from the monitor records (KL, lengths, diversity of eval
generations; see ``preftune.eval.drift``) and the eval record:

    kl_spike           KL (k3, nats per sequence) > kl_spike_factor × max(first measured KL, 0.5)
    max_kl             KL (k3, nats per sequence) > monitor.max_kl: the run stops
    reward_saturated   σ(mean eval margin) > reward_max_fraction, i.e. the mean implicit-reward margin exceeds
                       logit(0.99) = 4.6: the preference the implicit reward model assigns is saturated, the
                       DPO gradient (∝ σ(−margin)) has vanished on typical pairs, and further steps mostly move
                       the policy away from the reference
    diversity_collapse distinct-1 or distinct-2 below min_distinct_ratio × the reference's, or self-repetition
                       above max_repetition and above the reference's
    length_drift       mean output length / the reference's above max_length_ratio or below min_length_ratio
"""

from __future__ import annotations

import math
from dataclasses import dataclass

STATES = ("healthy", "stuck", "overfitting", "both_falling")
KL_SPIKE_FLOOR = 0.5
"""Nats per sequence: the first measured KL is often ~0 (the policy barely moved), and 10x of ~0 is noise; with
the floor, the spike alarm needs at least 5 nats per sequence at the default factor."""


@dataclass(frozen=True)
class Thresholds:
    stuck_margin: float = 0.25
    """|log-ratio margin| below this many nats counts as no separation; also the least chosen drop (nats)
    that counts as falling."""
    overfit_train_accuracy: float = 0.95
    """Train accuracy at or above this is 'near 1'."""
    overfit_accuracy_drop: float = 0.03
    """Eval accuracy this far below its best so far counts as falling."""
    both_falling_share: float = 0.5
    """Both falling when the chosen drop −c is at least this share of the margin m = c − r."""
    growth: float = 0.05
    """Relative margin rise per evaluation above which a healthy margin is 'growing', else 'plateau'."""


@dataclass
class Diagnosis:
    state: str
    message: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.state}: {self.message}" + (f"; likely fix: {self.fix}" if self.fix else "")


FIXES = {
    "stuck": "raise training.learning_rate or lower loss.beta",
    "overfitting": "stop earlier (monitor.patience keeps the best checkpoint), lower training.learning_rate or "
                   "num_epochs, raise loss.beta, or add data",
    "both_falling": "lower training.learning_rate or raise loss.beta, or hold the chosen likelihood up with an "
                    "SFT term (loss.name: [dpo, sft])",
}


def _num(record: dict, key: str) -> float | None:
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _train_window(records: list[dict], after: int, upto: int) -> dict[str, float]:
    """Mean of train metrics over train records with after < step ≤ upto (the last one before, if none)."""
    window = [r for r in records if r.get("split") == "train" and after < r["step"] <= upto]
    if not window:
        window = [r for r in records if r.get("split") == "train" and r["step"] <= upto][-1:]
    out = {}
    for key in ("rewards/accuracies", "rewards/margins"):
        values = [v for v in (_num(r, key) for r in window) if v is not None]
        if values:
            out[key] = sum(values) / len(values)
    return out


def _rewards(ev: dict, first: dict, beta: float) -> tuple[float, float] | None:
    """(c, r) in nats: implicit rewards / β when the loss has them, else log-prob change since the first eval."""
    c, r = _num(ev, "rewards/chosen"), _num(ev, "rewards/rejected")
    if c is not None and r is not None:
        return c / beta, r / beta
    lc, lr, lc0, lr0 = (_num(x, k) for x in (ev, first) for k in ("logps/chosen", "logps/rejected"))
    if None in (lc, lr, lc0, lr0):
        return None
    return lc - lc0, lr - lr0


def _margin(ev: dict, first: dict, beta: float) -> float | None:
    """m = c − r in nats."""
    m = _num(ev, "rewards/margins")
    if m is not None:
        return m / beta
    cr = _rewards(ev, first, beta)
    return cr[0] - cr[1] if cr is not None else None


def diagnose(records: list[dict], beta: float | None = None, th: Thresholds = Thresholds()) -> Diagnosis | None:
    """Margin health at the latest eval record; None when there is none or it has no margin to judge.

    ``beta``: the loss's β, to turn logged rewards into log-ratio nats (None: rewards taken as nats).
    """
    beta = beta or 1.0
    evals = [r for r in records if r.get("split") == "eval"]
    if not evals:
        return None
    ev, prev = evals[-1], (evals[-2] if len(evals) > 1 else None)
    m, acc = _margin(ev, evals[0], beta), _num(ev, "rewards/accuracies")
    cr = _rewards(ev, evals[0], beta)
    if m is None or acc is None:
        return None
    train = _train_window(records, prev["step"] if prev else -1, ev["step"])
    train_prev = _train_window(records, evals[-3]["step"] if len(evals) > 2 else -1, prev["step"]) if prev else {}

    # overfitting: train accuracy near 1, train margin still rising, eval accuracy below its best
    best_acc = max((a for a in (_num(e, "rewards/accuracies") for e in evals[:-1]) if a is not None), default=None)
    t_acc, t_m, t_m_prev = (train.get("rewards/accuracies"), train.get("rewards/margins"),
                            train_prev.get("rewards/margins"))
    if (t_acc is not None and t_acc >= th.overfit_train_accuracy and best_acc is not None
            and acc <= best_acc - th.overfit_accuracy_drop and t_m is not None
            and (t_m_prev is None or t_m > t_m_prev)):
        return Diagnosis("overfitting", f"train accuracy {t_acc:.2f}, train margin {t_m:.2f} and rising, eval "
                         f"accuracy {acc:.2f} down from {best_acc:.2f}", FIXES["overfitting"])

    # both falling: chosen goes down with rejected, and is still going down
    if cr is not None:
        c, r = cr
        prev_cr = _rewards(prev, evals[0], beta) if prev else (0.0, 0.0)
        still = prev_cr is None or c < prev_cr[0]
        if c < -th.stuck_margin and r < c and still and -c >= th.both_falling_share * (c - r):
            return Diagnosis("both_falling", f"chosen {c:+.2f} and rejected {r:+.2f} nats against the reference, "
                             f"chosen still falling: the loss falls while the preferred answers lose likelihood",
                             FIXES["both_falling"])

    # stuck: no separation at the last two evaluations
    pm = _margin(prev, evals[0], beta) if prev else None
    if pm is not None and abs(m) < th.stuck_margin and abs(pm) < th.stuck_margin:
        return Diagnosis("stuck", f"log-ratio margin {m:.3f} nats (under {th.stuck_margin:g}) at two evaluations "
                         f"in a row, eval accuracy {acc:.2f}", FIXES["stuck"])

    trend = "growing" if pm is None or m > pm + th.growth * max(abs(pm), 1e-8) else "plateau"
    return Diagnosis("healthy", f"log-ratio margin {m:.2f} nats ({trend}), eval accuracy {acc:.2f}")


# ---- reward-hacking alarms ----------------------------------------------------------------------------------


@dataclass
class Alarm:
    name: str
    message: str


def check_alarms(monitor_records: list[dict], eval_record: dict, cfg) -> list[Alarm]:
    """Alarms active at the latest monitor record (see module docstring). ``cfg``: a MonitorConfig."""
    out: list[Alarm] = []
    mon = monitor_records[-1] if monitor_records else {}
    kl = _num(mon, "kl/k3_seq")
    firsts = [v for v in (_num(r, "kl/k3_seq") for r in monitor_records) if v is not None]
    if kl is not None and firsts:
        first = firsts[0]
        limit = cfg.kl_spike_factor * max(first, KL_SPIKE_FLOOR)
        if len(firsts) > 1 and kl > limit:
            out.append(Alarm("kl_spike", f"KL {kl:.3g} nats/sequence is more than {cfg.kl_spike_factor:g}x its "
                                         f"first measured value {first:.3g} (limit {limit:.3g})"))
        if cfg.max_kl is not None and kl > cfg.max_kl:
            out.append(Alarm("max_kl", f"KL {kl:.3g} nats/sequence exceeds monitor.max_kl = {cfg.max_kl:g}"))
    m = _num(eval_record, "rewards/margins")
    if m is not None and 0 < cfg.reward_max_fraction < 1:
        saturated = math.log(cfg.reward_max_fraction / (1 - cfg.reward_max_fraction))
        if m > saturated:
            out.append(Alarm("reward_saturated", f"mean eval margin {m:.3g} gives σ(margin) = "
                             f"{1 / (1 + math.exp(-m)):.4f} > {cfg.reward_max_fraction:g}: the implicit reward is "
                             "at its maximum; further steps mostly add drift"))
    low = []
    for key in ("distinct_1", "distinct_2"):
        v, ref = _num(mon, f"diversity/{key}"), _num(mon, f"diversity/reference_{key}")
        if v is not None and ref is not None and v < cfg.min_distinct_ratio * ref:
            low.append(f"{key.replace('_', '-')} {v:.3f} < {cfg.min_distinct_ratio:g} x reference {ref:.3f}")
    rep, ref_rep = _num(mon, "diversity/repetition"), _num(mon, "diversity/reference_repetition")
    if rep is not None and rep > cfg.max_repetition and (ref_rep is None or rep > ref_rep):
        low.append(f"self-repetition {rep:.3f} > {cfg.max_repetition:g}")
    if low:
        out.append(Alarm("diversity_collapse", "; ".join(low)))
    ratio = _num(mon, "length/ratio")
    if ratio is not None and not cfg.min_length_ratio <= ratio <= cfg.max_length_ratio:
        out.append(Alarm("length_drift", f"mean output length {_num(mon, 'length/policy'):.1f} tokens is "
                         f"{ratio:.2f}x the reference's {_num(mon, 'length/reference'):.1f} (allowed "
                         f"{cfg.min_length_ratio:g}..{cfg.max_length_ratio:g})"))
    return out
