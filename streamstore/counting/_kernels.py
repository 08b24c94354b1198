"""numba counting kernels: the semantics of ``_reference.py`` at memory speed.

Work is split into items of ``BAND_ROWS`` rows of one frame; each item writes
its events into its own slot of a preallocated buffer, so the result does not
depend on the number of threads. The kernels are compiled single-threaded
(``nogil``) and :func:`._launch.count_frames` runs contiguous ranges of items on its own
threads: a parallel (``prange``) compile cost several times as much, for every
variant (``benchmarks/startup.py`` measures the cold start), and the split is the
same static one.

Within an item, rows are processed as a rolling window of three signal rows
(``S[r - 1]``, ``S[r]``, ``S[r + 1]``, a sentinel column at each end, SKIP
wherever there is no candidate) and of their horizontal 3-maxima. For each row
``r + 1`` (the vector loops are LLVM IR in ``_simd.py``):

1. :func:`~._simd.signal_row` streams the frame, dark and threshold rows once,
   32 pixels at a time, into the signals of row ``r + 1``, and says whether the
   row may hold an X-ray hit; the ``W mod 64`` tail is scalar code;
2. :func:`~._simd.test_row`: the 3 x 3 local-maximum test of row ``r``, 64
   pixels at a time, reading the row above through its horizontal maxima, which
   the previous row's test stored; it appends the local maxima it can settle to
   the item's events in column order, without a data-dependent branch in the
   common case, and leaves words of bits for the others. It prefetches the next
   frame row, so memory keeps streaming while it computes;
3. X-ray positions of row ``r`` when step 1 said so (:func:`~._simd.xray_row`);
4. the rare maxima the test left (``_settle_row``): those on a plateau (rule 5,
   :func:`_plateau_near`, a full walk when the items are joined for the few it
   cannot settle) and, in byte rows, those whose clamped signal cannot decide
   (:func:`_exact_max`), inserted in column order; then sub-pixel cells from the
   frame.

The kernel streams the maps of :func:`._maps.kernel_maps`: in practice a one-byte
dark over a per-row base and a one-byte threshold above dark, 4 bytes per
pixel with the frame. Where every unmasked pixel shares one dark level and one
threshold (frames the camera dark-subtracted), the vector pass reads those as
single values instead (``vdmap``, ``vtmap``: :func:`._maps.frame_only_maps`)
and streams only the frame; the masked pixels are then listed per row
(``mptr``, ``mcols``) and made SKIP after the pass, and the scalar paths, which
read a few pixels around each event, keep the per-pixel maps, so the events
are those of the per-pixel maps bit for bit. Wrapped (signed) frames are read
as unsigned ones, each value XORed with the sign bit as it is read (``flip``,
0 for unsigned frames): order, differences and the maximum are kept, so they
need neither a variant nor a flipped copy of their own. Signal rows are
bytes, ``min(signal, 255)``, for unsigned frames without a gain map and with a
one-byte dark map or 8-bit frames (see :func:`._maps.row_type`), else exact int32:
``|raw - dark| <= 65535`` and the relative gain is at most 32767, so
``(raw - dark) * gain`` fits.

X-ray hits are collected per item and the events within the exclusion radius
are dropped when the items are joined (``_compact``): hits are rare, so this
costs nothing in the common case. Compiled lazily for the types actually seen,
cached on disk; :data:`._maps.VARIANTS` lists every combination a calibration can
lead to, and :mod:`streamstore.counting.warmup` compiles them ahead of use.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from streamstore._numba_cache import serialize_saves
from streamstore.counting._simd import (
    EQ_ANY,
    LANES,
    SAT_ANY,
    cttz,
    hmax_row,
    signal_row,
    signal_row_gain,
    test_row,
    xray_row,
)

__all__ = ["BAND_ROWS", "UNDECIDED_CAPACITY", "XRAY_CAPACITY"]

#: Rows per work item (fixed: results must not depend on the thread count).
BAND_ROWS = 64
#: Plateau maxima one item leaves undecided before the call is redone with room for all.
UNDECIDED_CAPACITY = 64
#: X-ray hits one item records before the call is redone with room for every pixel.
XRAY_CAPACITY = 64

_OPTS = {"nogil": True, "cache": True, "error_model": "numpy", "boundscheck": False}
#: sha256 (first 16 hex digits) of _simd.py. numba's on-disk cache is keyed on
#: this file only, so a change to the intrinsics must change this file too, or
#: stale machine code would run: tests/counting/test_counting.py checks the two agree.
SIMD_SOURCE_SHA = "e48df65a4c5eb3ec"


@njit(inline="always", **_OPTS)
def _signal64(frame, m, r, c):
    """Signal ``(raw - dark) * gain`` of pixel (r, c) from the kernel's maps ``m``.

    ``m = (dmap, dbase, tmap, gain, has_gain, compact, top, flip)``; with compact
    maps a masked pixel (``t = 255``) has dark TMAX, as in the reference. Frame
    values are read XORed with ``flip`` (the sign bit of wrapped frames, else 0).
    """
    dmap, dbase, tmap, gain, has_gain, compact, top, flip = m
    if compact and tmap[r, c] == 255:
        s = np.int64(frame[r, c] ^ flip) - np.int64(top)
    else:
        s = np.int64(frame[r, c] ^ flip) - np.int64(dbase[r]) - np.int64(dmap[r, c])
    if has_gain:
        s *= np.int64(gain[r, c])
    return s


@njit(inline="always", **_OPTS)
def _candidate(frame, m, r, c):
    """Whether pixel (r, c) is a candidate: ``raw > lo``, from the kernel's maps ``m``."""
    dmap, dbase, tmap, gain, has_gain, compact, top, flip = m
    t = tmap[r, c]
    if compact and t == 255:
        return False
    raw = np.int64(frame[r, c] ^ flip)
    return raw - np.int64(dbase[r]) - np.int64(dmap[r, c]) > np.int64(t)


