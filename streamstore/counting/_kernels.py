"""numba counting kernels: the semantics of ``_reference.py`` at memory speed.

Work is split into items of ``BAND_ROWS`` rows of one frame; items run in
parallel (``prange``) and each writes its events into its own slot of a
preallocated buffer, so the result does not depend on the number of threads.

Within an item, rows are processed as a rolling window of three signal rows
(``S[r - 1]``, ``S[r]``, ``S[r + 1]``, int32, a sentinel column at each end, the
sentinel ``SKIP`` wherever there is no candidate):

1. *scan* row ``r + 1``: compare it with the threshold map 64 pixels at a time
   into a bit mask (a fixed trip count, so LLVM vectorises it). The map is read
   as one byte per pixel over a per-row base when the thresholds fit
   (:func:`compact_thresholds`; exact), else as the frame-type map. The columns
   of the set bits are appended to the row's candidate list without a
   data-dependent branch in the common case (at most four per word), and the
   dark row is prefetched;
2. *signals* ``S = (raw - dark) * gain`` of the row's candidates only (and the
   previous occupant's candidates reset to SKIP), with an X-ray flag for the row;
   without a gain map the gain row is not read;
3. *test* row ``r``: for each candidate, the 3 x 3 local-maximum test against
   the three signal rows (two comparisons, with the largest earlier and the
   largest later neighbour) and whether it has an equal later neighbour
   (a plateau), into per-candidate flags; then the events in column order, rule
   5 settled for the rare plateau maxima (a pair without the general walk).

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
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["BAND_ROWS", "compact_thresholds", "count_frames"]

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


@intrinsic
def _cttz0(typingctx, x):
    """Count trailing zero bits of a uint64, 64 for zero (LLVM ``cttz``, defined at 0)."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 0))

    return sig, codegen


@intrinsic
def _popcount(typingctx, x):
    """Number of set bits of a uint64 (LLVM ``ctpop``)."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Hint the CPU to fetch the cache line of ``arr[idx]`` (LLVM ``prefetch``; no effect)."""
    sig = types.void(arr, types.intp)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

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


@njit(**_OPTS)
def _plateau_wins_pair(frame, lo, dark, gain, has_gain, r, c, h, w):
    """Rule 5 for local maximum (r, c), without the walk when its plateau is a pair.

    Called only when (r, c) beat its neighbours and has an equal later one. When it
    has exactly one equal neighbour ``q`` and ``q`` has no other equal neighbour,
    the plateau is ``{p, q}`` with ``p`` first: ``p`` wins unless a neighbour of ``q``
    is brighter (``p``'s own neighbours are not). Otherwise the general walk decides.
    """
    value = _signal64(frame, dark, gain, has_gain, r, c)
    qr = -1
    qc = -1
    for dy in range(0, 2):
        rr = r + dy
        if rr >= h:
            continue
        for dx in range(-1, 2):
            cc = c + dx
            if cc < 0 or cc >= w or (dy == 0 and dx <= 0) or frame[rr, cc] <= lo[rr, cc]:
                continue
            if _signal64(frame, dark, gain, has_gain, rr, cc) == value:
                if qr >= 0:
                    return _plateau_wins(frame, lo, dark, gain, has_gain, r, c, h, w)
                qr = rr
                qc = cc
    for dy in range(-1, 2):
        rr = qr + dy
        if rr < 0 or rr >= h:
            continue
        for dx in range(-1, 2):
            cc = qc + dx
            if (
                cc < 0
                or cc >= w
                or (dy == 0 and dx == 0)
                or (rr == r and cc == c)
                or frame[rr, cc] <= lo[rr, cc]
            ):
                continue
            st = _signal64(frame, dark, gain, has_gain, rr, cc)
            if st > value:
                return False
            if st == value:
                return _plateau_wins(frame, lo, dark, gain, has_gain, r, c, h, w)
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
def _append_bits(cols, k, bits, c0):
    """Append the positions ``c0 + j`` of the set bits ``j`` to ``cols[k:]``; new length.

    The first four are written whatever the number of bits (slots past the count are
    scratch that the next append overwrites; ``cols`` has four spare slots), so the
    common case takes no data-dependent branch.
    """
    t = bits
    cols[k] = c0 + np.int64(_cttz0(t))
    t &= t - np.uint64(1)
    cols[k + 1] = c0 + np.int64(_cttz0(t))
    t &= t - np.uint64(1)
    cols[k + 2] = c0 + np.int64(_cttz0(t))
    t &= t - np.uint64(1)
    cols[k + 3] = c0 + np.int64(_cttz0(t))
    t &= t - np.uint64(1)
    n = np.int64(_popcount(bits))
    if n > 4:
        m = k + 4
        while t:
            cols[m] = c0 + np.int64(_cttz(t))
            t &= t - np.uint64(1)
            m += 1
    return k + n


