"""Killing a training subprocess the way a user's kill -9 would, at a chosen checkpoint (the resume tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest


def kill_at_checkpoint(victim: subprocess.Popen, target: Path, timeout: float = 240.0) -> None:
    """Wait until the run ``victim`` has written checkpoint ``target`` (``.../step-NNNNNNNN``), then SIGKILL it.

    Fails the test when the run ends first or no checkpoint appears within ``timeout`` seconds."""
    step = int(target.name.split("-")[1])
    deadline = time.monotonic() + timeout
    while not target.exists():
        if victim.poll() is not None:
            pytest.fail(f"the run ended before its step-{step} checkpoint:\n{victim.stdout.read()}")
        assert time.monotonic() < deadline, f"no step-{step} checkpoint within {timeout:g} s"
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    victim.stdout.close()
