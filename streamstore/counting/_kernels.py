"""numba counting kernels: the semantics of ``_reference.py`` at memory speed.

Work is split into items of ``BAND_ROWS`` rows of one frame; items run in
parallel (``prange``) and each writes its events into its own slot of a
preallocated buffer, so the result does not depend on the number of threads.

Within an item, rows are processed as a rolling window of three signal rows
(``S[r - 1]``, ``S[r]``, ``S[r + 1]``, int32, with a sentinel column at each end):

1. *scan* row ``r + 1`` in blocks of ``BLOCK`` pixels: one comparison per pixel
   against the threshold map, packed into a 64-bit mask (a fixed trip count,
   so LLVM vectorises it). Blocks without a candidate keep the sentinel
   ``SKIP`` as signal; blocks with one get ``S = (raw - dark) * gain`` at
   candidates and ``SKIP`` elsewhere (vectorised), with the block's largest
   signal gating an exact X-ray test. When a quarter or more of the previous
   row's blocks held a candidate, the row is scanned in *dense* mode instead:
   signals of every block in one pass, without the mask first (same result);
2. *test* row ``r``: in each block holding a candidate, the 3 x 3 local-maximum
   test of all 64 pixels at once (eight vectorised comparisons against the
   shifted neighbour rows), again packed into a bit mask;
3. each set bit is an event (after the plateau rule, when an equal neighbour
   exists): its index (and sub-pixel cell) is stored.

X-ray hits are collected per item and the events within the exclusion radius
are dropped when the items are joined (``_compact``): hits are rare, so this
costs nothing in the common case.

The signal fits an int32: ``|raw - dark| <= 65535`` and the relative gain is at
most 32767. Compiled lazily for the frame type actually seen (uint8, uint16,
and int8/int16 for wrapped pedestal-subtracted data), cached on disk.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

__all__ = ["BAND_ROWS", "count_frames", "xray_gate"]

#: Rows per work item (fixed: results must not depend on the thread count).
BAND_ROWS = 64
#: Pixels per vectorised block (the width of the bit masks).
BLOCK = 64
#: Signal of a pixel that is not a candidate: below every real signal.
SKIP = np.int32(-(2**31))
#: X-ray hits one item records before the call is redone with room for every pixel.
XRAY_CAPACITY = 64

_OPTS = {"nogil": True, "cache": True, "error_model": "numpy", "boundscheck": False}


@intrinsic
def _cttz(typingctx, x):
    """Count trailing zero bits of a nonzero uint64 (LLVM ``cttz``)."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return sig, codegen


@njit(inline="always", **_OPTS)
def _signal64(frame, dark, gain, has_gain, r, c):
    s = np.int64(frame[r, c]) - np.int64(dark[r, c])
    if has_gain:
        s *= np.int64(gain[r, c])
    return s


@njit(**_OPTS)
def _plateau_wins(frame, lo, dark, gain, has_gain, r, c, h, w):
    """May local maximum (r, c) stand for its plateau of equal signals? (rule 5)

    Walks the candidates joined to it through 8-adjacent candidates of the same
    signal; loses to an earlier plateau pixel or a brighter candidate next to the
    plateau. Only called when an equal neighbour exists (rare).
    """
    value = _signal64(frame, dark, gain, has_gain, r, c)
    p = r * w + c
    todo = [p]
    seen = {p}
    while len(todo):
        q = todo.pop()
        qr = q // w
        qc = q % w
        for dy in range(-1, 2):
            rr = qr + dy
            if rr < 0 or rr >= h:
                continue
            for dx in range(-1, 2):
                cc = qc + dx
                if cc < 0 or cc >= w or (dy == 0 and dx == 0) or frame[rr, cc] <= lo[rr, cc]:
                    continue
                t = rr * w + cc
                st = _signal64(frame, dark, gain, has_gain, rr, cc)
                if st > value or (st == value and t < p):
                    return False
                if st == value and t not in seen:
                    seen.add(t)
                    todo.append(t)
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
            v = _signal64(frame, dark, gain, has_gain, rr, cc)
            if v > 0:
                total += v
                ty += dy * v
                tx += dx * v
    qy = _quantise(2 * total + 4 * ty, total)
    qx = _quantise(2 * total + 4 * tx, total)
    return np.uint8((qy << 2) | qx)


