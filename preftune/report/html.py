"""``report.html``: one self-contained page per run, built from ``metrics.jsonl`` (and ``samples.jsonl``).

Sections: the run (its key settings, throughput, the learning-rate, gradient-norm and tokens/s curves, and the
whole ``config.yaml``); the final numbers; for an on-policy run its rollouts (``preftune.report.onpolicy``: the
last rewards, per function too, spread, skipped fraction, EOS and truncation rates, lengths, entropy, KL, clip
fractions, generation vs training time, and the last rollout's pairs or completions from ``samples.jsonl`` rows
of kind "rollout"); a timeline of the monitor's alarms, health diagnoses and events
(best model, early stopping) as an inline SVG and a table; the other plots of ``preftune.report.plots`` (loss, margins,
accuracies, chosen/rejected log-probs, KL, lengths, diversity; alarms drawn as red lines), embedded as base64
PNGs; the greedy samples, policy beside reference, latest step first. No external resources: the file can be
mailed or archived as is. A small inline script marks ``<body data-images-visible="k">`` with the number of
plots that loaded with a non-empty size (the headless-browser test reads it).
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from preftune.runlog import read_metrics

KEY_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
               "logps/chosen", "logps/rejected")
COLORS = {"alarm": "#d62728", "health": "#1f77b4", "event": "#2ca02c"}
STATE_COLORS = {"healthy": "#2ca02c", "stuck": "#ff7f0e", "overfitting": "#d62728", "both_falling": "#9467bd"}

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1300px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; } figure { margin: 0; } figcaption { font-size: 0.8em; }
img.plot { width: 640px; height: auto; border: 1px solid #eee; }
.alarm { color: #d62728; font-weight: 600; } .muted { color: #777; }
pre { white-space: pre-wrap; margin: 0; font-size: 0.85em; }
"""

SCRIPT = """
window.addEventListener("load", function () {
  var visible = 0;
  document.querySelectorAll("img.plot").forEach(function (im) {
    var box = im.getBoundingClientRect();
    if (im.complete && im.naturalWidth > 0 && box.width > 0 && box.height > 0) { visible += 1; }
  });
  document.body.setAttribute("data-images-visible", String(visible));
});
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value) -> str:
    if isinstance(value, float):
        return "—" if not math.isfinite(value) else f"{value:.4g}"
    return _e(value) if value is not None else "—"


def _final_table(records: list[dict]) -> str:
    last = {split: next((r for r in reversed(records) if r.get("split") == split), None)
            for split in ("train", "eval", "monitor")}
    rows = []
    for key in KEY_METRICS:
        t, e = (last[s].get(key) if last[s] else None for s in ("train", "eval"))
        if t is not None or e is not None:
            rows.append(f"<tr><td>{_e(key)}</td><td class=num>{_num(t)}</td><td class=num>{_num(e)}</td></tr>")
    mon = last["monitor"] or {}
    for key in ("kl/k3_seq", "kl/k1_seq", "length/policy", "length/reference", "diversity/distinct_2"):
        if key in mon:
            rows.append(f"<tr><td>{_e(key)}</td><td></td><td class=num>{_num(mon[key])}</td></tr>")
    steps = [r["step"] for r in records if r.get("split") == "train"]
    head = (f"<p>{len(steps)} logged train steps, last step {max(steps) if steps else '—'}; "
            f"last eval at step {last['eval']['step'] if last['eval'] else '—'}.</p>")
    if not rows:
        return head
    return head + "<table><tr><th>metric</th><th>train (last)</th><th>eval (last)</th></tr>" + "".join(rows) + "</table>"


RUN_PLOTS = ("learning_rate", "grad_norm", "throughput")  # shown with the run's settings, above the rest
SETTINGS = (("model", ("model",)), ("task", ("task",)), ("loss", ("loss",)), ("LoRA", ("lora",)),
            ("train data", ("data", "train")), ("eval data", ("data", "eval")),
            ("learning rate", ("training", "learning_rate")), ("schedule", ("training", "lr_scheduler")),
            ("batch per device", ("training", "per_device_batch_size")),
            ("accumulation", ("training", "gradient_accumulation_steps")), ("precision", ("training", "precision")),
            ("max length", ("training", "max_length")), ("seed", ("training", "seed")))


def _run_section(run_dir: Path, plots: list[Path]) -> str:
    """Key settings from config.yaml, throughput from train_summary.json, the optimizer's curves, the config."""
    import json

    import yaml

    from preftune.configfile import read_config

    config = read_config(run_dir)
    parts = []
    if config is not None:
        rows = []
        for label, path in SETTINGS:
            value = config
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items() if v is not None)
            elif label == "LoRA" and value is None:
                value = "none: full fine-tuning"
            rows.append(f"<tr><td>{_e(label)}</td><td>{_num(value)}</td></tr>")
        parts.append("<table>" + "".join(rows) + "</table>")
    summary_path = run_dir / "train_summary.json"
    if summary_path.exists():
        s = json.loads(summary_path.read_text())
        parts.append(f"<p>Throughput: {_num(s.get('samples_per_second'))} samples/s, "
                     f"{_num(s.get('tokens_per_second'))} tokens/s over {_num(s.get('train_loop_s'))} s of "
                     f"optimizer steps (evaluation, checkpoints and setup excluded); {_num(s.get('train_runtime_s'))} "
                     f"s in all; peak RSS {_num(s.get('peak_rss_mb'))} MiB.</p>")
    parts.append(_plots([p for p in plots if p.stem in RUN_PLOTS], empty=""))
    if config is not None:
        text = yaml.safe_dump(config, sort_keys=False, width=110)
        parts.append(f"<details><summary>config.yaml</summary><pre>{_e(text)}</pre></details>")
    return "".join(parts) or "<p class=muted>No config.yaml or train_summary.json in this run directory.</p>"