@njit(inline="always", **_OPTS)
def _equal_neighbours(frame, m, q, value, p, h, w, out):
    """The candidates 8-adjacent to pixel ``q`` whose signal is ``value``, into ``out``.

    Returns how many, or -1 when one of them is brighter, or equal and before
    ``p`` in raster order (then ``p`` does not stand for the plateau).
    """
    qr = q // w
    qc = q - qr * w
    k = 0
    for dy in range(-1, 2):
        rr = qr + dy
        if rr < 0 or rr >= h:
            continue
        for dx in range(-1, 2):
            cc = qc + dx
            if cc < 0 or cc >= w or (dy == 0 and dx == 0) or not _candidate(frame, m, rr, cc):
                continue
            t = rr * w + cc
            st = _signal64(frame, m, rr, cc)
            if st > value or (st == value and t < p):
                return -1
            if st == value:
                out[k] = t
                k += 1
    return k


@njit(inline="always", **_OPTS)
def _plateau_near(frame, m, r, c, h, w):
    """Rule 5 for local maximum (r, c) that has a later neighbour of equal signal.

    The common plateau is the maximum and its equal later neighbours (two
    pixels). The test already settled the maximum's own neighbours (earlier ones
    below it, later ones not above), so only the other neighbours of the equal
    ones are looked at: 1 when none is brighter or equal (the maximum is the
    plateau's raster-first pixel: it stands for it), 0 when one is brighter, -1
    when one is equal (the plateau reaches further: :func:`_plateau_wins` walks it
    when the items are joined). No loop here stores to memory and nothing is
    called: kept that way, this runs in about 20 ns instead of a walk's 160.
    """
    v = _signal64(frame, m, r, c)
    for k in range(4):  # the later neighbours (0, 1), (1, -1), (1, 0), (1, 1)
        qr = r if k == 0 else r + 1
        qc = c + 1 if k == 0 else c + k - 2
        if qr >= h or qc < 0 or qc >= w or not _candidate(frame, m, qr, qc):
            continue
        if _signal64(frame, m, qr, qc) != v:
            continue
        for dy in range(-1, 2):
            xr = qr + dy
            if xr < 0 or xr >= h:
                continue
            for dx in range(-1, 2):
                xc = qc + dx
                if xc < 0 or xc >= w or (abs(xr - r) <= 1 and abs(xc - c) <= 1):
                    continue  # the maximum or one of its neighbours: settled
                if not _candidate(frame, m, xr, xc):
                    continue
                sx = _signal64(frame, m, xr, xc)
                if sx > v:
                    return 0
                if sx == v:
                    return -1
    return 1


