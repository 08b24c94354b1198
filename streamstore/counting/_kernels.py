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
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["BAND_ROWS", "count_frames"]

#: Rows per work item (fixed: results must not depend on the thread count).
BAND_ROWS = 32
#: Pixels per vectorised scan block.
BLOCK = 64

_OPTS = {"nogil": True, "cache": True, "error_model": "numpy", "boundscheck": False}


@intrinsic
def _cttz(typingctx, x):
    """Count trailing zero bits of a nonzero uint64 (LLVM ``cttz``)."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return sig, codegen


@njit(inline="always", **_OPTS)
def _signal(frame, dark, gain, has_gain, r, c):
    s = np.int64(frame[r, c]) - np.int64(dark[r, c])
    if has_gain:
        s *= np.int64(gain[r, c])
    return s


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Hint the CPU to fetch the cache line of ``arr[idx]`` (1-d array); no effect on results."""
    if not isinstance(arr, types.Array) or arr.ndim != 1:
        return None
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), i8p)
        # read, high locality, data cache
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always", **_OPTS)
def _is_cand(masks, frame, lo, r0, r1, rr, cc):
    """Is pixel (rr, cc) a candidate? From the band's bit masks, or directly outside the band."""
    if r0 <= rr < r1:
        return (masks[rr - r0, cc // BLOCK] >> np.uint64(cc % BLOCK)) & np.uint64(1) != 0
    return frame[rr, cc] > lo[rr, cc]


@njit(inline="always", **_OPTS)
def _is_local_max(masks, frame, lo, dark, gain, has_gain, r0, r1, r, c, h, w):
    """Does candidate (r, c) beat every candidate 8-neighbour (key: signal, then raster order)?"""
    s = np.int64(0)
    have_s = False
    for dy in range(-1, 2):
        rr = r + dy
        if rr < 0 or rr >= h:
            continue
        for dx in range(-1, 2):
            cc = c + dx
            if cc < 0 or cc >= w or (dy == 0 and dx == 0):
                continue
            if not _is_cand(masks, frame, lo, r0, r1, rr, cc):
                continue  # not a candidate: never competes
            if not have_s:
                s = _signal(frame, dark, gain, has_gain, r, c)
                have_s = True
            t = _signal(frame, dark, gain, has_gain, rr, cc)
            if dy < 0 or (dy == 0 and dx < 0):
                if s <= t:
                    return False
            elif s < t:
                return False
    return True


@njit(inline="always", **_OPTS)
def _quantise(num, den):
    if num < 0:
        return 0
    q = num // den
    return 3 if q > 3 else q


@njit(inline="always", **_OPTS)
def _subpixel(frame, dark, gain, has_gain, r, c, h, w):
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
            v = _signal(frame, dark, gain, has_gain, rr, cc)
            if v > 0:
                total += v
                ty += dy * v
                tx += dx * v
    qy = _quantise(2 * total + 4 * ty, total)
    qx = _quantise(2 * total + 4 * tx, total)
    return np.uint8((qy << 2) | qx)


@njit(parallel=True, **_OPTS)
def _count_items(
    frames,
    lo,
    dark,
    gain,
    has_gain,
    xray_level,
    xray_floor,
    top,
    want_sub,
    cap,
    out_idx,
    out_sub,
    out_n,
    xcap,
    out_xray,
    out_nx,
):
    n, h, w = frames.shape
    bands = (h + BAND_ROWS - 1) // BAND_ROWS
    full_blocks = w // BLOCK
    n_blocks = (w + BLOCK - 1) // BLOCK
    for item in prange(n * bands):
        f = item // bands
        r0 = (item % bands) * BAND_ROWS
        r1 = min(h, r0 + BAND_ROWS)
        frame = frames[f]
        masks = np.empty((BAND_ROWS, n_blocks), np.uint64)
        # phase 1: one comparison per pixel, packed into bit masks (the fixed trip count of
        # full blocks and a unit-step outer loop let LLVM vectorise it); where a block holds
        # a candidate, prefetch the dark (and gain) lines phase 2 will read
        for r in range(r0, r1):
            row = frame[r]
            lrow = lo[r]
            for b in range(n_blocks):
                c0 = b * BLOCK
                bits = np.uint64(0)
                if b < full_blocks:
                    for j in range(BLOCK):
                        bits |= np.uint64(row[c0 + j] > lrow[c0 + j]) << np.uint64(j)
                else:
                    for j in range(w - c0):
                        bits |= np.uint64(row[c0 + j] > lrow[c0 + j]) << np.uint64(j)
                masks[r - r0, b] = bits
                if bits:
                    for rr in range(max(0, r - 1), min(h, r + 2)):
                        _prefetch(dark[rr], c0)
                        if has_gain:
                            _prefetch(gain[rr], c0)
        # phase 2: the 3 x 3 test and X-ray detection at the candidates only
        k = 0
        nx = 0
        base = item * cap
        xbase = item * xcap
        for r in range(r0, r1):
            for b in range(n_blocks):
                bits = masks[r - r0, b]
                c0 = b * BLOCK
                while bits:
                    c = c0 + np.int64(_cttz(bits))
                    bits &= bits - np.uint64(1)
                    v = frame[r, c]
                    if v == top or (
                        v > xray_floor and _signal(frame, dark, gain, has_gain, r, c) > xray_level
                    ):
                        if nx < xcap:
                            out_xray[xbase + nx] = r * w + c
                        nx += 1
                    if _is_local_max(masks, frame, lo, dark, gain, has_gain, r0, r1, r, c, h, w):
                        out_idx[base + k] = r * w + c
                        if want_sub:
                            out_sub[base + k] = _subpixel(frame, dark, gain, has_gain, r, c, h, w)
                        k += 1
        out_n[item] = k
        out_nx[item] = nx


@njit(**_OPTS)
def _lower_bound(a, lo_i, hi_i, value):
    """First index in ``a[lo_i:hi_i]`` (ascending) whose value is >= ``value``."""
    while lo_i < hi_i:
        mid = (lo_i + hi_i) // 2
        if a[mid] < value:
            lo_i = mid + 1
        else:
            hi_i = mid
    return lo_i


@njit(**_OPTS)
def _compact(
    n, h, w, bands, cap, out_idx, out_sub, out_n, xcap, out_xray, out_nx, radius, want_sub
):
    """Join the items' events frame by frame, dropping events near an X-ray hit."""
    total = 0
    for i in range(out_n.size):
        total += out_n[i]
    indices = np.empty(total, np.uint32)
    sub = np.empty(total if want_sub else 0, np.uint8)
    offsets = np.zeros(n + 1, np.int64)
    k = 0
    for f in range(n):
        start = k
        for b in range(bands):
            item = f * bands + b
            base = item * cap
            for j in range(out_n[item]):
                indices[k] = out_idx[base + j]
                if want_sub:
                    sub[k] = out_sub[base + j]
                k += 1
        n_x = 0
        for b in range(bands):
            n_x += out_nx[f * bands + b]
        if n_x:
            keep = np.ones(k - start, np.bool_)
            for b in range(bands):
                item = f * bands + b
                for j in range(out_nx[item]):
                    x = np.int64(out_xray[item * xcap + j])
                    xr, xc = x // w, x % w
                    ca, cb = max(0, xc - radius), min(w - 1, xc + radius)
                    for rr in range(max(0, xr - radius), min(h, xr + radius + 1)):
                        i = _lower_bound(indices, start, k, rr * w + ca)
                        while i < k and indices[i] <= rr * w + cb:
                            keep[i - start] = False
                            i += 1
            m = start
            for i in range(start, k):
                if keep[i - start]:
                    indices[m] = indices[i]
                    if want_sub:
                        sub[m] = sub[i]
                    m += 1
            k = m
        offsets[f + 1] = k
    return offsets, indices[:k].copy(), sub[: k if want_sub else 0].copy()


_NO_GAIN = np.zeros((1, 1), np.uint16)
#: X-ray hits one item records before the call is redone with room for every pixel.
XRAY_CAPACITY = 64


def item_capacity(w: int) -> int:
    """Most events one item can hold: no two events are 8-adjacent."""
    return ((BAND_ROWS + 1) // 2) * ((w + 1) // 2)


def _xray_floor(dark: np.ndarray, gain: np.ndarray | None, xray_level: int, top: int) -> int:
    """A raw value at or below which no pixel's signal can exceed ``xray_level``.

    ``(raw - dark) * gain <= (raw - min(dark)) * max(gain)``, so raw values up to
    ``min(dark) + xray_level // max(gain)`` need no signal computed (a shortcut only).
    """
    if xray_level >= 2**62:
        return top
    g_max = 1 if gain is None else 65535
    return min(top, int(dark.min()) + xray_level // g_max)


def count_frames(
    frames: np.ndarray,
    lo: np.ndarray,
    dark: np.ndarray,
    gain: np.ndarray | None,
    xray_level: int,
    radius: int,
    subpixel: bool,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Count ``frames (n, H, W)`` (C-contiguous, same dtype as ``lo`` and ``dark``).

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
    out_nx = np.zeros(n_items, np.int64)
    top = frames.dtype.type(np.iinfo(frames.dtype).max)
    floor = _xray_floor(dark, gain, xray_level, int(np.iinfo(frames.dtype).max))
    gain_arg = _NO_GAIN if gain is None else gain
    previous = numba.get_num_threads()
    if threads is not None:
        numba.set_num_threads(min(int(threads), numba.config.NUMBA_NUM_THREADS))
    try:
        xcap = XRAY_CAPACITY
        while True:
            out_xray = np.empty(n_items * xcap, np.uint32)
            _count_items(
                frames,
                lo,
                dark,
                gain_arg,
                gain is not None,
                np.int64(xray_level),
                np.int64(floor),
                top,
                subpixel,
                cap,
                out_idx,
                out_sub,
                out_n,
                xcap,
                out_xray,
                out_nx,
            )
            if int(out_nx.max(initial=0)) <= xcap:
                break
            xcap = BAND_ROWS * w  # a flood of X-rays (or saturation): room for every pixel
    finally:
        if threads is not None:
            numba.set_num_threads(previous)
    offsets, indices, sub = _compact(
        n, h, w, bands, cap, out_idx, out_sub, out_n, xcap, out_xray, out_nx, radius, subpixel
    )
    return offsets, indices, (sub if subpixel else None)
