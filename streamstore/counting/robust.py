"""Robust centre and spread of pixel values: the Gaussian core of a sample and the
(clean, lower) side of the noise peak of integer values, where electrons only add
signal. Shared by the dark-series calibration and the data-only estimator."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["clipped_noise_peak", "noise_peak", "robust_sigma"]


#: An integer sample is counted in a histogram when its values span at most this
#: many more than four bins per value (a wider spread: a partition is cheaper).
_HIST_SPAN = 1 << 16


def _histogram(x: np.ndarray) -> tuple[np.ndarray, int, np.ndarray] | None:
    """``(values, lo, counts)`` of integer ``x``: its values as a read-only int64
    array, in order, and ``counts[v - lo]`` of them equal to ``v``; None where
    ``x`` is empty or not integer (or uint64), its values span too many bins, or
    their float64 sums could round (the histogram's results then would not be
    those of the values themselves)."""
    if x.size == 0 or x.dtype.kind not in "iu" or x.dtype == np.uint64:
        return None
    from streamstore.counting._robust_kernels import _bin_counts, _int_span

    values = np.ascontiguousarray(x.reshape(-1), dtype=np.int64).view()
    values.flags.writeable = False  # one compiled type, whatever the caller's flags
    lo, hi = (int(v) for v in _int_span(values))
    if hi - lo >= 4 * x.size + _HIST_SPAN or max(abs(lo), abs(hi)) * x.size >= 1 << 53:
        return None
    counts = np.zeros(hi - lo + 1, np.int64)
    _bin_counts(values, lo, counts)
    return values, lo, counts


def _rank_value(cum: np.ndarray, n: int) -> float:
    """The median of ``n`` values whose cumulative counts per bin are ``cum``, in
    bins (the mean of the two middle bins for an even count)."""
    upper = int(np.searchsorted(cum, n // 2, side="right"))
    if n % 2:
        return float(upper)
    return (int(np.searchsorted(cum, n // 2 - 1, side="right")) + upper) / 2.0


def _median_mad(lo: int, counts: np.ndarray, n: int) -> tuple[float, float]:
    """The median and the median absolute deviation of ``n`` integer values from
    their histogram: exactly the float64 results of ``np.median`` on the values
    (each is a value or the mean of two, both exact in float64)."""
    m2 = _rank_value(np.cumsum(counts), n)
    centre = lo + m2
    # deviations from a centre on a value are whole numbers, from one between two
    # values halves: the bins above and below the centre, paired by distance
    c = int(m2)
    up = counts[c:] if m2 == c else counts[c + 1 :]
    down = counts[c::-1]
    dev = np.zeros(max(up.size, down.size), np.int64)
    dev[: up.size] += up
    dev[: down.size] += down
    if m2 == c:
        dev[0] -= counts[c]  # the centre's own bin, once
    mad = _rank_value(np.cumsum(dev), n) + (0.0 if m2 == c else 0.5)
    return centre, mad


def robust_sigma(x: np.ndarray) -> tuple[float, float]:
    """Centre and sigma of the Gaussian core of ``x`` (median/MAD, then clipped refits).

    Integer ``x`` is counted in a histogram (:func:`_histogram`) for the median,
    the MAD and the refits' core and sums, with the same float64 results as the
    values themselves give: medians of integers and sums of integers below 2**53
    are exact, and each refit's standard deviation is numpy's own, of the core in
    the sample's order.
    """
    x = np.asarray(x)
    hist = _histogram(x)
    if hist is None:
        return _robust_sigma_values(np.asarray(x, dtype=np.float64))
    return _robust_sigma_counted(*hist)


def _robust_sigma_counted(values: np.ndarray, lo: int, counts: np.ndarray) -> tuple[float, float]:
    """:func:`robust_sigma` of integer values from their :func:`_histogram`."""
    from streamstore.counting._robust_kernels import _core_values

    n = values.size
    centre, mad = _median_mad(lo, counts, n)
    sigma = 1.4826 * mad
    levels = np.arange(lo, lo + counts.size, dtype=np.float64)
    weighted = counts * np.arange(lo, lo + counts.size, dtype=np.int64)
    core = np.empty(0)
    kept = None
    for _ in range(5):
        if sigma <= 0:
            break
        # the test of each value, as each element of the sample takes it
        keep = np.abs(levels - centre) <= 3.0 * sigma
        if kept is not None and np.array_equal(keep, kept):
            break  # the same core again: its centre and sigma, converged
        size = int(counts[keep].sum())
        if size < 16:
            break
        kept = keep
        # a Gaussian clipped at +-3 sigma has std 0.9866 sigma
        new_centre = float(int(weighted[keep].sum())) / size  # an exact sum, as numpy's
        if core.size < n:
            core = np.empty(n)
        _core_values(values, lo, keep, core)  # the core in the sample's order
        new_sigma = float(core[:size].std()) / 0.98658
        if abs(new_sigma - sigma) <= 1e-3 * sigma and abs(new_centre - centre) <= 1e-3 * sigma:
            centre, sigma = new_centre, new_sigma
            break
        centre, sigma = new_centre, new_sigma
    if sigma <= 0:
        return centre, _spike_sigma(values.astype(np.float64), centre)
    return centre, sigma


def _robust_sigma_values(x: np.ndarray) -> tuple[float, float]:
    """:func:`robust_sigma` of float64 ``x``, on the values themselves."""
    centre = float(np.median(x))
    sigma = 1.4826 * float(np.median(np.abs(x - centre)))
    kept = None
    for _ in range(5):
        if sigma <= 0:
            break
        keep = np.abs(x - centre) <= 3.0 * sigma
        if kept is not None and np.array_equal(keep, kept):
            break  # the same core again: its centre and sigma, converged
        kept = keep
        core = x[keep]
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
        sigma = _spike_sigma(x, centre)
    return centre, sigma


def _spike_sigma(x: np.ndarray, centre: float) -> float:
    """Quantised data with a spike at one value: the plain std of the core."""
    return float(np.std(x[np.abs(x - centre) <= max(1.0, 3.0 * float(np.std(x)))]))


def noise_peak(x: np.ndarray) -> tuple[float, float]:
    """Centre and sigma of the noise peak of integer pixel values ``x``.

    Electrons only add positive signal, so the peak's lower side is clean: a Gaussian
    is fitted to the logarithm of the histogram from 2.5 sigma below the mode to half
    a sigma above it (weighted least squares, weights = counts). Falls back to the
    clipped median/MAD estimate when the fit is not a peak.
    """
    # int64 values (what the callers pass) are counted once, for both fits
    hist = _histogram(x) if x.dtype == np.int64 else None
    if hist is None:
        centre0, sigma0 = robust_sigma(x.astype(np.float64))
    else:
        centre0, sigma0 = _robust_sigma_counted(*hist)
    if not sigma0 > 0:
        return centre0, sigma0
    half = max(4, int(math.ceil(5 * sigma0)))
    base = int(math.floor(centre0)) - half
    if hist is None:
        counts = np.bincount(np.clip(x - base, 0, 2 * half), minlength=2 * half + 1)[1:-1]
    else:
        # the bins from base + 1 to base + 2 half - 1, zero outside the values' range
        lo, full = hist[1:]
        counts = np.zeros(2 * half - 1, full.dtype)
        a, b = max(base + 1, lo), min(base + 2 * half, lo + full.size)
        if a < b:
            counts[a - base - 1 : b - base - 1] = full[a - lo : b - lo]
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


def clipped_noise_peak(x: np.ndarray, floor: int = 0) -> tuple[float, float]:
    """Centre and sigma of the noise peak of integer values ``x`` clipped at ``floor``
    (frames a camera dark-subtracted and cut at 0: the peak's lower side is gone).

    A value ``v > floor`` stands for ``v - 0.5 <= d + sigma Z < v + 0.5``, ``floor``
    for everything below ``floor + 0.5``, so ``P(x <= v) = Phi((v + 0.5 - d) /
    sigma)``: the probits of the empirical distribution up to 0.9 lie on a line
    ``v + 0.5 = d + sigma z`` (the lower side, clean of the electrons' signal, whose
    share of the sample is first measured above ``d + 3 sigma`` and left out).
    Needs the noise peak within a few sigmas of the floor (a share of the values
    at it): the caller decides that.
    """
    from scipy.stats import norm

    v = np.asarray(x, np.int64).reshape(-1) - int(floor)
    if v.size == 0 or v.min() < 0:
        raise ValueError("clipped_noise_peak: values below the floor")
    counts = np.bincount(np.minimum(v, 1 << 16))
    cum = np.cumsum(counts).astype(np.float64)
    n = float(v.size)
    centre = sigma = 0.0
    for _ in range(3):  # the share of electrons' signal, from the previous fit
        if sigma > 0:
            top = int(math.floor(centre + 3.0 * sigma - 0.5))
            if 0 <= top < cum.size:
                n = cum[top] / norm.cdf(3.0)
        f = cum / n
        ks = np.flatnonzero((f > 0.002) & (f < 0.9))
        if ks.size < 2:  # the peak lies within a value or two: one more bin
            ks = np.arange(min(2, cum.size))
        z = norm.ppf(np.clip(f[ks], 1e-6, 1 - 1e-6))
        if np.ptp(z) <= 0:
            break
        sigma, centre = np.polyfit(z, ks + 0.5, 1)
    return float(centre) + floor, float(sigma)