@njit(**_OPTS)
def _plateau_wins(frame, m, p, h, w):
    """May local maximum ``p`` (flat index) stand for its plateau of equal signals?

    Rule 5 in full: walks the candidates joined to it through 8-adjacent
    candidates of the same signal; loses to an earlier plateau pixel or a brighter
    candidate next to the plateau. For the few plateaus :func:`_plateau_near`
    leaves undecided (a handful per full frame).
    """
    r = p // w
    value = _signal64(frame, m, r, p - r * w)
    nb = np.empty(8, np.int64)
    todo = [p]
    seen = {p}
    while len(todo):
        k = _equal_neighbours(frame, m, todo.pop(), value, p, h, w, nb)
        if k < 0:
            return False
        for j in range(k):
            if nb[j] not in seen:
                seen.add(nb[j])
                todo.append(nb[j])
    return True


@njit(inline="always", **_OPTS)
def _exact_max(frame, m, r, c, h, w):
    """Rule 4 for candidate (r, c) from the frame: 0 (not a local maximum), 1 (one),
    2 (one with a later neighbour of equal signal: a plateau, rule 5).

    For the pixels unsigned rows store at their ceiling (in byte rows, a signal of
    BYTE_TOP or more), whose clamped neighbourhood cannot tell them apart."""
    v = _signal64(frame, m, r, c)
    eq = False
    for dy in range(-1, 2):
        rr = r + dy
        if rr < 0 or rr >= h:
            continue
        for dx in range(-1, 2):
            cc = c + dx
            if cc < 0 or cc >= w or (dy == 0 and dx == 0) or not _candidate(frame, m, rr, cc):
                continue
            sn = _signal64(frame, m, rr, cc)
            if dy < 0 or (dy == 0 and dx < 0):  # earlier in raster order: strictly below
                if sn >= v:
                    return 0
            elif sn > v:
                return 0
            elif sn == v:
                eq = True
    return 2 if eq else 1


@njit(inline="always", **_OPTS)
def _quantise(num, den):
    if num < 0:
        return 0
    q = num // den
    return 3 if q > 3 else q


@njit(inline="always", **_OPTS)
def _subpixel(frame, dmap, dbase, tmap, gain, has_gain, compact, top, flip, r, c, h, w):
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
            # _signal64's body, written out: calling it (or a twin taking the unpacked
            # maps, inlined as well) passes the arrays again per pixel, and took this
            # loop back from ~26 to ~219 ms a full frame
            if compact and tmap[rr, cc] == 255:
                v = np.int64(frame[rr, cc] ^ flip) - np.int64(top)
            else:
                raw = np.int64(frame[rr, cc] ^ flip)
                v = raw - np.int64(dbase[rr]) - np.int64(dmap[rr, cc])
            if has_gain:
                v *= np.int64(gain[rr, cc])
            if v > 0:
                total += v
                ty += dy * v
                tx += dx * v
    qy = _quantise(2 * total + 4 * ty, total)
    qx = _quantise(2 * total + 4 * tx, total)
    return np.uint8((qy << 2) | qx)


@njit(**_OPTS)
def _subpixel_row(frame, m, r, h, w, out_idx, out_sub, lo_q, hi_q):
    """Sub-pixel cells of one row's events ``out_idx[lo_q:hi_q]``: the maps unpacked
    once for the row (unpacking the tuple per pixel, as _signal64 does, took and
    dropped a reference to each of its arrays nine times an event), in a function of
    its own so the counting loop's code stays as it is without sub-pixel output."""
    dmap, dbase, tmap, gain, has_gain, compact, top, flip = m
    for q in range(lo_q, hi_q):
        c = np.int64(out_idx[q]) - r * w
        out_sub[q] = _subpixel(frame, dmap, dbase, tmap, gain, has_gain, compact, top, flip, r,
                               c, h, w)  # fmt: skip


