"""Plain Python reference of the cloud fit: one electron or two in a 5 x 5 window.

The specification that the numba kernel (``_fit_kernels.py``) and the C twin
(``native_ref/fit.c``) match bit for bit: every float64 operation below in this
order, no fused multiply-add. :mod:`streamstore.counting.fit` chooses the
windows and turns the fits into events.

Inputs: ``win`` (m, 25), the signal of each window in row-major order (the
event's pixel is entry 12, pixel ``(i, j)`` of the window spans ``[i - 2, i -
1) x [j - 2, j - 1)`` in pixels from the event pixel's top-left corner, so a
cloud centred on the event pixel is at ``(0.5, 0.5)``); ``iv`` (m, 25), the
weight of each pixel (1 / its noise variance, 0 off the frame or masked);
``cdf`` and ``pdf`` (N,), one electron's cloud along one axis tabulated at
``t0 + k / inv_h`` pixels from its centre: the share of the charge before
``t`` and its derivative; ``drop``: the two-cloud fit is made only where the
one-cloud fit leaves more than this chi-square (one per window); ``nb`` (m,
K, 3) and ``nn`` (m,): the clouds ``(a, y, x)`` that other events near the
window's start from, in the window's coordinates, ``nn`` of them.

1. *table*: at ``t``, ``x = (t - t0) * inv_h`` clamped to ``[0, N - 1]``,
   ``k = min(floor(x), N - 2)``, ``f = x - k``; ``cdf(t) = cdf[k] + f *
   (cdf[k + 1] - cdf[k])``, ``pdf`` alike;
2. *cloud*: a cloud ``(a, y, x)`` gives pixel ``(i, j)`` the charge ``(a *
   sy[i]) * sx[j]`` with ``sy[i] = cdf(i - 1 - y) - cdf(i - 2 - y)``, ``sx``
   alike; its derivatives are ``sy[i] * sx[j]`` (by ``a``), ``(a * dy[i]) *
   sx[j]`` (by ``y``), ``(a * sy[i]) * dx[j]`` (by ``x``) with ``dy[i] = -(pdf(i
   - 1 - y) - pdf(i - 2 - y))``; the model of several clouds adds them in order
   to 0; chi-square: ``sum over q of (iv[q] * r) * r``, ``r = win[q] -
   model[q]``, q ascending;
3. *Levenberg-Marquardt*: ``lam = LAM[0]``; at most ``iters`` times: ``A[a,
   b] = sum over q of (iv[q] * J[q, a]) * J[q, b]`` (b <= a), ``g[a] = sum of
   (iv[q] * J[q, a]) * r[q]``; then, until a step is taken or ``lam`` exceeds
   ``LAM[2]`` (the fit ends): the Cholesky factor of ``A`` with ``A[a, a] + lam
   * A[a, a]`` on its diagonal (row by row, ``t = A[a, b] - sum over k < b of
   L[a, k] * L[b, k]``, k ascending; a pivot ``t <= 0`` fails the step),
   forward and back substitution for the step, and the chi-square at the
   stepped parameters; the step is taken where that is lower: ``lam =
   max(lam * 0.1, LAM[1])``, and the fit ends when the chi-square fell by at
   most ``TOL`` of itself; otherwise the fit ends where the step promised at
   most that much (``sum over a of step[a] * g[a]``, a ascending), and ``lam``
   grows tenfold where it did not. The model and its
   derivatives at the parameters are those of the last chi-square taken;
4. *one cloud*: the event's cloud from ``a`` the sum of the positive charge of
   the central 3 x 3 and ``(y, x) = (0.5 + Ty / a, 0.5 + Tx / a)`` its centre of
   mass (``Ty``: the sum of the charge times ``i - 2``, i then j ascending; ``(0,
   0.5, 0.5)`` without charge), then the neighbours' clouds ``nb[:nn]`` (other
   events near enough to reach into the window), all fitted together,
   :data:`ITERS_ONE` iterations;
5. *two clouds*, only where that fit leaves a chi-square above ``drop``: the
   event's cloud ``(a, y, x)`` becomes two, ``(a / 2, y + oy, x + ox)`` and
   ``(a / 2, y - oy, x - ox)``, beside the neighbours' fitted clouds, fitted
   from each start ``(oy, ox)``, :data:`ITERS_TWO` iterations: first the pixel
   ``q`` of greatest residual ``win[q] - model[q]`` of rule 4's fit among those
   of weight above 0 (the first on a tie; ``oy = ((q // 5 - 2) + 0.5) - y``,
   ``ox`` alike: one cloud on that pixel's centre, the other mirrored through
   the event's), then each of :data:`STARTS`; the start of lowest final
   chi-square wins (the first on a tie).

Output (m, 11): rule 4's chi-square, rule 5's (rule 4's where not fitted),
the event's cloud ``(a, y, x)`` of rule 4 and its two clouds ``(a1, y1, x1,
a2, y2, x2)`` of rule 5 (zeros where not fitted).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["ITERS_ONE", "ITERS_TWO", "LAM", "STARTS", "TOL", "fit_windows_reference"]

#: Iterations of the one-cloud and the two-cloud fits at most.
ITERS_ONE = 20
ITERS_TWO = 15
#: Offsets of the two clouds' starts from the one cloud's centre (each cloud
#: one way): along each axis (the diagonals too changed no event in a hundred
#: thousand electrons, and cost twice the time).
STARTS = ((0.6, 0.0), (0.0, 0.6))
#: Levenberg-Marquardt's damping: first, least, and greatest (beyond it the fit ends).
LAM = (0.001, 1e-6, 1e4)
#: A step that lowers the chi-square by at most this fraction of it ends the fit.
TOL = 1e-4


def _lookup(cdf, pdf, t, t0, inv_h):
    """Both tables at ``t`` (rule 1)."""
    n = len(cdf)
    x = (t - t0) * inv_h
    if x < 0.0:
        x = 0.0
    if x > n - 1.0:
        x = n - 1.0
    k = int(math.floor(x))
    if k > n - 2:
        k = n - 2
    f = x - k
    return cdf[k] + f * (cdf[k + 1] - cdf[k]), pdf[k] + f * (pdf[k + 1] - pdf[k])


def _shares(mu, cdf, pdf, t0, inv_h, s, d):
    """Shares of one cloud at ``mu`` in the window's five pixels, and their derivatives."""
    lo_c, lo_p = _lookup(cdf, pdf, -2.0 - mu, t0, inv_h)
    for k in range(5):
        hi_c, hi_p = _lookup(cdf, pdf, (k - 1.0) - mu, t0, inv_h)
        s[k] = hi_c - lo_c
        d[k] = -(hi_p - lo_p)
        lo_c = hi_c
        lo_p = hi_p