def _timeline(records: list[dict]) -> str:
    """Alarms, health changes and events: an SVG strip over the step axis, then a table."""
    marks = [r for r in records if r.get("split") in ("alarm", "health", "event")]
    bests = [r for r in marks if r["split"] == "event" and r.get("name") == "best"]
    marks = [r for r in marks if r not in bests[:-1]]  # every improvement is an event; the last one is the news
    steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
    if not marks:
        return "<p class=muted>No alarms, diagnoses or events were recorded.</p>"
    lo, hi = 0, max(steps) or 1
    width, pad, lanes = 1100, 40, ("alarm", "health", "event")

    def x(step):
        return pad + (width - 2 * pad) * (step - lo) / max(hi - lo, 1)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="120" role="img" '
             f'aria-label="timeline of alarms, diagnoses and events">',
             f'<line x1="{pad}" y1="100" x2="{width - pad}" y2="100" stroke="#999"/>',
             f'<text x="{pad}" y="116" font-size="10">step {lo}</text>',
             f'<text x="{width - pad}" y="116" font-size="10" text-anchor="end">step {hi}</text>']
    for lane_i, lane in enumerate(lanes):
        y = 20 + 28 * lane_i
        parts.append(f'<text x="2" y="{y + 4}" font-size="10" fill="#555">{lane}</text>')
        for r in (m for m in marks if m["split"] == lane):
            color = STATE_COLORS.get(r.get("state"), COLORS[lane])
            label = r.get("name") or r.get("state")
            parts.append(f'<circle cx="{x(r["step"]):.1f}" cy="{y}" r="5" fill="{color}">'
                         f'<title>step {r["step"]}: {_e(label)}: {_e(r.get("message", ""))}</title></circle>')
    parts.append("</svg>")
    rows = []
    for r in marks:
        what = r.get("name") or r.get("state")
        cls = ' class="alarm"' if r["split"] == "alarm" else ""
        fix = f"<br><span class=muted>likely fix: {_e(r['fix'])}</span>" if r.get("fix") else ""
        rows.append(f"<tr><td class=num>{r['step']}</td><td>{_e(r['split'])}</td><td{cls}>{_e(what)}</td>"
                    f"<td>{_e(r.get('message', ''))}{fix}</td></tr>")
    return ("".join(parts) + "<table><tr><th>step</th><th>kind</th><th>name</th><th>message</th></tr>"
            + "".join(rows) + "</table>")


