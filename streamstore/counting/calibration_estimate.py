"""How a calibration is made from data: dark frames, frames with beam, a dark estimator.

The bodies of :meth:`Calibration.from_dark_frames
<streamstore.counting.calibration.Calibration.from_dark_frames>`,
:meth:`~streamstore.counting.calibration.Calibration.estimate`,
:meth:`~streamstore.counting.calibration.Calibration.from_estimator` and
:meth:`~streamstore.counting.calibration.Calibration.electron_peak_signal`
(documented there), with their helpers: the hot-pixel test and the
single-electron peak that places an X-ray threshold. Each function is handed
the class to build (``cls``) so this module never imports
:mod:`~streamstore.counting.calibration`, which delegates here.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from streamstore.counting.calibration_checks import as_map, check_frames
from streamstore.counting.robust import clipped_noise_peak, noise_peak, robust_sigma

if TYPE_CHECKING:
    from streamstore.counting.calibration import Calibration
    from streamstore.counting.dark_estimate import DarkEstimator

__all__ = [
    "CLIPPED_SHARE",
    "MAX_ESTIMATE_FRAMES",
    "PER_PIXEL_GAIN",
    "START_FRAMES",
    "electron_peak_signal",
    "estimate",
    "from_dark_frames",
    "from_estimator",
]

#: :meth:`Calibration.estimate` uses a per-pixel dark map when the pooled noise peak
#: is this much wider than the per-pixel noise (a fixed dark pattern).
PER_PIXEL_GAIN = 1.1
#: Frames :meth:`Calibration.estimate` reads for a per-pixel dark map: the first
#: ``START_FRAMES`` start it, the others refine it.
MAX_ESTIMATE_FRAMES = 64
START_FRAMES = 8
#: Share of sampled values at exactly 0 above which unsigned frames are taken as
#: dark-subtracted and clipped at 0 (a noise peak 1.3 sigma or less above 0): the
#: peak is fitted from the share at each value (:func:`~.robust.clipped_noise_peak`),
#: with one dark level (the fitted ``noise_peak`` of the cut peak had given 2.1 for
#: 3.3 ADU of noise and a per-pixel estimate: a precision of 0.84).
CLIPPED_SHARE = 0.1
# the 8 neighbours of a pixel (hot-pixel test)
_RING = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], np.int32)


def from_dark_frames(
    cls: type[Calibration],
    dark_frames: Any,
    *,
    n_sigma: float,
    xray_threshold: float | None,
    gain: Any,
    mask: Any,
    xray_radius: int,
    hot_sigma: float,
) -> Calibration:
    """:meth:`Calibration.from_dark_frames`: a ``cls`` with ``source == "dark_frames"``."""
    from streamstore.counting.dark_sums import DarkSums

    # mean and variance per pixel from running sums: memory independent of n
    sums = DarkSums.of(dark_frames)
    n = sums.n
    dark, var = sums.mean_and_variance()
    shape = dark.shape
    noise = np.sqrt(var)
    # (a pixel whose n values happen to be equal has zero noise: with few frames
    # thousands do, so zero noise is not a reason to mask)
    hot = ~np.isfinite(noise)
    d_c, d_s = robust_sigma(dark[~hot])
    n_c, n_s = robust_sigma(noise[~hot])
    # floors on the spreads: a perfectly uniform sensor must not make pixels "hot"
    d_s = max(d_s, 0.5 * n_c / math.sqrt(n))
    n_s = max(n_s, n_c / math.sqrt(2.0 * (n - 1)))
    hot |= dark > d_c + hot_sigma * d_s
    hot |= noise > n_c + hot_sigma * n_s
    # typical noise: the RMS over the other pixels (the median of per-pixel
    # estimates from few frames is biased low)
    rms = math.sqrt(float(np.mean(var[~hot]))) if (~hot).any() else 1.0
    if mask is not None:
        hot |= as_map("mask", mask, shape, bool)
    # A noise estimate from n frames scatters by about 1/sqrt(2 (n - 1)); pixels whose
    # estimate came out low would get a threshold below n_sigma of their true noise and
    # fire on noise. Read noise is nearly uniform, so no pixel gets less than the RMS.
    noise = np.where(hot, 1.0, np.maximum(noise, rms))
    return cls(
        dark.astype(np.float32),
        noise.astype(np.float32),
        gain=gain,
        mask=hot,
        n_sigma=n_sigma,
        xray_threshold=xray_threshold,
        xray_radius=xray_radius,
        source="dark_frames",
    )


def _sorted_unique(idx: np.ndarray, size: int) -> np.ndarray:
    """``np.sort(idx)`` of distinct indices below ``size``: marked in a mask and
    read back in order where the mask is not much longer than ``idx`` (a linear
    pass instead of a sort)."""
    if size > 64 * idx.size:
        return np.sort(idx)
    marked = np.zeros(size, bool)
    marked[idx] = True
    return np.flatnonzero(marked)


def _check_xray_threshold(xray_threshold: float | str | None) -> None:
    if isinstance(xray_threshold, str) and xray_threshold != "auto":
        raise ValueError(f"xray_threshold must be a number, 'auto' or None, got {xray_threshold!r}")


def estimate(
    cls: type[Calibration],
    frames: Any,
    *,
    n_sigma: float,
    xray_threshold: float | str | None,
    xray_factor: float,
    xray_radius: int,
    gain: Any,
    mask: Any,
    n_samples: int,
    seed: int,
    pedestal_subtracted: bool | None,
    per_pixel: bool | None,
    estimator_out: list | None,
) -> Calibration:
    """:meth:`Calibration.estimate`: a ``cls`` with ``source == "estimate"``."""
    _check_xray_threshold(xray_threshold)
    arr = check_frames("frames", frames, 1)
    if arr.dtype.kind == "f":
        raise ValueError("estimate needs integer frames (uint8 or uint16)")
    shape = arr.shape[1:]
    wrapped = False
    if arr.dtype.kind == "u":
        signed = arr.view(np.dtype(f"int{8 * arr.dtype.itemsize}"))
        if pedestal_subtracted is None:
            # wrapped data: a large share of values sit just below the top of the range
            top = int(np.iinfo(arr.dtype).max)
            probe = arr.reshape(-1)[:: max(1, arr.size // 100_000)]
            near_top = np.count_nonzero(probe > top - top // 8)
            near_zero = np.count_nonzero(probe < top // 8)
            wrapped = near_top > 0.05 * probe.size and near_zero > 0.05 * probe.size
        else:
            wrapped = bool(pedestal_subtracted)
        if wrapped:
            arr = signed
    flat = arr.reshape(-1)
    rng = np.random.default_rng(seed)
    if flat.size > n_samples:
        pick = _sorted_unique(rng.choice(flat.size, size=n_samples, replace=False), flat.size)
    else:
        pick = np.arange(flat.size)
    if mask is not None:
        m = as_map("mask", mask, shape, bool).reshape(-1)
        pick = pick[~m[pick % m.size]]
        if pick.size == 0:
            raise ValueError("mask covers every pixel: nothing to estimate from")
    sample = flat[pick]
    # frames dark-subtracted and cut at 0: the noise peak's lower side is a spike at 0
    clipped = not wrapped and np.count_nonzero(sample == 0) > CLIPPED_SHARE * sample.size
    if clipped:
        if per_pixel:
            raise ValueError(
                "frames clipped at 0 (dark-subtracted): no per-pixel estimate from them"
            )
        centre, sigma = clipped_noise_peak(sample)
    else:
        centre, sigma = noise_peak(sample.astype(np.int64))
    if not sigma > 0:
        raise ValueError("cannot estimate the noise: the sampled pixels are all equal")
    if per_pixel is not False and arr.shape[0] >= 2 and not clipped:
        from streamstore.counting.dark_estimate import DarkEstimator

        # the first frames start it; later ones refine it the way ingest does
        est = DarkEstimator(arr[:START_FRAMES], n_sigma=n_sigma, wrapped=wrapped)
        est.update_batch(arr[START_FRAMES:MAX_ESTIMATE_FRAMES])
        # a fixed dark pattern widens the pooled peak beyond the per-pixel noise
        if per_pixel or sigma > PER_PIXEL_GAIN * est.noise_sigma:
            cal = cls.from_estimator(
                est,
                n_sigma=n_sigma,
                xray_threshold=xray_threshold,
                xray_factor=xray_factor,
                xray_radius=xray_radius,
                gain=gain,
                mask=mask,
                frames=arr,
            )
            if estimator_out is not None:  # to be refined further (ingest does)
                estimator_out.append(est)
            return cal
    if per_pixel:
        raise ValueError("a per-pixel estimate needs at least 2 frames")
    xt: float | None
    if isinstance(xray_threshold, str):
        xt = _electron_peak_scale(arr, centre, sigma, n_sigma)
        xt = None if xt is None else float(xray_factor) * xt
    else:
        xt = xray_threshold
    hot = _hot_pixels(arr, centre, sigma, n_sigma)
    if mask is not None:
        hot |= as_map("mask", mask, shape, bool)
    return cls(
        np.full(shape, centre, np.float32),
        np.full(shape, sigma, np.float32),
        gain=gain,
        mask=hot if hot.any() else None,
        n_sigma=n_sigma,
        xray_threshold=xt,
        xray_radius=xray_radius,
        wrapped=wrapped,
        source="estimate",
    )


def from_estimator(
    cls: type[Calibration],
    estimator: DarkEstimator,
    *,
    n_sigma: float,
    xray_threshold: float | str | None,
    xray_factor: float,
    xray_radius: int,
    gain: Any,
    mask: Any,
    frames: Any,
) -> Calibration:
    """:meth:`Calibration.from_estimator`: a ``cls`` with ``source == "estimate"``."""
    _check_xray_threshold(xray_threshold)
    dark, noise, hot = estimator.maps()
    if mask is not None:
        hot |= as_map("mask", mask, dark.shape, bool)
    cal = cls(
        dark,
        noise,
        gain=gain,
        mask=hot if hot.any() else None,
        n_sigma=n_sigma,
        xray_threshold=None if isinstance(xray_threshold, str) else xray_threshold,
        xray_radius=xray_radius,
        wrapped=estimator.wrapped,
        source="estimate",
    )
    if isinstance(xray_threshold, str) and frames is not None:
        arr = np.asarray(frames)
        if arr.dtype.kind == "i":  # signed view of wrapped frames: back to the raw type
            arr = arr.view(np.dtype(f"uint{8 * arr.dtype.itemsize}"))
        peak = cal.electron_peak_signal(arr)
        if peak is not None:
            cal = cal.with_xray_threshold(float(xray_factor) * peak)
    return cal


def electron_peak_signal(cal: Calibration, frames: Any) -> float | None:
    """:meth:`Calibration.electron_peak_signal` of ``cal``: None below 20 peaks."""
    arr = check_frames("frames", frames, 1)
    if arr.shape[1:] != cal.frame_shape:
        raise ValueError(f"frames are {arr.shape[1:]}, the calibration is {cal.frame_shape}")
    arr = arr.view(cal.frame_dtype(arr.dtype))
    h0, w0 = cal.frame_shape
    r0, c0 = max(0, (h0 - 1024) // 2), max(0, (w0 - 1024) // 2)
    win = (slice(r0, r0 + 1024), slice(c0, c0 + 1024))
    dark = cal.dark[win].astype(np.float64)
    above = cal.n_sigma * cal.noise[win].astype(np.float64)
    gain = 1.0 if cal.gain is None else cal.gain[win].astype(np.float64)
    bad = None if cal.mask is None else cal.mask[win]
    peaks: list[np.ndarray] = []
    for raw in arr[: min(8, arr.shape[0]), win[0], win[1]]:
        d = raw.astype(np.float64) - dark
        f = d * gain
        candidate = d > above
        if bad is not None:
            f[bad] = -np.inf
            candidate &= ~bad
        peaks.append(_local_max_values(f, candidate))
    vals = np.concatenate(peaks)
    if vals.size < 20:
        return None
    return float(np.median(vals))


def _hot_pixels(frames: np.ndarray, centre: float, sigma: float, n_sigma: float) -> np.ndarray:
    """Hot (noisy) pixels in up to 16 frames with beam.

    Two signs, each impossible for a normal pixel at counting doses:

    - a value *below* ``centre - n_sigma * sigma`` in any frame (electrons only add
      signal, so only a noisy pixel swings that far down);
    - with 4 or more frames: above ``centre + n_sigma * sigma`` in at least a quarter
      of the frames (and 3), and more than ``4 x mean of its 8 neighbours + 2``
      times (illumination varies smoothly, so neighbours share a real pixel's rate).
    """
    n = min(16, frames.shape[0])
    high = centre + n_sigma * sigma
    low = centre - n_sigma * sigma
    fired = np.zeros(frames.shape[1:], np.int32)
    sank = np.zeros(frames.shape[1:], bool)
    for f in frames[:n]:
        fired += f > high
        sank |= f < low
    if n < 4:
        return sank
    from scipy import ndimage

    # the sum of the 8 neighbours, a pixel outside the frame counting 0
    around = ndimage.correlate(fired, _RING, mode="constant", cval=0)
    return sank | ((fired >= max(3, n // 4)) & (8 * fired > 4 * around + 16))


def _electron_peak_scale(
    frames: np.ndarray, centre: float, sigma: float, n_sigma: float
) -> float | None:
    """Median signal of 3 x 3 local maxima above ``centre + n_sigma * sigma``.

    Used to place the X-ray threshold relative to a typical electron. Looks at
    up to 8 frames, at most their central 1024 x 1024 pixels; returns None when
    fewer than 20 peaks are found.
    """
    h0, w0 = frames.shape[1:]
    r0, c0 = max(0, (h0 - 1024) // 2), max(0, (w0 - 1024) // 2)
    peaks: list[np.ndarray] = []
    for raw in frames[: min(8, frames.shape[0]), r0 : r0 + 1024, c0 : c0 + 1024]:
        f = raw.astype(np.float64) - centre
        peaks.append(_local_max_values(f, f > n_sigma * sigma))
    vals = np.concatenate(peaks)
    if vals.size < 20:
        return None
    return float(np.median(vals))


def _local_max_values(f: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Values of ``f`` at candidate pixels that are >= all 8 neighbours (a pixel
    outside the frame counting as -inf), in row-major order.

    The candidates are few (values above the noise): each is compared with its
    8 neighbours, where a 3 x 3 maximum filter would visit every pixel. ``f``
    holds no NaN (masked pixels are -inf), so ">= each neighbour" is ">= the
    3 x 3 maximum" exactly.
    """
    h, w = f.shape
    at = np.flatnonzero(candidate)
    values = f.reshape(-1)[at]
    if values.size == 0:
        return values
    padded = np.full((h + 2, w + 2), -np.inf, f.dtype)
    padded[1:-1, 1:-1] = f
    flat = padded.reshape(-1)
    at += at // w * 2 + w + 3  # the same pixels in the padded frame
    peak = np.ones(values.size, bool)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr or dc:
                peak &= values >= flat[at + (dr * (w + 2) + dc)]
    return values[peak]
