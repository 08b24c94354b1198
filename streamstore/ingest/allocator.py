"""Keep freed frame buffers in the process instead of returning them to the kernel.

glibc's ``malloc`` serves every block above 32 MiB (its largest mmap
threshold) with a fresh ``mmap`` and gives it back with ``munmap`` on
``free``. A full K3 frame is 47 MB, and ZeroMQ allocates one message buffer
per frame received, so by default every frame costs the kernel about 11,500
page faults, zeroing 47 MB, and an unmap with its TLB shootdown. Measured on
this project's 2-core machine (tcp loopback, 47 MB messages, receiver
process only): 25.8 ms of system time per frame by default, 10.3 ms with
the setting below, and 41 -> 60-69 frames/s for a bare PULL receiver.

:func:`keep_large_buffers` turns ``mmap`` off for ``malloc`` (``M_MMAP_MAX =
0``) and raises the trim threshold, so freed frames go back to the heap and
the next frame reuses the same, already mapped pages. The price: the process
keeps its peak heap (bounded for the ingest daemon by ``--max-buffer-mb`` plus
ZeroMQ's high-water mark). The bare-transport benchmark applies the same
setting to its receiver, so the ceiling it reports is the transport's best.
Does nothing on a C library without ``mallopt`` (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["keep_large_buffers", "one_malloc_arena", "release_free_memory"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
#: Heap kept on free before glibc trims it back (bytes; the largest value mallopt takes).
_TRIM = 2**31 - 1


def keep_large_buffers() -> bool:
    """Make ``malloc`` reuse freed large blocks (see the module); True when applied."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.debug("no mallopt in the C library (%s): large buffers stay mmap'ed", name)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM) == 1
    if not ok:
        log.debug("mallopt refused M_MMAP_MAX / M_TRIM_THRESHOLD")
    return ok


def one_malloc_arena() -> bool:
    """Make every thread ``malloc`` from the main heap (``M_ARENA_MAX = 1``); True if applied.

    A thread other than the main one allocates from its own arena, made of
    heaps of at most 64 MiB: ZeroMQ's I/O thread allocates every received
    message there, and with 47 MB frames each buffer needs a heap of its own
    whose pages come back faulted in and zeroed again, about 1,000-3,800
    page faults per frame received (``benchmarks/broker_cpu.py``). From the
    main heap, with :func:`keep_large_buffers`, freed frames are reused
    mapped. For a process whose threads do little else but move frames (the
    broker): threads that allocate much in parallel would contend for the one
    arena's lock. Call it before the process starts threads: glibc fixes the
    arena a thread uses at the thread's first ``malloc``.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(_M_ARENA_MAX, 1) == 1


def release_free_memory() -> bool:
    """Return the heap's free pages to the system now (``malloc_trim(0)``); True if any were.

    For after an outsized message was dropped: with :func:`keep_large_buffers`
    the heap would otherwise keep that peak for good. Does nothing without
    glibc's ``malloc_trim``.
    """
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))
