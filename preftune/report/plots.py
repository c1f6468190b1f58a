"""PNG plots of a run, drawn from ``metrics.jsonl`` alone."""

from __future__ import annotations

from pathlib import Path

from preftune.trainer.metrics import read_metrics

PANELS = {
    "loss": ["loss"],
    "margins": ["rewards/margins", "rewards/chosen", "rewards/rejected"],
    "accuracies": ["rewards/accuracies"],
    "logps": ["logps/chosen", "logps/rejected"],
}


def series(records: list[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get("split") == split and isinstance(r.get(key), (int, float))]
    return [s for s, _ in pts], [v for _, v in pts]


def plot_run(run_dir: str | Path) -> list[Path]:
    """One PNG per panel with train and eval curves; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for panel, keys in PANELS.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        drawn = False
        for key in keys:
            for split, style in (("train", "-"), ("eval", "o--")):
                x, y = series(records, split, key)
                if x:
                    ax.plot(x, y, style, label=f"{split} {key}", markersize=3)
                    drawn = True
        if not drawn:
            plt.close(fig)
            continue
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
