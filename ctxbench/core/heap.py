"""glibc's heap during a CPU peak-memory reading, and only then.

The CPU peak memory of a call is the growth of the process's peak resident set
(ctxbench.measurements.kernel.measure.peak_memory). That needs every block over 128 KiB to be a
fresh mmap that leaves the resident set when freed, so that memory the call frees and allocates
again is counted as a real allocator would hold it, and memory an earlier call left in the heap
does not hide the call's own. `pinned_heap` sets that up for the memory pass alone:

    mmap and trim thresholds 128 KiB (mallopt), then malloc_trim(0): free heap pages go back;

and afterwards leaves the thresholds where glibc's own dynamic thresholds settle in a process
that allocates and frees the same blocks again and again (a benchmark loop, a serving engine):
blocks up to 32 MiB come from the heap (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit; glibc raises the
threshold to each freed mmapped block's size up to there) and the heap is trimmed above twice that.

Pinned for a worker's whole life (MALLOC_MMAP_THRESHOLD_ in its environment, as ctxbench did
before 2026-12-07), every such block in the timed loop paid an mmap, page faults and zeroed pages:
the blockwise implementations, which allocate many blocks over 128 KiB per call, measured 1.12 to
1.45x (chunked) and 1.11 to 1.32x (sliding_window) the latency of the same call in a plain
Python process (benchmarks/harness_overhead.py, docs/performance.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from contextlib import contextmanager
from typing import Iterator

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
PINNED_BYTES = 128 * 1024
# Where glibc's dynamic thresholds settle (malloc/malloc.c: DEFAULT_MMAP_THRESHOLD_MAX on 64-bit;
# the trim threshold follows at twice the mmap threshold).
STEADY_MMAP_BYTES = 32 * 2**20
STEADY_TRIM_BYTES = 64 * 2**20

_LIBC: ctypes.CDLL | None | bool = False  # False: not looked up yet


def _libc() -> ctypes.CDLL | None:
    """glibc, when this process runs on it (mallopt and malloc_trim), else None."""
    global _LIBC
    if _LIBC is False:
        _LIBC = None
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") and hasattr(libc, "gnu_get_libc_version"):
                    _LIBC = libc
            except OSError:
                pass
    return _LIBC or None


def set_thresholds(mmap_bytes: int, trim_bytes: int) -> bool:
    """Set glibc's mmap and trim thresholds (bytes); False where this is not glibc."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_bytes)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim_bytes))


@contextmanager
def pinned_heap() -> Iterator[bool]:
    """Within: blocks over 128 KiB are mmapped and leave the resident set when freed, and free heap
    pages were returned first (yields whether that holds: False off glibc). After: the steady
    thresholds of a warmed-up glibc process (module docstring)."""
    libc = _libc()
    if libc is None:
        yield False
        return
    set_thresholds(PINNED_BYTES, PINNED_BYTES)
    libc.malloc_trim(0)
    try:
        yield True
    finally:
        set_thresholds(STEADY_MMAP_BYTES, STEADY_TRIM_BYTES)