@njit(inline="always", **_OPTS)
def _signal_block(row, lrow, drow, grow, srow, c0, n, gate, xray_level, top):
    """Signals of one block into ``srow`` (SKIP at non-candidates); X-ray hits in it.

    The vectorised loop only tracks the block's largest signal; ``gate`` is at most
    ``xray_level`` and below the signal of any saturated candidate, so a block whose
    largest signal does not exceed it holds no X-ray hit and the exact test is skipped.
    """
    smax = SKIP
    if n == BLOCK:
        for j in range(BLOCK):
            v = row[c0 + j]
            s = (np.int32(v) - np.int32(drow[c0 + j])) * np.int32(grow[c0 + j])
            s = s if v > lrow[c0 + j] else SKIP
            srow[1 + c0 + j] = s
            smax = max(smax, s)
    else:
        for j in range(n):
            v = row[c0 + j]
            s = (np.int32(v) - np.int32(drow[c0 + j])) * np.int32(grow[c0 + j])
            s = s if v > lrow[c0 + j] else SKIP
            srow[1 + c0 + j] = s
            smax = max(smax, s)
    nx = 0
    if smax > gate:
        for j in range(n):
            s = srow[1 + c0 + j]
            if s != SKIP and (row[c0 + j] == top or s > xray_level):
                nx += 1
    return nx


@njit(inline="always", **_OPTS)
def _dense_block(row, lrow, drow, grow, srow, c0, n, gate, xray_level, top):
    """Signals of a whole block (no candidate mask first); ``(has candidates, X-ray hits)``."""
    smax = SKIP
    if n == BLOCK:
        for j in range(BLOCK):
            v = row[c0 + j]
            s = (np.int32(v) - np.int32(drow[c0 + j])) * np.int32(grow[c0 + j])
            s = s if v > lrow[c0 + j] else SKIP
            srow[1 + c0 + j] = s
            smax = max(smax, s)
    else:
        for j in range(n):
            v = row[c0 + j]
            s = (np.int32(v) - np.int32(drow[c0 + j])) * np.int32(grow[c0 + j])
            s = s if v > lrow[c0 + j] else SKIP
            srow[1 + c0 + j] = s
            smax = max(smax, s)
    nx = 0
    if smax > gate:
        for j in range(n):
            s = srow[1 + c0 + j]
            if s != SKIP and (row[c0 + j] == top or s > xray_level):
                nx += 1
    return smax != SKIP, nx


@njit(inline="always", **_OPTS)
def _scan_row(
    row, lrow, drow, grow, srow, masks, w, full_blocks, n_blocks, gate, xray_level, top, dense
):
    """Fill ``srow[1:w + 1]`` with the signal of the row's candidates (SKIP elsewhere).

    ``grow`` is the row's relative gain (ones without a gain map). ``masks[b]`` says
    whether block ``b`` of the row previously kept in ``srow`` held a candidate and is
    overwritten for this row. Sparse mode first packs the candidates of a block
    into a bit mask and computes signals only where there is one (a block without
    candidates now and before is all SKIP already and is not touched); dense mode
    computes every block's signals in one pass (cheaper when most blocks hold a
    candidate). Both give the same ``srow`` and ``masks != 0``.

    Returns ``(X-ray hits in the row, blocks holding a candidate)``.
    """
    n_xray = 0
    n_busy = 0
    for b in range(n_blocks):
        c0 = b * BLOCK
        n = BLOCK if b < full_blocks else w - c0
        if dense:
            busy, nx = _dense_block(row, lrow, drow, grow, srow, c0, n, gate, xray_level, top)
            masks[b] = np.uint64(busy)
            n_busy += busy
            n_xray += nx
            continue
        bits = np.uint64(0)
        if b < full_blocks:
            for j in range(BLOCK):
                bits |= np.uint64(row[c0 + j] > lrow[c0 + j]) << np.uint64(j)
        else:
            for j in range(n):
                bits |= np.uint64(row[c0 + j] > lrow[c0 + j]) << np.uint64(j)
        before = masks[b]
        masks[b] = bits
        if bits != 0:
            n_busy += 1
            n_xray += _signal_block(row, lrow, drow, grow, srow, c0, n, gate, xray_level, top)
        elif before != 0:
            if b < full_blocks:
                for j in range(BLOCK):
                    srow[1 + c0 + j] = SKIP
            else:
                for j in range(n):
                    srow[1 + c0 + j] = SKIP
    return n_xray, n_busy


