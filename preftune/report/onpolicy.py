"""The on-policy section of ``report.html`` (online DPO, GRPO / RLOO / REINFORCE++): what the rollouts held and
where the time went, from ``metrics.jsonl`` and the ``samples.jsonl`` rows of kind "rollout".

    last rollout metrics (train step, held-out greedy eval): rewards (all and per function), reward spread
    (``frac_reward_zero_std``), truncation and EOS rates, lengths, entropy, KL, clip fractions, skipped pairs
    steps without a learning signal (every group tied: no update, no loss logged)
    time of the logged steps: generation, scoring, training
    the last rollout's table: GRPO one row per completion (prompt, completion, reward, advantage),
    online DPO one row per pair (prompt, chosen, rejected, the samples' rewards)

Empty for a run without rollouts. Self-contained (its own escaping), so ``report.html`` imports it, not the
other way round.
"""

from __future__ import annotations

import html
import math

# (key, what it is) in display order; a key a run does not log is left out.
ROLLOUT_KEYS = (
    ("reward/mean", "mean reward of the step's samples"),
    ("reward/std", "their spread"),
    ("rollout/frac_reward_zero_std", "groups whose rewards are all equal (no signal from them)"),
    ("rollout/refilled_groups", "zero-spread groups replaced by dynamic sampling"),
    ("rollout/skipped_fraction", "prompts that gave no pair (online DPO)"),
    ("reward/chosen", "reward of the chosen samples (online DPO)"),
    ("reward/rejected", "reward of the rejected samples (online DPO)"),
    ("rollout/truncated_fraction", "samples cut at max_new_tokens"),
    ("rollout/eos_rate", "samples that ended with EOS"),
    ("completions/mean_length", "mean completion length (tokens)"),
    ("completions/max_length", "longest completion"),
    ("entropy", "mean per-token entropy of the policy at the sampling temperature"),
    ("kl", "k3 KL to the reference per token (GRPO with beta > 0)"),
    ("clip_low_frac", "tokens clipped below (ratio < 1 - epsilon, A < 0)"),
    ("clip_high_frac", "tokens clipped above (ratio > 1 + epsilon_high, A > 0)"),
    ("ratio_mean", "mean ratio pi / pi_old (1 on a fresh rollout)"),
    ("advantages/std", "advantage spread"),
    ("rollout/tokens_per_second", "generation throughput"),
)


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return "—" if not math.isfinite(value) else f"{value:.4g}"
    return _e(value)


def onpolicy_section(records: list[dict], rows: list[dict], show: int = 16) -> str:
    """The section's HTML ('' when no train record has rollout metrics); ``rows``: samples.jsonl rollout rows."""
    train = [r for r in records if r.get("split") == "train" and "reward/mean" in r]
    if not train:
        return ""
    last = train[-1]
    held = next((r for r in reversed(records) if r.get("split") == "eval" and "reward/mean" in r), {})
    keys = [k for k, _ in ROLLOUT_KEYS]
    per_fn = sorted(k for k in last if k.startswith("reward/") and k.endswith(("/mean", "/std")) and k not in keys)
    doc = dict(ROLLOUT_KEYS)
    body = "".join(f"<tr><td>{_e(k)}</td><td class=num>{_num(last.get(k))}</td><td class=num>"
                   f"{_num(held.get(k))}</td><td class=muted>{_e(doc.get(k, 'per reward function'))}</td></tr>"
                   for k in (*keys, *per_fn) if k in last or k in held)
    parts = [f"<p>Last logged step {last['step']}; held-out values are greedy samples of the eval prompts.</p>"
             "<table><tr><th>metric</th><th>train (last step)</th><th>eval (last)</th><th></th></tr>"
             f"{body}</table>"]
    silent = [r["step"] for r in train if "loss" not in r]
    if silent:
        parts.append(f"<p class=alarm>{len(silent)} of {len(train)} logged steps had no learning signal (all rewards "
                     f"equal within every group: no update, no loss logged): steps {_e(_ranges(silent))}.</p>")
    spent = {k: sum(r.get(f"time/{k}_s") or 0.0 for r in train) for k in ("generate", "score", "train")}
    total = sum(spent.values())
    if total > 0:
        parts.append(f"<p>Time over the {len(train)} logged steps: "
                     + ", ".join(f"{k} {v:.2f}s ({100 * v / total:.0f}%)" for k, v in spent.items()) + ".</p>")
    parts.append(_table(rows, show))
    return "<h2>On-policy rollouts</h2>" + "".join(parts)


def _table(rows: list[dict], show: int) -> str:
    if not rows:
        return ""
    step = max(r["step"] for r in rows)
    last = [r for r in rows if r["step"] == step][:show]
    if "completion" in last[0]:  # groups: one row per completion
        body = "".join(
            f"<tr><td class=num>{_e(r.get('group', ''))}</td><td><pre>{_e(r.get('prompt'))}</pre></td>"
            f"<td><pre>{_e(r.get('completion'))}</pre></td><td class=num>{_num(r.get('reward'))}</td>"
            f"<td class=num>{_num(r.get('advantage'))}</td><td>{'truncated' if r.get('truncated') else ''}</td></tr>"
            for r in last)
        return (f"<p>Completions of the rollout trained on before the evaluation of step {step} ({len(last)} "
                "shown):</p><table><tr><th>group</th><th>prompt</th><th>completion</th><th>reward</th>"
                f"<th>advantage</th><th></th></tr>{body}</table>")
    body = "".join(
        f"<tr><td><pre>{_e(r.get('prompt'))}</pre></td><td><pre>{_e(r.get('chosen'))}</pre></td>"
        f"<td><pre>{_e(r.get('rejected'))}</pre></td>"
        f"<td>{_e(', '.join(_num(x) for x in r.get('rewards', [])))}</td></tr>" for r in last)
    return (f"<p>Pairs trained on at the last step before the evaluation of step {step} ({len(last)} shown):</p>"
            "<table><tr><th>prompt</th><th>chosen</th><th>rejected</th><th>rewards of the samples</th></tr>"
            f"{body}</table>")


def _ranges(steps: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    out, start = [], None
    for i, s in enumerate(steps):
        if start is None:
            start = s
        if i + 1 == len(steps) or steps[i + 1] != s + 1:
            out.append(str(start) if start == s else f"{start}-{s}")
            start = None
    return ", ".join(out)
