"""The data-only dark estimator's per-frame passes, as numba kernels over row ranges.

Each kernel equals its plain numpy definition in
:mod:`streamstore.counting.dark_estimate` (``accumulate_numpy``, ``fold_numpy``,
the per-pixel median): those are the reference, these the speed. They release
the GIL and run on contiguous row ranges, one per thread (:func:`_run_rows`);
results do not depend on the thread count.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np

from streamstore._numba_cache import serialize_saves

_OPTS = {"nogil": True, "cache": True, "error_model": "numpy", "boundscheck": False}

#: A pixel whose window caught fewer than this share of its values (a quarter of the share a
#: window on the pixel's mean catches) has lost its values: see :func:`fold_numpy`.
LOST_SHARE = 0.2
#: The largest step of a pixel's centre in one refinement, in noise sigmas.
_MAX_STEP = 4.0
#: The largest error variance of a centre (sigma**2) the window model tabulates.
TAU2_MAX = 2.0


# -- kernels ------------------------------------------------------------------------
@numba.njit(inline="always", **_OPTS)
def _sum_row(
    frame, centre, s1, s2, n, above, below, low, lo, hi, sink, radius, last, vert, r
):  # pragma: no cover - compiled
    """Row ``r`` of :func:`_accumulate_rows`, branch-free (it vectorises)."""
    w = frame.shape[1]
    for j in range(w + 2 * radius):
        vert[j] = last[j] >= r - radius
    for j in range(w):
        near = np.uint8(0)
        for i in range(2 * radius + 1):
            near |= vert[j + i]
        keep = np.uint8(1) - near
        x = np.float32(frame[r, j]) - centre[r, j]
        up = np.uint8(x > hi)
        down = np.uint8(x < -lo)
        inside = keep & (np.uint8(1) - up) & (np.uint8(1) - down)
        xi = x * np.float32(inside)
        s1[r, j] += xi
        s2[r, j] += xi * xi
        n[r, j] += np.uint16(inside)
        above[r, j] += np.uint16(up)
        below[r, j] += down & np.uint8(below[r, j] < 255)
        low[r, j] += np.uint8(x < -sink) & np.uint8(low[r, j] < 255)


@numba.njit(inline="always", **_OPTS)
def _residual_row(frame, centre, q, out):  # pragma: no cover - compiled
    """Row ``q`` of the frame less the centre (float32), into ``out``."""
    for j in range(frame.shape[1]):
        out[j] = np.float32(frame[q, j]) - centre[q, j]


@numba.njit(**_OPTS)
def _accumulate_rows(
    frame, centre, s1, s2, n, above, below, low, lo, hi, hit, block, sink, radius, r0, r1
):  # pragma: no cover - compiled
    """:func:`accumulate_numpy` on rows ``r0:r1`` in one pass.

    ``last[j]`` is the last row, ``radius`` rows ahead of the one summed, with a
    hit in column ``j`` (a value above ``hit``, or in a 2 x 2 block whose sum is
    above ``block``): a pixel is near one when ``last`` is within ``radius`` rows
    in one of the ``2 radius + 1`` columns around it. The blocks of row ``q`` are
    the sums of its vertical pairs with the rows above (``up``) and below
    (``dn``), padded with -inf where the frame ends, so that a block outside the
    frame never fires.
    """
    h, w = frame.shape
    last = np.full(w + 2 * radius, np.int64(-(1 << 40)))
    vert = np.zeros(w + 2 * radius, np.uint8)
    neg = np.float32(-np.inf)
    cur = np.empty(w, np.float32)
    nxt = np.empty(w, np.float32)
    up = np.full(w + 2, neg, np.float32)  # up[j + 1]: rows q - 1 and q in column j
    dn = np.full(w + 2, neg, np.float32)  # dn[j + 1]: rows q and q + 1 in column j
    q0 = max(r0 - radius, 0)
    _residual_row(frame, centre, q0, cur)
    if q0 >= 1:
        _residual_row(frame, centre, q0 - 1, nxt)
        for j in range(w):
            up[j + 1] = nxt[j] + cur[j]
    for q in range(q0, min(r1 + radius, h)):
        if q + 1 < h:
            _residual_row(frame, centre, q + 1, nxt)
            for j in range(w):
                dn[j + 1] = cur[j] + nxt[j]
        else:
            for j in range(w):
                dn[j + 1] = neg
        for j in range(w):
            b = max(
                max(up[j] + up[j + 1], up[j + 1] + up[j + 2]),
                max(dn[j] + dn[j + 1], dn[j + 1] + dn[j + 2]),
            )
            ahead = (cur[j] > hit) | (b > block)
            last[j + radius] = q if ahead else last[j + radius]  # a select: it vectorises
        for j in range(w):
            up[j + 1] = dn[j + 1]
            cur[j] = nxt[j]
        r = q - radius
        if r < r0:
            continue
        _sum_row(frame, centre, s1, s2, n, above, below, low, lo, hi, sink, radius, last, vert, r)
    # rows at the end of the range whose look-ahead ran past the frame
    for r in range(max(r0, min(r1 + radius, h) - radius), r1):
        _sum_row(frame, centre, s1, s2, n, above, below, low, lo, hi, sink, radius, last, vert, r)


@numba.njit(**_OPTS)
def _fold_rows(
    centre,
    s1,
    s2,
    n,
    above,
    below,
    var,
    w,
    sigma,
    g0,
    vt0,
    btab,
    vtab,
    a,
    b,
    ptab,
    v_start,
    fp,
    fs,
    r0,
    r1,
):  # pragma: no cover - compiled
    """:func:`fold_numpy` on rows ``r0:r1``."""
    top = btab.size - 1.000001
    scale = (btab.size - 1) / TAU2_MAX
    for r in range(r0, r1):
        for j in range(centre.shape[1]):
            nn = np.float64(n[r, j])
            ww = np.float64(w[r, j])
            tau2 = v_start if ww == 0 else 1.0 / (vt0 * ww)
            t = min(tau2 * scale, top)
            i = np.int64(t)
            f = t - i
            bias = btab[i] + f * (btab[i + 1] - btab[i])
            vbar = vtab[i] + f * (vtab[i + 1] - vtab[i])
            na = np.float64(above[r, j])
            nb = np.float64(below[r, j])
            total = nn + na + nb
            above[r, j] = 0
            below[r, j] = 0
            if total >= 4 and nn < LOST_SHARE * total:
                if na >= nb:
                    q = (na + 0.5) / (total + 1.0)
                else:
                    q = (nb + 0.5) / (total + 1.0)
                tq = q * (ptab.size - 1)
                iq = min(np.int64(tq), ptab.size - 2)
                z = ptab[iq] + (tq - iq) * (ptab[iq + 1] - ptab[iq])
                d = b + z if na >= nb else -a - z
                d = min(max(d, -_MAX_STEP), _MAX_STEP)
                centre[r, j] = np.float32(np.float64(centre[r, j]) + sigma * d)
                w[r, j] = 0
                s1[r, j] = 0
                s2[r, j] = 0
                n[r, j] = 0
                continue
            if nn > 0:
                m = np.float64(s1[r, j]) / nn
                d = min(max((m / sigma - g0) / vt0 - bias, -_MAX_STEP), _MAX_STEP)
                c = np.float64(centre[r, j])
                centre[r, j] = np.float32(c + sigma * d * nn / (ww + nn))
            if nn >= 2:
                ss = np.float64(s1[r, j]) * np.float64(s1[r, j]) / nn
                v = max(np.float64(s2[r, j]) - ss, 0.0) / ((nn - 1.0) * vbar)
                if ww == 0:
                    var[r, j] = np.float32(v)
                else:
                    var[r, j] = np.float32((fp * np.float64(var[r, j]) + fs * v) / (fp + fs))
            w[r, j] = np.uint16(min(ww + nn, 65535.0))
            s1[r, j] = 0
            s2[r, j] = 0
            n[r, j] = 0


@numba.njit(**_OPTS)
def _median_rows(frames, out, r0, r1):  # pragma: no cover - compiled
    """Per-pixel median of ``frames (k, H, W)`` on rows ``r0:r1`` (float32)."""
    k = frames.shape[0]
    buf = np.empty(k, np.float32)
    for r in range(r0, r1):
        for j in range(frames.shape[2]):
            for i in range(k):  # insertion sort: k is small
                x = np.float32(frames[i, r, j])
                p = i
                while p > 0 and buf[p - 1] > x:
                    buf[p] = buf[p - 1]
                    p -= 1
                buf[p] = x
            if k % 2:
                out[r, j] = buf[k // 2]
            else:
                out[r, j] = np.float32(0.5) * (buf[k // 2 - 1] + buf[k // 2])


_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def _threads() -> int:
    return max(1, int(numba.config.NUMBA_NUM_THREADS))


def _run_rows(kernel: Any, h: int, *args: Any) -> None:
    """``kernel(*args, r0, r1)`` over the frame's rows in contiguous ranges, one per
    thread (the calling thread takes the first; the kernels release the GIL)."""
    global _pool, _pool_pid
    k = max(1, min(_threads(), h // 16))
    cuts = [h * i // k for i in range(k + 1)]
    if k == 1:
        kernel(*args, 0, h)
        return
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():  # none yet, or a forked child's copy
            _pool = ThreadPoolExecutor(max_workers=k - 1, thread_name_prefix="streamstore-dark")
            _pool_pid = os.getpid()
        pool = _pool
    futures = [pool.submit(kernel, *args, cuts[i], cuts[i + 1]) for i in range(1, k)]
    try:
        kernel(*args, cuts[0], cuts[1])
    finally:
        for f in futures:
            f.result()


# the start-up's compile workers may save these at once (streamstore._numba_cache)
serialize_saves(_accumulate_rows, _fold_rows, _median_rows)