@njit(inline="always", **_OPTS)
def _local_max_bits(up, mid, down, c0, n):
    """Bit j set when pixel c0 + j of the middle row beats its 8 neighbours (and is a candidate).

    ``up``, ``mid``, ``down`` are signal rows with a sentinel at index 0, so pixel c
    sits at index c + 1. Earlier neighbours (row above, left) must be strictly
    smaller, later ones (right, row below) smaller or equal.
    """
    bits = np.uint64(0)
    if n == BLOCK:
        for j in range(BLOCK):
            i = c0 + j + 1
            s = mid[i]
            ok = (
                (s != SKIP)
                & (s > up[i - 1])
                & (s > up[i])
                & (s > up[i + 1])
                & (s > mid[i - 1])
                & (s >= mid[i + 1])
                & (s >= down[i - 1])
                & (s >= down[i])
                & (s >= down[i + 1])
            )
            bits |= np.uint64(ok) << np.uint64(j)
    else:
        for j in range(n):
            i = c0 + j + 1
            s = mid[i]
            ok = (
                (s != SKIP)
                & (s > up[i - 1])
                & (s > up[i])
                & (s > up[i + 1])
                & (s > mid[i - 1])
                & (s >= mid[i + 1])
                & (s >= down[i - 1])
                & (s >= down[i])
                & (s >= down[i + 1])
            )
            bits |= np.uint64(ok) << np.uint64(j)
    return bits


