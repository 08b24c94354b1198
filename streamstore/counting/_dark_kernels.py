"""The data-only dark estimator's per-frame passes, as numba kernels over row ranges.

Each kernel equals its plain numpy definition in
:mod:`streamstore.counting.dark_estimate` (``accumulate_numpy``, ``fold_numpy``,
the per-pixel median, each frame's residual about the median of the others): those
are the reference, these the speed (``tests/counting/test_estimate_exact.py``
holds the medians to ``np.median``). They release
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
from streamstore.counting._maps import unsigned_bits

_OPTS = {"nogil": True, "cache": True, "error_model": "numpy", "boundscheck": False}

#: A pixel whose window caught fewer than this share of its values (a quarter of the share a
#: window on the pixel's mean catches) has lost its values: see :func:`fold_numpy`.
LOST_SHARE = 0.2
#: The largest step of a pixel's centre in one refinement, in noise sigmas.
_MAX_STEP = 4.0
#: The largest error variance of a centre (sigma**2) the window model tabulates.
TAU2_MAX = 2.0
#: A segment whose mean lies this many of its standard errors (its own and the
#: earlier segments') from the earlier segments' starts the pixel over: see
#: :func:`fold_numpy`.
RESET_Z = 3.0
#: Frames one pass of :func:`_accumulate_rows` adds (a tuple of this length, the
#: unused places holding the first frame again): one compiled signature for any batch.
BATCH = 8
#: Values of the RMS noise that the own noise estimate of a pixel with up to as
#: many values is pooled with in the noise map (:meth:`DarkEstimator.maps
#: <streamstore.counting.dark_estimate.DarkEstimator.maps>`); the weight falls as
#: the pixel's values grow beyond.
NOISE_PRIOR = 8.0
#: A pixel with this many values more than ``n_sigma`` sigmas below its centre is hot.
LOW_HOT = 2
#: Bytes of window sums (centre, two float32 sums and the counts) per pixel that a
#: band of rows holds while all the frames of a batch pass through it.
_SUM_BYTES = 18
#: Bytes of window sums a band should hold: well inside a core's second-level cache.
_BAND_BYTES = 1 << 19


def band_rows(width: int) -> int:
    """Rows of the bands :func:`_accumulate_rows` takes a batch through."""
    return max(2, min(64, _BAND_BYTES // (_SUM_BYTES * max(width, 1))))


def as_read(frames: np.ndarray, signed: bool) -> tuple[np.ndarray, int, np.float32]:
    """``frames`` as the per-frame kernels read them: ``(bits, flip, wrap)``.

    The kernels take unsigned frames only (one compiled overload per width):
    ``bits`` and ``flip`` are :func:`~streamstore.counting._maps.unsigned_bits`'
    view and sign bit (0 for unsigned values), ``wrap`` twice the sign bit, in
    float32: the value is ``bits - wrap`` at and above the sign bit
    (:func:`_value`), and ``bits ^ flip`` orders as the values do.
    """
    bits, flip = unsigned_bits(np.asarray(frames), signed)
    return bits, flip, np.float32(2 * flip)


@numba.njit(inline="always", **_OPTS)
def _value(u, wrap):  # pragma: no cover - compiled
    """The value of frame bits ``u`` as :func:`as_read` gives them, in float32 (exact):
    a select in float32, which vectorises (an integer xor would widen to 64 bits)."""
    v = np.float32(u)
    return v - wrap if v >= np.float32(0.5) * wrap else v


def frame_tuple(frames: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    """``frames`` (1 to ``BATCH`` frames of one type, in order) as the tuple
    :func:`_accumulate_rows` takes: C-contiguous read-only views (one type whatever
    the frames' own flags), padded to ``BATCH`` with the first."""
    views = []
    for f in frames:
        v = np.ascontiguousarray(f).view()
        v.flags.writeable = False
        views.append(v)
    return tuple(views + [views[0]] * (BATCH - len(views)))


# -- kernels ------------------------------------------------------------------------
@numba.njit(inline="always", **_OPTS)
def _sum_row(
    frame, wrap, centre, s1, s2, n, above, below, low, lo, hi, sink, radius, last, vert,
    near, r,
):  # fmt: skip  # pragma: no cover - compiled
    """Row ``r`` of :func:`_accumulate_rows`: simple loops over the row's columns,
    branch-free, on one-dimensional rows (each vectorises)."""
    w = frame.shape[1]
    edge = np.int32(r - radius)
    for j in range(w + 2 * radius):
        vert[j] = np.uint8(last[j] >= edge)
    for j in range(w):
        near[j] = vert[j]
    for i in range(1, 2 * radius + 1):
        vi = vert[i : i + w]
        for j in range(w):
            near[j] |= vi[j]
    fr = frame[r]
    cr = centre[r]
    s1r = s1[r]
    s2r = s2[r]
    nr = n[r]
    ar = above[r]
    br = below[r]
    lr = low[r]
    # the same loop twice, unsigned values and signed ones: a select in the loop
    # for both cost the unsigned pass 7 %
    if wrap == 0:
        for j in range(w):
            x = np.float32(fr[j]) - cr[j]
            _sum_one(x, near[j], s1r, s2r, nr, ar, br, lr, lo, hi, sink, j)
    else:
        for j in range(w):
            x = _value(fr[j], wrap) - cr[j]
            _sum_one(x, near[j], s1r, s2r, nr, ar, br, lr, lo, hi, sink, j)


@numba.njit(inline="always", **_OPTS)
def _sum_one(x, near, s1r, s2r, nr, ar, br, lr, lo, hi, sink, j):  # pragma: no cover - compiled
    """Column ``j`` of :func:`_sum_row`: ``x`` (the value less its centre) into the sums."""
    up = np.uint8(x > hi)
    down = np.uint8(x < -lo)
    inside = (np.uint8(1) - near) & (np.uint8(1) - up) & (np.uint8(1) - down)
    xi = x * np.float32(inside)
    s1r[j] += xi
    s2r[j] += xi * xi
    nr[j] += np.uint16(inside)
    ar[j] += np.uint16(up)
    br[j] += down & np.uint8(br[j] < 255)
    lr[j] += np.uint8(x < -sink) & np.uint8(lr[j] < 255)


@numba.njit(inline="always", **_OPTS)
def _residual_row(frame, wrap, centre, q, out):  # pragma: no cover - compiled
    """Row ``q`` of the frame (values as :func:`as_read` says) less the centre
    (float32), into ``out``."""
    fq = frame[q]
    cq = centre[q]
    if wrap == 0:  # two loops, as in :func:`_sum_row`
        for j in range(fq.size):
            out[j] = np.float32(fq[j]) - cq[j]
    else:
        for j in range(fq.size):
            out[j] = _value(fq[j], wrap) - cq[j]


@numba.njit(**_OPTS)
def _accumulate_rows(
    frames, k, wrap, centre, s1, s2, n, above, below, low, lo, hi, hit, block, sink, radius,
    band, r0, r1,
):  # pragma: no cover - compiled  # fmt: skip
    """:func:`accumulate_numpy` of ``frames[:k]`` (a tuple of frames, in order) on rows
    ``r0:r1``, each frame in one pass, ``band`` rows of all ``k`` frames at a time.
    The frames are unsigned, their values as :func:`as_read` says (``wrap``).

    Each frame is scanned row by row with a look-ahead of ``radius`` rows: its scan
    state (``last``, ``cur``, ``up``) is kept per frame, so a band of one frame
    carries on where the band before it stopped and no row is read twice. The
    window sums of a band's rows are read and written once for all ``k`` frames
    while they sit in cache; each pixel still adds the frames in order, so the sums
    equal those of the frames added one at a time, bit for bit.

    ``last[j]`` is the last row, ``radius`` rows ahead of the one summed, with a
    hit in column ``j`` (a value above ``hit``, or in a 2 x 2 block whose sum is
    above ``block``): a pixel is near one when ``last`` is within ``radius`` rows
    in one of the ``2 radius + 1`` columns around it. The blocks of row ``q`` are
    the sums of its vertical pairs with the rows above (``up``) and below
    (``dn``), padded with -inf where the frame ends, so that a block outside the
    frame never fires.
    """
    h, w = frames[0].shape
    last = np.full((k, w + 2 * radius), np.int32(-(1 << 30)))
    vert = np.zeros(w + 2 * radius, np.uint8)
    near = np.zeros(w, np.uint8)
    neg = np.float32(-np.inf)
    cur = np.empty((k, w), np.float32)
    nxt = np.empty(w, np.float32)
    up = np.full((k, w + 2), neg, np.float32)  # up[f, j + 1]: rows q - 1 and q in column j
    dn = np.full(w + 2, neg, np.float32)  # dn[j + 1]: rows q and q + 1 in column j
    # the loops index shifted views with the column itself: an index such as j + 1
    # keeps numba's negative-index check in the loop, which then does not vectorise
    d0, d1, d2 = dn[0:w], dn[1 : w + 1], dn[2 : w + 2]
    q0 = max(r0 - radius, 0)
    q1 = min(r1 + radius, h)
    for f in range(k):
        frame = frames[f]
        cf = cur[f]
        _residual_row(frame, wrap, centre, q0, cf)
        if q0 >= 1:
            _residual_row(frame, wrap, centre, q0 - 1, nxt)
            u1 = up[f, 1 : w + 1]
            for j in range(w):
                u1[j] = nxt[j] + cf[j]
    for b0 in range(q0, q1, band):
        for f in range(k):
            frame = frames[f]
            lf = last[f]
            ahead = lf[radius : radius + w]
            cf = cur[f]
            u0, u1, u2 = up[f, 0:w], up[f, 1 : w + 1], up[f, 2 : w + 2]
            for q in range(b0, min(b0 + band, q1)):
                if q + 1 < h:
                    _residual_row(frame, wrap, centre, q + 1, nxt)
                    for j in range(w):
                        d1[j] = cf[j] + nxt[j]
                else:
                    for j in range(w):
                        d1[j] = neg
                qi = np.int32(q)
                for j in range(w):
                    # a block above ``block`` is one of the four sums above it
                    hits = (
                        (cf[j] > hit)
                        | (u0[j] + u1[j] > block)
                        | (u1[j] + u2[j] > block)
                        | (d0[j] + d1[j] > block)
                        | (d1[j] + d2[j] > block)
                    )
                    ahead[j] = qi if hits else ahead[j]  # a select: it vectorises
                for j in range(w):
                    u1[j] = d1[j]
                    cf[j] = nxt[j]
                r = q - radius
                if r < r0:
                    continue
                _sum_row(
                    frame,
                    wrap,
                    centre,
                    s1,
                    s2,
                    n,
                    above,
                    below,
                    low,
                    lo,
                    hi,
                    sink,
                    radius,
                    lf,
                    vert,
                    near,
                    r,
                )
    # rows at the end of the range whose look-ahead ran past the frame
    for r in range(max(r0, q1 - radius), r1):
        for f in range(k):
            _sum_row(
                frames[f], wrap, centre, s1, s2, n, above, below, low, lo, hi, sink, radius,
                last[f], vert, near, r,
            )  # fmt: skip


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
                if ww > 0 and d * d > RESET_Z * RESET_Z * (tau2 + 1.0 / (vt0 * nn)):
                    ww = 0.0  # the segment disagrees with the earlier ones: it alone
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


@numba.njit(inline="always", **_OPTS)
def _rank_row(frames, flip, r, vals, rank):  # pragma: no cover - compiled
    """Row ``r`` of each of ``frames (k, H, W)``, its bits ``^ flip``, into ``vals (k, W)``
    (its type) and each value's place among the pixel's ``k`` sorted values into
    ``rank (k, W)``: a permutation per pixel, equal values in frame order. Comparisons
    over whole rows, branch-free: they vectorise, where a sort per pixel branches on
    every value."""
    k = frames.shape[0]
    w = frames.shape[2]
    for i in range(k):
        fi = frames[i, r]
        vi = vals[i]
        ri = rank[i]
        for c in range(w):
            vi[c] = fi[c] ^ flip  # unsigned, in the signed values' order
            ri[c] = 0
    for i in range(k):
        vi = vals[i]
        ri = rank[i]
        for j in range(k):
            vj = vals[j]
            if j < i:  # an equal value of an earlier frame sorts first
                for c in range(w):
                    ri[c] += np.int32(vj[c] <= vi[c])
            elif j > i:
                for c in range(w):
                    ri[c] += np.int32(vj[c] < vi[c])


@numba.njit(inline="always", **_OPTS)
def _value_at(vals, rank, place, out):  # pragma: no cover - compiled
    """Per column, the value of rank ``place`` (one per pixel: the ranks are a
    permutation), into ``out``."""
    for i in range(vals.shape[0]):
        vi = vals[i]
        ri = rank[i]
        for c in range(out.size):
            # both loaded first: a select of two values vectorises, a conditional
            # load does not
            v = vi[c]
            o = out[c]
            out[c] = v if ri[c] == place else o


@numba.njit(**_OPTS)
def _median_rows(frames, flip, wrap, out, r0, r1):  # pragma: no cover - compiled
    """Per-pixel median of ``frames (k, H, W)`` on rows ``r0:r1`` (float32); the
    frames are unsigned, their values as :func:`as_read` says (``flip``, ``wrap``):
    ranked as ``bits ^ flip``, which is the value plus ``wrap / 2``."""
    off = np.float32(0.5) * wrap
    k, _, w = frames.shape
    # the frames' own type: float32 of each value, as a sort of the values gives
    vals = np.empty((k, w), frames.dtype)
    rank = np.empty((k, w), np.int32)
    lo = np.empty(w, frames.dtype)
    hi = np.empty(w, frames.dtype)
    for r in range(r0, r1):
        _rank_row(frames, flip, r, vals, rank)
        _value_at(vals, rank, k // 2, hi)
        orow = out[r]
        if k % 2:
            for c in range(w):
                orow[c] = np.float32(hi[c]) - off
        else:
            _value_at(vals, rank, k // 2 - 1, lo)
            for c in range(w):
                a = np.float32(lo[c]) - off
                b = np.float32(hi[c]) - off
                orow[c] = np.float32(0.5) * (a + b)


@numba.njit(**_OPTS)
def _start_residual_rows(sample, m, out, r0, r1):  # pragma: no cover - compiled
    """Each value of ``sample (k, H, W)`` less the median of ``m`` of the *other*
    frames (``m`` odd: ``k - 1``, or ``k - 2`` leaving out the last of the others),
    per pixel, on rows ``r0:r1``, into ``out (k, H, W)`` (int64).

    The pixel's ``k`` values are ranked once. The median of the others is the
    value of rank ``m // 2`` among those left in: in all ``k``, that rank plus
    one for each left-out value ranked at or below it, so one of the three
    values of ranks ``m // 2`` to ``m // 2 + 2`` (two where ``m = k - 1``): no
    sort per frame.
    """
    k, _, w = sample.shape
    vals = np.empty((k, w), sample.dtype)
    rank = np.empty((k, w), np.int32)
    near = np.zeros((3, w), sample.dtype)  # the values of ranks half, half + 1, half + 2
    half = np.int32(m // 2)
    for r in range(r0, r1):
        _rank_row(sample, 0, r, vals, rank)
        for d in range(min(3, k - half)):
            _value_at(vals, rank, half + d, near[d])
        n0, n1, n2 = near[0], near[1], near[2]
        for t in range(k):
            rt = rank[t]
            vt = vals[t]
            ot = out[t, r]
            if m == k - 1:  # t alone left out: rank half, or half + 1 where t is below
                for c in range(w):
                    a = n0[c]
                    b = n1[c]
                    ot[c] = np.int64(vt[c]) - np.int64(a if rt[c] > half else b)
                continue
            # t and the others' last frame left out
            ro = rank[k - 2 if t == k - 1 else k - 1]
            for c in range(w):
                e1 = min(rt[c], ro[c])
                e2 = max(rt[c], ro[c])
                p = np.int32(e1 <= half)
                p += np.int32(e2 <= half + p)
                a = n0[c]
                b = n1[c]
                d = n2[c]
                ot[c] = np.int64(vt[c]) - np.int64(a if p == 0 else (b if p == 1 else d))


@numba.njit(**_OPTS)
def _noise_rows(
    centre, var, w, low, check, dark_top, noise_top, rms, hot, noise, r0, r1
):  # pragma: no cover - compiled
    """:func:`noise_numpy` on rows ``r0:r1``, in float32 as numpy has it, in one pass."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    weight = np.float32(NOISE_PRIOR * NOISE_PRIOR)
    floor = np.float32(NOISE_PRIOR)
    for r in range(r0, r1):
        for j in range(centre.shape[1]):
            v = var[r, j]
            bad = low[r, j] >= LOW_HOT
            if check:
                bad |= (centre[r, j] > dark_top) | (np.sqrt(v) > noise_top)
            dof = max(np.float32(w[r, j]) - one, zero)
            prior = weight / max(dof + one, floor)
            pulled = np.sqrt((dof * v + prior * rms * rms) / (dof + prior))
            # np.maximum: a NaN stays
            own = pulled if (pulled >= rms or pulled != pulled) else rms
            hot[r, j] = bad
            noise[r, j] = rms if (bad or w[r, j] < 2) else own


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
serialize_saves(_accumulate_rows, _fold_rows, _median_rows, _start_residual_rows, _noise_rows)