@njit(inline="always", **_OPTS)
def _insert_event(out_idx, lo_i, hi_i, p):
    """Insert ``p`` into the ascending ``out_idx[lo_i:hi_i]``; its slot."""
    i = hi_i
    while i > lo_i and out_idx[i - 1] > p:
        out_idx[i] = out_idx[i - 1]
        i -= 1
    out_idx[i] = p
    return i


@njit(inline="always", **_OPTS)
def _settle_row(frame, m, r, h, w, eqw, satw, summary, flags, out_idx, obase, k_row, k,
                out_und, ubase, ucap, nu):  # fmt: skip
    """Add to row ``r``'s events the local maxima :func:`~._simd.test_row` left
    to decide: the exact test for the pixels the byte rows clamped, rule 5 for the
    rare plateau maxima (those :func:`_plateau_near` cannot settle are kept, and
    their slots listed in ``out_und`` for the join to decide). Returns ``(k, nu)``.
    """
    for si in range(summary.size):
        sm = summary[si]
        while sm:
            b = si * 64 + np.int64(cttz(sm))
            sm &= sm - np.uint64(1)
            e = eqw[b] if flags & EQ_ANY else np.uint64(0)
            sat = satw[b] if flags & SAT_ANY else np.uint64(0)
            t = e | sat
            while t:
                j = cttz(t)
                t &= t - np.uint64(1)
                c = b * LANES + np.int64(j)
                plateau = (e >> j) & np.uint64(1) != 0
                if (sat >> j) & np.uint64(1):  # rare: a signal of 255 or more
                    res = _exact_max(frame, m, r, c, h, w)
                    if res == 0:
                        continue
                    plateau = res == 2
                undecided = False
                if plateau:
                    res = _plateau_near(frame, m, r, c, h, w)
                    if res == 0:
                        continue
                    undecided = res < 0
                slot = _insert_event(out_idx, obase + k_row, obase + k, np.uint32(r * w + c))
                k += 1
                if undecided:  # later insertions in this row go after it: the slot holds
                    if nu < ucap:
                        out_und[ubase + nu] = slot - obase
                    nu += 1
    return k, nu


