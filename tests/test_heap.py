"""engine.reuse_freed_memory: inside the block a large tensor comes from the heap (kept for reuse), not from a
fresh mmap; outside, and after the block, glibc's defaults are back. Measured with glibc's own counter of
mmapped bytes (``mallinfo2().hblkhd``)."""

from __future__ import annotations

import ctypes
import sys

import pytest
import torch

from preftune.trainer.heap import reuse_freed_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mmapped_by(alloc) -> int:
    """Bytes glibc holds in mmapped blocks while ``alloc()``'s result is alive, minus before."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc < 2.33 has no mallinfo2")
    libc.mallinfo2.restype = _MallInfo2
    before = libc.mallinfo2().hblkhd
    kept = alloc()
    during = libc.mallinfo2().hblkhd
    del kept
    return during - before


def test_large_blocks_come_from_the_heap_inside_and_from_mmap_outside():
    def alloc():
        return torch.empty(64 * 2**20, dtype=torch.uint8)  # 64 MiB: above glibc's largest mmap threshold

    assert _mmapped_by(alloc) >= 64 * 2**20  # glibc default: a fresh mmap, unmapped (and re-faulted) each time
    with reuse_freed_memory() as active:
        assert active is True
        assert _mmapped_by(alloc) == 0  # served from the heap, and kept there when freed
    assert _mmapped_by(alloc) >= 64 * 2**20  # defaults restored


def test_switched_off_changes_nothing():
    with reuse_freed_memory(False) as active:
        assert active is False
        assert _mmapped_by(lambda: torch.empty(64 * 2**20, dtype=torch.uint8)) >= 64 * 2**20
