"""The process heap during a backbone pass: freed activations are kept for the next batch, not handed back (glibc).

glibc serves each block over its mmap threshold (128 KiB, raised as blocks are freed, at most 32 MiB) from a
fresh mapping and unmaps it on free. A CPU forward pass allocates and frees every layer's activations, tens of MiB
at 224 px, so each batch faulted every page of them in again: a cold `fedtl simulate --executor inprocess` of the
default job spent 88 s of system time on 54 million minor page faults against 54 s of user time (75.8 s wall).
With mappings and trimming off for the pass the freed blocks are reused: 20.5 s wall, 1.2 s of system time,
0.4 million faults, and a lower peak (1.6 GiB against 1.9 GiB) at the new feature batch of 32. The memory goes back to
the system when the pass ends (`malloc_trim`). The arithmetic is untouched: features are bit-identical either way.
A thread other than the main one allocates from its own arena of 64 MiB heaps, so a block larger than that (a 224 px
batch of 32 expands to 154 MiB inside MBConv block 1) is still mapped afresh there, about 3x slower: heavy passes
belong in a main thread (the lab's preparation, simulations/federation.py). Anywhere but glibc this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import platform
import threading
from collections.abc import Iterator

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
KEEP_ALL = 2**31 - 1  # mallopt takes a C int: the largest trim threshold it accepts, i.e. never trim
# A thread other than the main one (Flower's ServerApp thread, a Ray worker's) allocates from its own arena, a chain
# of 64 MiB heaps, and glibc unmaps a heap the moment it is wholly free, whatever the trim threshold, unless the
# top pad is at least a heap's size: then no heap is ever given back during the pass.
TOP_PAD_DURING = 128 * 2**20
TOP_PAD_AFTER = 128 * 2**10  # glibc's default
# After the pass: what glibc's own dynamic rule reaches once it has seen a large block freed (mmap threshold at its
# 64-bit ceiling, trim threshold twice that). Setting any of these turns that rule off for the process, so the pass
# leaves the heap where the rule would have taken it rather than at the 128 KiB start, which would map and fault
# every later block of a few MiB (a DP step's per-sample gradients) afresh.
MMAP_MAX_AFTER = 65536  # glibc's default count of mappings
MMAP_THRESHOLD_AFTER = 32 * 2**20
TRIM_THRESHOLD_AFTER = 2 * MMAP_THRESHOLD_AFTER


def _load_glibc() -> ctypes.CDLL | None:
    """Return the C library when it is glibc (the only one with these knobs), else None."""
    if platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


_LIBC = _load_glibc()
_LOCK = threading.Lock()
_depth = 0  # passes in progress (nested or on other threads): the heap is restored when the last one ends


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Within the block, keep freed memory in the heap for reuse; on leaving, settle the heap and return the rest.

    For the duration of a backbone pass (`shared/features.extract_features`). Safe to nest and to enter from
    several threads: the first entry switches, the last exit restores.
    """
    global _depth
    if _LIBC is None:
        yield
        return
    with _LOCK:
        _depth += 1
        if _depth == 1:
            _LIBC.mallopt(M_MMAP_MAX, 0)  # every block from the heap, however large
            _LIBC.mallopt(M_TRIM_THRESHOLD, KEEP_ALL)  # and freed ones kept there for the next batch
            _LIBC.mallopt(M_TOP_PAD, TOP_PAD_DURING)
    try:
        yield
    finally:
        with _LOCK:
            _depth -= 1
            if _depth == 0:
                _LIBC.mallopt(M_MMAP_MAX, MMAP_MAX_AFTER)
                _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_AFTER)
                _LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_AFTER)
                _LIBC.mallopt(M_TOP_PAD, TOP_PAD_AFTER)
                _LIBC.malloc_trim(0)  # the pass's activations go back to the system
