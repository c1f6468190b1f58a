"""PNG plots of a run, drawn from ``metrics.jsonl`` alone.

One panel per quantity: train curves as lines, eval (and monitor) points as markers; on-policy runs add
their rollout panels (rewards, skipped and EOS fractions, completion lengths, step time, generation speed) and,
for policy-gradient losses, entropy / KL and the clipped, zero-spread and truncated fractions. The monitor's alarms
(records with split ``alarm``) are drawn on every panel as red dashed vertical lines at their steps, so a
curve's turn can be read against the alarm it raised.
"""

from __future__ import annotations

from pathlib import Path

from preftune.runlog import read_metrics

# panel -> (split, key, style) curves; splits "train" and "eval" are drawn for the training metrics.
PANELS = {
    "loss": ["loss"],
    "margins": ["rewards/margins", "rewards/chosen", "rewards/rejected"],
    "accuracies": ["rewards/accuracies"],
    "logps": ["logps/chosen", "logps/rejected"],
}
# On-policy policy-gradient runs (GRPO family): the policy's entropy and KL, and the shares of clipped tokens,
# of zero-spread groups and of truncated samples.
POLICY_PANELS = {
    "entropy_kl": ["entropy", "kl"],
    "policy_fractions": ["clip_low_frac", "clip_high_frac", "rollout/frac_reward_zero_std",
                         "rollout/truncated_fraction"],
}
MONITOR_PANELS = {
    "kl": ["kl/k3_seq", "kl/k1_seq"],
    "lengths": ["length/policy", "length/reference"],
    "diversity": ["diversity/distinct_1", "diversity/distinct_2", "diversity/repetition",
                  "diversity/reference_distinct_1", "diversity/reference_distinct_2"],
}

# On-policy runs (rollout metrics, train and eval): rewards (all, chosen / rejected, and each function's mean,
# found in the records), the share of prompts skipped and of samples that ended with EOS, completion lengths,
# where a step's time goes, and generation throughput.
ROLLOUT_PANELS = {
    "rewards": ["reward/mean", "reward/chosen", "reward/rejected"],
    "rollout": ["rollout/skipped_fraction", "rollout/eos_rate"],
    "completion_lengths": ["completions/mean_length", "completions/max_length"],
    "step_time": ["time/generate_s", "time/score_s", "time/train_s"],
    "generation_speed": ["rollout/tokens_per_second"],
}


def series(records: list[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get("split") == split and isinstance(r.get(key), (int, float))]
    return [s for s, _ in pts], [v for _, v in pts]


def _curves(panel: str, records: list[dict]) -> list[tuple[str, str, str]]:
    if panel in PANELS or panel in ROLLOUT_PANELS:
        keys = list(PANELS.get(panel) or ROLLOUT_PANELS[panel])
        if panel == "rewards":  # each reward function's mean: reward/<name>/mean
            keys += sorted({k for r in records for k in r if k.startswith("reward/") and k.endswith("/mean")
                            and k != "reward/mean"})
        return [(split, key, style) for key in keys for split, style in (("train", "-"), ("eval", "o--"))]
    if panel in POLICY_PANELS:
        return [("train", key, "-") for key in POLICY_PANELS[panel]]
    return [("monitor", key, "s:" if "reference" in key else "o-") for key in MONITOR_PANELS[panel]]


def plot_run(run_dir: str | Path) -> list[Path]:
    """One PNG per panel that has data, under ``run_dir/plots``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    alarms = sorted({r["step"] for r in records if r.get("split") == "alarm"})
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for panel in [*PANELS, *MONITOR_PANELS, *ROLLOUT_PANELS, *POLICY_PANELS]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        drawn = False
        for split, key, style in _curves(panel, records):
            x, y = series(records, split, key)
            if x:
                ax.plot(x, y, style, label=f"{split} {key}", markersize=3)
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        for i, step in enumerate(alarms):
            ax.axvline(step, color="red", linestyle="--", linewidth=0.8, alpha=0.7, label="alarm" if i == 0 else None)
        ax.set_xlabel("step")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{panel}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