@njit(inline="always", **_OPTS)
def _scan_row(row, l8row, base, lrow, compact, drow, grow, has_gain, srow, cols, n_old, w,
              full_blocks, n_blocks, xray_level, top):  # fmt: skip
    """Candidate columns of one row into ``cols`` and their signals into ``srow``.

    ``srow`` holds SKIP everywhere but at the ``n_old`` columns ``cols`` held on entry
    (the row kept there before), which are reset first. The scan compares 64 pixels
    at a time (a fixed trip count LLVM vectorises) into a bit mask: in ``compact``
    mode against ``base + l8row`` (one byte per pixel, 255 = never a candidate; see
    :func:`compact_thresholds`), else against ``lrow``. The dark and gain rows are
    read only at candidates. Returns ``(number of candidates, any X-ray hit)``.
    """
    for q in range(n_old):
        srow[np.uint64(cols[q]) + np.uint64(1)] = SKIP
    k = 0
    for b in range(n_blocks):
        c0 = b * BLOCK
        bits = np.uint64(0)
        if compact:
            if b < full_blocks:
                for j in range(BLOCK):
                    t = l8row[c0 + j]
                    bits |= np.uint64((row[c0 + j] > t + base) & (t != 255)) << np.uint64(j)
            else:
                for j in range(w - c0):
                    t = l8row[c0 + j]
                    bits |= np.uint64((row[c0 + j] > t + base) & (t != 255)) << np.uint64(j)
        elif b < full_blocks:
            for j in range(BLOCK):
                bits |= np.uint64(row[c0 + j] > lrow[c0 + j]) << np.uint64(j)
        else:
            for j in range(w - c0):
                bits |= np.uint64(row[c0 + j] > lrow[c0 + j]) << np.uint64(j)
        _prefetch(drow, c0)  # the signals below read the dark row at candidates
        _prefetch(drow, c0 + 32)
        k = _append_bits(cols, k, bits, c0)
    xray = False
    if has_gain:
        for q in range(k):
            c = np.uint64(cols[q])
            v = row[c]
            s = (np.int32(v) - np.int32(drow[c])) * np.int32(grow[c])
            srow[c + np.uint64(1)] = s
            xray |= (v == top) | (s > xray_level)
    else:  # no gain map: the gain row is not read
        for q in range(k):
            c = np.uint64(cols[q])
            v = row[c]
            s = np.int32(v) - np.int32(drow[c])
            srow[c + np.uint64(1)] = s
            xray |= (v == top) | (s > xray_level)
    return k, xray


