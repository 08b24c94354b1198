"""Plain Python reference of the joint fit's group fit: clouds, the frame's model,
the clouds near a place, and the Levenberg-Marquardt fit of a group.

Rules 1-4 of the joint fit's specification (``_joint_reference.py``, which fits
a frame with these); written in the loops over arrays that numba compiles
(``_joint_kernels.py`` compiles these functions as they stand), mirrored in
``native_ref/joint.c``: every float64 operation in this order.
"""

from __future__ import annotations

import math

from streamstore.counting._fit_reference import _lookup  # the fit rule's table, rule 1

__all__ = ["GROUP_FUNCTIONS"]

_FOOT = 3  # a cloud reaches 3 pixels around its own (rule 1)
_CELL = 4.0  # the grid of rule 2's search, pixels a cell
# conf's entries
_SWEEPS, _ROUNDS, _REACH, _DROP, _LEAST, _ADD, _SPREAD = 0, 1, 2, 3, 4, 5, 6
_MAX_STEP, _MERGE, _SPLIT_CHARGE, _SPLIT_OFFSET, _START_LEAST, _GROUP, _ITERS = (
    7, 8, 9, 10, 11, 12, 13,
)  # fmt: skip
_LAM0, _LAM1, _LAM2, _TOL, _WMIN, _WMAX, _POLISH = 14, 15, 16, 17, 18, 19, 20
_DROP_WIDE, _WIDE_CHARGE, _WIDE_BY, _PRUNE = 21, 22, 23, 24


def _shares(mu, s, lo, cdf, pdf, t0, inv_h, sh, row):
    """Rows ``row .. row + 2`` of ``sh``: a cloud's shares of pixels ``lo .. lo + 6``
    along one axis, and their derivatives by its centre and its width (rule 1)."""
    lo_u = (lo - mu) / s
    lo_c, lo_p = _lookup(cdf, pdf, lo_u, t0, inv_h)
    for k in range(7):
        u = ((lo + k + 1.0) - mu) / s
        hi_c, hi_p = _lookup(cdf, pdf, u, t0, inv_h)
        sh[row, k] = hi_c - lo_c
        sh[row + 1, k] = -(hi_p - lo_p) / s
        sh[row + 2, k] = -(hi_p * u - lo_p * lo_u) / s
        lo_c = hi_c
        lo_p = hi_p
        lo_u = u


def _draw(model, a, y, x, s, sign, cdf, pdf, t0, inv_h, sh):
    """Add (``sign`` > 0) or take away a cloud's charge to or from ``model``."""
    h, w = model.shape
    r0 = int(math.floor(y)) - _FOOT
    c0 = int(math.floor(x)) - _FOOT
    _shares(y, s, r0, cdf, pdf, t0, inv_h, sh, 0)
    _shares(x, s, c0, cdf, pdf, t0, inv_h, sh, 3)
    for i in range(7):
        r = r0 + i
        if r < 0 or r >= h:
            continue
        for j in range(7):
            c = c0 + j
            if c < 0 or c >= w:
                continue
            v = (a * sh[0, i]) * sh[3, j]
            if sign > 0:
                model[r, c] = model[r, c] + v
            else:
                model[r, c] = model[r, c] - v


def _cell(v, n):
    k = int(math.floor((v + _CELL) / _CELL))
    if k < 0:
        k = 0
    if k > n - 1:
        k = n - 1
    return k


def _grid_put(i, cl, head, nxt, cell_of, ncy, ncx):
    k = _cell(cl[i, 1], ncy) * ncx + _cell(cl[i, 2], ncx)
    cell_of[i] = k
    nxt[i] = head[k]
    head[k] = i


def _grid_drop(i, head, nxt, cell_of):
    """Cloud ``i`` out of its cell's list (it is no longer near anything)."""
    old = cell_of[i]
    if head[old] == i:
        head[old] = nxt[i]
    else:
        j = head[old]
        while nxt[j] != i:
            j = nxt[j]
        nxt[j] = nxt[i]
    nxt[i] = -1
    cell_of[i] = -1