def _chi2(p, nc, w, iv, cdf, pdf, t0, inv_h, m, jac) -> float:
    """Fill the model ``m`` and its derivatives ``jac`` at ``p``; its chi-square."""
    sy = [0.0] * 5
    dy = [0.0] * 5
    sx = [0.0] * 5
    dx = [0.0] * 5
    for q in range(25):
        m[q] = 0.0
    for c in range(nc):
        a = p[3 * c]
        _shares(p[3 * c + 1], cdf, pdf, t0, inv_h, sy, dy)
        _shares(p[3 * c + 2], cdf, pdf, t0, inv_h, sx, dx)
        for i in range(5):
            for j in range(5):
                q = 5 * i + j
                m[q] = m[q] + (a * sy[i]) * sx[j]
                jac[q][3 * c] = sy[i] * sx[j]
                jac[q][3 * c + 1] = (a * dy[i]) * sx[j]
                jac[q][3 * c + 2] = (a * sy[i]) * dx[j]
    t = 0.0
    for q in range(25):
        r = w[q] - m[q]
        t = t + (iv[q] * r) * r
    return t


def _lm(p, nc, w, iv, cdf, pdf, t0, inv_h, iters) -> float:
    """Levenberg-Marquardt from ``p`` (changed in place); the final chi-square."""
    n = 3 * nc
    m = [0.0] * 25
    jac = [[0.0] * n for _ in range(25)]
    A = [[0.0] * n for _ in range(n)]
    L = [[0.0] * n for _ in range(n)]
    g = [0.0] * n
    z = [0.0] * n
    step = [0.0] * n
    trial = [0.0] * n
    lam = LAM[0]
    cur = _chi2(p, nc, w, iv, cdf, pdf, t0, inv_h, m, jac)
    for _ in range(iters):
        for a in range(n):
            for b in range(a + 1):
                t = 0.0
                for q in range(25):
                    t = t + (iv[q] * jac[q][a]) * jac[q][b]
                A[a][b] = t
            t = 0.0
            for q in range(25):
                t = t + (iv[q] * jac[q][a]) * (w[q] - m[q])
            g[a] = t
        taken = False
        done = False
        while not taken and not done and lam <= LAM[2]:
            ok = True
            for a in range(n):
                for b in range(a + 1):
                    t = A[a][b]
                    if a == b:
                        t = t + lam * A[a][a]
                    for k in range(b):
                        t = t - L[a][k] * L[b][k]
                    if a == b:
                        if t <= 0.0:
                            ok = False
                            break
                        L[a][a] = math.sqrt(t)
                    else:
                        L[a][b] = t / L[b][b]
                if not ok:
                    break
            if ok:
                for a in range(n):
                    t = g[a]
                    for k in range(a):
                        t = t - L[a][k] * z[k]
                    z[a] = t / L[a][a]
                for a in range(n - 1, -1, -1):
                    t = z[a]
                    for k in range(a + 1, n):
                        t = t - L[k][a] * step[k]
                    step[a] = t / L[a][a]
                for a in range(n):
                    trial[a] = p[a] + step[a]
                new = _chi2(trial, nc, w, iv, cdf, pdf, t0, inv_h, m, jac)
                if new < cur:
                    done = cur - new <= TOL * cur
                    cur = new
                    for a in range(n):
                        p[a] = trial[a]
                    lam = max(lam * 0.1, LAM[1])
                    taken = True
                else:
                    pred = 0.0
                    for a in range(n):
                        pred = pred + step[a] * g[a]
                    done = pred <= TOL * cur
            if not taken and not done:
                lam = lam * 10.0
        if not taken or done:
            break
    return cur


