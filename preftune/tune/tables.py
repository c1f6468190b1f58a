"""Tables and plots of the drivers: the iterate round table (terminal, CSV, PNG) and the generic helpers the
sweep report shares (CSV writing, fixed-width terminal tables)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from preftune.tune.files import write_text

ROUND_COLUMNS = ("round", "pairs", "win_rate_vs_previous", "win_rate_vs_sft", "lc_win_rate_vs_sft", "kl_to_sft",
                 "length", "distinct_2", "model_score")
"""Columns of the printed round table (rounds.csv has every metric)."""
LABELS = {"model_score": "judge score (mean)", "lc_win_rate_vs_sft": "length-controlled win rate vs sft"}


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        small = value != 0 and abs(value) < 10 ** -(digits - 1)  # a learning rate: significant digits, not 0.000
        return f"{value:.{digits}g}" if small else f"{value:.{digits}f}"
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """A fixed-width text table of ``columns`` of ``rows`` (numbers right-aligned)."""
    headers = list(headers or columns)
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str] | None = None) -> Path:
    """``rows`` as CSV; columns: the given ones, else every key in first-seen order."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in columns})
    return write_text(path, buf.getvalue())


def round_rows(baseline: dict, rounds: list[dict]) -> list[dict]:
    """Round 0 (the SFT model: win rate 0.5 against itself by definition, KL 0) and each round's metrics."""
    zero = {"round": 0, "model": "sft", "pairs": None, "win_rate_vs_previous": None, "win_rate_vs_sft": 0.5,
            "lc_win_rate_vs_sft": 0.5, "kl_to_sft": 0.0, "length": baseline.get("length"),
            "distinct_1": baseline.get("distinct_1"), "distinct_2": baseline.get("distinct_2"),
            "repetition": baseline.get("repetition"), "eos_rate": baseline.get("eos_rate"),
            "model_score": baseline.get("model_score")}
    return [zero, *rounds]


def rounds_table(rows: list[dict]) -> str:
    headers = ("round", "pairs", "win vs prev", "win vs sft", "LC win vs sft", "KL to sft", "length", "distinct-2",
               "judge score")
    return format_table(rows, ROUND_COLUMNS, headers)


def plot_rounds(rows: list[dict], path: Path) -> Path:
    """Four panels over rounds: win rates (vs previous, vs SFT, length-controlled), KL to SFT, length,
    distinct-2 (and the judge's mean score when it scores)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["round"] for r in rows]

    def series(key):
        return [r.get(key) if r.get(key) is not None else math.nan for r in rows]

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    panels = [("win rate", ["win_rate_vs_previous", "win_rate_vs_sft", "lc_win_rate_vs_sft", "model_score"]),
              ("KL to SFT (k3, nats/seq)", ["kl_to_sft"]), ("length (tokens)", ["length"]),
              ("diversity", ["distinct_1", "distinct_2"])]
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            y = series(key)
            if any(not math.isnan(v) for v in y):
                ax.plot(x, y, "o-", label=LABELS.get(key, key), markersize=4)
        if title == "win rate":
            ax.axhline(0.5, color="#999", linewidth=0.8, linestyle=":")
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