def _grid_move(i, cl, head, nxt, cell_of, ncy, ncx):
    """Cloud ``i``'s centre changed: into its new cell, where that is another."""
    k = _cell(cl[i, 1], ncy) * ncx + _cell(cl[i, 2], ncx)
    if k == cell_of[i]:
        return
    _grid_drop(i, head, nxt, cell_of)
    cell_of[i] = k
    nxt[i] = head[k]
    head[k] = i


def _near(y, x, cap, reach, cl, head, nxt, ncy, ncx, ids, cand, dd):
    """Rule 2 into ``ids``; how many."""
    r2 = reach * reach
    cnt = 0
    for cy in range(_cell(y - reach, ncy), _cell(y + reach, ncy) + 1):
        for cx in range(_cell(x - reach, ncx), _cell(x + reach, ncx) + 1):
            j = head[cy * ncx + cx]
            while j >= 0:
                dy = cl[j, 1] - y
                dx = cl[j, 2] - x
                d2 = dy * dy + dx * dx
                if d2 < r2:
                    cand[cnt] = j
                    dd[cnt] = d2
                    cnt += 1
                j = nxt[j]
    if cnt > cap:  # the cap nearest, by distance then index, to the front
        for a in range(cap):
            best = a
            for b in range(a + 1, cnt):
                if dd[b] < dd[best] or (dd[b] == dd[best] and cand[b] < cand[best]):
                    best = b
            t = cand[a]
            cand[a] = cand[best]
            cand[best] = t
            u = dd[a]
            dd[a] = dd[best]
            dd[best] = u
        cnt = cap
    for a in range(cnt):  # ascending index
        ids[a] = cand[a]
        b = a
        while b > 0 and ids[b - 1] > ids[b]:
            t = ids[b - 1]
            ids[b - 1] = ids[b]
            ids[b] = t
            b -= 1
    return cnt


def _region(pts, npts, h, w, pr, pc):
    """Rule 3 of places ``pts[:npts]`` into ``(pr, pc)``; how many pixels."""
    rlo = h
    rhi = -1
    clo = w
    chi = -1
    for k in range(npts):
        r = int(math.floor(pts[k, 0]))
        c = int(math.floor(pts[k, 1]))
        rlo = min(rlo, r - 2)
        rhi = max(rhi, r + 2)
        clo = min(clo, c - 2)
        chi = max(chi, c + 2)
    n = 0
    for r in range(max(rlo, 0), min(rhi, h - 1) + 1):
        for c in range(max(clo, 0), min(chi, w - 1) + 1):
            inside = False
            for k in range(npts):
                if (
                    abs(r - int(math.floor(pts[k, 0]))) <= 2
                    and abs(c - int(math.floor(pts[k, 1]))) <= 2
                ):
                    inside = True
                    break
            if inside:
                pr[n] = r
                pc[n] = c
                n += 1
    return n


def _chi2(P, kk, pr, pc, npix, data, wt, width, conf, h, w, cdf, pdf, t0, inv_h, m, jac, sh):
    """Rule 4's chi-square of the clouds ``P[:4 kk]``; fills the model ``m`` and its
    derivatives ``jac`` on the region (nothing where infinite)."""
    inv_sp = 1.0 / conf[_SPREAD]
    for c in range(kk):
        s = P[4 * c + 3]
        y = P[4 * c + 1]
        x = P[4 * c + 2]
        if not (conf[_WMIN] <= s and s <= conf[_WMAX]):
            return math.inf
        if not (-3.0 <= y and y < h + 3.0 and -3.0 <= x and x < w + 3.0):
            return math.inf
        if not (P[4 * c] == P[4 * c]):
            return math.inf
    for q in range(npix):
        m[q] = 0.0
    for c in range(kk):
        a = P[4 * c]
        y = P[4 * c + 1]
        x = P[4 * c + 2]
        s = P[4 * c + 3]
        r0 = int(math.floor(y)) - _FOOT
        c0 = int(math.floor(x)) - _FOOT
        _shares(y, s, r0, cdf, pdf, t0, inv_h, sh, 0)
        _shares(x, s, c0, cdf, pdf, t0, inv_h, sh, 3)
        for q in range(npix):
            i = pr[q] - r0
            j = pc[q] - c0
            if 0 <= i and i < 7 and 0 <= j and j < 7:
                m[q] = m[q] + (a * sh[0, i]) * sh[3, j]
                jac[q, 4 * c] = sh[0, i] * sh[3, j]
                jac[q, 4 * c + 1] = (a * sh[1, i]) * sh[3, j]
                jac[q, 4 * c + 2] = (a * sh[0, i]) * sh[4, j]
                jac[q, 4 * c + 3] = (a * sh[2, i]) * sh[3, j] + (a * sh[0, i]) * sh[5, j]
            else:
                jac[q, 4 * c] = 0.0
                jac[q, 4 * c + 1] = 0.0
                jac[q, 4 * c + 2] = 0.0
                jac[q, 4 * c + 3] = 0.0
    t = 0.0
    for q in range(npix):
        r = data[q] - m[q]
        t = t + (wt[q] * r) * r
    for c in range(kk):
        d = (P[4 * c + 3] - width) * inv_sp
        t = t + d * d
    return t