@njit(**_OPTS)
def _count_items(
    item0,
    item1,
    frames,
    dmap,
    dbase,
    tmap,
    gain,
    has_gain,
    compact,
    clamp,
    xray_level,
    top,
    want_sub,
    cap,
    proto,
    out_idx,
    out_sub,
    out_n,
    xcap,
    out_xray,
    out_nx,
    ucap,
    out_und,
    out_nu,
    vdmap,
    vtmap,
    mptr,
    mcols,
    flip,
):
    # Items item0 .. item1 - 1 of the call (count_frames gives each thread a range).
    # The vector pass reads vdmap and vtmap: dmap and tmap themselves, or one value
    # each whose masked pixels are row r's columns mcols[mptr[r]:mptr[r + 1]]
    # (frames the camera dark-subtracted; none listed with per-pixel maps). Frame
    # values are read XORed with flip: wrapped frames' sign bit, else 0.
    n, h, w = frames.shape
    bands = (h + BAND_ROWS - 1) // BAND_ROWS
    nfull = w // LANES
    n_blocks = (w + LANES - 1) // LANES
    skip = proto[0]
    m = (dmap, dbase, tmap, gain, has_gain, compact, top, flip)  # for the scalar paths
    fl = np.int64(flip)  # for the vector passes
    for item in range(item0, item1):
        f = item // bands
        r0 = (item % bands) * BAND_ROWS
        r1 = min(h, r0 + BAND_ROWS)
        frame = frames[f]
        # signal rows and their horizontal 3-maxima, three of each (row r is in slot
        # (r - r0 + 3) % 3). Signal rows: the sentinel columns and the padding past
        # the frame stay SKIP, the rest is written row by row; the row above the frame
        # is all SKIP. The maxima rows are written whole before they are read.
        sig = np.empty((3, n_blocks * LANES + 2), proto.dtype)
        sig[:, 0] = skip
        sig[:, w + 1 :] = skip
        if r0 == 0:
            sig[2, :] = skip
        hmx = np.empty((3, n_blocks * LANES + 2), proto.dtype)
        eqw = np.zeros(n_blocks, np.uint64)  # local maxima equal to a later neighbour
        satw = np.zeros(n_blocks, np.uint64)  # unsigned rows' pixels at the ceiling
        summary = np.zeros((n_blocks + 63) // 64, np.uint64)  # eqw | satw words not zero
        xw = np.zeros(n_blocks, np.uint64)  # bits of the X-ray hits
        xrow = np.zeros(3, np.bool_)
        k = 0
        nxr = 0
        nu = 0
        obase = item * cap
        xbase = item * xcap
        ubase = item * ucap
        for rr in range(max(0, r0 - 1), min(h + 1, r0 + BAND_ROWS + 1)):
            slot = (rr - r0 + 3) % 3
            srow = sig[slot]
            if rr < h:
                row = frame[rr]
                if has_gain:
                    xr = signal_row_gain(row, vdmap[rr], vtmap[rr], gain[rr], srow, nfull,
                                         dbase[rr], xray_level, fl)  # fmt: skip
                else:
                    xr = signal_row(row, vdmap[rr], vtmap[rr], gain[0], srow, nfull, dbase[rr],
                                    xray_level, fl)  # fmt: skip
                for j in range(mptr[rr], mptr[rr + 1]):  # one-value maps' masked pixels
                    srow[mcols[j] + 1] = skip  # (the tail's are set again below)
                for c in range(nfull * LANES, w):  # the row's tail, one pixel at a time
                    if _candidate(frame, m, rr, c):
                        s = _signal64(frame, m, rr, c)
                        srow[c + 1] = min(s, clamp)
                        xr |= ((row[c] ^ flip) == top) | (s > xray_level)
                    else:
                        srow[c + 1] = skip
                xrow[slot] = xr
            else:  # below the frame: no candidates
                srow[:] = skip
                xrow[slot] = False
            r = rr - 1  # the row whose neighbours are all in once row rr is
            if r < r0 or r >= r1:
                continue
            ms = (r - r0 + 3) % 3
            mid = sig[ms]
            up = (r - 1 - r0 + 3) % 3
            if r == r0:  # rows r0 - 1 and r0: their maxima were not made by a test
                hmax_row(sig[up], hmx[up], n_blocks)
                hmax_row(mid, hmx[ms], n_blocks)
            # the test prefetches the next frame row, so memory streams while it computes
            nxt = min(rr + 1, h - 1)
            n_pf = nfull if rr + 1 < h else 0
            k_row = k
            k, flags = test_row(hmx[up], mid, srow, hmx[slot], eqw, satw, summary, n_blocks,
                                frame[nxt], vdmap[nxt], vtmap[nxt], n_pf, out_idx, obase + k,
                                np.uint32(r * w))  # fmt: skip
            k -= obase
            if xrow[ms]:  # X-ray hits in row r (rare): record their positions
                row = frame[r]
                grow = gain[r] if has_gain else gain[0]
                xray_row(row, dmap[r], tmap[r], grow, mid, xw, nfull, dbase[r], xray_level, fl)
                for b in range(nfull):
                    t = xw[b]
                    while t:
                        if nxr < xcap:
                            out_xray[xbase + nxr] = r * w + b * LANES + np.int64(cttz(t))
                        nxr += 1
                        t &= t - np.uint64(1)
                for c in range(nfull * LANES, w):
                    if _candidate(frame, m, r, c) and (
                        (row[c] ^ flip) == top or _signal64(frame, m, r, c) > xray_level
                    ):
                        if nxr < xcap:
                            out_xray[xbase + nxr] = r * w + c
                        nxr += 1
            # the events the test left to decide, while its prefetches land
            if flags:
                k, nu = _settle_row(frame, m, r, h, w, eqw, satw, summary, flags, out_idx, obase,
                                    k_row, k, out_und, ubase, ucap, nu)  # fmt: skip
            if want_sub:
                _subpixel_row(frame, m, r, h, w, out_idx, out_sub, obase + k_row, obase + k)
        out_n[item] = k
        out_nx[item] = nxr
        out_nu[item] = nu


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


#: Marks an event the join drops (never a flat index: frames have fewer pixels).
_DROPPED = np.uint32(0xFFFFFFFF)


@njit(**_OPTS)
def _compact(
    frames,
    maps,
    bands,
    cap,
    out_idx,
    out_n,
    xcap,
    out_xray,
    out_nx,
    ucap,
    out_und,
    out_nu,
    radius,
):
    """Prepare the join of the items' events: the undecided plateau maxima walked
    (rule 5), the events near an X-ray hit marked as dropped. ``maps`` as in
    ``_count_items``. Returns ``(offsets, marked, dest)``: per-frame event
    offsets, the items holding a dropped event, where each item's events go.

    Both are rare, so the events to drop are marked in place; :func:`_gather`
    then copies the marked items event by event and the others whole.
    """
    n, h, w = frames.shape
    drop = []  # slots of the events to drop: marked once all are found (the
    # binary searches need the item lists intact)
    for f in range(n):
        for b in range(bands):
            item = f * bands + b
            base = item * cap
            for u in range(item * ucap, item * ucap + out_nu[item]):
                j = base + out_und[u]
                if not _plateau_wins(frames[f], maps, np.int64(out_idx[j]), h, w):
                    drop.append(j)
            for j in range(out_nx[item]):
                x = np.int64(out_xray[item * xcap + j])
                xr, xc = x // w, x % w
                ca, cb = max(0, xc - radius), min(w - 1, xc + radius)
                for rr in range(max(0, xr - radius), min(h, xr + radius + 1)):
                    it = f * bands + rr // BAND_ROWS  # the item that holds row rr's events
                    lo_i, hi_i = it * cap, it * cap + out_n[it]
                    i = _lower_bound(out_idx, lo_i, hi_i, rr * w + ca)
                    while i < hi_i and out_idx[i] <= rr * w + cb:
                        drop.append(i)
                        i += 1
    marked = np.zeros(out_n.size, np.bool_)
    for j in drop:
        out_idx[j] = _DROPPED
        marked[j // cap] = True
    dest = np.empty(out_n.size + 1, np.int64)  # where each item's events go
    dest[0] = 0
    offsets = np.zeros(n + 1, np.int64)
    for f in range(n):
        for b in range(bands):
            item = f * bands + b
            kept = out_n[item]
            if marked[item]:
                base = item * cap
                kept = 0
                for j in range(base, base + out_n[item]):
                    kept += np.int64(out_idx[j] != _DROPPED)
            dest[item + 1] = dest[item] + kept
        offsets[f + 1] = dest[(f + 1) * bands]
    return offsets, marked, dest


@njit(**_OPTS)
def _gather(out_idx, out_sub, out_n, marked, dest, cap, indices, sub, want_sub):
    """Copy the items' events to ``indices[dest[item]:]`` (and their sub-pixel cells),
    the marked items without their dropped events (a copy of the events only:
    a fraction of a millisecond for a full frame, one thread is enough)."""
    for item in range(out_n.size):
        base = item * cap
        k = dest[item]
        m = out_n[item]
        if not marked[item]:
            indices[k : k + m] = out_idx[base : base + m]
            if want_sub:
                sub[k : k + m] = out_sub[base : base + m]
            continue
        for j in range(base, base + m):
            if out_idx[j] != _DROPPED:
                indices[k] = out_idx[j]
                if want_sub:
                    sub[k] = out_sub[j]
                k += 1


# the start-up compiles variants in several processes at once (streamstore._numba_cache)
serialize_saves(_plateau_wins, _subpixel_row, _count_items, _lower_bound, _compact, _gather)
