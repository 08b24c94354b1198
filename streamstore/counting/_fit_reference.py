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
one-cloud fit leaves more than this chi-square.

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
   most ``TOL`` of itself; otherwise ``lam`` grows tenfold. The model and its
   derivatives at the parameters are those of the last chi-square taken;
4. *one cloud*: from ``a`` the sum of the positive charge of the central 3 x 3,
   ``(y, x) = (0.5 + Ty / a, 0.5 + Tx / a)`` its centre of mass (``Ty``: the sum
   of the charge times ``i - 2``, i then j ascending; ``(0, 0.5, 0.5)`` without
   charge), :data:`ITERS_ONE` iterations;
5. *two clouds*, only where the one cloud leaves a chi-square above ``drop``:
   from each of :data:`STARTS` ``(oy, ox)``, clouds ``(a / 2, y + oy, x + ox)``
   and ``(a / 2, y - oy, x - ox)`` of the one cloud's fit, :data:`ITERS_TWO`
   iterations; the start of lowest final chi-square wins (the first on a tie).

Output (m, 11): the one cloud's chi-square, the two clouds' (the one cloud's
where they were not fitted), the one cloud ``(a, y, x)`` and the two clouds
``(a1, y1, x1, a2, y2, x2)`` (zeros where not fitted).
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
TOL = 1e-7


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
        while not taken and lam <= LAM[2]:
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
            if not taken:
                lam = lam * 10.0
        if not taken or done:
            break
    return cur


def fit_window(w, iv, cdf, pdf, t0: float, inv_h: float, drop: float) -> list[float]:
    """The eleven numbers of one window (rules 4 and 5)."""
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
    p1 = [0.0, 0.5, 0.5]
    if tot > 0.0:
        p1 = [tot, 0.5 + ty / tot, 0.5 + tx / tot]
    one = _lm(p1, 1, w, iv, cdf, pdf, t0, inv_h, ITERS_ONE)
    out = [one, one, *p1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    if not one > drop:
        return out
    best = math.inf
    for oy, ox in STARTS:
        half = p1[0] * 0.5
        p2 = [half, p1[1] + oy, p1[2] + ox, half, p1[1] - oy, p1[2] - ox]
        two = _lm(p2, 2, w, iv, cdf, pdf, t0, inv_h, ITERS_TWO)
        if two < best:
            best = two
            out[1] = two
            out[5:] = p2
    return out


def fit_windows_reference(
    win: np.ndarray,
    iv: np.ndarray,
    cdf: np.ndarray,
    pdf: np.ndarray,
    t0: float,
    inv_h: float,
    drop: float,
) -> np.ndarray:
    """Fit one and two clouds to each window (the module docstring); (m, 11) float64."""
    win = np.asarray(win, np.float64).reshape(-1, 25)
    iv = np.asarray(iv, np.float64).reshape(-1, 25)
    out = np.zeros((win.shape[0], 11), np.float64)
    cdf_l = [float(v) for v in cdf]
    pdf_l = [float(v) for v in pdf]
    for k in range(win.shape[0]):
        w = [float(v) for v in win[k]]
        wt = [float(v) for v in iv[k]]
        out[k] = fit_window(w, wt, cdf_l, pdf_l, float(t0), float(inv_h), float(drop))
    return out