@njit(parallel=True, **_OPTS)
def _count_items(
    frames,
    lo8,
    base,
    compact,
    lo,
    dark,
    gain,
    has_gain,
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
        # three signal rows with a sentinel column at each end (and one spare for the
        # scratch slots); rows outside the frame stay all SKIP
        sig = np.full((3, w + 3), SKIP, np.int32)
        cols = np.zeros((3, w + 4), np.int64)  # candidate columns of each row
        ncols = np.zeros(3, np.int64)
        flags = np.zeros(w + 1, np.uint8)
        xrow = np.zeros(3, np.bool_)
        ones = np.ones(w, np.uint16)
        k = 0
        nxr = 0
        obase = item * cap
        xbase = item * xcap
        for rr in range(max(0, r0 - 1), min(h + 1, r0 + BAND_ROWS + 1)):
            # scan row rr into its slot (rows past the frame: no candidates)
            slot = (rr - r0 + 3) % 3
            if rr < h:
                ncols[slot], xrow[slot] = _scan_row(
                    frame[rr], lo8[rr if compact else 0], base[rr], lo[rr], compact, dark[rr],
                    gain[rr] if has_gain else ones, has_gain, sig[slot], cols[slot], ncols[slot], w,
                    full_blocks, n_blocks, xray_level, top,
                )  # fmt: skip
            else:
                for q in range(ncols[slot]):
                    sig[slot, 1 + cols[slot, q]] = SKIP
                ncols[slot] = 0
                xrow[slot] = False
            r = rr - 1  # the row whose neighbours are now all scanned
            if r < r0 or r >= r1:
                continue
            up = sig[(r - 1 - r0 + 3) % 3]
            ms = (r - r0) % 3
            mid = sig[ms]
            down = sig[(r + 1 - r0) % 3]
            mcols = cols[ms]
            if xrow[ms]:  # X-ray hits in this row (rare): record their positions
                row = frame[r]
                for q in range(ncols[ms]):
                    c = mcols[q]
                    if row[c] == top or mid[c + 1] > xray_level:
                        if nxr < xcap:
                            out_xray[xbase + nxr] = r * w + c
                        nxr += 1
            # the 3 x 3 test of every candidate of the row into flags (bit 0: local
            # maximum, bit 1: with an equal later neighbour, i.e. on a plateau)
            nm = ncols[ms]
            for q in range(nm):
                i = np.uint64(mcols[q]) + np.uint64(1)  # unsigned: no wrap-around test
                sv = mid[i]
                ia = i - np.uint64(1)
                ib = i + np.uint64(1)
                # beat the largest earlier neighbour strictly and the largest later one
                # or equal it (then it is on a plateau): the eight comparisons of rule 4
                before = max(max(up[ia], up[i]), max(up[ib], mid[ia]))
                after = max(max(mid[ib], down[ia]), max(down[i], down[ib]))
                ok = (sv > before) & (sv >= after)
                flags[q] = np.uint8(ok) | (np.uint8(ok & (sv == after)) << np.uint8(1))
            # events, in column order; rule 5 for the (rare) plateau maxima
            for q in range(nm):
                c = mcols[q]
                fl = flags[q]
                if fl & 2:
                    fl = np.uint8(_plateau_wins_pair(frame, lo, dark, gain, has_gain, r, c, h, w))
                out_idx[obase + k] = r * w + c  # kept only when fl (a spare slot at the end)
                if want_sub and fl:
                    out_sub[obase + k] = _subpixel(frame, dark, gain, has_gain, r, c, h, w)
                k += np.int64(fl & 1)
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


def compact_thresholds(lo: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """The scan's one-byte threshold map: ``(lo8 uint8 (H, W), base (H,), usable)``.

    ``base[r]`` is the smallest threshold of row ``r`` below the type's maximum
    ``TMAX`` and ``lo8 = lo - base``, with 255 where ``lo == TMAX`` (never a
    candidate). It is ``usable`` when every other pixel's ``lo - base`` is below
    255 (dark levels and noise vary less than that within a row; always true for
    uint8): then ``raw > base + lo8 and lo8 != 255`` is exactly ``raw > lo`` and the
    scan reads one byte of map per pixel instead of two. Otherwise the kernel
    compares with ``lo``. Costs a pass over the map, so
    :class:`~streamstore.counting.Counter` computes it once.
    """
    top = np.iinfo(lo.dtype).max
    never = lo == top
    wide = lo.astype(np.int64)
    base = np.where(never, top, wide).min(axis=1, initial=top)
    delta = wide - base[:, None]
    usable = bool(np.all(never | (delta < 255)))
    if not usable:
        return np.zeros((1, 1), np.uint8), base.astype(lo.dtype), False
    return np.where(never, 255, delta).astype(np.uint8), base.astype(lo.dtype), True


def count_frames(
    frames: np.ndarray,
    lo: np.ndarray,
    dark: np.ndarray,
    gain: np.ndarray | None,
    xray_level: int,
    radius: int,
    subpixel: bool,
    threads: int | None = None,
    compact: tuple[np.ndarray, np.ndarray, bool] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Count ``frames (n, H, W)`` (C-contiguous, same dtype as ``lo`` and ``dark``).

    Returns ``(offsets int64, indices uint32, subpixel uint8 or None)``.
    ``threads`` caps numba's thread count for this call (None: numba's current
    setting); ``compact`` is :func:`compact_thresholds` of ``lo`` (computed when None).
    """
    n, h, w = frames.shape
    bands = (h + BAND_ROWS - 1) // BAND_ROWS
    cap = item_capacity(w) + 1  # one spare slot per item for the branch-free store
    n_items = n * bands
    out_idx = np.empty(n_items * cap, np.uint32)
    out_sub = np.empty(n_items * cap if subpixel else 1, np.uint8)
    out_n = np.zeros(n_items, np.int64)
    out_nx = np.zeros(n_items, np.int64)
    top = frames.dtype.type(np.iinfo(frames.dtype).max)
    level = np.int32(min(int(xray_level), 2**31 - 1))  # signals are int32: same test
    lo8, base, usable = compact_thresholds(lo) if compact is None else compact
    gain_arg = _NO_GAIN if gain is None else gain
    previous = numba.get_num_threads()
    if threads is not None:
        numba.set_num_threads(min(int(threads), numba.config.NUMBA_NUM_THREADS))
    try:
        xcap = XRAY_CAPACITY
        while True:
            out_xray = np.empty(n_items * xcap, np.uint32)
            _count_items(
                frames, lo8, base, usable, lo, dark, gain_arg, gain is not None, level, top,
                subpixel, cap, out_idx, out_sub, out_n, xcap, out_xray, out_nx,
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
