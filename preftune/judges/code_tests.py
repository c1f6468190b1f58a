"""Running generated code against unit tests in a separate Python process with a time limit.

The candidate runs in a fresh interpreter (``python -I``: no user site, no PYTHON* variables) in a temporary
directory, with a minimal environment, no stdin, sockets disabled at the Python level and file writes capped
at 16 MiB. Each test snippet runs after the candidate's code in its namespace; the reward is the fraction of
snippets that ran without raising. The result travels through a file whose random name is removed from
``sys.argv`` before the candidate runs and which lies outside its working directory, so printing a fake
"all passed" line earns nothing.

This is a guard against accidents and naive reward hacking, NOT a sandbox: code that imports ``_socket``,
``ctypes`` or ``os`` can still reach the network and the file system. Run untrusted generations inside a
container or VM without network.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_CODE_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)

_HARNESS = r"""
import json, sys

def _main():
    result_path = sys.argv[1]
    del sys.argv[1:]
    out = {"passed": 0, "errors": []}
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
        if MEMORY_LIMIT:
            resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    except (ImportError, ValueError, OSError):
        pass
    import socket
    def _no_network(*args, **kwargs):
        raise OSError("network access is disabled while verifying code")
    for attr in ("connect", "connect_ex", "bind", "sendto"):
        setattr(socket.socket, attr, _no_network)
    socket.create_connection = socket.getaddrinfo = _no_network
    with open("tests.json", encoding="utf-8") as f:
        tests = json.load(f)
    with open("candidate.py", encoding="utf-8") as f:
        source = f.read()
    namespace = {"__name__": "candidate"}
    try:
        exec(compile(source, "candidate.py", "exec"), namespace)
    except BaseException as e:
        out["errors"].append("candidate: %s: %s" % (type(e).__name__, e))
        tests = []
    for i, test in enumerate(tests):
        try:
            exec(compile(test, "test_%d" % i, "exec"), dict(namespace))
            out["passed"] += 1
        except BaseException as e:
            out["errors"].append("test_%d: %s: %s" % (i, type(e).__name__, e))
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(out, f)

_main()
"""


@dataclass
class CodeTestResult:
    """Outcome of one run: tests passed out of total, whether time ran out, and what went wrong."""

    passed: int
    total: int
    timed_out: bool = False
    errors: tuple[str, ...] = ()
    stderr_tail: str = ""

    @property
    def fraction(self) -> float:
        """passed / total (0.0 for no tests)."""
        return self.passed / self.total if self.total else 0.0


def extract_code(response: str) -> str:
    """The first ```python (or unlabelled) fenced block of ``response``, else the whole response."""
    m = _CODE_FENCE.search(response)
    return m.group(1) if m else response


def run_code_tests(
    code: str, tests: Sequence[str], timeout: float = 5.0, memory_limit_mb: int | None = None
) -> CodeTestResult:
    """Run ``code`` and then each test snippet in a subprocess; see the module docstring for the guards.

    A timeout kills the whole process group (so spawned children die too) and scores zero passed.
    """
    tests = list(tests)
    with tempfile.TemporaryDirectory(prefix="preftune-verify-") as tmp:
        root = Path(tmp)
        work = root / "work"  # the candidate's cwd; the result file lives outside it
        work.mkdir()
        limit = 0 if memory_limit_mb is None else int(memory_limit_mb) << 20
        (work / "harness.py").write_text(_HARNESS.replace("MEMORY_LIMIT", str(limit)), encoding="utf-8")
        (work / "candidate.py").write_text(code, encoding="utf-8")
        (work / "tests.json").write_text(json.dumps(tests), encoding="utf-8")
        result_path = root / f"result-{secrets.token_hex(16)}.json"
        env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONIOENCODING": "utf-8",
            "LC_ALL": "C.UTF-8",
            "HOME": str(work),
        }
        proc = subprocess.Popen(
            [sys.executable, "-I", "harness.py", str(result_path)],
            cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return CodeTestResult(0, len(tests), timed_out=True, errors=(f"timed out after {timeout:g}s",))
        finally:
            _kill_group(proc)  # children the candidate left behind die with the run
        tail = stderr.decode("utf-8", "replace")[-2000:]
        if not result_path.exists():
            return CodeTestResult(
                0, len(tests), errors=(f"no result (exit code {proc.returncode})",), stderr_tail=tail
            )
        out = json.loads(result_path.read_text(encoding="utf-8"))
        return CodeTestResult(out["passed"], len(tests), errors=tuple(out["errors"]), stderr_tail=tail)


def _kill_group(proc: subprocess.Popen) -> None:
    if hasattr(os, "killpg"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.kill()
