"""Plain numpy references of the data-only dark estimator's per-frame pass and fold.

The specification the numba kernels of :mod:`._dark_kernels` must match
(parity tests in ``tests/counting/test_dark_estimate.py``); what they compute
and why is in :mod:`streamstore.counting.dark_estimate`, which uses them for
``implementation="numpy"``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamstore.counting._dark_kernels import (
    _MAX_STEP,
    LOST_SHARE,
    LOW_HOT,
    NOISE_PRIOR,
    RESET_Z,
    TAU2_MAX,
)

__all__ = ["accumulate_numpy", "fold_numpy", "noise_numpy"]


def _near(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` grown by ``radius`` pixels (Chebyshev distance)."""
    out = mask.copy()
    for _ in range(radius):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        out = grown.copy()
        out[:, 1:] |= grown[:, :-1]
        out[:, :-1] |= grown[:, 1:]
    return out


def accumulate_numpy(
    frame: np.ndarray,
    centre: np.ndarray,
    s1: np.ndarray,
    s2: np.ndarray,
    n: np.ndarray,
    above: np.ndarray,
    below: np.ndarray,
    low: np.ndarray,
    edges: tuple[float, float, float, float, float],
    radius: int,
) -> None:
    """Add one frame to the window sums (the definition :func:`_accumulate_rows` equals).

    ``edges = (lo, hi, hit, block, sink)`` in ADU about the centre: values in
    ``[-lo, hi]`` join ``s1``, ``s2`` and ``n`` unless within ``radius`` pixels of
    a hit, which are left out: a value above ``hit``, or any of the four pixels of
    a 2 x 2 block whose sum is above ``block``. ``above`` counts the values above
    the window and ``below`` those below it (saturating at 255), left out or not:
    a pixel whose centre sits far from its values would otherwise leave itself
    out of every frame (a patch of such pixels fires its blocks); ``low`` counts
    values below ``-sink`` (saturating at 255).
    """
    lo, hi, hit, block, sink = (np.float32(e) for e in edges)
    r = frame.astype(np.float32)
    r -= centre
    pair = r[:-1] + r[1:]  # vertical pairs, then their horizontal neighbours: the blocks
    fired = (pair[:, :-1] + pair[:, 1:]) > block
    hits = r > hit
    hits[:-1, :-1] |= fired
    hits[1:, :-1] |= fired
    hits[:-1, 1:] |= fired
    hits[1:, 1:] |= fired
    keep = ~_near(hits, radius)
    inside = (r >= -lo) & (r <= hi) & keep
    above += (r > hi).astype(np.uint16)
    below += ((r < -lo) & (below < 255)).astype(np.uint8)
    sank = (r < -sink) & (low < 255)
    low += sank.astype(np.uint8)
    np.multiply(r, inside, out=r)
    s1 += r
    r *= r
    s2 += r
    n += inside.astype(np.uint16)


