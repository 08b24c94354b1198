"""Plain Python reference of the joint fit: one frame's electron clouds fitted together.

The specification that the compiled kernel (``_joint_kernels.py``, numba
compiling *these functions*) and the C twin (``native_ref/joint.c``) match bit
for bit: every float64 operation below in this order, no fused multiply-add.
:mod:`streamstore.counting.joint` cuts each frame's signal and weights and
turns the clouds into events. Written in loops over arrays (what numba
compiles); slow in Python, for the parity tests' small frames. Rules 1-4 (the
clouds, the model, the clouds near a place and the group fit) are the functions
of ``_joint_group_reference.py``; rules 5-11 (a frame's fit) are here.

Inputs, one frame: ``signal`` (H, W), the charge of each pixel in signal units,
0 where it holds no electron to fit (masked, an X-ray hit's surroundings);
``iv`` (H, W), each pixel's weight, 0 there; ``starts`` (n, 2), the places
``(y, x)`` (pixels from the frame's corner) of the events the fit counter found;
``e`` one electron's charge; ``width`` the series' cloud width; ``cdf``,
``pdf``, ``t0``, ``inv_h`` the cloud's profile table (as the fit counter's);
``conf``, :func:`joint_conf`.

1. *cloud*: ``(a, y, x, s)`` puts ``(a * sy[i]) * sx[j]`` in pixel ``(r0 + i, c0 +
   j)`` of the 7 x 7 around its own (``r0 = floor(y) - 3``; ``i, j = 0 .. 6``;
   nothing beyond), ``sy[i] = cdf(u[i + 1]) - cdf(u[i])``, ``u[k] = ((r0 + k) -
   y) / s``, the table read as the fit counter's rule 1, derivatives as its rule
   2 (``dy``, ``wy``); the *model* of the frame is every cloud's charge added
   pixel by pixel (taken away again with ``-``, in the same order).
2. *clouds near* ``(y, x)``: those whose centre lies at a squared distance
   ``dy * dy + dx * dx`` below ``reach * reach``; where more than ``cap``, the
   ``cap`` of least distance (then least index); in ascending index.
3. *region* of some places: the pixels in the frame within Chebyshev distance 2
   of any place's pixel (``floor``), in raster order (the union of their 5 x 5
   windows).
4. *group fit* of the clouds ``ids`` (as they stand in the model) from start
   clouds ``P`` (``kk`` of them) on a region: ``data[q] = signal[p] - under[q]``,
   ``under[q] = model[p]`` less each cloud of ``ids`` in order (rule 1);
   ``wt[q] = iv[p]``. Chi-square of ``P``: the model of ``P`` alone on the region
   (clouds in order, rule 1), ``sum over q of (wt[q] * r) * r``, ``r = data[q] -
   m[q]``, plus ``d * d`` for each cloud, ``d = (s - width) * (1 / spread)``;
   infinite where a width lies outside :data:`WIDTHS` or a centre more than 3 px
   off the frame (or any is not a number). The parameters ``4 c + (a, y, x, s)``
   all free; Levenberg-Marquardt as the fit counter's rule 3 (``f = 0``), its
   width prior on every ``4 c + 3``, :data:`ITERS` iterations; no fit (the
   chi-square of ``P``) where the region has no more pixels than parameters or
   ``kk`` is 0.
5. *start*: a cloud at each place, of the 3 x 3 sum of ``signal`` around its
   pixel (``START_LEAST`` electrons at least) and width ``width``, in order.
6. *refit*, ``SWEEPS`` times, ``i`` over the clouds in order: the clouds near
   cloud ``i`` (``cap`` :data:`GROUP`) fitted from where they stand on their
   region; kept where the chi-square is finite, every number finite and no centre
   moved :data:`MAX_STEP` or more along an axis (each cloud taken away from the
   model and the new ones added, in order).
7. *add*: the residual ``signal - model`` (0 where ``iv`` is 0), its 3 x 3 sums
   (pixels in the frame, rows then columns); every pixel of weight above 0 whose
   sum exceeds ``add * e`` and is no less than any neighbour's, by falling sum
   (raster order on a tie): where its sum *now* still exceeds it, a new cloud
   ``(sum, r + 0.5, c + 0.5, width)`` with the clouds near it (``cap`` GROUP - 1),
   region of all; the group fitted alone (``chi0``) and with the new cloud
   (``chi1``); kept (the group's clouds replaced, the new one appended) where
   ``chi0 - chi1 > drop``, every number finite, every cloud above ``least * e``,
   no centre moved MAX_STEP or more from its start, no two within
   :data:`MERGE_PX` (squared distance ``<=`` its square).
8. *split*: the clouds above ``SPLIT_CHARGE * e`` or wider than ``width + 2 *
   spread``, by falling charge (index on a tie), each while ``(a, y, x)`` are as
   listed: with the clouds near it (``cap`` GROUP - 1; it among them), region of
   their places; the group fitted (``chi0``), then with the cloud as two ``(a /
   2, y + oy, x + ox, width)``, ``(a / 2, y - oy, x - ox, width)`` after the
   others, from ``(oy, ox) = (0, SPLIT_OFFSET)`` then ``(SPLIT_OFFSET, 0)``, the
   lower chi-square (the first on a tie) against ``chi0`` as rule 7 (the moves
   from the others' places and the cloud's twice; the drop ``drop_wide`` for a
   cloud of ``WIDE_CHARGE * e`` or more wider than ``width + WIDE_BY``); kept:
   the others replaced, the cloud the first of the two, the second appended.
9. Rules 7 and 8 (both) ``ROUNDS`` times at most, until neither keeps a cloud;
   then rule 6 ``polish`` times more, then rule 10.
10. *prune*, each cloud in order whose charge lies above 0 and below ``prune * e``
    with another near it (``cap`` GROUP; it among them), region of their places:
    the group fitted with it (``chi1``) and without it (``chi0``, the others from
    where they stand); where ``chi0 - chi1 <= drop`` and no other's centre moved
    MAX_STEP or more, its charge becomes 0 (taken out of the model and of rule 2's
    search) and the others are replaced: a faint cloud beside another must earn
    its place as an added one does.
11. *events*: every cloud of charge above 0, less those of ``least * e`` or less
    with another cloud near (a neighbour took their charge).

Output: the clouds ``(n', 4)`` and whether each is an event (uint8).
"""

