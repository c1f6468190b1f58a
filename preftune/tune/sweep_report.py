"""What a sweep writes when its trials are done (or whenever it is run again, from the study alone):

    sweep.csv     every trial: number, state, parameters, objective, scores, feasibility, error, directory
    (terminal)    the same, sorted by the objective: feasible finished trials best first, then infeasible,
                  pruned, failed and interrupted ones
    pareto.png    win rate against KL to the reference per finished trial, the Pareto front drawn through the
                  non-dominated trials (lower KL and higher win rate), ``sweep.max_kl`` as a line
    sweep.html    one self-contained page: the table, the plot (embedded), the best config
    best.yaml     the training config of the best feasible trial, ready for ``preftune train best.yaml``
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from preftune.tune.files import write_json, write_text
from preftune.tune.scoring import pareto_front
from preftune.tune.settings import dump_yaml
from preftune.tune.space import apply_params
from preftune.tune.tables import fmt, format_table, write_csv

SCORE_COLUMNS = ("win_rate", "lc_win_rate", "kl", "perplexity", "distinct_2", "repetition", "eos_rate", "length",
                 "model_score")
ORDER = {"complete": 0, "infeasible": 1, "pruned": 2, "failed": 3, "interrupted": 4, "running": 5, "waiting": 6}


def trial_rows(plan, study) -> list[dict]:
    """One row per trial, sorted as the module docstring says."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        state = t.state.name.lower()
        if state == "fail":
            state = "interrupted" if t.user_attrs.get("interrupted") else "failed"
        scores = t.user_attrs.get("scores") or {}
        if state == "complete" and t.user_attrs.get("feasible") is False:
            state = "infeasible"
        row: dict[str, Any] = {"trial": t.number, "state": state}
        for d in plan.dims:
            row[d.key] = d.decode(t.params[d.key]) if d.key in t.params else None
        row["objective"] = t.value if t.values else None
        row.update({k: scores.get(k) for k in SCORE_COLUMNS})
        row.update({"error": t.user_attrs.get("error"), "retry_of": t.user_attrs.get("retry_of"),
                    "dir": t.user_attrs.get("dir")})
        if state == "pruned" and t.intermediate_values:
            step = max(t.intermediate_values)
            row["error"] = f"pruned at step {step}"
        rows.append(row)
    sign = -1.0 if plan.direction == "maximize" else 1.0  # best first

    def key(r):
        value = sign * r["objective"] if r["objective"] is not None else math.inf
        return ORDER.get(r["state"], 9), value, r["trial"]

    return sorted(rows, key=key)


def best_row(rows: list[dict]) -> dict | None:
    done = [r for r in rows if r["state"] == "complete"]
    return done[0] if done else None


def write_report(plan, study, log) -> dict:
    """Write the outputs of the module docstring; returns the summary (also ``sweep.json``)."""
    rows = trial_rows(plan, study)
    columns = ["trial", "state", *[d.key for d in plan.dims], "objective", *SCORE_COLUMNS, "error", "retry_of",
               "dir"]
    write_csv(plan.out / "sweep.csv", rows, columns)
    best = best_row(rows)
    plot = plot_pareto(rows, plan.out / "pareto.png", plan.settings.max_kl)
    best_config = None
    if best is not None:
        params = {d.key: best[d.key] for d in plan.dims}
        best_config = apply_params(plan.train_tree, params)
        best_config["training"] = {**best_config["training"], "output_dir": str(plan.out / "best")}
        header = (f"# The best trial ({best['trial']}) of sweep study {plan.settings.study_name!r}: "
                  f"{plan.settings.objective} = {fmt(best['objective'], 4)}, KL {fmt(best['kl'], 4)}.\n"
                  f"# Its run: {best['dir']}/run. Train it again with: preftune train {plan.out / 'best.yaml'}\n")
        write_text(plan.out / "best.yaml", header + dump_yaml(best_config))
    (plan.out / "sweep.html").write_text(render_html(plan, rows, best, best_config, plot), encoding="utf-8")
    shown = ["trial", "state", *[d.key for d in plan.dims], "objective", "win_rate", "lc_win_rate", "kl",
             "perplexity", "distinct_2", "eos_rate"]
    log(format_table(rows, shown))
    for r in rows:
        if r["state"] == "failed":
            log(f"trial {r['trial']} failed: {r['error']}")
    summary = {"study": plan.settings.study_name, "storage": plan.storage, "objective": plan.settings.objective,
               "direction": plan.direction, "trials": rows, "best": best,
               "best_yaml": str(plan.out / "best.yaml") if best else None}
    write_json(plan.out / "sweep.json", summary)
    if best is None:
        log("sweep: no feasible finished trial yet; no best.yaml")
    log(f"sweep: wrote {plan.out / 'sweep.csv'}, pareto.png, sweep.html" + (", best.yaml" if best else ""))
    return summary


