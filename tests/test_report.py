"""report.html: its content from metrics.jsonl and samples.jsonl, `preftune report`, and a render in headless
Chromium (Debian package `chromium`, installed by .ci/run) that checks every plot is visible and the page logs
nothing to the console."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from preftune.report.html import write_report

CHROMIUM = shutil.which("chromium")


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A synthetic 20-step run: train/eval curves, monitor records, a diagnosis, an alarm, an event, samples."""
    records = []
    for s in range(1, 21):
        records.append({"step": s, "split": "train", "loss": 0.69 - 0.02 * s, "rewards/margins": 0.05 * s,
                        "rewards/accuracies": min(1.0, 0.5 + 0.03 * s), "rewards/chosen": -0.01 * s,
                        "rewards/rejected": -0.06 * s, "logps/chosen": -10 - 0.1 * s, "logps/rejected": -10 - 0.6 * s})
        if s % 5 == 0:
            records.append({"step": s, "split": "eval", "loss": 0.69 - 0.015 * s, "rewards/margins": 0.04 * s,
                            "rewards/accuracies": 0.5 + 0.02 * s, "logps/chosen": -10.0, "logps/rejected": -11.0})
            records.append({"step": s, "split": "monitor", "kl/k1_seq": 0.05 * s * s, "kl/k3_seq": 0.04 * s * s,
                            "length/policy": 5 + s / 4, "length/reference": 5.0, "length/ratio": (5 + s / 4) / 5,
                            "diversity/distinct_1": 0.4, "diversity/distinct_2": 0.9, "diversity/repetition": 0.0,
                            "diversity/reference_distinct_1": 0.4, "diversity/reference_distinct_2": 0.9})
    records += [
        {"step": 5, "split": "health", "state": "healthy", "message": "log-ratio margin 2.0 nats (growing)", "fix": ""},
        {"step": 10, "split": "event", "name": "best", "message": "best eval/loss = 0.54", "value": 0.54},
        {"step": 15, "split": "alarm", "name": "kl_spike", "message": "KL 9 nats <above> 10x & more"},
        {"step": 20, "split": "health", "state": "both_falling", "message": "chosen falls", "fix": "lower lr"},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    samples = [{"step": s, "index": i, "prompt": f"repeat : a <b> {i}", "policy": "a <b>", "reference": "a <b> !",
                "policy_tokens": 2, "reference_tokens": 3} for s in (10, 20) for i in range(2)]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    return tmp_path


def test_report_content(run_dir):
    path = write_report(run_dir)
    html = path.read_text()
    for panel in ("loss", "margins", "accuracies", "logps", "kl", "lengths", "diversity"):
        assert f'alt="{panel}"' in html, panel
    assert 'data-images-total="7"' in html
    assert "1 alarm(s): kl_spike" in html and "KL 9 nats &lt;above&gt; 10x &amp; more" in html  # escaped
    assert "both_falling" in html and "likely fix: lower lr" in html and "best eval/loss" in html
    assert html.count("<circle") == 4  # the timeline: one mark per alarm, diagnosis and event
    assert "repeat : a &lt;b&gt; 0" in html and "<details open><summary>step 20</summary>" in html
    # self-contained: nothing is fetched (the only URL is the SVG namespace)
    urls = re.findall(r"""(?:src|href)=["']([^"']+)""", html)
    assert urls and all(u.startswith("data:image/png;base64,") for u in urls)


def test_report_cli(run_dir, capsys, tmp_path_factory):
    from preftune.cli import main

    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "alarms: kl_spike; last health state: both_falling" in out and (run_dir / "report.html").exists()
    empty = tmp_path_factory.mktemp("empty")
    assert main(["report", str(empty)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def render(html_path: Path, profile: Path) -> tuple[dict[str, str], list[str]]:
    """Load the page in headless Chromium; (the <body> attributes after load, console lines)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--window-size=1200,3000",
           "--dump-dom", html_path.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body, proc.stdout[:500]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))
    return attrs, [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs the Debian package)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path_factory):
    attrs, console = render(write_report(run_dir), tmp_path_factory.mktemp("chromium-profile"))
    assert console == []  # no errors, no warnings, nothing logged at all
    assert attrs["data-images-total"] == "7"
    assert attrs.get("data-images-visible") == "7"  # each plot decoded (naturalWidth > 0) with a non-empty box

    # The check can fail: a page with a broken plot and a script error is caught on both counts.
    bad = run_dir / "broken.html"
    page = write_report(run_dir).read_text()
    page = page.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1)
    page = page.replace("</body>", "<script>console.error('boom'); undefinedFunction();</script></body>")
    bad.write_text(page)
    attrs, console = render(bad, tmp_path_factory.mktemp("chromium-profile"))
    assert attrs.get("data-images-visible") == "6"
    assert any("boom" in line for line in console) and any("Uncaught" in line for line in console)


def test_legends_sit_beside_the_axes_never_over_the_curves(run_dir):
    """Every panel's legend box lies outside its axes box (the diversity panel's five entries used to sit on
    the curves)."""
    import matplotlib.pyplot as plt

    from preftune.report.plots import ALL_PANELS, draw_panel
    from preftune.runlog import read_metrics

    records = read_metrics(run_dir)
    drawn = 0
    for panel in ALL_PANELS:
        fig = draw_panel(records, panel, alarms=[15])
        if fig is None:
            continue
        drawn += 1
        fig.canvas.draw()
        (ax,) = fig.axes
        legend, axes_box = ax.get_legend().get_window_extent(), ax.get_window_extent()
        assert legend.x0 > axes_box.x1, panel  # entirely to the right of the axes
        plt.close(fig)
    assert drawn == 7


def test_report_opens_with_the_run_config_throughput_and_optimizer_curves(run_dir):
    import yaml

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        if r["split"] == "train":
            r.update(learning_rate=1e-3 * (1 - r["step"] / 20), grad_norm=2.0 / r["step"], tokens_per_second=900.0)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "loss": {"name": "dpo", "beta": 0.1}, "lora": None,
        "training": {"learning_rate": 5e-6, "precision": "bf16"}}, sort_keys=False))
    (run_dir / "train_summary.json").write_text(json.dumps({
        "samples_per_second": 12.5, "tokens_per_second": 4321.0, "train_loop_s": 80.0, "train_runtime_s": 95.0,
        "peak_rss_mb": 2048.0}))
    html = write_report(run_dir).read_text()
    top = html[html.index("<h2>Run</h2>"):html.index("<h2>Final numbers</h2>")]
    assert "<td>model</td><td>HuggingFaceTB/SmolLM2-135M-Instruct</td>" in top
    assert "<td>loss</td><td>name=dpo, beta=0.1</td>" in top and "none: full fine-tuning" in top
    assert "<td>learning rate</td><td>5e-06</td>" in top
    assert "12.5 samples/s, 4321 tokens/s over 80 s of optimizer steps" in top
    assert all(f'alt="{p}"' in top for p in ("learning_rate", "grad_norm", "throughput"))
    assert "<summary>config.yaml</summary>" in top and "beta: 0.1" in top
    assert 'data-images-total="10"' in html