def _plots(paths: list[Path], empty: str = "<p class=muted>No metrics to plot.</p>") -> str:
    if not paths:
        return empty
    figs = []
    for p in paths:
        data = base64.b64encode(Path(p).read_bytes()).decode("ascii")
        figs.append(f'<figure><img class="plot" alt="{_e(p.stem)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{_e(p.stem)}</figcaption></figure>")
    return '<div class="plots">' + "".join(figs) + "</div>"


def _samples(rows: list[dict]) -> str:
    if not rows:
        return "<p class=muted>No samples (samples.jsonl is written by the monitor at evaluations).</p>"
    steps = sorted({r["step"] for r in rows}, reverse=True)
    out = []
    for i, step in enumerate(steps):
        body = "".join(
            f"<tr><td><pre>{_e(r['prompt'])}</pre></td><td><pre>{_e(r['policy'])}</pre></td>"
            f"<td><pre>{_e(r['reference'])}</pre></td><td class=num>{r.get('policy_tokens', '')} / "
            f"{r.get('reference_tokens', '')}</td></tr>"
            for r in rows if r["step"] == step)
        table = ("<table><tr><th>prompt</th><th>policy (greedy)</th><th>reference (greedy)</th>"
                 f"<th>tokens</th></tr>{body}</table>")
        out.append(f"<details{' open' if i == 0 else ''}><summary>step {step}</summary>{table}</details>")
    return "".join(out)


def render_report(run_dir: str | Path, plots: list[Path] | None = None) -> str:
    """The report page as a string; ``plots``: PNGs already drawn by ``plot_run`` (drawn now if None)."""
    from preftune.monitor.samples import read_samples
    from preftune.report.onpolicy import onpolicy_section
    from preftune.report.plots import plot_run

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if plots is None:
        plots = plot_run(run_dir)
    alarms = [r for r in records if r.get("split") == "alarm"]
    verdict = (f'<p class="alarm">{len(alarms)} alarm(s): {_e(", ".join(sorted({a["name"] for a in alarms})))}</p>'
               if alarms else "<p>No alarms.</p>")
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>preftune report: {_e(run_dir.name)}</title><style>{STYLE}</style></head>",
        f'<body data-images-total="{len(plots)}">',
        f"<h1>preftune run report: {_e(run_dir.name)}</h1>", verdict,
        "<h2>Run</h2>", _run_section(run_dir, plots),
        "<h2>Final numbers</h2>", _final_table(records),
        onpolicy_section(records, read_samples(run_dir, kind="rollout")),
        "<h2>Timeline: alarms, diagnoses, events</h2>", _timeline(records),
        "<h2>Curves</h2>", _plots([p for p in plots if p.stem not in RUN_PLOTS]),
        "<h2>Samples</h2>", _samples(read_samples(run_dir)),
        f"<script>{SCRIPT}</script>", "</body></html>",
    ])


def write_report(run_dir: str | Path, plots: list[Path] | None = None) -> Path:
    """Write ``run_dir/report.html`` (see the module docstring); returns its path."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        from preftune.errors import PreftuneError

        raise PreftuneError(f"{run_dir} has no metrics.jsonl (not a training run directory?)")
    path = run_dir / "report.html"
    path.write_text(render_report(run_dir, plots), encoding="utf-8")
    return path


def report_summary(run_dir: str | Path) -> dict:
    """Counts for the CLI's one-line summary: alarms by name, the last health state."""
    records = read_metrics(run_dir)
    alarms = [r["name"] for r in records if r.get("split") == "alarm"]
    health = [r for r in records if r.get("split") == "health"]
    return {"alarms": alarms, "health": health[-1]["state"] if health else None,
            "samples": (Path(run_dir) / "samples.jsonl").exists()}

