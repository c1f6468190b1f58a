"""A self-contained HTML page for a validation report: summary, per-finding tables, length-difference histogram.

Built from ``ValidationReport.to_dict()`` only (the JSON report is the single source), with inline CSS and an
inline SVG histogram: no scripts, no external files, opens offline.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em}
table{border-collapse:collapse;width:100%;margin:.5em 0}
th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.error{color:#b00020;font-weight:600}.warning{color:#a15c00;font-weight:600}.info{color:#555}
.verdict{padding:.6em 1em;border-radius:6px;font-weight:600}
.ok{background:#e6f4ea;color:#0b6b2b}.bad{background:#fde7e9;color:#b00020}
code{background:#f4f4f4;padding:0 3px;border-radius:3px}
pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:12px}
"""


def histogram_svg(hist: dict[str, Any], unit: str, width: int = 900, height: int = 260) -> str:
    """Bars of ``hist["counts"]`` over ``hist["edges"]`` (chosen - rejected length), with a line at 0."""
    counts, edges = hist["counts"], hist["edges"]
    if not counts:
        return "<p>(no pairs)</p>"
    left, bottom, top = 50, 40, 10
    plot_w, plot_h = width - left - 10, height - bottom - top
    peak = max(counts) or 1
    bar_w = plot_w / len(counts)
    lo, hi = edges[0], edges[-1]

    def x_of(v: float) -> float:
        return left + (v - lo) / (hi - lo) * plot_w

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="histogram of chosen minus rejected length">']
    for i, c in enumerate(counts):
        h = c / peak * plot_h
        color = "#4c78a8" if edges[i] >= 0 else "#e45756"
        parts.append(f'<rect x="{left + i * bar_w:.1f}" y="{top + plot_h - h:.1f}" width="{max(bar_w - 1, 1):.1f}" '
                     f'height="{h:.1f}" fill="{color}"><title>[{edges[i]}, {edges[i + 1]}): {c}</title></rect>')
    parts.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#333"/>')
    if lo <= 0 <= hi:
        parts.append(f'<line x1="{x_of(0):.1f}" y1="{top}" x2="{x_of(0):.1f}" y2="{top + plot_h}" '
                     f'stroke="#333" stroke-dasharray="4 3"/>')
    for v in (lo, 0, hi) if lo < 0 < hi else (lo, hi):
        parts.append(f'<text x="{x_of(v):.1f}" y="{top + plot_h + 15}" font-size="11" text-anchor="middle">{v}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 5}" font-size="12" text-anchor="middle">'
                 f'chosen - rejected length ({escape(unit)}); red: rejected longer, blue: chosen longer or equal</text>')
    parts.append(f'<text x="5" y="{top + 10}" font-size="11">{peak}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render(report: Any) -> str:
    """HTML for a ``ValidationReport`` (or its ``to_dict()``)."""
    d = report.to_dict() if hasattr(report, "to_dict") else report
    e = escape
    out = ["<!doctype html><html><head><meta charset='utf-8'>",
           f"<title>preftune data report: {e(str(d['source']))}</title><style>{_CSS}</style></head><body>",
           f"<h1>Preference data report</h1><p><code>{e(str(d['source']))}</code>"
           + (f" (eval: <code>{e(str(d['eval_source']))}</code>)" if d.get("eval_source") else "") + "</p>"]
    if d["usable"]:
        out.append(f"<p class='verdict ok'>USABLE: {d['rows_usable']} of {d['rows_read']} rows can be trained on</p>")
    else:
        out.append("<p class='verdict bad'>UNUSABLE: " + e("; ".join(d["unusable_reasons"])) + "</p>")
    out.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in
               ("rows read", "usable", "unusable", "pairs", "unpaired", "kind", "lengths in")) + "</tr><tr>"
               + "".join(f"<td>{e(str(d[k]))}</td>" for k in
                         ("rows_read", "rows_usable", "rows_unusable", "pairs", "unpaired", "kind", "length_unit"))
               + "</tr></table>")

    out.append("<h2>Findings</h2>")
    if d["findings"]:
        out.append("<table><tr><th>severity</th><th>finding</th><th>count</th><th>%</th><th>message</th>"
                   "<th>example rows</th></tr>")
        for f in d["findings"]:
            out.append(f"<tr><td class='{f['severity']}'>{f['severity']}</td><td><a href='#f-{e(f['name'])}'>"
                       f"{e(f['name'])}</a></td><td class='n'>{f['count']}</td><td class='n'>{f['percent']:.2f}</td>"
                       f"<td>{e(f['message'])}</td><td>{'<br>'.join(e(r) for r in f['example_rows'][:3])}</td></tr>")
        out.append("</table>")
    else:
        out.append("<p>No findings.</p>")

    length = d["stats"].get("length")
    if length:
        out.append("<h2>Length difference, chosen - rejected</h2>")
        out.append(f"<p>chosen longer in {100 * length['share_chosen_longer']:.1f}% of {length['pairs']} pairs "
                   f"(rejected longer {length['rejected_longer']}, ties {length['ties']}); mean difference "
                   f"{length['mean_difference']:+.2f}, median {length['median_difference']:+g} "
                   f"{e(length['unit'])}. Values beyond the 1st/99th percentile are counted in the end bins "
                   f"({length['histogram']['below']} below, {length['histogram']['above']} above).</p>")
        out.append(histogram_svg(length["histogram"], length["unit"]))

    for f in d["findings"]:
        out.append(f"<h2 id='f-{e(f['name'])}'><span class='{f['severity']}'>{f['severity']}</span> "
                   f"{e(f['name'])}</h2><p>{e(f['message'])}</p>")
        out.append(f"<table><tr><th>count</th><td class='n'>{f['count']}</td></tr><tr><th>of</th>"
                   f"<td class='n'>{f['total']}</td></tr><tr><th>percent</th><td class='n'>{f['percent']:.3f}</td>"
                   "</tr></table>")
        if f["example_rows"]:
            out.append("<table><tr><th>#</th><th>row (file:line)</th></tr>" + "".join(
                f"<tr><td class='n'>{i}</td><td><code>{e(r)}</code></td></tr>"
                for i, r in enumerate(f["example_rows"], 1)) + "</table>")
        if f["details"]:
            out.append(f"<pre>{e(json.dumps(f['details'], indent=2, ensure_ascii=False))}</pre>")
    out.append("<p style='color:#888'>Written by <code>preftune data validate</code>; "
               "the JSON report holds the same numbers (schema in docs/data.md).</p></body></html>")
    return "\n".join(out)


def write_html(report: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(report), encoding="utf-8")
    return path