from __future__ import annotations

import math

import numpy as np

from streamstore.counting._fit_reference import LAM, TOL, WIDTHS
from streamstore.counting._joint_group_reference import (
    _ADD,
    _CELL,
    _DROP,
    _DROP_WIDE,
    _GROUP,
    _LEAST,
    _MAX_STEP,
    _POLISH,
    _PRUNE,
    _REACH,
    _ROUNDS,
    _SPLIT_CHARGE,
    _SPLIT_OFFSET,
    _SPREAD,
    _START_LEAST,
    _SWEEPS,
    _WIDE_BY,
    _WIDE_CHARGE,
    _draw,
    _fit,
    _good,
    _grid_drop,
    _grid_put,
    _near,
    _pts_of,
    _replace,
    _store,
)

__all__ = ["joint_conf", "joint_frame", "joint_frames_reference", "JOINT_FUNCTIONS"]

#: Refits over every cloud, and rounds of added and split clouds at most.
SWEEPS = 2
ROUNDS = 2
#: Clouds within this distance (pixels) are fitted together.
REACH = 2.5
#: Chi-square an added or split cloud must save.
DROP = 30.0
#: Electrons every cloud of an added or split group holds at least.
LEAST = 0.35
#: Electrons a residual's 3 x 3 holds for a cloud to be tried there.
ADD = 0.5
#: How far (pixels, one sigma) a cloud's width strays from the series'.
SPREAD = 0.1
#: A fit that moves a centre this far (pixels, along an axis) is not kept.
MAX_STEP = 1.5
#: Two clouds closer than this (pixels) are one electron.
MERGE_PX = 0.75
#: Clouds of more electrons than this are tried as two.
SPLIT_CHARGE = 1.3
#: A cloud of this many electrons or more and wider than the series' by
#: ``WIDE_BY`` px is most likely two: it splits on a chi-square drop of ``DROP_WIDE``.
WIDE_CHARGE = 1.7
WIDE_BY = 0.1
DROP_WIDE = 20.0
#: The two clouds start this far (pixels) either side of the one.
SPLIT_OFFSET = 0.6
#: A start cloud holds this many electrons at least.
START_LEAST = 0.3
#: Clouds fitted together at most.
GROUP = 8
#: Levenberg-Marquardt iterations at most.
ITERS = 20
#: Refits over every cloud after the added and split ones.
POLISH = 1
#: Clouds of fewer electrons than this beside another must earn their place as an
#: added one does (0: none are tried).
PRUNE = 0.7


