"""Numba kernel of the "resolve" counting rule (specification: ``_resolve_reference.py``).

One frame per call of :func:`_resolve_frame`, scalar and plain: it gives the
same events as the reference bit for bit. Frames are independent, so
:func:`count_resolve_frames` spreads them over threads and the events do not
depend on the thread count. The common path is one compare per pixel (``raw >
lo_c``) and no scratch map: the rest is computed from the frame where a candidate
needs it. Not yet vectorised.
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


@njit(**_OPTS)
def _quantise(num, den):
    if num < 0:
        return 0
    q = num // (den if den > 1 else 1)
    return 3 if q > 3 else q


# A frame travels as F = (raw, lo_c, dark, gain, has_gain, top): the signal and the
# candidate flag are computed where they are needed, so the common path reads
# two maps and makes one compare per pixel, with no scratch map.


@njit(**_OPTS)
def _sig(F, r, c):
    """Signal ``(raw - dark) * gain`` of an in-frame pixel, 0 when masked."""
    raw, lo_c, dark, gain, has_gain, top = F
    if lo_c[r, c] == top:
        return np.int64(0)
    v = np.int64(raw[r, c]) - np.int64(dark[r, c])
    if has_gain:
        v *= np.int64(gain[r, c])
    return v


@njit(**_OPTS)
def _cand(F, r, c):
    return F[0][r, c] > F[1][r, c]


@njit(**_OPTS)
def _centroid(F, r, c, br, bc, partner):
    """Sub-pixel cell of the event ``(r, c)``; with ``partner`` each pixel of its 3 x 3
    is weighted 2 / 1 / 0 as it is nearer ``(r, c)``, as near, or nearer ``(br, bc)``."""
    h, w = F[0].shape
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
            wv = _sig(F, rr, cc)
            if wv < 0:
                wv = 0
            if partner:
                da = dy * dy + dx * dx
                db = (rr - br) * (rr - br) + (cc - bc) * (cc - bc)
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
def _beats(F, r, c, rr, cc):
    """Does the key of ``(r, c)`` beat that of the candidate ``(rr, cc)`` (True when
    ``(rr, cc)`` is out of the frame or not a candidate)?"""
    h, w = F[0].shape
    if rr < 0 or rr >= h or cc < 0 or cc >= w or not _cand(F, rr, cc):
        return True
    if rr < r or (rr == r and cc < c):
        return _sig(F, r, c) > _sig(F, rr, cc)
    return _sig(F, r, c) >= _sig(F, rr, cc)


@njit(**_OPTS)
def _wide(F, r, c):
    """Does the key of ``(r, c)`` beat every candidate at Chebyshev distance 2?"""
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            if max(abs(dy), abs(dx)) == 2 and not _beats(F, r, c, r + dy, c + dx):
                return False
    return True


@njit(**_OPTS)
def _is_local_max(F, r, c):
    """Rule 3 at ``(r, c)``: an in-frame candidate whose key beats every candidate
    8-neighbour's."""
    h, w = F[0].shape
    if r < 0 or r >= h or c < 0 or c >= w or not _cand(F, r, c):
        return False
    for dy in range(-1, 2):
        for dx in range(-1, 2):
            if (dy != 0 or dx != 0) and not _beats(F, r, c, r + dy, c + dx):
                return False
    return True


@njit(**_OPTS)
def _lonely(F, r, c):
    """No local maximum at Chebyshev distance 2 of ``(r, c)``."""
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            if max(abs(dy), abs(dx)) == 2 and _is_local_max(F, r + dy, c + dx):
                return False
    return True


@njit(**_OPTS)
def _near_xray(F, xray_level, radius, r, c):
    """An X-ray hit (a saturated candidate, or one above ``xray_level``) within
    Chebyshev distance ``radius`` of ``(r, c)``?"""
    raw, top = F[0], F[5]
    h, w = raw.shape
    for rr in range(max(0, r - radius), min(h, r + radius + 1)):
        for cc in range(max(0, c - radius), min(w, c + radius + 1)):
            if _cand(F, rr, cc) and (raw[rr, cc] == top or _sig(F, rr, cc) > xray_level):
                return True
    return False


@njit(**_OPTS)
def _grow(a, n):
    """``a`` with room for twice as many items, its first ``n`` kept."""
    b = np.empty(2 * a.size, a.dtype)
    b[:n] = a[:n]
    return b


