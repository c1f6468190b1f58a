"""Files and directories written so that a crash leaves the old version or the new one, never half of either.

A neutral room (standard library only), shared by the trainer (checkpoints, ``final/``), the monitor
(``best/``) and the run log::

    tmp = temp_dir(parent, "final")      # parent/.final.tmp-<hex>, created with the umask's mode
    ... write into tmp ...
    publish_dir(tmp, parent / "final")   # fsync, then swap it in (one atomic exchange where the OS has it)

``publish_dir`` replaces an existing directory with ``renameat2(RENAME_EXCHANGE)`` on Linux, so ``final/``
names the old model or the new one at every instant. Where the exchange is unavailable it renames the old
one aside (``.final.old-<hex>``) first; :func:`recover_dirs` puts such a directory back if a crash came
between the two renames, and removes temporary directories nobody will finish.

Directories get the mode the umask gives (``tempfile.mkdtemp`` would make them 0700, unreadable to the
group that shares a run directory).
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
from pathlib import Path

from preftune.errors import PreftuneError

TMP, OLD = ".tmp-", ".old-"
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def temp_dir(parent: Path, name: str) -> Path:
    """A new empty directory ``parent/.{name}.tmp-<hex>`` (mode from the umask, like ``mkdir``)."""
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = parent / f".{name}{TMP}{secrets.token_hex(4)}"
        try:
            path.mkdir()  # mode 0o777 & ~umask
            return path
        except FileExistsError:
            continue


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and the directories themselves to disk (before a rename publishes them)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the OS or filesystem cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def publish_dir(tmp: Path, out: Path) -> Path:
    """Make the finished directory ``tmp`` appear as ``out``, replacing any old ``out`` in one step."""
    fsync_tree(tmp)
    if not out.exists():
        os.rename(tmp, out)
    elif _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old contents
    else:
        old = out.with_name(f".{out.name}{OLD}{secrets.token_hex(4)}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out.parent)
    return out


def write_dir_atomic(out: Path, write, what: str) -> Path:
    """``write(tmp)`` fills a temporary sibling of ``out``, which then replaces ``out`` in one step
    (:func:`publish_dir`). A failed write leaves the old ``out`` untouched and no temporary behind; a full disk
    or another OS error becomes one :class:`PreftuneError` line naming ``what`` and ``out``."""
    tmp = temp_dir(out.parent, out.name)
    try:
        write(tmp)
        return publish_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        error = write_error(e, what, out) if isinstance(e, Exception) else None
        if error is None:
            raise
        raise error from None


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}{TMP}{secrets.token_hex(4)}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def recover_dirs(parent: Path, legacy: tuple[str, ...] = ()) -> list[str]:
    """Finish what a crash interrupted in ``parent``: an ``.X.old-*`` whose ``X`` is missing is renamed back;
    every other ``.X.old-*`` and ``.X.tmp-*`` entry, and every entry whose name starts with one of ``legacy``
    (older temporary names), is removed. Returns one line per action.

    Only call this while holding the run directory (no live writer can own those entries).
    """
    done: list[str] = []
    if not parent.is_dir():
        return done
    for entry in sorted(parent.iterdir()):
        name = entry.name
        ours = name.startswith(".") and (TMP in name or OLD in name)
        if not ours and not name.startswith(legacy):
            continue
        target = parent / name[1:].split(OLD, 1)[0] if OLD in name else None
        if target is not None and entry.is_dir() and not target.exists():
            os.rename(entry, target)
            done.append(f"restored {target.name}/ from an interrupted replacement")
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        done.append(f"removed {name}, left by an interrupted write")
    return done


def write_error(err: BaseException, what: str, path: Path) -> PreftuneError | None:
    """A one-line error for a failed write of ``what`` at ``path`` (disk full, quota, permissions, ...), or
    None when ``err`` is not a write failure.

    ``torch.save`` reports a full disk as a RuntimeError from its zip writer (``[enforce fail at
    inline_container.cc:...]`` / "file write failed"); the OS as ``OSError(ENOSPC)``.
    """
    text = str(err)
    torch_write = isinstance(err, RuntimeError) and ("inline_container" in text or "write failed" in text)
    if not (isinstance(err, OSError) or torch_write):
        return None
    free = _free_space(path)
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or torch_write:
        reason = "no space left on the device" if getattr(err, "errno", None) != errno.EDQUOT else "disk quota exceeded"
        if torch_write and free is not None and free > 64 * 2**20:
            reason = "the write failed (the disk may have been full at that moment)"
    else:
        reason = getattr(err, "strerror", None) or text.splitlines()[0]
    where = f" ({free / 2**20:.0f} MiB free there)" if free is not None else ""
    return PreftuneError(f"could not write {what} {path}: {reason}{where}")


def _free_space(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None
