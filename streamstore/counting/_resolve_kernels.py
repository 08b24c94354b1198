"""Numba kernel of the "resolve" counting rule (specification: ``_resolve_reference.py``).

:func:`_resolve_rows` lists the events of a band of a frame's rows and
:func:`_merge` makes a frame's events of a band's lists, or of its bands' lists
in order: the same events as the reference, bit for bit, whatever the bands.
:func:`count_resolve_frames` spreads frames over threads, or the row bands of a
frame where it has fewer frames than threads, so the events do not depend on the
thread count.

The frame is read once, row by row, into a ring of the few rows the rules look
at: each row's signals (int64, 0 where masked) and flags (in frame and unmasked;
candidate; X-ray hit; local maximum; above the peak threshold), with two columns
of padding at each side and zero rows beyond the frame's edges, so the tests of a
pixel's neighbours need no bounds checks and no second read of the frame, the
dark, the candidate or the peak threshold. A row's local maxima (rule 3) are
found once the row below it is in the ring; they are settled (rules 4-5) ``lag``
rows later, once the local maxima within 2 rows and the X-ray hits within
``radius`` rows are listed, while their rows are still in the ring. Lists grow
before a row's loop, never in it (see :func:`_room`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import njit

from streamstore._numba_cache import compiling_alone, serialize_saves
from streamstore.counting._maps import as_unsigned

__all__ = ["count_resolve_frames"]

_OPTS = {"nogil": True, "cache": True, "error_model": "numpy", "boundscheck": False}
_INT64_MIN = np.iinfo(np.int64).min
#: Flags of a ring pixel: in the frame and unmasked; a candidate (``raw > lo_c``);
#: an X-ray hit (a candidate saturated or above the X-ray level); a local maximum;
#: above the peak threshold (``raw > lo``: set with the others, so that settling a
#: maximum reads no row of ``lo``, which the fill has not brought into the cache).
_LIVE = 1
_CAND = 2
_XRAY = 4
_MAX = 8
_PEAK = 16
#: Columns of padding at each side of a ring row.
_PAD = 2


@njit(**_OPTS)
def _quantise(num, den):
    if num < 0:
        return 0
    q = num // (den if den > 1 else 1)
    return 3 if q > 3 else q


@njit(**_OPTS)
def _fill_row(raw, lo, lo_c, dark, gain, has_gain, top, xray_level, t, srow, frow):
    """Ring row of frame row ``t``: signals ``(raw - dark) * gain`` (0 where masked or
    outside the frame) and flags (all but the local maxima's), pixel ``c`` at ``c +
    _PAD``. Returns whether the row holds an X-ray hit."""
    h, w = raw.shape
    if t < 0 or t >= h:
        srow[:] = 0
        frow[:] = 0
        return False
    x_row = raw[t]
    lo_row = lo[t]
    lc_row = lo_c[t]
    d_row = dark[t]
    # the loops stay simple enough to be vector loops: the row's largest signal and
    # value say whether it may hold an X-ray hit, which is then looked for
    vmax = np.int64(_INT64_MIN)
    xmax = x_row[0]
    if has_gain:
        g_row = gain[t]
        for c in range(w):
            v = (np.int64(x_row[c]) - np.int64(d_row[c])) * np.int64(g_row[c])
            srow[c + _PAD] = v if lc_row[c] != top else 0
            vmax = max(vmax, v)
            xmax = max(xmax, x_row[c])
    else:
        for c in range(w):
            v = np.int64(x_row[c]) - np.int64(d_row[c])
            srow[c + _PAD] = v if lc_row[c] != top else 0
            vmax = max(vmax, v)
            xmax = max(xmax, x_row[c])
    for c in range(w):
        frow[c + _PAD] = (
            np.uint8(lc_row[c] != top)
            + np.uint8(2) * np.uint8(x_row[c] > lc_row[c])
            + np.uint8(16) * np.uint8(x_row[c] > lo_row[c])
        )
    if vmax <= xray_level and xmax != top:
        return False
    hits = False
    for c in range(w):
        x = x_row[c]
        if x > lc_row[c]:
            v = np.int64(x) - np.int64(d_row[c])
            if has_gain:
                v *= np.int64(gain[t, c])
            if x == top or v > xray_level:
                frow[c + _PAD] |= _XRAY
                hits = True
    return hits


@njit(**_OPTS)
def _key(S, F, k, c):
    """The key's signal of ring pixel ``(k, c)`` where it is a candidate, else the
    lowest int64 (a non-candidate never competes)."""
    return S[k, c] if F[k, c] & _CAND else _INT64_MIN


@njit(**_OPTS)
def _maxima_row(S, F, ku, k, kd, w, lm, n):
    """Rule 3 on the ring row ``k`` (``ku`` above it, ``kd`` below): its local maxima
    flagged, their frame columns appended to ``lm`` (``n`` so far), ascending."""
    lm = _room(lm, n, w)
    for c in range(_PAD, w + _PAD):
        if not F[k, c] & _CAND:
            continue
        s = S[k, c]
        # neighbours earlier in raster order must be beaten, later ones matched
        before = max(
            max(_key(S, F, ku, c - 1), _key(S, F, ku, c)),
            max(_key(S, F, ku, c + 1), _key(S, F, k, c - 1)),
        )
        after = max(
            max(_key(S, F, k, c + 1), _key(S, F, kd, c - 1)),
            max(_key(S, F, kd, c), _key(S, F, kd, c + 1)),
        )
        if s > before and s >= after:
            F[k, c] |= _MAX
            lm[n] = c - _PAD
            n += 1
    return lm, n


@njit(**_OPTS)
def _xray_row(F, k, w, xr, nx):
    """The X-ray hits of ring row ``k`` appended to ``xr`` (``nx`` so far) as
    ascending frame columns."""
    xr = _room(xr, nx, w)
    for c in range(_PAD, w + _PAD):
        if F[k, c] & _XRAY:
            xr[nx] = c - _PAD
            nx += 1
    return xr, nx


@njit(**_OPTS)
def _centroid(S, ring, r, c, br, bc, partner):
    """Sub-pixel cell of the event at frame row ``r``, ring column ``c``; with
    ``partner`` each pixel of its 3 x 3 is weighted 2 / 1 / 0 as it is nearer ``(r,
    c)``, as near, or nearer ``(br, bc)``."""
    total = np.int64(0)
    ty = np.int64(0)
    tx = np.int64(0)
    for dy in range(-1, 2):
        k = (r + dy + _PAD) & ring
        for dx in range(-1, 2):
            wv = S[k, c + dx]
            if wv < 0:
                wv = 0
            if partner:
                da = dy * dy + dx * dx
                db = (r + dy - br) * (r + dy - br) + (c + dx - bc) * (c + dx - bc)
                if da < db:
                    wv = 2 * wv
                elif da > db:
                    wv = 0
            total += wv
            ty += dy * wv
            tx += dx * wv
    qy = _quantise(2 * total + 4 * ty, total)
    qx = _quantise(2 * total + 4 * tx, total)
    return np.uint8((qy << 2) | qx)


@njit(**_OPTS)
def _wide(S, F, ring, r, c, s):
    """Does the key ``(s, -flat_index)`` of ring pixel ``(r, c)`` beat every candidate
    at Chebyshev distance 2?"""
    ku = (r - 2 + _PAD) & ring
    kd = (r + 2 + _PAD) & ring
    before = _INT64_MIN
    after = _INT64_MIN
    for dx in range(-2, 3):
        before = max(before, _key(S, F, ku, c + dx))
        after = max(after, _key(S, F, kd, c + dx))
    for dy in range(-1, 2):
        k = (r + dy + _PAD) & ring
        if dy < 0:
            before = max(before, max(_key(S, F, k, c - 2), _key(S, F, k, c + 2)))
        elif dy > 0:
            after = max(after, max(_key(S, F, k, c - 2), _key(S, F, k, c + 2)))
        else:
            before = max(before, _key(S, F, k, c - 2))
            after = max(after, _key(S, F, k, c + 2))
    return s > before and s >= after


@njit(**_OPTS)
def _first_at_least(cols, lo, hi, x):
    """The first position in ``cols[lo:hi]`` (ascending) holding ``x`` or more."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if cols[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(**_OPTS)
def _any_between(cols, row_at, r, a, b):
    """Does frame row ``r`` of the per-row list ``(cols, row_at)`` hold a column in
    ``[a, b]``?"""
    hi = row_at[r + 1]
    k = _first_at_least(cols, row_at[r], hi, a)
    return k < hi and cols[k] <= b


@njit(**_OPTS)
def _lonely(F, ring, r, c):
    """No local maximum at Chebyshev distance 2 of ring pixel ``(r, c)`` (frame row
    ``r``)."""
    ku = (r - 2 + _PAD) & ring
    kd = (r + 2 + _PAD) & ring
    m = np.uint8(0)
    for dx in range(-2, 3):
        m |= F[ku, c + dx] | F[kd, c + dx]
    for dy in range(-1, 2):
        k = (r + dy + _PAD) & ring
        m |= F[k, c - 2] | F[k, c + 2]
    return (m & _MAX) == 0


@njit(**_OPTS)
def _near_xray(xr, xr_at, h, radius, r, c):
    """An X-ray hit (listed per row in ``(xr, xr_at)``) within Chebyshev distance
    ``radius`` of frame pixel ``(r, c)``?"""
    for rr in range(max(0, r - radius), min(h, r + radius + 1)):
        if _any_between(xr, xr_at, rr, c - radius, c + radius):
            return True
    return False


@njit(**_OPTS)
def _room(a, n, more):
    """``a``, or a copy of its first ``n`` items with room for twice ``n + more``
    where it has no room for ``more`` items after them. Lists are grown before a
    row's loop, never in it: an array variable assigned in a loop costs that loop
    reference counting at every step, taken or not (10 x the loop's own time)."""
    if a.size - n >= more:
        return a
    b = np.empty(2 * (n + more), a.dtype)
    for i in range(n):  # not b[:n] = a[:n]: its shape check costs a second to compile
        b[i] = a[i]
    return b


@njit(**_OPTS)
def _charged(S, ring, qthr, h, w, r, c):
    """The charge rule: does a 2 x 2 quadrant holding frame pixel ``(r, c)`` (ring
    column ``c + _PAD``) sum above its threshold?"""
    for r0 in range(r - 1, r + 1):
        if r0 < 0 or r0 >= h - 1:
            continue
        k0 = (r0 + _PAD) & ring
        k1 = (r0 + 1 + _PAD) & ring
        for c0 in range(c - 1, c + 1):
            if c0 < 0 or c0 >= w - 1:
                continue
            p = c0 + _PAD
            quad = S[k0, p] + S[k0, p + 1] + S[k1, p] + S[k1, p + 1]
            if quad > qthr[r0, c0]:
                return True
    return False


@njit(**_OPTS)
def _settle_row(
    raw, lo, S, F, ring, qthr, r, lm, lm_at, xr, xr_at, nx, radius, subpixel,
    e_unit, pair16, any16, spread16, out_i, out_s, n, q_i, q_s, nq,
):  # fmt: skip
    """Rules 4-5 on the local maxima of frame row ``r``: events appended to ``out_i``
    (``n`` so far; sub-pixel cells to ``out_s``), second events of splits to ``q_i``
    (``nq``; ``q_s``). The lists have room for them; ``nx`` X-ray hits are listed
    so far. Returns ``(n, nq)``."""
    h, w = raw.shape
    kr = (r + _PAD) & ring
    for j in range(lm_at[r], lm_at[r + 1]):
        c = lm[j]
        p = c + _PAD  # ring column
        s = S[kr, p]
        wide = -1  # not yet known
        if not F[kr, p] & _PEAK:
            if not _charged(S, ring, qthr, h, w, r, c):
                continue
            wide = 1 if _wide(S, F, ring, r, p, s) else 0
            if wide == 0:
                continue
        if nx > 0 and _near_xray(xr, xr_at, h, radius, r, c):
            continue
        # partner: the brightest live 8-neighbour, raster-first on ties
        has = False
        best = np.int64(_INT64_MIN)
        ey = 0
        ex = 0
        for dy in range(-1, 2):
            k = (r + dy + _PAD) & ring
            for dx in range(-1, 2):
                if (dy == 0 and dx == 0) or not F[k, p + dx] & _LIVE:
                    continue
                v = S[k, p + dx]
                if not has or v > best:
                    has = True
                    best = v
                    ey = dy
                    ex = dx
        split = False
        if has:
            if wide < 0:
                wide = 1 if _wide(S, F, ring, r, p, s) else 0
            if wide == 1 and _lonely(F, ring, r, p):
                e2 = ey * ey + ex * ex
                big = np.int64(0)
                su = np.int64(0)
                suu = np.int64(0)
                sv = np.int64(0)
                svv = np.int64(0)
                for dy in range(-2, 3):
                    k = (r + dy + _PAD) & ring
                    for dx in range(-2, 3):
                        inside = (abs(dy) <= 1 and abs(dx) <= 1) or (
                            abs(dy - ey) <= 1 and abs(dx - ex) <= 1
                        )
                        if not inside:
                            continue
                        v = S[k, p + dx]
                        u = np.int64(2 * (dy * ey + dx * ex) - e2)
                        x = np.int64(2 * (dy * ex - dx * ey))
                        big += v
                        su += v * u
                        suu += v * u * u
                        sv += v * x
                        svv += v * x * x
                fs = np.float64(big)
                a = fs * np.float64(suu) - np.float64(su) * np.float64(su)
                b = fs * np.float64(svv) - np.float64(sv) * np.float64(sv)
                elongated = 16.0 * (a - b) >= np.float64(spread16 * 4 * e2) * (fs * fs)
                split = 16 * big >= any16 * e_unit or (16 * big >= pair16 * e_unit and elongated)
        out_i[n] = r * w + c
        if subpixel:
            out_s[n] = _centroid(S, ring, r, p, r + ey, p + ex, split)
        n += 1
        if split:
            q_i[nq] = (r + ey) * w + (c + ex)
            if subpixel:
                q_s[nq] = _centroid(S, ring, r + ey, p + ex, r, p, split)  # split: True
            nq += 1
    return n, nq


@njit(**_OPTS)
def _resolve_rows(
    raw, lo, lo_c, dark, gain, has_gain, qthr, xray_level, radius, subpixel,
    e_unit, pair16, any16, spread16, top, r0, r1,
):  # fmt: skip
    """The events of the local maxima in frame rows ``r0`` to ``r1 - 1``: ``(out_i,
    out_s, q_i, q_s)``, the maxima's events in raster order and the second events of
    their splits in their origins' raster order, each with its sub-pixel cells
    (empty without ``subpixel``); :func:`_merge` makes them a frame's events. A row
    band reads the ``lag + 2`` rows above it and the ``lag`` rows below it too."""
    h, w = raw.shape
    # the rows a settled row looks at (2 above, 2 below) and those listed since
    lag = max(2, radius)
    size = 8
    while size < lag + 4:
        size *= 2
    ring = size - 1  # a mask: ring row of frame row t is (t + _PAD) & ring
    S = np.zeros((size, w + 2 * _PAD), np.int64)
    F = np.zeros((size, w + 2 * _PAD), np.uint8)
    # local maxima and X-ray hits, per row: row r's are lm[lm_at[r]:lm_at[r + 1]]
    lm = np.empty(1024, np.int64)
    lm_at = np.zeros(h + 1, np.int64)
    xr = np.empty(16, np.int64)
    xr_at = np.zeros(h + 1, np.int64)
    # counts typed int64 from the start: a literal 0 would compile the row
    # functions a second time
    n_lm = np.int64(0)
    nx = np.int64(0)
    hits = np.zeros(h + lag + 1 + _PAD, np.bool_)  # frame row t: hits[t + _PAD]
    out_i = np.empty(256, np.int64)
    out_s = np.empty(256 if subpixel else 0, np.uint8)
    n = np.int64(0)
    q_i = np.empty(256, np.int64)
    q_s = np.empty(256 if subpixel else 0, np.uint8)
    nq = np.int64(0)
    # the first row listed: the maxima 2 rows above r0 and the X-ray hits ``radius``
    # rows above it are looked at; the two rows above it are in the ring first
    first = max(r0 - lag, 0)
    for t in range(first - 2, first + 1):
        k = (t + _PAD) & ring
        hits[t + _PAD] = _fill_row(
            raw, lo, lo_c, dark, gain, has_gain, top, xray_level, t, S[k], F[k]
        )
    for t in range(first, r1 + lag):
        # row t + 1 into the ring, over a row settled before (zeros below the frame)
        k = (t + 1 + _PAD) & ring
        hits[t + 1 + _PAD] = _fill_row(
            raw, lo, lo_c, dark, gain, has_gain, top, xray_level, t + 1, S[k], F[k]
        )
        if t < h:
            lm, n_lm = _maxima_row(S, F, (t - 1 + _PAD) & ring, (t + _PAD) & ring, k, w, lm, n_lm)
            lm_at[t + 1] = n_lm
            if hits[t + _PAD]:
                xr, nx = _xray_row(F, (t + _PAD) & ring, w, xr, nx)
            xr_at[t + 1] = nx
        r = t - lag
        if r < r0:
            continue
        more = lm_at[r + 1] - lm_at[r]
        out_i = _room(out_i, n, more)
        q_i = _room(q_i, nq, more)
        if subpixel:
            out_s = _room(out_s, n, more)
            q_s = _room(q_s, nq, more)
        n, nq = _settle_row(
            raw, lo, S, F, ring, qthr, r, lm, lm_at, xr, xr_at, nx, radius, subpixel,
            e_unit, pair16, any16, spread16, out_i, out_s, n, q_i, q_s, nq,
        )  # fmt: skip
    return out_i[:n], out_s[: n if subpixel else 0], q_i[:nq], q_s[: nq if subpixel else 0]


@njit(**_OPTS)
def _merge(out_i, out_s, q_i, q_s, subpixel):
    """A frame's events ``(indices uint32, subpixel uint8)`` from the lists of
    :func:`_resolve_rows` (of its row bands, in order, concatenated)."""
    n = out_i.size
    nq = q_i.size
    # the second events were made in raster order of their origins: a stable sort
    # by pixel keeps, of several splits to one pixel, the lowest origin's
    order = np.argsort(q_i[:nq], kind="mergesort")
    idx = np.empty(n + nq, np.uint32)
    sub = np.empty(n + nq if subpixel else 0, np.uint8)
    i = 0
    j = 0
    k = 0
    last = np.int64(-1)
    while i < n or j < nq:
        if j < nq and q_i[order[j]] == last:  # a pixel another split already took
            j += 1
            continue
        if j >= nq or (i < n and out_i[i] < q_i[order[j]]):
            idx[k] = out_i[i]
            if subpixel:
                sub[k] = out_s[i]
            i += 1
        else:
            last = q_i[order[j]]
            idx[k] = last
            if subpixel:
                sub[k] = q_s[order[j]]
            j += 1
        k += 1
    return idx[:k], sub[: k if subpixel else 0]


_pool: ThreadPoolExecutor | None = None
#: The fewest rows of a row band (a band also reads the few rows around it).
_BAND_ROWS = 64
#: The (frame, dark map, gain) types this process has counted frames of.
_ran: set[tuple[str, str, str]] = set()


def count_resolve_frames(
    frames: np.ndarray,
    lo: np.ndarray,
    lo_c: np.ndarray,
    dark: np.ndarray,
    gain: np.ndarray | None,
    qthr: np.ndarray,
    xray_level: int,
    radius: int,
    subpixel: bool,
    e_unit: int,
    pair16: int,
    any16: int,
    spread16: int,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Count ``frames (n, H, W)`` by the resolve rule; the arguments of
    :func:`~streamstore.counting._resolve_reference.count_resolve_reference` plus
    ``threads`` (None: numba's thread count). Returns ``(offsets, indices, subpixel)``.
    Signed (wrapped) frames are counted as unsigned ones, frame by frame, and may come
    with the unsigned maps :func:`~streamstore.counting._maps.as_unsigned` makes.
    8-bit frames are counted by the 16-bit kernel, frame by frame, with their maps
    widened and 255 still the saturated value: the kernel only compares values and
    subtracts them in 64 bits, so the events are the same, and one compiled kernel
    serves both widths."""
    global _pool
    n = frames.shape[0]
    wrapped = frames.dtype.kind == "i"  # no kernel variant of their own
    lo, lo_c, dark = as_unsigned(lo), as_unsigned(lo_c), as_unsigned(dark)
    top = lo.dtype.type(np.iinfo(lo.dtype).max)
    widen = lo.dtype.itemsize == 1
    if widen:
        top = np.uint16(top)
        lo, lo_c, dark = (a.astype(np.uint16) for a in (lo, lo_c, dark))
    g = np.ones((1, 1), np.uint16) if gain is None else gain
    level = np.int64(min(int(xray_level), 2**62))

    def frame_at(i: int) -> np.ndarray:
        frame = as_unsigned(frames[i]) if wrapped else frames[i]
        return frame.astype(np.uint16) if widen else frame

    def band(frame: np.ndarray, r0: int, r1: int) -> tuple[np.ndarray, ...]:
        return _resolve_rows(
            frame, lo, lo_c, dark, g, gain is not None, qthr, level, np.int64(radius),
            bool(subpixel), np.int64(e_unit), np.int64(pair16), np.int64(any16),
            np.int64(spread16), top, np.int64(r0), np.int64(r1),
        )  # fmt: skip

    def one(i: int, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        # k > 1: row bands on the pool, each reading a few rows beyond its own
        frame = frame_at(i)
        if k == 1:
            return _merge(*band(frame, 0, frame.shape[0]), bool(subpixel))
        edges = np.linspace(0, frame.shape[0], k + 1).astype(np.int64)
        parts = list(_pool.map(band, [frame] * k, edges[:-1], edges[1:]))
        return _merge(*(np.concatenate([p[j] for p in parts]) for j in range(4)), bool(subpixel))

    k = numba.config.NUMBA_NUM_THREADS if threads is None else int(threads)
    # fewer frames than threads: each frame in row bands, one a thread
    bands = max(1, min(k, frames.shape[1] // _BAND_ROWS)) if n < k else 1
    k = max(1, min(k, n))
    if (k > 1 or bands > 1) and _pool is None:
        _pool = ThreadPoolExecutor(
            max_workers=numba.config.NUMBA_NUM_THREADS, thread_name_prefix="streamstore-resolve"
        )
    parts = []
    types = (lo.dtype.str, dark.dtype.str, g.dtype.str)
    if n and types not in _ran:
        # this process's first frame of these types: compiled (or loaded) under the
        # cache's lock, so that processes starting together compile the kernel once
        with compiling_alone(_resolve_rows):
            parts.append(one(0, bands))
        _ran.add(types)
    if bands > 1:
        parts.extend(one(i, bands) for i in range(len(parts), n))
    elif k == 1:
        parts.extend(one(i) for i in range(len(parts), n))
    else:
        # at most k frames in flight; results are taken in frame order
        for start in range(len(parts), n, k):
            parts.extend(_pool.map(one, range(start, min(n, start + k))))
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = np.cumsum([p[0].size for p in parts])
    indices = np.concatenate([p[0] for p in parts]) if n else np.zeros(0, np.uint32)
    sub = None
    if subpixel:
        sub = np.concatenate([p[1] for p in parts]) if n else np.zeros(0, np.uint8)
    return offsets, indices, sub


# several processes may compile at once (streamstore._numba_cache)
serialize_saves(
    _quantise, _fill_row, _key, _maxima_row, _xray_row, _centroid, _wide, _first_at_least,
    _any_between, _lonely, _near_xray, _room, _charged, _settle_row,
    _resolve_rows, _merge,
)  # fmt: skip