@njit(parallel=True, **_OPTS)
def _count_items(
    frames,
    lo,
    dark,
    gain,
    has_gain,
    gate,
    xray_level,
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
        # three signal rows with a sentinel column at each end; rows outside the frame
        # stay all SKIP
        sig = np.full((3, w + 2), SKIP, np.int32)
        masks = np.zeros((3, n_blocks), np.uint64)
        xr_rows = np.zeros(3, np.int64)
        ones = np.ones(w, np.uint16)
        dense = False  # scan mode of the next row: dense when a quarter of blocks are busy
        for rr in range(max(0, r0 - 1), min(h, r0 + 1)):
            slot = (rr - r0 + 3) % 3
            xr_rows[slot], busy = _scan_row(
                frame[rr], lo[rr], dark[rr], gain[rr] if has_gain else ones,
                sig[slot], masks[slot], w, full_blocks, n_blocks, gate, xray_level, top, dense,
            )  # fmt: skip
            dense = 4 * busy > n_blocks
        k = 0
        nxr = 0
        base = item * cap
        xbase = item * xcap
        for r in range(r0, r1):
            up = sig[(r - 1 - r0 + 3) % 3]
            mid = sig[(r - r0) % 3]
            nslot = (r + 1 - r0) % 3
            down = sig[nslot]
            if r + 1 < h:
                xr_rows[nslot], busy = _scan_row(
                    frame[r + 1], lo[r + 1], dark[r + 1], gain[r + 1] if has_gain else ones,
                    down, masks[nslot], w, full_blocks, n_blocks, gate, xray_level, top, dense,
                )  # fmt: skip
                dense = 4 * busy > n_blocks
            else:
                down[:] = SKIP
                masks[nslot] = 0
                xr_rows[nslot] = 0
            mrow = masks[(r - r0) % 3]
            # X-ray hits of this row (rare): record their positions
            if xr_rows[(r - r0) % 3]:
                row = frame[r]
                for c in range(w):
                    if mid[c + 1] != SKIP and (row[c] == top or mid[c + 1] > xray_level):
                        if nxr < xcap:
                            out_xray[xbase + nxr] = r * w + c
                        nxr += 1
            for b in range(n_blocks):
                if mrow[b] == 0:
                    continue
                c0 = b * BLOCK
                nb = BLOCK if b < full_blocks else w - c0
                bits = _local_max_bits(up, mid, down, c0, nb)
                while bits:
                    c = c0 + np.int64(_cttz(bits))
                    bits &= bits - np.uint64(1)
                    # an equal later neighbour (earlier ones failed the test) means a plateau
                    sv = mid[c + 1]
                    tie = (mid[c + 2] == sv) | (down[c] == sv) | (down[c + 1] == sv)
                    if (tie | (down[c + 2] == sv)) and not _plateau_wins(
                        frame, lo, dark, gain, has_gain, r, c, h, w
                    ):
                        continue
                    out_idx[base + k] = r * w + c
                    if want_sub:
                        out_sub[base + k] = _subpixel(frame, dark, gain, has_gain, r, c, h, w)
                    k += 1
        out_n[item] = k
        out_nx[item] = nxr


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


def item_capacity(w: int) -> int:
    """Most events one item can hold: no two events are 8-adjacent."""
    return ((BAND_ROWS + 1) // 2) * ((w + 1) // 2)


def xray_gate(lo: np.ndarray, dark: np.ndarray, gain: np.ndarray | None, xray_level: int) -> int:
    """A signal no block without X-ray hits exceeds: ``min(xray_level, G - 1)``.

    ``G`` is the smallest signal a saturated candidate can have, ``(top - dark) *
    gain`` over the pixels that can be candidates (``lo < top``). Only a shortcut
    (blocks above it get the exact test); costs a pass over the maps, so
    :class:`~streamstore.counting.Counter` computes it once.
    """
    top = int(np.iinfo(lo.dtype).max)
    level = min(int(xray_level), 2**31 - 1)
    sat = top - dark.astype(np.int64)
    if gain is not None:
        sat *= gain
    sat[lo >= top] = 2**62  # never a candidate
    return int(max(min(level, int(sat.min()) - 1), -(2**31) + 1))


def count_frames(
    frames: np.ndarray,
    lo: np.ndarray,
    dark: np.ndarray,
    gain: np.ndarray | None,
    xray_level: int,
    radius: int,
    subpixel: bool,
    threads: int | None = None,
    gate: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Count ``frames (n, H, W)`` (C-contiguous, same dtype as ``lo`` and ``dark``).

    Returns ``(offsets int64, indices uint32, subpixel uint8 or None)``.
    ``threads`` caps numba's thread count for this call (None: numba's current
    setting); ``gate`` is :func:`xray_gate` of the maps (computed when None).
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
    level = np.int32(min(int(xray_level), 2**31 - 1))  # signals are int32: same test
    if gate is None:
        gate = xray_gate(lo, dark, gain, xray_level)
    gate = np.int32(gate)
    gain_arg = _NO_GAIN if gain is None else gain
    previous = numba.get_num_threads()
    if threads is not None:
        numba.set_num_threads(min(int(threads), numba.config.NUMBA_NUM_THREADS))
    try:
        xcap = XRAY_CAPACITY
        while True:
            out_xray = np.empty(n_items * xcap, np.uint32)
            _count_items(
                frames, lo, dark, gain_arg, gain is not None, gate, level, top, subpixel,
                cap, out_idx, out_sub, out_n, xcap, out_xray, out_nx,
            )  # fmt: skip
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