def _lm(P, kk, pr, pc, npix, data, wt, width, conf, h, w, cdf, pdf, t0, inv_h, ws):
    """Levenberg-Marquardt from ``P`` (changed in place); the final chi-square."""
    m, jac, A, L, g, z, step, trial, sh = ws
    inv_sp = 1.0 / conf[_SPREAD]
    n = 4 * kk
    lam = conf[_LAM0]
    cur = _chi2(P, kk, pr, pc, npix, data, wt, width, conf, h, w, cdf, pdf, t0, inv_h, m, jac, sh)
    if not cur < math.inf:
        return cur
    for _ in range(int(conf[_ITERS])):
        for a in range(n):
            for b in range(a + 1):
                t = 0.0
                for q in range(npix):
                    t = t + (wt[q] * jac[q, a]) * jac[q, b]
                if a == b and a % 4 == 3:
                    t = t + inv_sp * inv_sp
                A[a, b] = t
            t = 0.0
            for q in range(npix):
                t = t + (wt[q] * jac[q, a]) * (data[q] - m[q])
            if a % 4 == 3:
                t = t - ((P[a] - width) * inv_sp) * inv_sp
            g[a] = t
        taken = False
        done = False
        while not taken and not done and lam <= conf[_LAM2]:
            ok = True
            for a in range(n):
                for b in range(a + 1):
                    t = A[a, b]
                    if a == b:
                        t = t + lam * A[a, a]
                    for k in range(b):
                        t = t - L[a, k] * L[b, k]
                    if a == b:
                        if t <= 0.0:
                            ok = False
                            break
                        L[a, a] = math.sqrt(t)
                    else:
                        L[a, b] = t / L[b, b]
                if not ok:
                    break
            if ok:
                for a in range(n):
                    t = g[a]
                    for k in range(a):
                        t = t - L[a, k] * z[k]
                    z[a] = t / L[a, a]
                for a in range(n - 1, -1, -1):
                    t = z[a]
                    for k in range(a + 1, n):
                        t = t - L[k, a] * step[k]
                    step[a] = t / L[a, a]
                for a in range(n):
                    trial[a] = P[a] + step[a]
                new = _chi2(trial, kk, pr, pc, npix, data, wt, width, conf, h, w, cdf, pdf,
                            t0, inv_h, m, jac, sh)  # fmt: skip
                if new < cur:
                    done = cur - new <= conf[_TOL] * cur
                    cur = new
                    for a in range(n):
                        P[a] = trial[a]
                    lam = max(lam * 0.1, conf[_LAM1])
                    taken = True
                else:
                    pred = 0.0
                    for a in range(n):
                        pred = pred + step[a] * g[a]
                    done = pred <= conf[_TOL] * cur
            if not taken and not done:
                lam = lam * 10.0
        if not taken or done:
            break
    return cur