def fold_numpy(
    centre: np.ndarray,
    s1: np.ndarray,
    s2: np.ndarray,
    n: np.ndarray,
    above: np.ndarray,
    below: np.ndarray,
    var: np.ndarray,
    w: np.ndarray,
    sigma: float,
    model: tuple[Any, ...],
    v_start: float,
    frames: tuple[float, float],
) -> None:
    """Turn a segment's sums into per-pixel mean and variance and fold them into
    ``centre``, ``var`` and the weights ``w`` (the definition :func:`_fold_rows`
    equals); the sums restart.

    ``sigma`` is the segment's noise, ``model`` :func:`window_model` of the window
    in its units followed by the window's edges ``lo, hi`` (sigmas) and the
    table :func:`_probit_table`, ``v_start`` the variance (sigma**2) of the starting centre of
    pixels without earlier segments, ``frames`` the frames of the earlier
    segments and of this one.

    The window mean, linearised about the centre, is ``delta`` (the pixel's mean
    less the centre, sigmas) plus ``bias(tau2)`` on average over pixels whose
    centre has the error variance ``tau2``, which is taken off. ``tau2`` is
    ``v_start`` (the starting median) before the first segment, then
    ``1 / (v(0) w)`` for the ``w`` in-window values of the earlier segments. The
    segment's estimate joins the centre in proportion to its count: the starting
    median only places the first window (electrons lift a median of few frames). The
    variance inside the window is ``E v`` times the pixel's own; the segments'
    variances are weighted by their frames, not by the pixel's counts, which
    depend on where the window sat on the pixel as its variance does.

    A pixel with earlier segments whose segment estimate ``delta`` lies more than
    ``RESET_Z`` standard errors (``sqrt(tau2 + 1 / (v(0) n))``) from them starts
    over from the segment alone, its variance and count the segment's: its dark
    level moved (a sensor settling while the first frames came), and the earlier
    values would hold it where it was.

    A pixel whose window caught fewer than ``LOST_SHARE`` of its values (of 4 or
    more) has its window too far from its values for the window's
    moments to say where they are (a starting median that electrons lifted, or
    one off by chance by a sigma or two): its centre moves to where the share of
    its values above (below) the window says its mean is, and the pixel starts
    over (``w = 0``).
    """
    g0, vt0, btab, vtab, a, b, ptab = model
    nn = n.astype(np.float64)
    na = above.astype(np.float64)
    nb = below.astype(np.float64)
    total = nn + na + nb
    lost = (total >= 4) & (nn < LOST_SHARE * total)
    up = na >= nb
    q = np.where(up, na + 0.5, nb + 0.5) / (total + 1.0)
    tq = q * (len(ptab) - 1)
    iq = np.minimum(tq.astype(np.int64), len(ptab) - 2)
    z = ptab[iq] + (tq - iq) * (ptab[iq + 1] - ptab[iq])  # the q-quantile of a unit Gaussian
    d_lost = np.clip(np.where(up, b + z, -a - z), -_MAX_STEP, _MAX_STEP)
    ww = w.astype(np.float64)
    first = ww == 0
    tau2 = np.where(first, v_start, 1.0 / (vt0 * np.maximum(ww, 1.0)))
    has = nn > 0
    m = np.zeros(nn.shape)
    np.divide(s1, nn, out=m, where=has)
    t = np.minimum(tau2 * ((len(btab) - 1) / TAU2_MAX), len(btab) - 1.000001)
    i = t.astype(np.int64)
    f = t - i
    bias = btab[i] + f * (btab[i + 1] - btab[i])
    vbar = vtab[i] + f * (vtab[i + 1] - vtab[i])
    d = np.clip((m / sigma - g0) / vt0 - bias, -_MAX_STEP, _MAX_STEP)
    with np.errstate(divide="ignore"):
        tau_seg = 1.0 / (vt0 * nn)
    reset = ~first & has & (d * d > RESET_Z * RESET_Z * (tau2 + tau_seg))
    ww = np.where(reset, 0.0, ww)
    first = ww == 0
    new_c = np.where(
        lost, centre + sigma * d_lost, centre + sigma * d * nn / np.maximum(ww + nn, 1.0)
    )
    two = nn >= 2
    ss = np.zeros(nn.shape)
    np.divide(s1.astype(np.float64) * s1, nn, out=ss, where=has)
    v = np.zeros(nn.shape)
    np.divide(np.maximum(s2 - ss, 0.0), (nn - 1.0) * vbar, out=v, where=two)
    fp, fs = frames
    new_v = np.where(first, v, (fp * var + fs * v) / (fp + fs))
    centre[...] = np.where(has | lost, new_c, centre).astype(np.float32)
    var[...] = np.where(two & ~lost, new_v, var).astype(np.float32)
    w[...] = np.where(lost, 0, np.minimum(ww + nn, 65535)).astype(np.uint16)
    s1.fill(0)
    s2.fill(0)
    n.fill(0)
    above.fill(0)
    below.fill(0)


def noise_numpy(
    centre: np.ndarray,
    var: np.ndarray,
    w: np.ndarray,
    low: np.ndarray,
    check: bool,
    dark_top: np.float32,
    noise_top: np.float32,
    rms: np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """The hot pixels and the noise map of :meth:`DarkEstimator.maps
    <streamstore.counting.dark_estimate.DarkEstimator.maps>` (the definition
    :func:`_noise_rows` equals): float32 maps and levels, as numpy meets them.

    A pixel is hot with ``LOW_HOT`` low values, or (where ``check``) a dark
    level above ``dark_top`` or a noise (``sqrt(var)``) above ``noise_top``. Its
    variance from ``w - 1`` degrees of freedom is pooled with the RMS's
    (``rms**2``), which weighs ``NOISE_PRIOR`` values while the pixel has up to
    as many of its own and fewer beyond; the noise is that, at least ``rms``,
    and ``rms`` for a hot pixel or one with fewer than 2 values.
    """
    hot = low >= LOW_HOT
    if check:
        hot |= centre > dark_top
        hot |= np.sqrt(var) > noise_top
    dof = np.maximum(w.astype(np.float32) - 1, 0)
    prior = np.float32(NOISE_PRIOR * NOISE_PRIOR) / np.maximum(dof + 1, NOISE_PRIOR)
    pulled = np.sqrt((dof * var + prior * rms * rms) / (dof + prior))
    noise = np.where(hot | (w < 2), rms, np.maximum(pulled, rms)).astype(np.float32)
    return hot, noise
