"""Per-pixel dark offset and noise from frames with beam, refined frame by frame.

A camera that sends raw frames without a dark series still has a fixed-pattern
dark offset per pixel. Electrons are sparse at counting doses (a pixel sees
signal in a few percent of frames), so each pixel's dark offset is the centre
of its own values once the rare high ones are set aside:

1. the first frames give a per-pixel median (the starting centre) and a first
   noise figure;
2. every frame then adds, per pixel, the values from ``clip[0]`` noise sigmas
   below the centre to ``clip[1]`` above it to running sums (count, sum, sum
   of squares, relative to the centre). Electrons only add signal, so the
   window is lopsided: its upper edge sits just above the centre, where the
   small charge shares of neighbouring electrons would otherwise widen and
   lift the peak; X-rays and electron signal drop out;
3. :meth:`DarkEstimator.maps` turns the sums into a dark map (the window's
   mean minus the known mean of a Gaussian truncated to that window) and a
   hot-pixel mask, and moves the centre to the new dark map (the sums are
   re-based on it, nothing is lost; repeated, the window recentres). It does
   so by itself at 16, 32, 64, ... frames.

The read noise is the pooled variance inside the window over that of the
truncated Gaussian, from pixels that never fell far below their centre. Pixels
within ``NEIGHBOURHOOD`` pixels of a value above the event threshold are left
out of the sums of that frame: an electron spills small charge shares into its
neighbours, and they would lift the dark and widen the noise. The noise is one
figure for the sensor (as from a dark series, where no pixel gets less than the
typical noise), inflated for the thresholds by the uncertainty of the per-pixel
dark estimate, ``sqrt(1 + 1 / n)``, so that a pixel's false-event rate does not
grow because its dark level comes from few frames. A pixel is hot (masked) when
a value lies more than ``n_sigma`` noise sigmas *below* its centre (electrons
only add signal, so only a noisy pixel swings that far down).

Memory is bounded: 15 bytes per pixel (centre and two window sums as float32,
a uint16 count, a uint8 count of low values), independent of the number of
frames. A dark series (no electrons) needs none of the clipping: its streaming
calibration uses the exact running sums of :class:`streamstore.counting.dark_sums.DarkSums`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["DarkEstimator"]

#: Window of the running sums around the centre, in noise sigmas (below, above).
DEFAULT_CLIP = (3.0, 1.0)
_ROW_BLOCK_BYTES = 1 << 26  # rows per block of the starting median: about 64 MB of float32
#: Variance of the dark estimate from n frames, in read-noise variances times n.
CENTRE_VARIANCE = 1.0
#: Frame counts at which :meth:`DarkEstimator.update` refines the centre (the window
#: then sits on a better centre for the frames after).
REFINE_AT = frozenset({16, 32, 64, 128, 256, 512})
#: Pixels within this Chebyshev distance of a value above the event threshold are left
#: out of the sums: an electron's charge spills into its neighbours in small shares
#: that would otherwise sit inside the window, lifting the dark and widening the noise.
NEIGHBOURHOOD = 2


def _near(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` grown by ``radius`` pixels (Chebyshev distance)."""
    out = mask.copy()
    h, w = mask.shape
    for _ in range(radius):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        out = grown.copy()
        out[:, 1:] |= grown[:, :-1]
        out[:, :-1] |= grown[:, 1:]
    return out


def _truncated_moments(a: float, b: float) -> tuple[float, float]:
    """Mean and variance of a unit Gaussian truncated to [a, b]."""

    def pdf(x: float) -> float:
        return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)

    def cdf(x: float) -> float:
        return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))

    z = cdf(b) - cdf(a)
    mean = (pdf(a) - pdf(b)) / z
    var = 1.0 + (a * pdf(a) - b * pdf(b)) / z - mean * mean
    return mean, var


