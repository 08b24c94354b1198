"""numba kernels of the cloud fit and of its inputs; ``_fit_reference.py`` is their
specification. The inputs (each event's 5 x 5 window, :func:`window_pixels`, and the
events fitted beside it, :func:`neighbours`) are cut event by event instead of by
numpy's gathers over every event (1.2 s -> 0.3 s for the 226,000 events of a full
frame at 0.01 e/px/frame); the C twins are in ``native_ref/fit.c``.

The same float64 operations in the same order as the reference (numba does not
fuse multiply-adds without fastmath), on work arrays allocated once per block
of windows. Windows are independent, so blocks of them run on a thread pool and
the result does not depend on the thread count.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import njit

from streamstore._numba_cache import compiling_alone, serialize_saves
from streamstore.counting._fit_reference import STARTS, fit_conf, fit_inputs

__all__ = ["fit_windows", "neighbours", "window_pixels"]

_OPTS = {"nogil": True, "cache": True, "error_model": "numpy", "boundscheck": False}
_STARTS = np.array(STARTS, np.float64)
# the reference's constants travel as arguments: numba's cache keys on this file only
_CONF = fit_conf()
_BLOCK = 256  # windows a pool task fits
_pool: ThreadPoolExecutor | None = None
_ran = False


@njit(**_OPTS)
def _lookup(cdf, pdf, t, t0, inv_h):
    """Both tables at ``t`` (rule 1)."""
    n = cdf.shape[0]
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


@njit(**_OPTS)
def _shares(mu, sw, cdf, pdf, t0, inv_h, sh, row):
    # rows row, row + 1, row + 2 of sh: the shares, their derivatives by mu and by sw
    lo_u = (-2.0 - mu) / sw
    lo_c, lo_p = _lookup(cdf, pdf, lo_u, t0, inv_h)
    for k in range(5):
        u = ((k - 1.0) - mu) / sw
        hi_c, hi_p = _lookup(cdf, pdf, u, t0, inv_h)
        sh[row, k] = hi_c - lo_c
        sh[row + 1, k] = -(hi_p - lo_p) / sw
        sh[row + 2, k] = -(hi_p * u - lo_p * lo_u) / sw
        lo_c = hi_c
        lo_p = hi_p
        lo_u = u


@njit(**_OPTS)
def _chi2(p, ne, nc, w, iv, cdf, pdf, t0, inv_h, s0, wmin, wmax, inv_sw, m, jac, sh):
    if not (wmin <= p[0] and p[0] <= wmax):
        return math.inf
    for q in range(25):
        m[q] = 0.0
        jac[q, 0] = 0.0
    for c in range(nc):
        a = p[1 + 3 * c]
        sw = p[0] if c < ne else s0
        _shares(p[2 + 3 * c], sw, cdf, pdf, t0, inv_h, sh, 0)
        _shares(p[3 + 3 * c], sw, cdf, pdf, t0, inv_h, sh, 3)
        for i in range(5):
            syi = sh[0, i]
            dyi = sh[1, i]
            wyi = sh[2, i]
            for j in range(5):
                q = 5 * i + j
                m[q] = m[q] + (a * syi) * sh[3, j]
                jac[q, 1 + 3 * c] = syi * sh[3, j]
                jac[q, 2 + 3 * c] = (a * dyi) * sh[3, j]
                jac[q, 3 + 3 * c] = (a * syi) * sh[4, j]
                if c < ne:
                    jac[q, 0] = jac[q, 0] + ((a * wyi) * sh[3, j] + (a * syi) * sh[5, j])
    t = 0.0
    for q in range(25):
        r = w[q] - m[q]
        t = t + (iv[q] * r) * r
    d = (p[0] - s0) * inv_sw
    return t + d * d


@njit(**_OPTS)
def _lm(p, ne, nc, w, iv, cdf, pdf, t0, inv_h, s0, iters, f, conf, ws):
    m, jac, A, L, vec, sh = ws
    g, z, step, trial = vec[0], vec[1], vec[2], vec[3]
    lam0, lam_min, lam_max, tol, wmin, wmax = conf[2], conf[3], conf[4], conf[5], conf[6], conf[7]
    inv_sw = conf[8]
    n = 1 + 3 * nc
    lam = lam0
    cur = _chi2(p, ne, nc, w, iv, cdf, pdf, t0, inv_h, s0, wmin, wmax, inv_sw, m, jac, sh)
    for a in range(f):
        trial[a] = p[a]
    for _ in range(iters):
        for a in range(f, n):
            for b in range(f, a + 1):
                t = 0.0
                for q in range(25):
                    t = t + (iv[q] * jac[q, a]) * jac[q, b]
                if a == 0:
                    t = t + inv_sw * inv_sw
                A[a, b] = t
            t = 0.0
            for q in range(25):
                t = t + (iv[q] * jac[q, a]) * (w[q] - m[q])
            if a == 0:
                t = t - ((p[0] - s0) * inv_sw) * inv_sw
            g[a] = t
        taken = False
        done = False
        while not taken and not done and lam <= lam_max:
            ok = True
            for a in range(f, n):
                for b in range(f, a + 1):
                    t = A[a, b]
                    if a == b:
                        t = t + lam * A[a, a]
                    for k in range(f, b):
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
                for a in range(f, n):
                    t = g[a]
                    for k in range(f, a):
                        t = t - L[a, k] * z[k]
                    z[a] = t / L[a, a]
                for a in range(n - 1, f - 1, -1):
                    t = z[a]
                    for k in range(a + 1, n):
                        t = t - L[k, a] * step[k]
                    step[a] = t / L[a, a]
                for a in range(f, n):
                    trial[a] = p[a] + step[a]
                new = _chi2(
                    trial, ne, nc, w, iv, cdf, pdf, t0, inv_h, s0, wmin, wmax, inv_sw, m, jac, sh
                )
                if new < cur:
                    done = cur - new <= tol * cur
                    cur = new
                    for a in range(f, n):
                        p[a] = trial[a]
                    lam = max(lam * 0.1, lam_min)
                    taken = True
                else:
                    pred = 0.0
                    for a in range(f, n):
                        pred = pred + step[a] * g[a]
                    done = pred <= tol * cur
            if not taken and not done:
                lam = lam * 10.0
        if not taken or done:
            break
    return cur


@njit(**_OPTS)
def _fit_block(win, iv, nb, nn, cdf, pdf, t0, inv_h, s0, drop, starts, conf, out, lo, hi):
    iters1, iters2 = int(conf[0]), int(conf[1])
    wmin, wmax = conf[6], conf[7]
    most = 1 + 3 * (2 + nb.shape[1])
    ws = (
        np.empty(25),
        np.empty((25, most)),
        np.empty((most, most)),
        np.empty((most, most)),
        np.empty((4, most)),
        np.empty((6, 5)),  # one cloud's shares and derivatives, y rows 0-2, x rows 3-5
    )
    p1 = np.empty(most)
    p2 = np.empty(most)
    for k in range(lo, hi):
        w = win[k]
        wt = iv[k]
        n_nb = nn[k]
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
        p1[0] = s0
        p1[1] = 0.0
        p1[2] = 0.5
        p1[3] = 0.5
        if tot > 0.0:
            p1[1] = tot
            p1[2] = 0.5 + ty / tot
            p1[3] = 0.5 + tx / tot
        for b in range(n_nb):
            for a in range(3):
                p1[4 + 3 * b + a] = nb[k, b, a]
        one = _lm(p1, 1, 1 + n_nb, w, wt, cdf, pdf, t0, inv_h, s0, iters1, 0, conf, ws)
        out[k, 0] = one
        out[k, 1] = one
        for a in range(3):
            out[k, 2 + a] = p1[1 + a]
        for a in range(5, 11):
            out[k, a] = 0.0
        out[k, 11] = p1[0]
        out[k, 12] = 0.0
        if not one > drop[k]:
            continue
        # the first start puts a cloud on the pixel the fit leaves most charge in,
        # the other mirrored through the event's cloud's centre
        m_one = ws[0]
        _chi2(
            p1, 1, 1 + n_nb, w, wt, cdf, pdf, t0, inv_h, s0, wmin, wmax, conf[8], m_one, ws[1],
            ws[5],
        )  # fmt: skip
        top = -math.inf
        ry = 0.0
        rx = 0.0
        for q in range(25):
            if wt[q] > 0.0 and w[q] - m_one[q] > top:
                top = w[q] - m_one[q]
                ry = ((q // 5 - 2.0) + 0.5) - p1[2]
                rx = ((q % 5 - 2.0) + 0.5) - p1[3]
        best = math.inf
        for s in range(-1, starts.shape[0]):
            if s < 0:
                oy = ry
                ox = rx
            else:
                oy = starts[s, 0]
                ox = starts[s, 1]
            half = p1[1] * 0.5
            p2[0] = s0
            p2[1] = half
            p2[2] = p1[2] + oy
            p2[3] = p1[3] + ox
            p2[4] = half
            p2[5] = p1[2] - oy
            p2[6] = p1[3] - ox
            for a in range(3 * n_nb):
                p2[7 + a] = p1[4 + a]
            two = _lm(p2, 2, 2 + n_nb, w, wt, cdf, pdf, t0, inv_h, s0, iters2, 1, conf, ws)
            if two < best:
                best = two
                out[k, 1] = two
                for a in range(6):
                    out[k, 5 + a] = p2[1 + a]
                out[k, 12] = p2[0]


def fit_windows(
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
    threads: int | None = None,
) -> np.ndarray:
    """numba form of :func:`~streamstore.counting._fit_reference.fit_windows_reference`
    (same inputs, plus ``threads``: None is numba's thread count); (m, 13) float64."""
    global _pool, _ran
    win, iv, nb, nn, cdf, pdf, drop = fit_inputs(win, iv, nb, nn, cdf, pdf, drop)
    m = win.shape[0]
    out = np.zeros((m, 13), np.float64)
    if m == 0:
        return out
    args = (win, iv, nb, nn, cdf, pdf, float(t0), float(inv_h), float(width), drop, _STARTS, _CONF,
            out)  # fmt: skip
    first = 0
    if not _ran:  # compiled (or loaded) once under the cache's lock
        with compiling_alone(_fit_block):
            first = min(m, _BLOCK)
            _fit_block(*args, 0, first)
        _ran = True
    k = numba.config.NUMBA_NUM_THREADS if threads is None else int(threads)
    blocks = [(s, min(m, s + _BLOCK)) for s in range(first, m, _BLOCK)]
    if k <= 1 or len(blocks) <= 1:
        for lo, hi in blocks:
            _fit_block(*args, lo, hi)
        return out
    if _pool is None:
        _pool = ThreadPoolExecutor(
            max_workers=numba.config.NUMBA_NUM_THREADS, thread_name_prefix="streamstore-fit"
        )
    # at most k blocks in flight: the caller's thread count holds
    for start in range(0, len(blocks), k):
        list(_pool.map(lambda b: _fit_block(*args, *b), blocks[start : start + k]))
    return out


@njit(**_OPTS)
def _window_pixels(frames, dark, gain, has_gain, iv_map, frame_of, r, c, model_error, win, wiv,
                   charge):  # fmt: skip
    n, h, w = frames.shape
    for i in range(r.size):
        f = frame_of[i]
        total = np.int64(0)
        for q in range(25):
            dy = q // 5 - 2
            dx = q % 5 - 2
            rr = r[i] + dy
            cc = c[i] + dx
            if rr < 0 or rr >= h or cc < 0 or cc >= w or not iv_map[rr, cc] > 0:
                continue  # off the frame or masked: no charge, no weight
            s = np.int64(frames[f, rr, cc]) - np.int64(dark[rr, cc])
            if has_gain:
                s *= np.int64(gain[rr, cc])
            weight = iv_map[rr, cc]
            err = model_error * np.float64(max(s, 0))
            win[i, q] = s
            wiv[i, q] = weight / (1.0 + weight * err * err)
            if -1 <= dy <= 1 and -1 <= dx <= 1:
                total += s
        charge[i] = total


def window_pixels(
    frames: np.ndarray,
    dark: np.ndarray,
    gain: np.ndarray | None,
    iv_map: np.ndarray,
    frame_of: np.ndarray,
    r: np.ndarray,
    c: np.ndarray,
    model_error: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numba form of :func:`~streamstore.counting._fit_reference.window_pixels_reference`
    (the same arguments and results): one pass over the events, each window's 25
    pixels read where they lie instead of 25 gathers over every event."""
    m = r.size
    win = np.zeros((m, 25), np.float64)
    wiv = np.zeros((m, 25), np.float64)
    charge = np.zeros(m, np.int64)
    if m:
        g = np.ones((1, 1), np.int64) if gain is None else gain
        _window_pixels(
            frames, dark, g, gain is not None, np.ascontiguousarray(iv_map, np.float64),
            frame_of.astype(np.int64), r.astype(np.int64), c.astype(np.int64),
            float(model_error), win, wiv, charge,
        )  # fmt: skip
    return charge, win, wiv


@njit(**_OPTS)
def _neighbours(key, r, c, charge, h, w, reach, most, nb, nn, alone):
    hw = h * w
    ck = np.empty((2 * reach + 1) * (reach + 1), np.int64)  # order keys found
    ci = np.empty_like(ck)  # their events
    for i in range(key.size):
        base0 = key[i] // hw * hw
        left = max(c[i] - reach, 0)
        right = min(c[i] + reach, w - 1)
        k = 0
        for dy in range(-reach, reach + 1):
            rr = r[i] + dy
            if rr < 0 or rr >= h:
                continue
            base = base0 + rr * w
            lo = np.searchsorted(key, base + left, "left")
            hi = np.searchsorted(key, base + right, "right")
            for j in range(reach + 1):
                at = lo + j
                if at < hi and at != i:
                    dr = r[at] - r[i]
                    dc = c[at] - c[i]
                    ck[k] = (max(abs(dr), abs(dc)) * 64 + dr * dr + dc * dc) * 2**36 + at
                    ci[k] = at
                    k += 1
        alone[i] = k == 0
        nn[i] = min(most, k)
        for s in range(nn[i]):  # the nearest first: a selection of the least keys
            b = s
            for t in range(s + 1, k):
                if ck[t] < ck[b]:
                    b = t
            ck[s], ck[b] = ck[b], ck[s]
            ci[s], ci[b] = ci[b], ci[s]
            at = ci[s]
            nb[i, s, 0] = max(charge[at], 0)
            nb[i, s, 1] = r[at] - r[i] + 0.5
            nb[i, s, 2] = c[at] - c[i] + 0.5


def neighbours(
    key: np.ndarray,
    r: np.ndarray,
    c: np.ndarray,
    charge: np.ndarray,
    h: int,
    w: int,
    reach: int,
    most: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numba form of :func:`~streamstore.counting._fit_reference.neighbours_reference`
    (the same arguments and results), event by event."""
    m = key.size
    nb = np.zeros((m, most, 3), np.float64)
    nn = np.zeros(m, np.int64)
    alone = np.zeros(m, np.bool_)
    if m:
        _neighbours(
            key.astype(np.int64), r.astype(np.int64), c.astype(np.int64),
            charge.astype(np.int64), int(h), int(w), int(reach), int(most), nb, nn, alone,
        )  # fmt: skip
    return nb, nn, alone


# several processes may compile at once (streamstore._numba_cache)
serialize_saves(_lookup, _shares, _chi2, _lm, _fit_block, _window_pixels, _neighbours)
