"""numba counting kernels: the semantics of ``_reference.py`` at memory speed.

Work is split into items of ``BAND_ROWS`` rows of one frame; items run in
parallel (``prange``) and each writes its events into its own slot of a
preallocated buffer, so the result does not depend on the number of threads.
Within a row the frame is scanned in blocks of ``BLOCK`` pixels with one
comparison per pixel against the threshold map (a loop LLVM vectorises); the
3 x 3 test runs only in blocks that hold a candidate.

Compiled lazily on first use for the frame type actually seen (uint8,
uint16, and int8/int16 for wrapped pedestal-subtracted data), cached on disk.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

__all__ = ["BAND_ROWS", "count_frames"]

#: Rows per work item (fixed: results must not depend on the thread count).
BAND_ROWS = 32
#: Pixels per vectorised scan block.
BLOCK = 64

_OPTS = {"nogil": True, "cache": True, "error_model": "numpy", "boundscheck": False}


@njit(inline="always", **_OPTS)
def _signal(frame, dark, gain, r, c):
    return (np.int64(frame[r, c]) - np.int64(dark[r, c])) * np.int64(gain[r, c])


@njit(inline="always", **_OPTS)
def _is_local_max(frame, dark, gain, r, c, h, w):
    s = _signal(frame, dark, gain, r, c)
    for dy in range(-1, 2):
        rr = r + dy
        if rr < 0 or rr >= h:
            continue
        for dx in range(-1, 2):
            cc = c + dx
            if cc < 0 or cc >= w or (dy == 0 and dx == 0):
                continue
            t = _signal(frame, dark, gain, rr, cc)
            if dy < 0 or (dy == 0 and dx < 0):
                if s <= t:
                    return False
            elif s < t:
                return False
    return True


@njit(inline="always", **_OPTS)
def _near_xray(frame, xr, r, c, h, w, radius):
    for rr in range(max(0, r - radius), min(h, r + radius + 1)):
        for cc in range(max(0, c - radius), min(w, c + radius + 1)):
            if frame[rr, cc] > xr[rr, cc]:
                return True
    return False


@njit(inline="always", **_OPTS)
def _quantise(num, den):
    if num < 0:
        return 0
    q = num // den
    return 3 if q > 3 else q


@njit(inline="always", **_OPTS)
def _subpixel(frame, dark, gain, r, c, h, w):
    total = np.int64(0)
    ty = np.int64(0)
    tx = np.int64(0)
    for dy in range(-1, 2):
        rr = r + dy
        if rr < 0 or rr >= h:
            continue
        for dx in range(-1, 2):
            cc = c + dx
            if cc < 0 or cc >= w:
                continue
            v = _signal(frame, dark, gain, rr, cc)
            if v > 0:
                total += v
                ty += dy * v
                tx += dx * v
    qy = _quantise(2 * total + 4 * ty, total)
    qx = _quantise(2 * total + 4 * tx, total)
    return np.uint8((qy << 2) | qx)


@njit(parallel=True, **_OPTS)
def _count_items(frames, lo, xr, dark, gain, radius, want_sub, cap, out_idx, out_sub, out_n):
    n, h, w = frames.shape
    bands = (h + BAND_ROWS - 1) // BAND_ROWS
    for item in prange(n * bands):
        f = item // bands
        r0 = (item % bands) * BAND_ROWS
        r1 = min(h, r0 + BAND_ROWS)
        frame = frames[f]
        base = item * cap
        k = 0
        for r in range(r0, r1):
            row = frame[r]
            lrow = lo[r]
            for c0 in range(0, w, BLOCK):
                c1 = min(w, c0 + BLOCK)
                hits = 0
                for c in range(c0, c1):
                    hits += row[c] > lrow[c]
                if hits == 0:
                    continue
                for c in range(c0, c1):
                    if row[c] > lrow[c]:
                        if not _is_local_max(frame, dark, gain, r, c, h, w):
                            continue
                        if _near_xray(frame, xr, r, c, h, w, radius):
                            continue
                        out_idx[base + k] = r * w + c
                        if want_sub:
                            out_sub[base + k] = _subpixel(frame, dark, gain, r, c, h, w)
                        k += 1
        out_n[item] = k


@njit(**_OPTS)
def _compact(n, bands, cap, out_idx, out_sub, out_n, want_sub):
    total = 0
    for i in range(out_n.size):
        total += out_n[i]
    offsets = np.zeros(n + 1, np.int64)
    indices = np.empty(total, np.uint32)
    sub = np.empty(total if want_sub else 0, np.uint8)
    k = 0
    for f in range(n):
        for b in range(bands):
            item = f * bands + b
            base = item * cap
            for j in range(out_n[item]):
                indices[k] = out_idx[base + j]
                if want_sub:
                    sub[k] = out_sub[base + j]
                k += 1
        offsets[f + 1] = k
    return offsets, indices, sub


def item_capacity(w: int) -> int:
    """Most events one item can hold: no two events are 8-adjacent."""
    return ((BAND_ROWS + 1) // 2) * ((w + 1) // 2)


def count_frames(
    frames: np.ndarray,
    lo: np.ndarray,
    xr: np.ndarray,
    dark: np.ndarray,
    gain: np.ndarray,
    radius: int,
    subpixel: bool,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Count ``frames (n, H, W)`` (C-contiguous, same dtype as ``lo``/``xr``).

    Returns ``(offsets int64, indices uint32, subpixel uint8 or None)``.
    ``threads`` caps numba's thread count for this call (None: numba's current setting).
    """
    n, h, w = frames.shape
    bands = (h + BAND_ROWS - 1) // BAND_ROWS
    cap = item_capacity(w)
    n_items = n * bands
    out_idx = np.empty(n_items * cap, np.uint32)
    out_sub = np.empty(n_items * cap if subpixel else 1, np.uint8)
    out_n = np.zeros(n_items, np.int64)
    previous = numba.get_num_threads()
    if threads is not None:
        numba.set_num_threads(min(int(threads), numba.config.NUMBA_NUM_THREADS))
    try:
        _count_items(
            frames, lo, xr, dark, gain, np.int64(radius), subpixel, cap, out_idx, out_sub, out_n
        )
    finally:
        if threads is not None:
            numba.set_num_threads(previous)
    offsets, indices, sub = _compact(n, bands, cap, out_idx, out_sub, out_n, subpixel)
    return offsets, indices, (sub if subpixel else None)