class DarkEstimator:
    """Running per-pixel dark offset, read noise and hot pixels from frames with beam.

    Parameters
    ----------
    frames : array_like, shape (n, H, W)
        The first frames (at least 2; 8 or more is good), integer, with or
        without beam. Read as signed integers when ``wrapped``.
    n_sigma : float, default 5.0
        Background threshold of the counting calibration, in noise sigmas; also
        the depth below the centre that marks a pixel hot.
    clip : (float, float), default (3.0, 1.0)
        The window of values the running sums keep: from ``clip[0]`` noise
        sigmas below the centre to ``clip[1]`` above it.
    wrapped : bool, default False
        Frames are pedestal-subtracted with negatives wrapped around the
        unsigned type: read them as two's-complement signed integers.

    Attributes
    ----------
    centre : ndarray of float32, shape (H, W)
        The current per-pixel dark estimate (ADU).
    sigma : float
        The read noise (ADU), from consecutive-frame differences.
    n_frames : int
        Frames added so far (the starting frames included).

    Raises
    ------
    ValueError
        When fewer than 2 frames are given, or they are not integer 3-d frames.
    """

    def __init__(
        self,
        frames: Any,
        *,
        n_sigma: float = 5.0,
        clip: tuple[float, float] = DEFAULT_CLIP,
        wrapped: bool = False,
    ) -> None:
        arr = np.asarray(frames)
        if arr.ndim != 3 or arr.dtype.kind not in "iu":
            raise ValueError(f"frames must be integer (n, H, W), got {arr.dtype} {arr.shape}")
        if arr.shape[0] < 2:
            raise ValueError(f"a per-pixel estimate needs at least 2 frames, got {arr.shape[0]}")
        lo, hi = (float(c) for c in clip)
        if not all(math.isfinite(v) and v > 0 for v in (n_sigma, lo, hi)):
            raise ValueError(f"n_sigma and clip must be positive, got {n_sigma!r}, {clip!r}")
        self.wrapped = bool(wrapped)
        if self.wrapped and arr.dtype.kind == "u":
            arr = arr.view(np.dtype(f"int{8 * arr.dtype.itemsize}"))
        self.frame_shape: tuple[int, int] = (int(arr.shape[1]), int(arr.shape[2]))
        self.n_sigma = float(n_sigma)
        self.clip = (lo, hi)
        self._mean_offset, self._var_factor = _truncated_moments(-lo, hi)
        h, w = self.frame_shape
        self.centre = np.empty((h, w), np.float32)
        rows = max(1, _ROW_BLOCK_BYTES // max(1, 4 * arr.shape[0] * w))
        for r in range(0, h, rows):
            block = arr[:, r : r + rows].astype(np.float32)
            self.centre[r : r + rows] = np.median(block, axis=0)
        self.s1 = np.zeros((h, w), np.float32)  # sum of (x - centre) inside the window
        self.n = np.zeros((h, w), np.uint16)  # values inside the window
        self.low = np.zeros((h, w), np.uint8)  # values below centre - n_sigma * noise
        self.n_frames = 0
        self.s2 = np.zeros((h, w), np.float32)  # sum of (x - centre)**2 inside the window
        # a first noise figure for the window (the residuals' median absolute
        # deviation), then the pooled window variance as the window settles
        step = max(1, int(math.sqrt(h * w / 65536)))
        res = arr[:, ::step, ::step].astype(np.float32) - self.centre[::step, ::step]
        k = arr.shape[0]
        sigma = 1.4826 * float(np.median(np.abs(res))) * math.sqrt(k / (k - 1.0))
        self.sigma = max(sigma, 0.5)
        for _ in range(2):  # two passes: the second window sits on the refined centre
            previous = self.sigma
            self.s1.fill(0)
            self.s2.fill(0)
            self.n.fill(0)
            self.low.fill(0)
            self.n_frames = 0
            for frame in arr:
                self._accumulate(frame)
            self.refine()
            if abs(self.sigma - previous) <= 0.01 * previous:
                break

    # -- streaming ------------------------------------------------------------------
    def _pooled_sigma(self) -> float:
        """Read noise from the pooled window variance of pixels without low values."""
        n = self.n.astype(np.float64)
        ok = (n >= 2) & (self.low == 0)
        if not ok.any():
            return self.sigma
        s1 = self.s1[ok].astype(np.float64)
        ss = self.s2[ok].astype(np.float64) - s1 * s1 / n[ok]
        var = float(ss.sum() / (n[ok] - 1.0).sum()) / self._var_factor
        return max(math.sqrt(max(var, 0.0)), 1e-3)

    def _accumulate(self, x: np.ndarray) -> None:
        r = x.astype(np.float32)
        r -= self.centre
        lo, hi = self.clip
        inside = (r >= np.float32(-lo * self.sigma)) & (r <= np.float32(hi * self.sigma))
        self.low += r < np.float32(-self.n_sigma * self.noise_sigma)
        if NEIGHBOURHOOD:
            inside &= ~_near(r > np.float32(self.n_sigma * self.sigma), NEIGHBOURHOOD)
        np.multiply(r, inside, out=r)
        self.s1 += r
        r *= r
        self.s2 += r
        self.n += inside
        self.n_frames += 1

    def update(self, frame: Any) -> None:
        """Add one frame (H, W) (refining by itself at 16, 32, 64, ... frames)."""
        x = np.asarray(frame)
        if x.shape != self.frame_shape:
            raise ValueError(f"frame is {x.shape}, the estimator is {self.frame_shape}")
        if self.wrapped and x.dtype.kind == "u":
            x = x.view(np.dtype(f"int{8 * x.dtype.itemsize}"))
        if self.n_frames >= min(np.iinfo(np.uint16).max, 255 * 255):
            return  # the sums are good enough long before this
        self._accumulate(x)
        if self.n_frames in REFINE_AT:
            self.refine()

    # -- results ----------------------------------------------------------------------
    @property
    def noise_sigma(self) -> float:
        """Noise used for thresholds: read noise inflated by the dark estimate's error."""
        return self.sigma * math.sqrt(1.0 + CENTRE_VARIANCE / max(1, self.n_frames))

    def refine(self) -> None:
        """Move the centre to the window means (less the truncated Gaussian's mean
        offset) and refit the read noise.

        The window sums are re-based on the new centre, so later frames and the
        frames already added count alike.
        """
        self.sigma = self._pooled_sigma()
        n = self.n.astype(np.float32)
        shift = np.zeros(self.frame_shape, np.float32)
        np.divide(self.s1, n, out=shift, where=n > 0)
        shift[n > 0] -= np.float32(self._mean_offset * self.sigma)
        # sums about the new centre: s2 - 2 d s1 + n d^2, s1 - n d
        self.s2 -= shift * (2.0 * self.s1 - n * shift)
        np.maximum(self.s2, 0, out=self.s2)
        self.s1 -= n * shift
        self.centre += shift

    def maps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(dark, noise, hot)`` after :meth:`refine`: float32 maps and a bool mask."""
        self.refine()
        noise = np.full(self.frame_shape, self.noise_sigma, np.float32)
        return self.centre.copy(), noise, self.low > 0