@njit(**_OPTS)
def _resolve_frame(
    raw, lo, lo_c, dark, gain, has_gain, qthr, xray_level, radius, subpixel,
    e_unit, pair16, any16, spread16, top,
):  # fmt: skip
    h, w = raw.shape
    F = (raw, lo_c, dark, gain, has_gain, top)
    out_i = np.empty(256, np.int64)
    out_s = np.empty(256, np.uint8)
    n = 0
    q_i = np.empty(256, np.int64)
    q_s = np.empty(256, np.uint8)
    nq = 0
    for r in range(h):
        for c in range(w):
            if not raw[r, c] > lo_c[r, c]:  # the common path: one compare
                continue
            if not _is_local_max(F, r, c):
                continue
            if not raw[r, c] > lo[r, c]:
                charged = False
                for r0 in range(r - 1, r + 1):
                    for c0 in range(c - 1, c + 1):
                        if r0 < 0 or c0 < 0 or r0 >= h - 1 or c0 >= w - 1:
                            continue
                        quad = (
                            _sig(F, r0, c0) + _sig(F, r0, c0 + 1)
                            + _sig(F, r0 + 1, c0) + _sig(F, r0 + 1, c0 + 1)
                        )  # fmt: skip
                        if quad > qthr[r0, c0]:
                            charged = True
                if not charged:
                    continue
                if not _wide(F, r, c):
                    continue
            if _near_xray(F, xray_level, radius, r, c):
                continue
            # partner: the brightest unmasked 8-neighbour, raster-first on ties
            has = False
            best = np.int64(_INT64_MIN)
            ey = 0
            ex = 0
            for dy in range(-1, 2):
                rr = r + dy
                if rr < 0 or rr >= h:
                    continue
                for dx in range(-1, 2):
                    cc = c + dx
                    if (dy == 0 and dx == 0) or cc < 0 or cc >= w or lo_c[rr, cc] == top:
                        continue
                    v = _sig(F, rr, cc)
                    if not has or v > best:
                        has = True
                        best = v
                        ey = dy
                        ex = dx
            split = False
            if has and _wide(F, r, c) and _lonely(F, r, c):
                e2 = ey * ey + ex * ex
                big = np.int64(0)
                su = np.int64(0)
                suu = np.int64(0)
                sv = np.int64(0)
                svv = np.int64(0)
                for dy in range(-2, 3):
                    rr = r + dy
                    if rr < 0 or rr >= h:
                        continue
                    for dx in range(-2, 3):
                        cc = c + dx
                        if cc < 0 or cc >= w:
                            continue
                        inside = (abs(dy) <= 1 and abs(dx) <= 1) or (
                            abs(dy - ey) <= 1 and abs(dx - ex) <= 1
                        )
                        if not inside:
                            continue
                        v = _sig(F, rr, cc)
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
            if n == out_i.size:
                out_i = _grow(out_i, n)
                out_s = _grow(out_s, n)
            out_i[n] = r * w + c
            if subpixel:
                out_s[n] = _centroid(F, r, c, r + ey, c + ex, split)
            n += 1
            if split:
                if nq == q_i.size:
                    q_i = _grow(q_i, nq)
                    q_s = _grow(q_s, nq)
                q_i[nq] = (r + ey) * w + (c + ex)
                if subpixel:
                    q_s[nq] = _centroid(F, r + ey, c + ex, r, c, True)
                nq += 1
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

    def one(i: int) -> tuple[np.ndarray, np.ndarray]:
        frame = as_unsigned(frames[i]) if wrapped else frames[i]
        if widen:
            frame = frame.astype(np.uint16)
        return _resolve_frame(
            frame, lo, lo_c, dark, g, gain is not None, qthr, level, np.int64(radius),
            bool(subpixel), np.int64(e_unit), np.int64(pair16), np.int64(any16),
            np.int64(spread16), top,
        )  # fmt: skip

    parts = []
    types = (lo.dtype.str, dark.dtype.str, g.dtype.str)
    if n and types not in _ran:
        # this process's first frame of these types: compiled (or loaded) under the
        # cache's lock, so that processes starting together compile the kernel once
        with compiling_alone(_resolve_frame):
            parts.append(one(0))
        _ran.add(types)
    k = numba.config.NUMBA_NUM_THREADS if threads is None else int(threads)
    k = max(1, min(k, n))
    if k == 1:
        parts.extend(one(i) for i in range(len(parts), n))
    else:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=numba.config.NUMBA_NUM_THREADS, thread_name_prefix="streamstore-resolve"
            )
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
    _quantise, _sig, _cand, _centroid, _beats, _wide, _is_local_max, _lonely, _near_xray,
    _grow, _resolve_frame,
)  # fmt: skip
