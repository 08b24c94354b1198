"""Robust centre and spread of pixel values: the Gaussian core of a sample and the
(clean, lower) side of the noise peak of integer values, where electrons only add
signal. Shared by the dark-series calibration and the data-only estimator."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["noise_peak", "robust_sigma"]


def robust_sigma(x: np.ndarray) -> tuple[float, float]:
    """Centre and sigma of the Gaussian core of ``x`` (median/MAD, then clipped refits)."""
    x = np.asarray(x, dtype=np.float64)
    centre = float(np.median(x))
    sigma = 1.4826 * float(np.median(np.abs(x - centre)))
    for _ in range(5):
        if sigma <= 0:
            break
        core = x[np.abs(x - centre) <= 3.0 * sigma]
        if core.size < 16:
            break
        # a Gaussian clipped at +-3 sigma has std 0.9866 sigma
        new_centre = float(core.mean())
        new_sigma = float(core.std()) / 0.98658
        if abs(new_sigma - sigma) <= 1e-3 * sigma and abs(new_centre - centre) <= 1e-3 * sigma:
            centre, sigma = new_centre, new_sigma
            break
        centre, sigma = new_centre, new_sigma
    if sigma <= 0:
        # quantised data with a spike at one value: fall back to the plain std of the core
        sigma = float(np.std(x[np.abs(x - centre) <= max(1.0, 3.0 * float(np.std(x)))]))
    return centre, sigma


def noise_peak(x: np.ndarray) -> tuple[float, float]:
    """Centre and sigma of the noise peak of integer pixel values ``x``.

    Electrons only add positive signal, so the peak's lower side is clean: a Gaussian
    is fitted to the logarithm of the histogram from 2.5 sigma below the mode to half
    a sigma above it (weighted least squares, weights = counts). Falls back to the
    clipped median/MAD estimate when the fit is not a peak.
    """
    centre0, sigma0 = robust_sigma(x.astype(np.float64))
    if not sigma0 > 0:
        return centre0, sigma0
    half = max(4, int(math.ceil(5 * sigma0)))
    base = int(math.floor(centre0)) - half
    counts = np.bincount(np.clip(x - base, 0, 2 * half), minlength=2 * half + 1)[1:-1]
    xs = np.arange(1, 2 * half, dtype=np.float64) + base
    smooth = np.convolve(counts, np.ones(3), mode="same")
    mode = float(xs[int(np.argmax(smooth))])
    lo_x = mode - max(3.0, 2.5 * sigma0)
    hi_x = mode + max(1.0, 0.5 * sigma0)
    sel = (xs >= lo_x) & (xs <= hi_x) & (counts > 0)
    if np.count_nonzero(sel) < 4:
        return centre0, sigma0
    xf, nf = xs[sel] - mode, counts[sel].astype(np.float64)
    coef = np.polyfit(xf, np.log(nf), 2, w=np.sqrt(nf))
    if not coef[0] < 0:
        return centre0, sigma0
    sigma = math.sqrt(-1.0 / (2.0 * coef[0]))
    centre = mode - coef[1] / (2.0 * coef[0])
    if not (math.isfinite(sigma) and 0.3 * sigma0 < sigma < 3.0 * sigma0):
        return centre0, sigma0
    return centre, sigma