def joint_conf(
    sweeps: int = SWEEPS,
    rounds: int = ROUNDS,
    reach: float = REACH,
    drop: float = DROP,
    least: float = LEAST,
    add: float = ADD,
    spread: float = SPREAD,
    polish: int = POLISH,
    drop_wide: float = DROP_WIDE,
    prune: float = PRUNE,
) -> np.ndarray:
    """The constants as every form takes them (float64), those named as given."""
    return np.array(
        [sweeps, rounds, reach, drop, least, add, spread, MAX_STEP, MERGE_PX, SPLIT_CHARGE,
         SPLIT_OFFSET, START_LEAST, GROUP, ITERS, *LAM, TOL, *WIDTHS, polish, drop_wide,
         WIDE_CHARGE, WIDE_BY, prune],
        np.float64,
    )  # fmt: skip


def _box(res, r, c):
    h, w = res.shape
    t = 0.0
    for i in range(r - 1, r + 2):
        if i < 0 or i >= h:
            continue
        for j in range(c - 1, c + 2):
            if j < 0 or j >= w:
                continue
            t = t + res[i, j]
    return t


def _residual(fr, res):
    signal, iv, model = fr
    h, w = signal.shape
    for r in range(h):
        for c in range(w):
            if iv[r, c] > 0.0:
                res[r, c] = signal[r, c] - model[r, c]
            else:
                res[r, c] = 0.0


def _refit(n, fr, cl, grid, e, width, conf, cdf, pdf, t0, inv_h, ws, rs, bufs):
    """Rule 6, one sweep."""
    head, nxt, cell_of, ncy, ncx = grid
    ids, cand, dd, P, S, P2, pts = bufs
    for i in range(n):
        ng = _near(cl[i, 1], cl[i, 2], int(conf[_GROUP]), conf[_REACH], cl, head, nxt, ncy, ncx,
                   ids, cand, dd)  # fmt: skip
        for k in range(ng):
            _store(P, k, cl, ids[k])
            _store(S, k, cl, ids[k])
        _pts_of(ids, ng, cl, pts)
        chi = _fit(ids, ng, P, ng, pts, ng, fr, cl, width, conf, cdf, pdf, t0, inv_h, ws, rs)
        if not chi < math.inf:
            continue
        if _moved_less(P, ng, S, conf):
            _replace(ids, ng, P, ng, n, fr, cl, grid, cdf, pdf, t0, inv_h, ws[8])


def _moved_less(P, kk, S, conf):
    """Every number finite and no centre moved MAX_STEP (rule 6's test)."""
    for c in range(kk):
        for j in range(4):
            v = P[4 * c + j]
            if not (v - v == 0.0):
                return False
        if not abs(P[4 * c + 1] - S[4 * c + 1]) < conf[_MAX_STEP]:
            return False
        if not abs(P[4 * c + 2] - S[4 * c + 2]) < conf[_MAX_STEP]:
            return False
    return True