def plot_pareto(rows: list[dict], path: Path, max_kl: float | None) -> Path | None:
    """Win rate against KL of the finished trials with their Pareto front; None when no trial has both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["state"] in ("complete", "infeasible") and _finite(r["kl"]) and _finite(r["win_rate"])]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for state, color in (("complete", "#1f77b4"), ("infeasible", "#d62728")):
        sel = [r for r in pts if r["state"] == state]
        if sel:
            ax.scatter([r["kl"] for r in sel], [r["win_rate"] for r in sel], color=color, s=28,
                       label="feasible" if state == "complete" else "infeasible (KL > max_kl)")
    for r in pts:
        ax.annotate(str(r["trial"]), (r["kl"], r["win_rate"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = [pts[i] for i in pareto_front([(r["kl"], r["win_rate"]) for r in pts])]
    ax.plot([r["kl"] for r in front], [r["win_rate"] for r in front], "k--", linewidth=1, label="Pareto front")
    if max_kl is not None:
        ax.axvline(max_kl, color="#d62728", linestyle=":", linewidth=1, label="sweep.max_kl")
    ax.axhline(0.5, color="#999", linewidth=0.8, linestyle=":")
    ax.set_xlabel("KL to the reference (k3, nats per sequence)")
    ax.set_ylabel("win rate against the reference")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


SCRIPT = """
window.addEventListener("load", function () {
  var visible = 0;
  document.querySelectorAll("img.plot").forEach(function (im) {
    var box = im.getBoundingClientRect();
    if (im.complete && im.naturalWidth > 0 && box.width > 0 && box.height > 0) { visible += 1; }
  });
  document.body.setAttribute("data-images-visible", String(visible));
  document.body.setAttribute("data-rows", String(document.querySelectorAll("table.trials tr.trial").length));
});
"""


def render_html(plan, rows: list[dict], best: dict | None, best_config: dict | None, plot: Path | None) -> str:
    """The self-contained sweep page (the run report's style; no external resources)."""
    from preftune.report.html import STYLE

    e = lambda v: html.escape(str(v), quote=True)  # noqa: E731
    cols = ["trial", "state", *[d.key for d in plan.dims], "objective", *SCORE_COLUMNS, "error"]
    head = "".join(f"<th>{e(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cls = ' class="alarm"' if r["state"] in ("failed", "infeasible") else ""
        cells = "".join(f"<td class=num>{e(fmt(r.get(c), 4))}</td>" if isinstance(r.get(c), (int, float))
                        and not isinstance(r.get(c), bool) else f"<td>{e(fmt(r.get(c)))}</td>" for c in cols)
        body.append(f'<tr class="trial"{cls}>{cells}</tr>')
    img = "<p class=muted>No finished trial with both a win rate and a KL yet.</p>"
    if plot is not None:
        data = base64.b64encode(Path(plot).read_bytes()).decode("ascii")
        img = f'<figure><img class="plot" alt="pareto" src="data:image/png;base64,{data}"><figcaption>win rate vs KL' \
              "</figcaption></figure>"
    s = plan.settings
    best_html = "<p class=muted>No feasible finished trial yet.</p>" if best is None else (
        f"<p>Trial {best['trial']}: {e(s.objective)} = {e(fmt(best['objective'], 4))}, KL {e(fmt(best['kl'], 4))}. "
        f"<code>preftune train {e(plan.out / 'best.yaml')}</code></p><pre>{e(dump_yaml(best_config))}</pre>")
    space = "".join(f"<li><code>{e(d.describe())}</code></li>" for d in plan.dims)
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>preftune sweep: {e(s.study_name)}</title><style>{STYLE}</style></head>",
        f'<body data-images-total="{0 if plot is None else 1}">',
        f"<h1>preftune sweep: {e(s.study_name)}</h1>",
        f"<p>{len(rows)} trials; objective <b>{e(s.objective)}</b> ({e(plan.direction)}); sampler {e(s.sampler)}; "
        f"pruner {e(s.pruner)} on {e(s.prune_metric)}; max KL {e(fmt(s.max_kl))}; judge "
        f"<code>{e(s.judge if isinstance(s.judge, str) else '<mapping>')}</code>; reference "
        f"<code>{e(plan.reference_model)}</code>; {len(plan.prompts)} held-out prompts.</p>",
        f"<h2>Search space</h2><ul>{space}</ul>",
        "<h2>Best trial</h2>", best_html,
        "<h2>Win rate against KL</h2>", img,
        "<h2>Trials (sorted by the objective)</h2>",
        f'<table class="trials"><tr>{head}</tr>{"".join(body)}</table>',
        f"<script>{SCRIPT}</script>", "</body></html>",
    ])