def fit_window(w, iv, nb, drop: float, cdf, pdf, t0: float, inv_h: float) -> list[float]:
    """The eleven numbers of one window (rules 4 and 5); ``nb``: its neighbours'
    starting clouds, a flat list of ``(a, y, x)``."""
    tot = 0.0
    ty = 0.0
    tx = 0.0
    for i in range(1, 4):
        for j in range(1, 4):
            v = w[5 * i + j]
            if v > 0.0:
                tot = tot + v
                ty = ty + v * (i - 2)
                tx = tx + v * (j - 2)
    p1 = [0.0, 0.5, 0.5, *nb]
    if tot > 0.0:
        p1[:3] = [tot, 0.5 + ty / tot, 0.5 + tx / tot]
    k = len(nb) // 3
    one = _lm(p1, 1 + k, w, iv, cdf, pdf, t0, inv_h, ITERS_ONE)
    out = [one, one, *p1[:3], 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    if not one > drop:
        return out
    m = [0.0] * 25
    jac = [[0.0] * (3 + 3 * k) for _ in range(25)]
    _chi2(p1, 1 + k, w, iv, cdf, pdf, t0, inv_h, m, jac)
    top = -math.inf
    ry = 0.0
    rx = 0.0
    for q in range(25):
        if iv[q] > 0.0 and w[q] - m[q] > top:
            top = w[q] - m[q]
            ry = ((q // 5 - 2.0) + 0.5) - p1[1]
            rx = ((q % 5 - 2.0) + 0.5) - p1[2]
    best = math.inf
    for oy, ox in ((ry, rx), *STARTS):
        half = p1[0] * 0.5
        p2 = [half, p1[1] + oy, p1[2] + ox, half, p1[1] - oy, p1[2] - ox, *p1[3:]]
        two = _lm(p2, 2 + k, w, iv, cdf, pdf, t0, inv_h, ITERS_TWO)
        if two < best:
            best = two
            out[1] = two
            out[5:] = p2[:6]
    return out


def fit_windows_reference(
    win: np.ndarray,
    iv: np.ndarray,
    nb: np.ndarray,
    nn: np.ndarray,
    cdf: np.ndarray,
    pdf: np.ndarray,
    t0: float,
    inv_h: float,
    drop: np.ndarray | float,
) -> np.ndarray:
    """Fit each window (the module docstring); (m, 11) float64."""
    win = np.asarray(win, np.float64).reshape(-1, 25)
    m = win.shape[0]
    iv = np.asarray(iv, np.float64).reshape(m, 25)
    nb = np.asarray(nb, np.float64).reshape(m, -1, 3)
    nn = np.asarray(nn, np.int64).reshape(m)
    drop = np.broadcast_to(np.asarray(drop, np.float64), (m,))
    out = np.zeros((m, 11), np.float64)
    cdf_l = [float(v) for v in cdf]
    pdf_l = [float(v) for v in pdf]
    for k in range(m):
        w = [float(v) for v in win[k]]
        wt = [float(v) for v in iv[k]]
        near = [float(v) for v in nb[k, : nn[k]].ravel()]
        out[k] = fit_window(w, wt, near, float(drop[k]), cdf_l, pdf_l, float(t0), float(inv_h))
    return out