def _add(n, cands, ncand, fr, cl, grid, e, width, conf, cdf, pdf, t0, inv_h, ws, rs, bufs):
    """Rule 7 over the candidate pixels ``cands[:ncand]`` (in order); the new count of
    clouds."""
    head, nxt, cell_of, ncy, ncx = grid
    ids, cand, dd, P, S, P2, pts = bufs
    signal, iv, model = fr
    h, w = signal.shape
    low = conf[_ADD] * e
    for k in range(ncand):
        r = cands[k] // w
        c = cands[k] - r * w
        # the residual's sum now (clouds added nearby may have taken this charge)
        t = 0.0
        for i in range(r - 1, r + 2):
            if i < 0 or i >= h:
                continue
            for j in range(c - 1, c + 2):
                if j < 0 or j >= w:
                    continue
                if iv[i, j] > 0.0:
                    t = t + (signal[i, j] - model[i, j])
        if not t > low:
            continue
        y = r + 0.5
        x = c + 0.5
        ng = _near(y, x, int(conf[_GROUP]) - 1, conf[_REACH], cl, head, nxt, ncy, ncx,
                   ids, cand, dd)  # fmt: skip
        for q in range(ng):
            _store(P, q, cl, ids[q])
            _store(P2, q, cl, ids[q])
        _pts_of(ids, ng, cl, pts)
        pts[ng, 0] = y
        pts[ng, 1] = x
        chi0 = _fit(ids, ng, P2, ng, pts, ng + 1, fr, cl, width, conf, cdf, pdf, t0, inv_h,
                    ws, rs)  # fmt: skip
        P[4 * ng] = t
        P[4 * ng + 1] = y
        P[4 * ng + 2] = x
        P[4 * ng + 3] = width
        for q in range(4 * ng + 4):
            S[q] = P[q]
        chi1 = _fit(ids, ng, P, ng + 1, pts, ng + 1, fr, cl, width, conf, cdf, pdf, t0, inv_h,
                    ws, rs)  # fmt: skip
        if chi0 - chi1 > conf[_DROP] and _good(P, ng + 1, S, conf[_LEAST] * e, conf):
            n = _replace(ids, ng, P, ng + 1, n, fr, cl, grid, cdf, pdf, t0, inv_h, ws[8])
    return n


def _split(n, heavy, nheavy, snap, fr, cl, grid, e, width, conf, cdf, pdf, t0, inv_h, ws, rs,
           bufs):  # fmt: skip
    """Rule 8 over the clouds ``heavy[:nheavy]`` (in order) as they were listed
    (``snap``); the new count of clouds."""
    head, nxt, cell_of, ncy, ncx = grid
    ids, cand, dd, P, S, P2, pts = bufs
    off = conf[_SPLIT_OFFSET]
    for k in range(nheavy):
        i = heavy[k]
        if not (cl[i, 0] == snap[k, 0] and cl[i, 1] == snap[k, 1] and cl[i, 2] == snap[k, 2]):
            continue  # refitted beside another's split since listed
        a = cl[i, 0]
        y = cl[i, 1]
        x = cl[i, 2]
        ng = _near(y, x, int(conf[_GROUP]) - 1, conf[_REACH], cl, head, nxt, ncy, ncx,
                   ids, cand, dd)  # fmt: skip
        at = -1
        for q in range(ng):
            if ids[q] == i:
                at = q
        if at < 0:
            continue
        _pts_of(ids, ng, cl, pts)
        for q in range(ng):
            _store(P2, q, cl, ids[q])
        chi0 = _fit(ids, ng, P2, ng, pts, ng, fr, cl, width, conf, cdf, pdf, t0, inv_h, ws, rs)
        best = math.inf
        for o in range(2):
            oy = 0.0 if o == 0 else off
            ox = off if o == 0 else 0.0
            kq = 0
            for q in range(ng):  # the others first, in order, then the two
                if q != at:
                    _store(P, kq, cl, ids[q])
                    kq += 1
            P[4 * kq] = a * 0.5
            P[4 * kq + 1] = y + oy
            P[4 * kq + 2] = x + ox
            P[4 * kq + 3] = width
            P[4 * kq + 4] = a * 0.5
            P[4 * kq + 5] = y - oy
            P[4 * kq + 6] = x - ox
            P[4 * kq + 7] = width
            chi1 = _fit(ids, ng, P, ng + 1, pts, ng, fr, cl, width, conf, cdf, pdf, t0, inv_h,
                        ws, rs)  # fmt: skip
            if chi1 < best:
                best = chi1
                for q in range(4 * ng + 4):
                    P2[q] = P[q]
        drop = conf[_DROP]
        if a >= conf[_WIDE_CHARGE] * e and cl[i, 3] > width + conf[_WIDE_BY]:
            drop = conf[_DROP_WIDE]
        if not chi0 - best > drop:
            continue
        kq = 0
        for q in range(ng):  # the starts the moves are measured from
            if q != at:
                _store(S, kq, cl, ids[q])
                kq += 1
        _store(S, kq, cl, i)
        _store(S, kq + 1, cl, i)
        if not _good(P2, ng + 1, S, conf[_LEAST] * e, conf):
            continue
        # the others keep their indices, the cloud becomes the first of the two
        kq = 0
        for q in range(ng):
            if q != at:
                for j in range(4):
                    P[4 * q + j] = P2[4 * kq + j]
                kq += 1
        for j in range(4):
            P[4 * at + j] = P2[4 * kq + j]
            P[4 * ng + j] = P2[4 * kq + 4 + j]
        n = _replace(ids, ng, P, ng + 1, n, fr, cl, grid, cdf, pdf, t0, inv_h, ws[8])
    return n


