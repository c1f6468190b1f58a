"""The run directory's lock: one live run per ``output_dir``.

An exclusive ``flock`` on ``output_dir/.preftune.lock`` held for the life of a run; the file names the holder
(pid, host, run id, start time) for the message a second run gets. The kernel drops the lock when its process
dies, so the lock file of a killed run is stale by construction and the next run takes it over, saying whose it
was.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from preftune.errors import PreftuneError

LOCK_FILE = ".preftune.lock"


class RunLock:
    """An exclusive ``flock`` on ``output_dir/.preftune.lock`` for the life of a run (see the module docstring)."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, run_dir: Path, run_id: str, say) -> RunLock:
        path = run_dir / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_lock(fd)
                os.close(fd)
                raise PreftuneError(f"training.output_dir {run_dir} is in use by another run "
                                    f"({describe_holder(holder)}); wait for it to finish, or choose another "
                                    "training.output_dir") from None
            except OSError as e:  # a filesystem without locks (some network mounts): run, but say what is lost
                say(f"warning: cannot lock {path} ({e.strerror}); a second run into this directory would not be "
                    "stopped")
                break
            try:  # a releasing run may have unlinked the file between our open and our flock: lock the new one
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_lock(fd)
        if previous and previous.get("pid") != os.getpid():
            say(f"run dir: took over the stale lock of {describe_holder(previous)}: that run is no longer running")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id, "started": now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        lock = cls(path.resolve(), fd)
        _HELD[lock.path] = lock
        return lock

    def note(self, run_id: str) -> None:
        """Name the run that holds the lock (known only once a resumed run's id is read)."""
        me = {**_read_lock(self.fd), "run_id": run_id}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(me).encode(), 0)

    def release(self) -> None:
        _HELD.pop(self.path, None)
        if self.fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(self.fd)  # closing releases the flock
            self.fd = None

    def __del__(self):
        try:
            self.release()
        except Exception:  # interpreter shutdown
            pass


_HELD: dict[Path, RunLock] = {}  # the locks this process holds, by lock file


def _read_lock(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}


def describe_holder(info: dict) -> str:
    if not info:
        return "its lock file gives no details"
    return f"pid {info.get('pid')} on host {info.get('host')}, run {info.get('run_id')}, started {info.get('started')}"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def release_lock(output_dir) -> None:
    """Release this process's lock on ``output_dir``, if it holds one."""
    lock = _HELD.get((Path(output_dir) / LOCK_FILE).resolve())
    if lock is not None:
        lock.release()
