"""Counting a stack of frames: the kernels of :mod:`._kernels` run over work items on threads.

:func:`count_frames` sizes the per-item buffers, runs ``_count_items`` on
contiguous ranges of items (the calling thread and a pool; the kernels release
the GIL), redoes the call with room for every pixel when an item overflows its
X-ray or plateau capacity, and joins the items (``_compact``, ``_gather``).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from streamstore.counting._kernels import (
    BAND_ROWS,
    UNDECIDED_CAPACITY,
    XRAY_CAPACITY,
    _compact,
    _count_items,
    _gather,
)
from streamstore.counting._maps import (
    as_unsigned,
    item_capacity,
    kernel_maps,
    row_type,
    unsigned_bits,
)

__all__ = ["count_frames"]

_NO_GAIN = np.zeros((1, 1), np.uint16)


def count_frames(
    frames: np.ndarray,
    lo: np.ndarray,
    dark: np.ndarray,
    gain: np.ndarray | None,
    xray_level: int,
    radius: int,
    subpixel: bool,
    threads: int | None = None,
    maps: tuple[np.ndarray, ...] | None = None,
    wide_rows: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Count ``frames (n, H, W)`` (C-contiguous, same dtype as ``lo`` and ``dark``).

    Signed (wrapped) frames are read as their unsigned bits with the sign bit
    flipped as each value is read, with the unsigned ``lo`` and ``dark`` of
    :func:`~._maps.as_unsigned` (``maps``, when given, are theirs): no copy.

    Returns ``(offsets int64, indices uint32, subpixel uint8 or None)``.
    ``threads``: threads for this call (None: numba's thread count,
    ``NUMBA_NUM_THREADS``, all cores by default); ``maps`` is :func:`kernel_maps`
    of ``lo`` and ``dark`` (computed when None), or those followed by
    :func:`~._maps.frame_only_maps` of them (the vector pass then streams only the
    frame; the same events); ``wide_rows``: 16-bit instead of byte rows where that
    applies (:func:`row_type`; the same events either way).
    """
    n, h, w = frames.shape
    if h * w > 0xFFFFFFFF:
        raise ValueError(
            f"frames of {h} x {w} = {h * w} pixels: uint32 event indices address 2**32 - 1"
        )
    flip = 0
    if frames.dtype.kind == "i":  # read as unsigned, the sign bit flipped as it is read
        frames, flip = unsigned_bits(frames)
        lo, dark = as_unsigned(lo), as_unsigned(dark)
    bands = (h + BAND_ROWS - 1) // BAND_ROWS
    cap = item_capacity(w) + 4  # four spare slots per item for the branch-free appends
    n_items = n * bands
    out_idx = np.empty(n_items * cap, np.uint32)
    out_sub = np.empty(n_items * cap if subpixel else 1, np.uint8)
    out_n = np.zeros(n_items, np.int64)
    out_nx = np.zeros(n_items, np.int64)
    out_nu = np.zeros(n_items, np.int64)
    top = frames.dtype.type(np.iinfo(frames.dtype).max)
    flip = frames.dtype.type(flip)
    dmap, dbase, tmap, *frame_only = kernel_maps(lo, dark) if maps is None else maps
    vdmap, vtmap, mptr, mcols = frame_only or (dmap, tmap, *_no_mask(h))
    for v in (vdmap, vtmap):  # the kernel reads a map not C-contiguous as one value
        if not (v.flags.c_contiguous or (v.ndim == 2 and v.strides == (0, 0))):
            raise ValueError("kernel maps must be C-contiguous or one value (zero strides)")
    level = min(int(xray_level), 2**62)
    rtype, clamp = row_type(frames.dtype, dmap.dtype, gain is not None, wide_rows)
    proto = np.array([np.iinfo(rtype).min], rtype)  # the rows' type and SKIP value
    gain_arg = _NO_GAIN if gain is None else gain
    compact = dmap.itemsize < frames.itemsize  # one-byte dark over a row base
    xcap, ucap = XRAY_CAPACITY, UNDECIDED_CAPACITY
    while True:
        out_xray = np.empty(n_items * xcap, np.uint32)
        out_und = np.empty(n_items * ucap, np.int64)
        args = (
            frames, dmap, dbase, tmap, gain_arg, gain is not None, compact, np.int64(clamp),
            np.int64(level), top, subpixel, cap, proto, out_idx, out_sub, out_n, xcap,
            out_xray, out_nx, ucap, out_und, out_nu, vdmap, vtmap, mptr, mcols, flip,
        )  # fmt: skip
        _run_items(args, n_items, threads)
        if int(out_nx.max(initial=0)) <= xcap and int(out_nu.max(initial=0)) <= ucap:
            break
        # a flood of X-rays (or saturation), of large plateaus: room for every pixel
        xcap = BAND_ROWS * w if int(out_nx.max(initial=0)) > xcap else xcap
        ucap = cap if int(out_nu.max(initial=0)) > ucap else ucap
    maps_ = (dmap, dbase, tmap, gain_arg, gain is not None, compact, top, flip)
    offsets, marked, dest = _compact(
        frames, maps_, bands, cap, out_idx, out_n, xcap, out_xray, out_nx, ucap, out_und,
        out_nu, radius,
    )  # fmt: skip
    indices = np.empty(dest[-1], np.uint32)
    sub = np.empty(dest[-1] if subpixel else 0, np.uint8)
    _gather(out_idx, out_sub, out_n, marked, dest, cap, indices, sub, subpixel)
    return offsets, indices, (sub if subpixel else None)


def _no_mask(h: int) -> tuple[np.ndarray, np.ndarray]:
    """The per-row list of masked pixels ``(mptr, mcols)`` that lists none (per-pixel
    maps hold their mask themselves)."""
    return np.zeros(h + 1, np.int64), np.zeros(0, np.int64)


_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def _thread_pool() -> ThreadPoolExecutor:
    """The counting threads, made on first use (again in a forked child, whose
    copy of the parent's pool has no threads)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(
                max_workers=max(1, numba.config.NUMBA_NUM_THREADS - 1),
                thread_name_prefix="streamstore-count",
            )
            _pool_pid = os.getpid()
        return _pool


def _run_items(args: tuple, n_items: int, threads: int | None) -> None:
    """``_count_items`` over all items, in ``threads`` contiguous ranges (the calling
    thread takes the first; the kernel releases the GIL)."""
    k = numba.config.NUMBA_NUM_THREADS if threads is None else int(threads)
    k = max(1, min(k, numba.config.NUMBA_NUM_THREADS, n_items))
    if k == 1:
        _count_items(0, n_items, *args)
        return
    cuts = [n_items * i // k for i in range(k + 1)]
    pool = _thread_pool()
    futures = [pool.submit(_count_items, cuts[i], cuts[i + 1], *args) for i in range(1, k)]
    try:
        _count_items(cuts[0], cuts[1], *args)
    finally:
        for f in futures:
            f.result()