def _prune(n, fr, cl, grid, e, width, conf, cdf, pdf, t0, inv_h, ws, rs, bufs):
    """Rule 10a: each cloud of charge above 0 and below ``prune * e`` with another
    near, in order: the group fitted with it (``chi1``) and without it (``chi0``);
    where ``chi0 - chi1 <= drop`` and no other centre moved MAX_STEP, it goes (its
    charge 0) and the others are replaced."""
    head, nxt, cell_of, ncy, ncx = grid
    ids, cand, dd, P, S, P2, pts = bufs
    model = fr[2]
    for i in range(n):
        a = cl[i, 0]
        if not (a > 0.0 and a < conf[_PRUNE] * e):
            continue
        ng = _near(cl[i, 1], cl[i, 2], int(conf[_GROUP]), conf[_REACH], cl, head, nxt, ncy, ncx,
                   ids, cand, dd)  # fmt: skip
        at = -1
        for q in range(ng):
            if ids[q] == i:
                at = q
        if at < 0 or ng < 2:
            continue
        _pts_of(ids, ng, cl, pts)
        for q in range(ng):
            _store(P2, q, cl, ids[q])
        chi1 = _fit(ids, ng, P2, ng, pts, ng, fr, cl, width, conf, cdf, pdf, t0, inv_h, ws, rs)
        kq = 0
        for q in range(ng):
            if q != at:
                _store(P, kq, cl, ids[q])
                _store(S, kq, cl, ids[q])
                kq += 1
        chi0 = _fit(ids, ng, P, ng - 1, pts, ng, fr, cl, width, conf, cdf, pdf, t0, inv_h, ws,
                    rs)  # fmt: skip
        if not (chi0 - chi1 <= conf[_DROP] and _moved_less(P, ng - 1, S, conf)):
            continue
        _draw(model, cl[i, 0], cl[i, 1], cl[i, 2], cl[i, 3], -1, cdf, pdf, t0, inv_h, ws[8])
        _grid_drop(i, head, nxt, cell_of)
        cl[i, 0] = 0.0
        for q in range(at, ng - 1):  # the others, in order
            ids[q] = ids[q + 1]
        _replace(ids, ng - 1, P, ng - 1, n, fr, cl, grid, cdf, pdf, t0, inv_h, ws[8])


