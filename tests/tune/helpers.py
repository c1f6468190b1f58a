"""Helpers of the driver tests: a judge for untrained tiny models, background CLI runs killed at a chosen point,
and a headless-Chromium render."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

# A response of three or more words passes, a shorter one fails: untrained tiny models produce both, so the
# judge splits their samples into pairs. Score-based: order-invariant, deterministic.
WORDS3 = {"type": "verifier", "kind": "regex", "pattern": "^\\S+ \\S+ \\S+", "name": "three-words"}
ROOT = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def start_cli(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """``python -m preftune.cli ARGS`` in the background, output to ``log``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "preftune.cli", *args], cwd=cwd, env=env, stdout=f,
                                stderr=subprocess.STDOUT)


def kill_when(proc: subprocess.Popen, condition, timeout: float = 240.0) -> None:
    """SIGKILL ``proc`` (only it: the process this test started) as soon as ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (rc {proc.returncode}) before the kill point")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the kill point was not reached in time")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def wait_gone(pid_file: Path, timeout: float = 30.0) -> None:
    """Wait until the process whose pid is in ``pid_file`` has exited (an orphaned trial watches its parent)."""
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            stat = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
            if stat == "Z":
                return
        except (ProcessLookupError, FileNotFoundError):
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} did not exit after its parent was killed")


def render(page: Path, profile: Path, fragment: str = "") -> tuple[dict[str, str], list[str]]:
    """Load ``page`` (plus ``#fragment``) in headless Chromium; (the <body> attributes after load, console lines).
    The same flags as tests/test_report.py."""
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--window-size=1200,3000",
           "--dump-dom", page.resolve().as_uri() + (f"#{fragment}" if fragment else "")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body, proc.stdout[:500]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))
    return attrs, [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
