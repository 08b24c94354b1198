"""Plain Python reference of the cloud fit: one electron or two in a 5 x 5 window.

The specification that the numba kernel (``_fit_kernels.py``) and the C twin
(``native_ref/fit.c``) match bit for bit: every float64 operation below in this
order, no fused multiply-add. :mod:`streamstore.counting.fit` chooses the
windows and turns the fits into events.

Inputs: ``win`` (m, 25), the signal of each window in row-major order (the
event's pixel is entry 12, pixel ``(i, j)`` of the window spans ``[i - 2, i -
1) x [j - 2, j - 1)`` in pixels from the event pixel's top-left corner, so a
cloud centred on the event pixel is at ``(0.5, 0.5)``); ``iv`` (m, 25), the
weight of each pixel (1 / its noise variance, 0 off the frame or masked); ``nb``
(m, K, 3) and ``nn`` (m,): the clouds ``(a, y, x)`` that other events near the
window start from, in the window's coordinates, ``nn`` of them; ``cdf`` and
``pdf`` (N,): a cloud's profile along one axis, tabulated at ``u = t0 + k /
inv_h`` widths from its centre (the share of the charge before ``u`` and its
derivative); ``width``: the width (pixels) of the neighbours' clouds and the
event's first guess; ``drop`` (m,): the two-cloud fit is made only where the
one-cloud fit leaves more than this chi-square.

1. *table*: at ``u``, ``x = (u - t0) * inv_h`` clamped to ``[0, N - 1]``,
   ``k = min(floor(x), N - 2)``, ``f = x - k``; ``cdf(u) = cdf[k] + f *
   (cdf[k + 1] - cdf[k])``, ``pdf`` alike;
2. *cloud*: a cloud ``(a, y, x)`` of width ``s`` gives pixel ``(i, j)`` the charge
   ``(a * sy[i]) * sx[j]`` with ``sy[i] = cdf(u[i + 1]) - cdf(u[i])``, ``u[e] =
   ((e - 2.0) - y) / s`` for the window's pixel edges ``e = 0 .. 5``, ``sx`` alike; its derivatives
   are ``sy[i] * sx[j]`` (by ``a``), ``(a * dy[i]) * sx[j]`` (by ``y``) and ``(a *
   sy[i]) * dx[j]`` (by ``x``) with ``dy[i] = -(pdf(u[i + 1]) - pdf(u[i])) / s``,
   and by ``s`` ``(a * wy[i]) * sx[j] + (a * sy[i]) * wx[j]`` with ``wy[i] =
   -(pdf(u[i + 1]) * u[i + 1] - pdf(u[i]) * u[i]) / s``. The parameters are the
   event's width ``s`` first, then the event's clouds (one or two, of width
   ``s``), then the neighbours' (of width ``width``); the model adds the clouds
   in that order to 0, the derivative by ``s`` adds the event's clouds' in order
   to 0; chi-square: ``sum over q of (iv[q] * r) * r``, ``r = win[q] -
   model[q]``, q ascending, plus ``d * d``, ``d = (s - width) * (1 /
   WIDTH_SPREAD)`` (the width's prior: one electron's cloud strays little from
   the series'), and infinite (nothing computed) where ``s`` is outside
   :data:`WIDTHS` (or not a number);
3. *Levenberg-Marquardt* over the parameters from ``f`` on (``f = 1``: the
   width held): ``lam = LAM[0]``; at most ``iters`` times: ``A[a, b] = sum over
   q of (iv[q] * J[q, a]) * J[q, b]`` (f <= b <= a), ``g[a] = sum of (iv[q] *
   J[q, a]) * r[q]``, and for the width (``a = 0``) the prior's ``+ (1 /
   WIDTH_SPREAD) * (1 / WIDTH_SPREAD)`` and ``- ((s - width) * (1 /
   WIDTH_SPREAD)) * (1 / WIDTH_SPREAD)``; then, until a step is taken or ``lam`` exceeds
   ``LAM[2]`` (the fit ends): the Cholesky factor of ``A`` with ``A[a, a] + lam
   * A[a, a]`` on its diagonal (row by row, ``t = A[a, b] - sum over f <= k <
   b of L[a, k] * L[b, k]``, k ascending; a pivot ``t <= 0`` fails the step),
   forward and back substitution for the step, and the chi-square at the
   stepped parameters; the step is taken where that is lower: ``lam =
   max(lam * 0.1, LAM[1])``, and the fit ends when the chi-square fell by at
   most ``TOL`` of itself; otherwise the fit ends where the step promised at
   most that much (``sum over a of step[a] * g[a]``, a ascending), and ``lam``
   grows tenfold where it did not. The model and its derivatives at the
   parameters are those of the last chi-square taken;
4. *one cloud*, the width free (``f = 0``): the event's width ``width``, its
   cloud from ``a`` the sum of the positive charge of the central 3 x 3 and ``(y,
   x) = (0.5 + Ty / a, 0.5 + Tx / a)`` its centre of mass (``Ty``: the sum of the
   charge times ``i - 2``, i then j ascending; ``(0, 0.5, 0.5)`` without
   charge), then the neighbours' clouds ``nb[:nn]``, all fitted together,
   :data:`ITERS_ONE` iterations;
5. *two clouds*, the width held at ``width`` (``f = 1``), only where that fit
   leaves a chi-square above ``drop``: the event's cloud ``(a, y, x)`` as two, ``(a / 2, y
   + oy, x + ox)`` and ``(a / 2, y - oy, x - ox)``, beside the neighbours' fitted
   clouds, fitted from each start ``(oy, ox)``, :data:`ITERS_TWO` iterations:
   first the pixel ``q`` of greatest residual ``win[q] - model[q]`` of rule 4's
   fit among those of weight above 0 (the first on a tie; ``oy = ((q // 5 - 2)
   + 0.5) - y``, ``ox`` alike: one cloud on that pixel's centre, the other
   mirrored through the event's), then each of :data:`STARTS`; the start of
   lowest final chi-square wins (the first on a tie). A single electron wider
   than the series' is one wide cloud, not two narrow ones: its one-cloud fit
   has that freedom, the two clouds do not.

Output (m, 13): rule 4's chi-square, rule 5's (rule 4's where not fitted),
the event's cloud ``(a, y, x)`` of rule 4, its two clouds ``(a1, y1, x1, a2,
y2, x2)`` of rule 5 (zeros where not fitted), and the event's width in rule 4
and in rule 5 (0 where not fitted).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "neighbours_reference",
    "window_pixels_reference",
    "ITERS_ONE",
    "ITERS_TWO",
    "LAM",
    "STARTS",
    "TOL",
    "WIDTHS",
    "WIDTH_SPREAD",
    "fit_conf",
    "fit_inputs",
    "fit_windows_reference",
]

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
#: The event's cloud width (pixels) stays within these; a step beyond fails.
WIDTHS = (0.1, 2.5)
#: How far (pixels, one sigma) an event's width strays from the series' at a chi-square of 1.
WIDTH_SPREAD = 0.1


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


def _shares(mu, sw, cdf, pdf, t0, inv_h, s, d, dw) -> None:
    """Shares of a cloud of width ``sw`` at ``mu`` in the window's five pixels, and
    their derivatives by ``mu`` and by ``sw`` (rule 2)."""
    lo_u = (-2.0 - mu) / sw
    lo_c, lo_p = _lookup(cdf, pdf, lo_u, t0, inv_h)
    for k in range(5):
        u = ((k - 1.0) - mu) / sw
        hi_c, hi_p = _lookup(cdf, pdf, u, t0, inv_h)
        s[k] = hi_c - lo_c
        d[k] = -(hi_p - lo_p) / sw
        dw[k] = -(hi_p * u - lo_p * lo_u) / sw
        lo_c = hi_c
        lo_p = hi_p
        lo_u = u


def _chi2(p, ne, nc, w, iv, tab, m, jac) -> float:
    """Fill the model ``m`` and its derivatives ``jac`` at ``p``; its chi-square
    (infinite, and nothing filled, where the event's width leaves :data:`WIDTHS`)."""
    cdf, pdf, t0, inv_h, s0 = tab
    if not (WIDTHS[0] <= p[0] <= WIDTHS[1]):
        return math.inf
    sy = [0.0] * 5
    dy = [0.0] * 5
    wy = [0.0] * 5
    sx = [0.0] * 5
    dx = [0.0] * 5
    wx = [0.0] * 5
    for q in range(25):
        m[q] = 0.0
        jac[q][0] = 0.0
    for c in range(nc):
        a = p[1 + 3 * c]
        sw = p[0] if c < ne else s0
        _shares(p[2 + 3 * c], sw, cdf, pdf, t0, inv_h, sy, dy, wy)
        _shares(p[3 + 3 * c], sw, cdf, pdf, t0, inv_h, sx, dx, wx)
        for i in range(5):
            for j in range(5):
                q = 5 * i + j
                m[q] = m[q] + (a * sy[i]) * sx[j]
                jac[q][1 + 3 * c] = sy[i] * sx[j]
                jac[q][2 + 3 * c] = (a * dy[i]) * sx[j]
                jac[q][3 + 3 * c] = (a * sy[i]) * dx[j]
                if c < ne:
                    jac[q][0] = jac[q][0] + ((a * wy[i]) * sx[j] + (a * sy[i]) * wx[j])
    t = 0.0
    for q in range(25):
        r = w[q] - m[q]
        t = t + (iv[q] * r) * r
    d = (p[0] - s0) * (1.0 / WIDTH_SPREAD)
    return t + d * d


def _lm(p, ne, nc, w, iv, tab, iters, f) -> float:
    """Levenberg-Marquardt from ``p`` (changed in place) over its parameters ``f``
    onwards (``f = 1``: the width held); the final chi-square."""
    n = 1 + 3 * nc
    m = [0.0] * 25
    jac = [[0.0] * n for _ in range(25)]
    A = [[0.0] * n for _ in range(n)]
    L = [[0.0] * n for _ in range(n)]
    g = [0.0] * n
    z = [0.0] * n
    step = [0.0] * n
    trial = [0.0] * n
    lam = LAM[0]
    cur = _chi2(p, ne, nc, w, iv, tab, m, jac)
    for a in range(f):
        trial[a] = p[a]
    for _ in range(iters):
        for a in range(f, n):
            for b in range(f, a + 1):
                t = 0.0
                for q in range(25):
                    t = t + (iv[q] * jac[q][a]) * jac[q][b]
                if a == 0:
                    t = t + (1.0 / WIDTH_SPREAD) * (1.0 / WIDTH_SPREAD)
                A[a][b] = t
            t = 0.0
            for q in range(25):
                t = t + (iv[q] * jac[q][a]) * (w[q] - m[q])
            if a == 0:
                t = t - ((p[0] - tab[4]) * (1.0 / WIDTH_SPREAD)) * (1.0 / WIDTH_SPREAD)
            g[a] = t
        taken = False
        done = False
        while not taken and not done and lam <= LAM[2]:
            ok = True
            for a in range(f, n):
                for b in range(f, a + 1):
                    t = A[a][b]
                    if a == b:
                        t = t + lam * A[a][a]
                    for k in range(f, b):
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
                for a in range(f, n):
                    t = g[a]
                    for k in range(f, a):
                        t = t - L[a][k] * z[k]
                    z[a] = t / L[a][a]
                for a in range(n - 1, f - 1, -1):
                    t = z[a]
                    for k in range(a + 1, n):
                        t = t - L[k][a] * step[k]
                    step[a] = t / L[a][a]
                for a in range(f, n):
                    trial[a] = p[a] + step[a]
                new = _chi2(trial, ne, nc, w, iv, tab, m, jac)
                if new < cur:
                    done = cur - new <= TOL * cur
                    cur = new
                    for a in range(f, n):
                        p[a] = trial[a]
                    lam = max(lam * 0.1, LAM[1])
                    taken = True
                else:
                    pred = 0.0
                    for a in range(f, n):
                        pred = pred + step[a] * g[a]
                    done = pred <= TOL * cur
            if not taken and not done:
                lam = lam * 10.0
        if not taken or done:
            break
    return cur


def fit_window(w, iv, nb, drop: float, tab) -> list[float]:
    """The thirteen numbers of one window (rules 4 and 5); ``nb``: its neighbours'
    starting clouds, a flat list of ``(a, y, x)``; ``tab``: ``(cdf, pdf, t0,
    inv_h, width)``."""
    s0 = tab[4]
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
    p1 = [s0, 0.0, 0.5, 0.5, *nb]
    if tot > 0.0:
        p1[1:4] = [tot, 0.5 + ty / tot, 0.5 + tx / tot]
    k = len(nb) // 3
    one = _lm(p1, 1, 1 + k, w, iv, tab, ITERS_ONE, 0)
    out = [one, one, *p1[1:4], 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, p1[0], 0.0]
    if not one > drop:
        return out
    m = [0.0] * 25
    jac = [[0.0] * (4 + 3 * k) for _ in range(25)]
    _chi2(p1, 1, 1 + k, w, iv, tab, m, jac)
    top = -math.inf
    ry = 0.0
    rx = 0.0
    for q in range(25):
        if iv[q] > 0.0 and w[q] - m[q] > top:
            top = w[q] - m[q]
            ry = ((q // 5 - 2.0) + 0.5) - p1[2]
            rx = ((q % 5 - 2.0) + 0.5) - p1[3]
    best = math.inf
    for oy, ox in ((ry, rx), *STARTS):
        half = p1[1] * 0.5
        p2 = [s0, half, p1[2] + oy, p1[3] + ox, half, p1[2] - oy, p1[3] - ox, *p1[4:]]
        two = _lm(p2, 2, 2 + k, w, iv, tab, ITERS_TWO, 1)
        if two < best:
            best = two
            out[1] = two
            out[5:11] = p2[1:7]
            out[12] = p2[0]
    return out


def fit_conf() -> np.ndarray:
    """The constants above as the compiled forms take them: ``[ITERS_ONE, ITERS_TWO,
    *LAM, TOL, *WIDTHS, 1 / WIDTH_SPREAD]``, float64."""
    return np.array([ITERS_ONE, ITERS_TWO, *LAM, TOL, *WIDTHS, 1.0 / WIDTH_SPREAD], np.float64)


def fit_inputs(win, iv, nb, nn, cdf, pdf, drop) -> tuple[np.ndarray, ...]:
    """The fit's arrays as every form reads them, C-contiguous: ``win`` and ``iv``
    (m, 25) float64, ``nb`` (m, K, 3) float64, ``nn`` (m,) int64, the tables, and
    ``drop`` (m,) float64 (a number: the same for every window)."""
    win = np.ascontiguousarray(win, np.float64).reshape(-1, 25)
    m = win.shape[0]
    iv = np.ascontiguousarray(iv, np.float64)
    if iv.shape != win.shape:
        raise ValueError(f"iv has shape {iv.shape}, expected {win.shape}")
    nb = np.ascontiguousarray(nb, np.float64).reshape(m, -1, 3)
    nn = np.ascontiguousarray(nn, np.int64).reshape(m)
    if nn.size and (nn.min() < 0 or nn.max() > nb.shape[1]):
        raise ValueError(f"nn must lie in 0..{nb.shape[1]}")
    cdf = np.ascontiguousarray(cdf, np.float64)
    pdf = np.ascontiguousarray(pdf, np.float64)
    if cdf.shape != pdf.shape or cdf.ndim != 1 or cdf.size < 2:
        raise ValueError("cdf and pdf must be one-dimensional tables of one size (2 or more)")
    # a writable copy always: a read-only array is another type to numba (a second
    # compile of the fit), and a view of one number over one window is read-only
    drop = np.broadcast_to(np.asarray(drop, np.float64), (m,)).copy()
    return win, iv, nb, nn, cdf, pdf, drop


def fit_windows_reference(
    win: np.ndarray,
    iv: np.ndarray,
    nb: np.ndarray,
    nn: np.ndarray,
    cdf: np.ndarray,
    pdf: np.ndarray,
    t0: float,
    inv_h: float,
    width: float,
    drop: np.ndarray | float,
) -> np.ndarray:
    """Fit each window (the module docstring); (m, 13) float64."""
    win, iv, nb, nn, cdf, pdf, drop = fit_inputs(win, iv, nb, nn, cdf, pdf, drop)
    m = win.shape[0]
    out = np.zeros((m, 13), np.float64)
    tab = ([float(v) for v in cdf], [float(v) for v in pdf], float(t0), float(inv_h), float(width))
    for k in range(m):
        w = [float(v) for v in win[k]]
        wt = [float(v) for v in iv[k]]
        near = [float(v) for v in nb[k, : nn[k]].ravel()]
        out[k] = fit_window(w, wt, near, float(drop[k]), tab)
    return out


def window_pixels_reference(
    frames: np.ndarray,
    dark: np.ndarray,
    gain: np.ndarray | None,
    iv_map: np.ndarray,
    frame_of: np.ndarray,
    r: np.ndarray,
    c: np.ndarray,
    model_error: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 5 x 5 windows around the events ``(frame_of, r, c)`` of ``frames (n, H, W)``:
    ``(charge, win, wiv)``, as :func:`streamstore.counting.fit.event_windows` returns
    them. Pixel ``q`` of a window is at ``(r + q // 5 - 2, c + q % 5 - 2)``; its signal
    ``(frame - dark) * gain`` in int64, 0 off the frame and where ``iv_map`` is 0
    (masked); its weight ``iv / (1 + iv * err * err)`` with ``err = model_error *
    max(s, 0)`` in float64 in this order; ``charge`` the sum of the signals of the
    3 x 3 at the window's centre."""
    n, h, w = frames.shape
    hw = h * w
    m = r.size
    flat_frames = frames.reshape(n, hw)
    dark_flat = dark.reshape(hw).astype(np.int64)
    gain_flat = None if gain is None else gain.reshape(hw).astype(np.int64)
    iv_flat = iv_map.reshape(hw)
    win = np.zeros((m, 25), np.float64)
    wiv = np.zeros((m, 25), np.float64)
    charge = np.zeros(m, np.int64)
    for q in range(25):
        dy, dx = q // 5 - 2, q % 5 - 2
        rr, cc = r + dy, c + dx
        inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        p = np.where(inside, rr * w + cc, 0)
        s = flat_frames[frame_of, p].astype(np.int64) - dark_flat[p]
        if gain_flat is not None:
            s *= gain_flat[p]
        weight = np.where(inside, iv_flat[p], 0.0)
        s = np.where(weight > 0, s, 0)  # masked and off-frame pixels hold no charge
        # the model's own error, a share of the charge, adds to the noise variance
        err = model_error * np.maximum(s, 0)
        weight = weight / (1.0 + weight * err * err)
        win[:, q] = s
        wiv[:, q] = weight
        if abs(dy) <= 1 and abs(dx) <= 1:
            charge += s
    return charge, win, wiv


def neighbours_reference(
    key: np.ndarray,
    r: np.ndarray,
    c: np.ndarray,
    charge: np.ndarray,
    h: int,
    w: int,
    reach: int,
    most: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The other events fitted beside each event: ``(nb, nn, alone)`` as
    :func:`streamstore.counting.fit.event_windows` returns them. ``key`` is each
    event's ``frame * h * w + pixel``, ascending; ``(r, c)`` its pixel; ``charge`` its
    3 x 3 charge. The events within Chebyshev distance ``reach`` in the same frame
    (no two events are 8-adjacent, so a row of ``2 reach + 1`` pixels holds ``reach +
    1`` at most), the nearest ``most`` of them by Chebyshev then Euclidean distance
    then list position; ``nb[i, j]`` their charge (at least 0) and centre ``(dr +
    0.5, dc + 0.5)`` from the event's pixel's corner, zero where fewer; ``alone``:
    none within reach."""
    m = key.size
    hw = h * w
    frame_base = key // hw * hw
    found: list[np.ndarray] = []
    left, right = np.maximum(c - reach, 0), np.minimum(c + reach, w - 1)
    for dy in range(-reach, reach + 1):
        rr = r + dy
        inside = (rr >= 0) & (rr < h)
        base = frame_base + rr * w
        lo = np.searchsorted(key, base + left, "left")
        hi = np.where(inside, np.searchsorted(key, base + right, "right"), lo)
        for j in range(reach + 1):
            at = lo + j
            found.append(np.where((at < hi) & (at != np.arange(m)), at, -1))
    cand = np.stack(found, 1) if found else np.zeros((m, 0), np.int64)
    ok = cand >= 0
    safe = np.where(ok, cand, 0)
    dr, dc = r[safe] - r[:, None], c[safe] - c[:, None]
    order_key = np.where(
        ok, (np.maximum(abs(dr), abs(dc)) * 64 + dr * dr + dc * dc) * 2**36 + cand, 2**62
    )
    pick = np.argsort(order_key, axis=1, kind="stable")[:, :most]
    chosen = np.take_along_axis(cand, pick, 1)
    nn = (chosen >= 0).sum(1).astype(np.int64)
    safe = np.where(chosen >= 0, chosen, 0)
    nb = np.zeros((m, most, 3), np.float64)
    nb[:, :, 0] = np.maximum(charge[safe], 0)
    nb[:, :, 1] = r[safe] - r[:, None] + 0.5
    nb[:, :, 2] = c[safe] - c[:, None] + 0.5
    nb[chosen < 0] = 0.0
    alone = ok.sum(1) == 0
    return nb, nn, alone