def _fit(ids, ng, P, kk, pts, npts, fr, cl, width, conf, cdf, pdf, t0, inv_h, ws, rs):
    """Rule 4: the clouds ``ids[:ng]`` (as they stand) fitted from ``P[:4 kk]`` (changed
    in place) on the region of ``pts[:npts]``; the chi-square."""
    signal, iv, model = fr
    pr, pc, data, wt = rs
    h, w = signal.shape
    npix = _region(pts, npts, h, w, pr, pc)
    sh = ws[8]
    for q in range(npix):
        data[q] = model[pr[q], pc[q]]
    for k in range(ng):
        i = ids[k]
        r0 = int(math.floor(cl[i, 1])) - _FOOT
        c0 = int(math.floor(cl[i, 2])) - _FOOT
        _shares(cl[i, 1], cl[i, 3], r0, cdf, pdf, t0, inv_h, sh, 0)
        _shares(cl[i, 2], cl[i, 3], c0, cdf, pdf, t0, inv_h, sh, 3)
        for q in range(npix):
            a = pr[q] - r0
            b = pc[q] - c0
            if 0 <= a and a < 7 and 0 <= b and b < 7:
                data[q] = data[q] - (cl[i, 0] * sh[0, a]) * sh[3, b]
    for q in range(npix):
        data[q] = signal[pr[q], pc[q]] - data[q]
        wt[q] = iv[pr[q], pc[q]]
    if kk == 0 or npix <= 4 * kk:
        return _chi2(P, kk, pr, pc, npix, data, wt, width, conf, h, w, cdf, pdf, t0, inv_h,
                     ws[0], ws[1], sh)  # fmt: skip
    return _lm(P, kk, pr, pc, npix, data, wt, width, conf, h, w, cdf, pdf, t0, inv_h, ws)


def _replace(ids, ng, P, kk, n, fr, cl, grid, cdf, pdf, t0, inv_h, sh):
    """The clouds ``ids[:ng]`` become ``P``'s first ``ng``, the rest appended from
    index ``n``; the model follows. Returns the new count of clouds."""
    model = fr[2]
    head, nxt, cell_of, ncy, ncx = grid
    for k in range(ng):
        i = ids[k]
        _draw(model, cl[i, 0], cl[i, 1], cl[i, 2], cl[i, 3], -1, cdf, pdf, t0, inv_h, sh)
    for k in range(kk):
        i = ids[k] if k < ng else n + (k - ng)
        for j in range(4):
            cl[i, j] = P[4 * k + j]
        _draw(model, cl[i, 0], cl[i, 1], cl[i, 2], cl[i, 3], 1, cdf, pdf, t0, inv_h, sh)
        if k < ng:
            _grid_move(i, cl, head, nxt, cell_of, ncy, ncx)
        else:
            _grid_put(i, cl, head, nxt, cell_of, ncy, ncx)
    return n + kk - ng


def _good(P, kk, S, least, conf):
    """Rule 7's tests of fitted clouds ``P`` against their starts ``S``."""
    step = conf[_MAX_STEP]
    for c in range(kk):
        for j in range(4):
            v = P[4 * c + j]
            if not (v - v == 0.0):  # not a number, or infinite
                return False
        if not P[4 * c] > least:
            return False
        if not abs(P[4 * c + 1] - S[4 * c + 1]) < step:
            return False
        if not abs(P[4 * c + 2] - S[4 * c + 2]) < step:
            return False
    m2 = conf[_MERGE] * conf[_MERGE]
    for c in range(kk):
        for d in range(c + 1, kk):
            dy = P[4 * c + 1] - P[4 * d + 1]
            dx = P[4 * c + 2] - P[4 * d + 2]
            if dy * dy + dx * dx <= m2:
                return False
    return True


def _store(P, k, cl, i):
    for j in range(4):
        P[4 * k + j] = cl[i, j]


def _pts_of(ids, ng, cl, pts):
    for k in range(ng):
        pts[k, 0] = cl[ids[k], 1]
        pts[k, 1] = cl[ids[k], 2]


#: The functions the kernel compiles, callees first.
GROUP_FUNCTIONS = (
    "_lookup", "_shares", "_draw", "_cell", "_grid_put", "_grid_drop", "_grid_move", "_near",
    "_region",
    "_chi2", "_lm", "_fit", "_replace", "_good", "_store", "_pts_of",
)  # fmt: skip
