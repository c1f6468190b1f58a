"""PNG plots of a run, drawn from ``metrics.jsonl`` alone.

One panel per quantity: train curves as lines, eval (and monitor) points as markers; on-policy runs add
their rollout panels (rewards, skipped and EOS fractions, completion lengths, step time, generation speed) and,
for policy-gradient losses, entropy / KL and the clipped, zero-spread and truncated fractions. The monitor's alarms
(records with split ``alarm``) are drawn on every panel as red dashed vertical lines at their steps, so a
curve's turn can be read against the alarm it raised. The legend sits outside the axes, to their right, so it
never covers a curve (the figure grows to hold it).
"""

from __future__ import annotations

from pathlib import Path

from preftune.runlog import read_metrics

# panel -> keys; train and eval are drawn for the training metrics, train alone for the optimizer's.
PANELS = {
    "loss": ["loss"],
    "margins": ["rewards/margins", "rewards/chosen", "rewards/rejected"],
    "accuracies": ["rewards/accuracies"],
    "logps": ["logps/chosen", "logps/rejected"],
}
TRAIN_PANELS = {
    "learning_rate": ["learning_rate"],
    "grad_norm": ["grad_norm"],
    "throughput": ["tokens_per_second"],
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


ALL_PANELS = [*TRAIN_PANELS, *PANELS, *MONITOR_PANELS, *ROLLOUT_PANELS, *POLICY_PANELS]


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
    if panel in TRAIN_PANELS:
        return [("train", key, "-") for key in TRAIN_PANELS[panel]]
    if panel in POLICY_PANELS:
        return [("train", key, "-") for key in POLICY_PANELS[panel]]
    return [("monitor", key, "s:" if "reference" in key else "o-") for key in MONITOR_PANELS[panel]]


def draw_panel(records: list[dict], panel: str, alarms: list[int]):
    """The matplotlib figure of one panel, or None when the run has no data for it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    drawn = False
    for split, key, style in _curves(panel, records):
        x, y = series(records, split, key)
        if x:
            label = key.split("/", 1)[-1].replace("reference_", "reference ") if split == "monitor" else f"{split} {key}"
            ax.plot(x, y, style, label=label, markersize=3)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for i, step in enumerate(alarms):
        ax.axvline(step, color="red", linestyle="--", linewidth=0.8, alpha=0.7, label="alarm" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_title(panel)
    ax.grid(alpha=0.3)
    # Beside the axes, not in them; no tight_layout (it would shrink the axes to fit the legend in the figure):
    # the saved image is cropped to include it (savefig bbox_inches="tight").
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    return fig


def plot_run(run_dir: str | Path) -> list[Path]:
    """One PNG per panel that has data, under ``run_dir/plots``; returns the files written."""
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    alarms = sorted({r["step"] for r in records if r.get("split") == "alarm"})
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for panel in ALL_PANELS:
        fig = draw_panel(records, panel, alarms)
        if fig is None:
            continue
        path = out_dir / f"{panel}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")  # "tight": the image includes the legend beside the axes
        plt.close(fig)
        written.append(path)
    return written