def _candidates(fr, res, e, conf, out, vals):
    """Rule 7's pixels into ``out``, in raster order, and their sums into ``vals``:
    how many (``res``: room for the residual)."""
    signal, iv, model = fr
    h, w = signal.shape
    _residual(fr, res)
    box = np.empty((h, w), np.float64)
    for r in range(h):
        for c in range(w):
            box[r, c] = _box(res, r, c)
    low = conf[_ADD] * e
    n = 0
    for r in range(h):
        for c in range(w):
            v = box[r, c]
            if not (iv[r, c] > 0.0 and v > low):
                continue
            top = True
            for i in range(max(r - 1, 0), min(r + 2, h)):
                for j in range(max(c - 1, 0), min(c + 2, w)):
                    if box[i, j] > v:
                        top = False
            if top:
                out[n] = r * w + c
                n += 1
    for k in range(n):
        vals[k] = box[out[k] // w, out[k] % w]
    return n


def _by_falling(keys, idx, n):
    """``idx[:n]`` sorted by falling ``keys`` (stable: a merge sort)."""
    tmp = np.empty(n, np.int64)
    width = 1
    while width < n:
        lo = 0
        while lo < n:
            mid = min(lo + width, n)
            hi = min(lo + 2 * width, n)
            a = lo
            b = mid
            for k in range(lo, hi):
                if a < mid and (b >= hi or not keys[idx[b]] > keys[idx[a]]):
                    tmp[k] = idx[a]
                    a += 1
                else:
                    tmp[k] = idx[b]
                    b += 1
            lo = hi
        for k in range(n):
            idx[k] = tmp[k]
        width *= 2


def _grown(a, size):
    """``a`` in a new array of ``size`` rows (the rest zero)."""
    shape = (size,) + a.shape[1:]
    b = np.zeros(shape, a.dtype)
    b[: a.shape[0]] = a
    return b


def joint_frame(signal, iv, starts, e, width, cdf, pdf, t0, inv_h, conf):
    """One frame's clouds (rules 5-11): ``(clouds (n', 4), event (n',) uint8)``."""
    h, w = signal.shape
    n = starts.shape[0]
    cap = 2 * n + 16
    cl = np.zeros((cap, 4), np.float64)
    model = np.zeros((h, w), np.float64)
    ncy = int(math.floor((h + _CELL) / _CELL)) + 2
    ncx = int(math.floor((w + _CELL) / _CELL)) + 2
    head = np.full(ncy * ncx, -1, np.int64)
    nxt = np.full(cap, -1, np.int64)
    cell_of = np.zeros(cap, np.int64)
    g = int(conf[_GROUP])
    npar = 4 * g
    rmax = (2 * int(math.ceil(conf[_REACH])) + 7) ** 2
    ws = (
        np.zeros(rmax), np.zeros((rmax, npar)), np.zeros((npar, npar)), np.zeros((npar, npar)),
        np.zeros(npar), np.zeros(npar), np.zeros(npar), np.zeros(npar), np.zeros((6, 7)),
    )  # fmt: skip
    rs = (np.zeros(rmax, np.int64), np.zeros(rmax, np.int64), np.zeros(rmax), np.zeros(rmax))
    cand = np.zeros(cap, np.int64)
    dd = np.zeros(cap)
    ids = np.zeros(g + 1, np.int64)
    P = np.zeros(npar + 4)
    S = np.zeros(npar + 4)
    P2 = np.zeros(npar + 4)
    pts = np.zeros((g + 1, 2))
    fr = (signal, iv, model)
    sh = ws[8]
    for k in range(n):  # rule 5
        t = _box(signal, int(math.floor(starts[k, 0])), int(math.floor(starts[k, 1])))
        cl[k, 0] = max(t, conf[_START_LEAST] * e)
        cl[k, 1] = starts[k, 0]
        cl[k, 2] = starts[k, 1]
        cl[k, 3] = width
        _draw(model, cl[k, 0], cl[k, 1], cl[k, 2], cl[k, 3], 1, cdf, pdf, t0, inv_h, sh)
        _grid_put(k, cl, head, nxt, cell_of, ncy, ncx)
    grid = (head, nxt, cell_of, ncy, ncx)
    for _ in range(int(conf[_SWEEPS])):  # rule 6
        bufs = (ids, cand, dd, P, S, P2, pts)
        _refit(n, fr, cl, grid, e, width, conf, cdf, pdf, t0, inv_h, ws, rs, bufs)
    res = np.zeros((h, w), np.float64)
    cands = np.zeros(h * w, np.int64)
    vals = np.zeros(h * w)
    for _ in range(int(conf[_ROUNDS])):  # rules 7-9
        before = n
        ncand = _candidates(fr, res, e, conf, cands, vals)
        order = np.arange(ncand)
        _by_falling(vals, order, ncand)
        picked = np.zeros(ncand, np.int64)
        for k in range(ncand):
            picked[k] = cands[order[k]]
        if n + ncand > cap:  # room for every candidate
            cap = 2 * (n + ncand) + 16
            cl, nxt, cell_of, cand, dd = (
                _grown(cl, cap), _grown(nxt, cap), _grown(cell_of, cap), _grown(cand, cap),
                _grown(dd, cap),
            )  # fmt: skip
            grid = (head, nxt, cell_of, ncy, ncx)
        bufs = (ids, cand, dd, P, S, P2, pts)
        n = _add(n, picked, ncand, fr, cl, grid, e, width, conf, cdf, pdf, t0, inv_h, ws, rs,
                 bufs)  # fmt: skip
        wide = width + 2.0 * conf[_SPREAD]
        heavy = np.zeros(n, np.int64)
        nheavy = 0
        for i in range(n):
            if cl[i, 0] > conf[_SPLIT_CHARGE] * e or cl[i, 3] > wide:
                heavy[nheavy] = i
                nheavy += 1
        charge = np.zeros(n)
        for i in range(n):
            charge[i] = cl[i, 0]
        _by_falling(charge, heavy, nheavy)
        snap = np.zeros((nheavy, 3))
        for k in range(nheavy):
            for j in range(3):
                snap[k, j] = cl[heavy[k], j]
        if n + nheavy > cap:
            cap = 2 * (n + nheavy) + 16
            cl, nxt, cell_of, cand, dd = (
                _grown(cl, cap), _grown(nxt, cap), _grown(cell_of, cap), _grown(cand, cap),
                _grown(dd, cap),
            )  # fmt: skip
            grid = (head, nxt, cell_of, ncy, ncx)
        bufs = (ids, cand, dd, P, S, P2, pts)
        n = _split(n, heavy, nheavy, snap, fr, cl, grid, e, width, conf, cdf, pdf, t0, inv_h,
                   ws, rs, bufs)  # fmt: skip
        if n == before:
            break
    for _ in range(int(conf[_POLISH])):  # rule 6 again, the new clouds among the rest
        bufs = (ids, cand, dd, P, S, P2, pts)
        _refit(n, fr, cl, grid, e, width, conf, cdf, pdf, t0, inv_h, ws, rs, bufs)
    bufs = (ids, cand, dd, P, S, P2, pts)
    _prune(n, fr, cl, grid, e, width, conf, cdf, pdf, t0, inv_h, ws, rs, bufs)
    event = np.zeros(n, np.uint8)
    for i in range(n):  # rule 11
        if not cl[i, 0] > 0.0:
            continue
        if cl[i, 0] <= conf[_LEAST] * e:
            crowded = _near(cl[i, 1], cl[i, 2], 2, conf[_REACH], cl, head, nxt, ncy, ncx,
                            ids, cand, dd)  # fmt: skip
            if crowded > 1:
                continue
        event[i] = 1
    return cl[:n].copy(), event


#: The functions the kernel compiles, callees first.
JOINT_FUNCTIONS = (
    "_box", "_residual", "_moved_less", "_refit", "_add", "_split", "_prune", "_candidates",
    "_by_falling", "_grown", "joint_frame",
)  # fmt: skip


def joint_inputs(signal, iv, starts, cdf, pdf):
    """The frame's arrays as every form reads them, C-contiguous float64."""
    signal = np.ascontiguousarray(signal, np.float64)
    iv = np.ascontiguousarray(iv, np.float64)
    if signal.ndim != 2 or iv.shape != signal.shape:
        raise ValueError(f"signal and iv must be one (H, W) shape, got {signal.shape}, {iv.shape}")
    starts = np.ascontiguousarray(starts, np.float64).reshape(-1, 2)
    return (signal, iv, starts, np.ascontiguousarray(cdf, np.float64),
            np.ascontiguousarray(pdf, np.float64))  # fmt: skip


def joint_frames_reference(signal, iv, starts, e, width, cdf, pdf, t0, inv_h, conf):
    """One frame's clouds by this module's plain Python (the module docstring)."""
    signal, iv, starts, cdf, pdf = joint_inputs(signal, iv, starts, cdf, pdf)
    return joint_frame(signal, iv, starts, float(e), float(width), cdf, pdf, float(t0),
                       float(inv_h), np.asarray(conf, np.float64))  # fmt: skip
