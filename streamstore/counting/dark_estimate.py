"""Per-pixel dark offset and noise from frames with beam, refined frame by frame.

A camera that sends raw frames without a dark series still has a fixed-pattern
dark offset per pixel. Electrons are sparse at counting doses (a pixel sees
signal in a few percent of frames), so each pixel's dark offset and noise are
those of the Gaussian core of its own values once the rare high ones are set
aside. The estimator measures what a dark series measures
(:meth:`streamstore.counting.calibration.Calibration.from_dark_frames`): each pixel's
mean and its frame-to-frame standard deviation, which holds the read noise and
the row noise (a common offset per row and frame) alike: counting has no
common-mode correction, so the threshold must cover both.

1. The first frames give a per-pixel median (the starting centre) and the
   noise (the residuals of each frame about the median of the others, on the
   clean lower side of their peak). The median only places the first window:
   electrons lift a median of few frames. The first frames are then the first
   segment (step 3), so that the first maps are already their window means,
   with the electrons left out.
2. Every frame adds, per pixel, the values from ``clip[0]`` noise sigmas
   below the centre to ``clip[1]`` above it to running sums (count, sum and sum
   of squares relative to the centre) and counts those above and below the
   window. Electrons and their charge are left out first: pixels within
   ``NEIGHBOURHOOD`` pixels of a value ``EXCLUDE_SIGMA`` sigmas above its centre,
   or of a 2 x 2 block whose sum is ``BLOCK_SIGMA`` of its own sigmas above the
   centres (an electron near a pixel corner shares its charge between four
   pixels that each stay below a single-pixel level; a wide point spread puts a
   few percent two pixels out). What is left is noise, so the window is as wide
   above the centre as below it: a window cut just above the centre would keep
   only part of each pixel's values, and the per-pixel noise, measured on fewer
   of them, would scatter more (a noise map floored at the RMS is then higher).
   X-rays and electron signal drop out.
3. At 16, 32, 64, ... frames (and in :meth:`DarkEstimator.maps`) the sums of
   the frames since the last such point (a *segment*: every value in it was
   windowed about the same centre) give the pixel's mean and variance through
   the moments of a Gaussian truncated to the window, linearised about the
   centre, less their known average bias for a centre of known error
   (:func:`fold_numpy`); the noise of the window's units is refitted from the
   segment first. The estimates join those of the earlier segments, the centre
   moves to the new mean and the sums restart. A pixel whose window caught few
   of its values recentres on the share above or below it; one whose segment
   mean lies ``RESET_Z`` standard errors from the earlier segments' (a dark
   level that drifted while the first frames came) starts over from the segment.

The noise map is each pixel's own standard deviation, raised to the RMS over
the pixels where it came out lower, the rule of a dark-series calibration (an
estimate from few frames scatters; read noise is nearly uniform). A pixel is hot
(masked) when it fell more than ``n_sigma`` sigmas *below* its centre in two
frames (electrons only add signal, so only a noisy pixel swings that far down),
or when its dark level or noise is an outlier as in a dark series.

The per-frame pass is one numba kernel (:func:`_accumulate_rows`, ``nogil``,
run on row ranges from a few threads) that takes up to ``BATCH`` frames at a
time (:meth:`DarkEstimator.update_batch`), band by band of rows: the per-pixel
sums (about 34 bytes per pixel read and written per pass) then move once per
batch, the frames' 2 bytes per pixel once per frame. :func:`accumulate_numpy` and
:func:`fold_numpy` are the plain numpy definitions that the kernels equal.
Memory is bounded: 24 bytes per pixel (centre, two window sums and the variance
as float32, three uint16 counts, two uint8 counts), independent of the number
of frames. A dark series (no electrons) needs none of the clipping: its
streaming calibration uses the exact running sums of
:class:`streamstore.counting.dark_sums.DarkSums`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from streamstore.counting._dark_kernels import (
    BATCH,
    LOW_HOT,
    NOISE_PRIOR,
    TAU2_MAX,
    _accumulate_rows,
    _fold_rows,
    _median_rows,
    _noise_rows,
    _run_rows,
    _start_residual_rows,
    as_read,
    band_rows,
    frame_tuple,
)
from streamstore.counting._dark_reference import accumulate_numpy, fold_numpy, noise_numpy

__all__ = [
    "LOW_HOT",
    "NOISE_PRIOR",
    "DarkEstimator",
    "accumulate_numpy",
    "fold_numpy",
    "noise_numpy",
]

#: Window of the running sums around the centre, in noise sigmas (below, above).
DEFAULT_CLIP = (3.0, 3.0)
#: Frame counts at which :meth:`DarkEstimator.update` ends a segment and refines
#: the centre (and every ``SEGMENT_MAX`` frames after the last).
REFINE_AT = frozenset({16, 32, 64, 128, 256, 512})
SEGMENT_MAX = 512
#: Pixels within this Chebyshev distance of a value above the event threshold are left
#: out of the sums: an electron's charge spills into its neighbours in small shares
#: that would otherwise sit inside the window, lifting the dark and widening the noise.
NEIGHBOURHOOD = 1
#: A value this many noise sigmas above its centre leaves its neighbourhood out of the
#: sums: below the event threshold, so that electrons too weak or too spread out to
#: be counted still do not lift the dark.
EXCLUDE_SIGMA = 5.0
#: A 2 x 2 block whose sum is this many of its noise sigmas (twice the pixels') above
#: the centres leaves its four pixels' neighbourhoods out of the sums: an electron that
#: lands near a pixel corner shares its charge between four pixels, each of which can
#: stay below ``EXCLUDE_SIGMA`` while their sum is well above the noise.
BLOCK_SIGMA = 4.0
#: As in a dark series: a dark level or noise this many robust sigmas above the
#: median of all pixels marks a hot pixel.
HOT_SIGMA = 10.0
#: Frames the starting median reads at most (the others go into the sums only).
MEDIAN_FRAMES = 64
_TAU2_STEPS = 257


# -- the truncated Gaussian --------------------------------------------------------
def _truncated_moments(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of a unit Gaussian truncated to [a, b] (arrays, a < b)."""
    from scipy.special import ndtr

    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    pa = np.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
    pb = np.exp(-0.5 * b * b) / math.sqrt(2.0 * math.pi)
    # the smaller tail difference keeps precision where both bounds are far out
    # (each side worked out where it is taken only: ndtr is most of the time here)
    upper = a > 0
    lower = ~upper
    z = np.empty(np.broadcast_shapes(a.shape, b.shape))
    au, bu = np.broadcast_to(a, z.shape)[upper], np.broadcast_to(b, z.shape)[upper]
    al, bl = np.broadcast_to(a, z.shape)[lower], np.broadcast_to(b, z.shape)[lower]
    z[upper] = ndtr(-au) - ndtr(-bu)
    z[lower] = ndtr(bl) - ndtr(al)
    mean = (pa - pb) / z
    var = 1.0 + (a * pa - b * pb) / z - mean * mean
    return mean, var


@functools.lru_cache(maxsize=1)
def _gauss_nodes() -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Hermite nodes and weights (summing to 1) of :func:`window_model`'s
    average over the centre's error: the same for every window."""
    x, wq = np.polynomial.hermite_e.hermegauss(48)
    wq = wq / wq.sum()
    x.flags.writeable = wq.flags.writeable = False  # shared by every call
    return x, wq


def window_model(lo: float, hi: float) -> tuple[float, float, np.ndarray, np.ndarray]:
    """How a window's moments answer to the pixel's mean, about the window's centre.

    A pixel whose mean lies ``delta`` noise sigmas above the centre has, inside
    the window ``[-lo, hi]`` sigmas about the centre, the mean ``g(delta) =
    delta + m(-lo - delta, hi - delta)`` and the variance ``v(delta)`` of the
    truncated Gaussian (sigma units); ``g'(0) = v(0)``. Over pixels whose centre
    has a Gaussian error of variance ``tau2``, the linearised mean ``(g - g(0)) /
    v(0)`` exceeds ``delta`` by ``bias(tau2) = (E g - g(0)) / v(0)`` on average,
    and the window variance is ``E v``.

    Returns
    -------
    g0, v0 : float
        ``g(0)`` and ``v(0)``.
    bias, vbar : ndarray of float64
        ``bias(tau2)`` and ``E v`` at ``tau2 = i * TAU2_MAX / (len - 1)``.
    """
    x, wq = _gauss_nodes()
    tau = np.sqrt(np.linspace(0.0, TAU2_MAX, _TAU2_STEPS))
    d = np.clip(tau[:, None] * x[None, :], -8.0, 8.0)
    m, v = _truncated_moments(-lo - d, hi - d)
    g = d + m
    g0, v0 = float(g[0, 0]), float(v[0, 0])
    bias = ((g @ wq) - g0) / v0
    return g0, v0, bias, v @ wq


@functools.lru_cache(maxsize=16)
def _window_model_cached(lo: float, hi: float) -> tuple[float, float, np.ndarray, np.ndarray]:
    return window_model(lo, hi)


def _window_model_copy(lo: float, hi: float) -> tuple[float, float, np.ndarray, np.ndarray]:
    """:func:`window_model`, remembered for the last few windows (each refinement
    starts from the window the sums were drawn with: ``clip`` in the noise then
    known); the tables are copies, free to change."""
    g0, v0, bias, vbar = _window_model_cached(lo, hi)
    return g0, v0, bias.copy(), vbar.copy()


@functools.lru_cache(maxsize=1)
def _probit_table() -> np.ndarray:
    """The quantile function of a unit Gaussian at ``q = i / 4096`` (the ends at
    ``1 / 8192`` from 0 and 1)."""
    from scipy.special import ndtri

    q = np.linspace(0.0, 1.0, 4097)
    q[0], q[-1] = 1.0 / 8192, 1.0 - 1.0 / 8192
    return ndtri(q)


# -- numpy definitions ---------------------------------------------------------------
def _robust_centre_sigma(x: np.ndarray) -> tuple[float, float]:
    from streamstore.counting.robust import robust_sigma

    return robust_sigma(x)


@functools.lru_cache(maxsize=64)
def _median_variance(m: int) -> float:
    """Variance of the median of ``m`` (odd) unit Gaussian values."""
    from scipy.special import gammaln, ndtr

    x = np.linspace(-8.0, 8.0, 16001)
    h = (m - 1) // 2
    logc = gammaln(m + 1) - 2.0 * gammaln(h + 1)
    cdf = np.clip(ndtr(x), 1e-300, 1.0)
    sf = np.clip(ndtr(-x), 1e-300, 1.0)
    f = np.exp(logc + h * (np.log(cdf) + np.log(sf)) - 0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return float(np.sum(x * x * f) * (x[1] - x[0]))


def _start_sigma(arr: np.ndarray) -> float:
    """The noise of the first frames ``(k, H, W)``, from a sample of pixels.

    Each value's residual about the median of an odd number of the *other*
    frames has the noise widened by that median's own error (a known factor for
    Gaussian noise); electrons only add signal, so the residuals' noise peak is
    fitted on its clean lower side (:func:`streamstore.counting.robust.noise_peak`).
    A median of the same frames would sit closer to their values than the dark
    level does and make the noise look smaller.
    """
    from streamstore.counting.robust import noise_peak

    k, h, w = arr.shape
    if k < 2:
        raise ValueError(f"the starting noise needs at least 2 frames, got {k}")
    step = max(1, int(math.sqrt(h * w / 65536)))
    # a small sample, contiguous and read-only in one type for the frame types a
    # camera sends (one compiled kernel): int16, uint16 values less 32768 (the
    # residuals are differences: the same), or int64 from wider frames
    sample = arr[:, ::step, ::step]
    if sample.dtype == np.uint16:
        sample = np.bitwise_xor(sample, np.uint16(0x8000)).view(np.int16)
    elif sample.dtype == np.uint64:  # int64 values, as the residuals have them
        sample = sample.view(np.int64)
    wide = sample.dtype.itemsize > 2
    sample = np.ascontiguousarray(sample, dtype=np.int64 if wide else np.int16).view()
    sample.flags.writeable = False
    # the median of an odd count is one of the values: the residuals are integers
    m = k - 1 if k % 2 == 0 else k - 2
    res = np.empty(sample.shape, np.int64)
    _run_rows(_start_residual_rows, sample.shape[1], sample, m, res)
    sigma = noise_peak(res.reshape(-1))[1] / math.sqrt(1.0 + _median_variance(m))
    return max(float(sigma), 0.5)


class DarkEstimator:
    """Running per-pixel dark offset, noise and hot pixels from frames with beam.

    Parameters
    ----------
    frames : array_like, shape (n, H, W)
        The first frames (at least 2; 8 or more is good), integer, with or
        without beam. Read as signed integers when ``wrapped``.
    n_sigma : float, default 5.0
        Background threshold of the counting calibration, in noise sigmas; also
        the height above the centre that leaves a pixel's neighbourhood out of
        the sums and the depth below it that marks a pixel hot.
    clip : (float, float), default (3.0, 3.0)
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
        The noise (ADU): the RMS of the pixels' frame-to-frame standard deviations.
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
        arr = self._signed(arr)
        self.frame_shape: tuple[int, int] = (int(arr.shape[1]), int(arr.shape[2]))
        self.n_sigma = float(n_sigma)
        self.clip = (lo, hi)
        h, w = self.frame_shape
        k = arr.shape[0]
        self.centre = np.empty((h, w), np.float32)
        first = as_read(np.ascontiguousarray(arr[:MEDIAN_FRAMES]), self.wrapped)
        _run_rows(_median_rows, h, *first, self.centre)
        self.s1 = np.zeros((h, w), np.float32)  # sum of (x - centre) inside the window
        self.s2 = np.zeros((h, w), np.float32)  # sum of (x - centre)**2 inside the window
        self.n = np.zeros((h, w), np.uint16)  # values inside the window, this segment
        self.w = np.zeros((h, w), np.uint16)  # values inside the window, earlier segments
        self.var = np.zeros((h, w), np.float32)  # per-pixel variance, earlier segments
        self.low = np.zeros((h, w), np.uint8)  # values below centre - n_sigma * noise
        self.above = np.zeros((h, w), np.uint16)  # values above the window, this segment
        self.below = np.zeros((h, w), np.uint8)  # values below the window, this segment
        self.n_frames = 0
        km = min(k, MEDIAN_FRAMES)
        self.sigma = _start_sigma(arr[:km])
        self._start = km
        self._folded = 0  # frames before the current segment
        # variance (sigma**2) of the starting median: between those of the odd counts
        # around an even one
        self._v_start = 0.5 * (_median_variance(km | 1) + _median_variance(km - 1 + km % 2))
        # the starting frames are the first segment, windowed about their median: the
        # provisional maps are their window means and variances with the electrons
        # left out, not the median, which electrons lift
        self._accumulate(list(arr))
        self.refine()
        # once more about that centre: the median sits high where electrons lifted it,
        # and so did the levels that leave electrons out; the second pass replaces the
        # first (the same values), its hot-pixel counts too
        for a in (self.w, self.var, self.low):
            a.fill(0)
        self.n_frames = self._folded = 0
        self._accumulate(list(arr))
        # that window sits on the values' own window mean: it truncates them as a
        # window on the pixel's mean would
        self._fold(0.0)

    def _signed(self, x: np.ndarray) -> np.ndarray:
        if self.wrapped and x.dtype.kind == "u":
            return x.view(np.dtype(f"int{8 * x.dtype.itemsize}"))
        return x

    # -- streaming ------------------------------------------------------------------
    def _edges(self) -> tuple[float, float, float, float, float]:
        lo, hi = self.clip
        s = self.sigma
        return (lo * s, hi * s, EXCLUDE_SIGMA * s, 2.0 * BLOCK_SIGMA * s, self.n_sigma * s)

    def _accumulate(self, frames: list[np.ndarray]) -> None:
        """Add frames of one type (signed views where wrapped), ``BATCH`` a pass."""
        edges = tuple(np.float32(e) for e in self._edges())
        h, w = self.frame_shape
        for i in range(0, len(frames), BATCH):
            part = frames[i : i + BATCH]
            # the kernels read unsigned bits only (signed values through the sign bit)
            read = [as_read(f, self.wrapped) for f in part]
            wrap = read[0][2]
            args = (frame_tuple([r[0] for r in read]), len(part), wrap, self.centre)
            args += (self.s1, self.s2, self.n)
            args += (self.above, self.below, self.low, *edges, NEIGHBOURHOOD)
            # one frame: the whole range is one band (nothing to share a cache with)
            band = band_rows(w) if len(part) > 1 else h + NEIGHBOURHOOD
            _run_rows(_accumulate_rows, h, *args, band)
            self.n_frames += len(part)

    def _check(self, frame: Any) -> np.ndarray:
        x = np.asarray(frame)
        if x.shape != self.frame_shape:
            raise ValueError(f"frame is {x.shape}, the estimator is {self.frame_shape}")
        if x.dtype.kind not in "iu":
            raise ValueError(f"frame must be integer, got {x.dtype}")
        return self._signed(x)

    def update(self, frame: Any) -> None:
        """Add one frame (H, W) (refining by itself at 16, 32, 64, ... frames)."""
        self.update_batch([frame])

    def update_batch(self, frames: Any) -> None:
        """Add frames in order, as many :meth:`update` calls would, with the same result.

        Up to ``BATCH`` frames go through the window sums in one pass, band by band
        of rows, so the sums are read and written once per batch instead of once
        per frame; a batch ends at each refinement point (16, 32, 64, ... frames).

        Parameters
        ----------
        frames : sequence of array_like (H, W), or array_like (n, H, W)
            Integer frames of one type, oldest first.

        Raises
        ------
        ValueError
            When a frame's shape or type does not fit; the frames before it in
            the batch are added.
        """
        todo = list(frames)
        while todo:
            cap = int(np.iinfo(np.uint16).max)
            if self.n_frames >= cap:
                return  # the estimate is as good as it gets long before this
            # frames up to the next refinement point (or the cap)
            nxt = min([r for r in REFINE_AT if r > self.n_frames], default=0)
            seg = SEGMENT_MAX - self.n_frames % SEGMENT_MAX
            room = min(seg, cap - self.n_frames)
            if nxt:
                room = min(room, nxt - self.n_frames)
            part: list[np.ndarray] = []
            bad = None
            for f in todo[: min(room, BATCH)]:
                try:
                    x = self._check(f)
                except ValueError as exc:
                    bad = exc
                    break
                if part and x.dtype != part[0].dtype:
                    break  # one type per pass: the next batch starts with it
                part.append(x)
            todo = todo[len(part) :]
            if part:
                self._accumulate(part)
                if self.n_frames in REFINE_AT or self.n_frames % SEGMENT_MAX == 0:
                    self.refine()
            if bad is not None:
                raise bad

    # -- results ----------------------------------------------------------------------
    @property
    def noise_sigma(self) -> float:
        """The sensor's noise (ADU), the RMS of the per-pixel noise."""
        return self.sigma

    def refine(self) -> None:
        """End the segment: fold its sums into the per-pixel mean (the new centre)
        and variance, and refit the noise; the sums restart."""
        self._fold(self._v_start)

    def _fold(self, v_start: float) -> None:
        """:meth:`refine`, a centre without earlier segments having the error
        variance ``v_start`` (sigma**2)."""
        if self.n_frames == self._folded:
            return
        sigma = self._segment_sigma(v_start)
        model = self._model(sigma)
        args = (self.centre, self.s1, self.s2, self.n, self.above, self.below, self.var, self.w)
        args += (sigma,)
        # frames of the earlier segments and of this one
        frames = (float(self._folded), float(self.n_frames - self._folded))
        _run_rows(_fold_rows, self.frame_shape[0], *args, *model, v_start, *frames)
        self._folded = self.n_frames
        self.sigma = self._rms()

    def _model(self, sigma: float) -> tuple[Any, ...]:
        """:func:`window_model` of the segment's window in units of the noise
        ``sigma`` (it was drawn ``clip`` sigmas wide with the noise then known),
        the window's edges in those units and :func:`_probit_table`."""
        a, b = (c * self.sigma / sigma for c in self.clip)
        return (*_window_model_copy(a, b), a, b, _probit_table())

    def _segment_sigma(self, v_start: float) -> float:
        """The noise of the segment's window sums, self-consistently: the window's
        width in noise sigmas depends on the noise being estimated."""
        h, w = self.frame_shape
        step = max(1, (h * w) // (1 << 20))
        n = self.n.reshape(-1)[::step].astype(np.float64)
        ok = (n >= 2) & (self.low.reshape(-1)[::step] < LOW_HOT)
        if np.count_nonzero(ok) < 16:
            return self.sigma
        n = n[ok]
        s1 = self.s1.reshape(-1)[::step][ok].astype(np.float64)
        # per pixel, then averaged: a pixel's count in the window depends on where the
        # window sits on it, as does its window variance, so weighting by the count
        # would favour the wider ones
        ss = np.maximum(self.s2.reshape(-1)[::step][ok] - s1 * s1 / n, 0.0) / (n - 1.0)
        # a pixel's window variance depends on its count of earlier values alone:
        # worked out once per count (each as the pixel's own), then looked up
        wi = self.w.reshape(-1)[::step][ok]
        w0, w1 = int(wi.min()), int(wi.max())
        ww = np.arange(w0, w1 + 1, dtype=np.float64)
        pick = None if w0 == w1 else wi - np.uint16(w0)
        sigma = self.sigma
        for _ in range(8):
            _, vt0, _, vtab = self._model(sigma)[:4]
            tau2 = np.where(ww == 0, v_start, 1.0 / (vt0 * np.maximum(ww, 1.0)))
            t = np.minimum(tau2 * ((len(vtab) - 1) / TAU2_MAX), len(vtab) - 1.000001)
            i = t.astype(np.int64)
            vbar = vtab[i] + (t - i) * (vtab[i + 1] - vtab[i])
            vbar = vbar[0] if pick is None else vbar[pick]
            new = max(math.sqrt(float(np.mean(ss / vbar))), 1e-3)  # equal values: no noise seen
            done = abs(new - sigma) <= 1e-4 * sigma
            sigma = new
            if done:
                break
        return max(sigma, 1e-3)

    def _rms(self) -> float:
        """RMS of the per-pixel noise over pixels with a variance and no low values."""
        h, w = self.frame_shape
        step = max(1, (h * w) // (1 << 22))  # a few million pixels pin it down
        var = self.var.reshape(-1)[::step]
        ok = (self.w.reshape(-1)[::step] >= 2) & (self.low.reshape(-1)[::step] < LOW_HOT)
        if not ok.any():
            return self.sigma
        return max(math.sqrt(float(np.mean(var[ok], dtype=np.float64))), 1e-3)

    def maps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(dark, noise, hot)`` after :meth:`refine`: float32 maps and a bool mask.

        ``noise`` is each pixel's own frame-to-frame standard deviation, at least
        the RMS over all pixels (:attr:`sigma`), as a dark series has it.
        """
        self.refine()
        h, w = self.frame_shape
        step = max(1, (h * w) // (1 << 20))
        var = self.var.reshape(-1)[::step]
        sample = (self.low.reshape(-1)[::step] < LOW_HOT) & (self.w.reshape(-1)[::step] >= 2)
        check = bool(sample.any())
        dark_top = noise_top = np.float32(0.0)
        if check:
            d_c, d_s = _robust_centre_sigma(self.centre.reshape(-1)[::step][sample])
            n_c, n_s = _robust_centre_sigma(np.sqrt(var[sample]))
            # floors on the spreads, as in a dark series: a uniform sensor has no hot pixels
            d_s = max(d_s, 0.5 * self.sigma)
            n_s = max(n_s, 0.1 * self.sigma)
            # float32 maps meet their levels in float32
            dark_top = np.float32(d_c + HOT_SIGMA * d_s)
            noise_top = np.float32(n_c + HOT_SIGMA * n_s)
        rms = np.float32(self.sigma)
        # each pixel's variance from its w - 1 degrees of freedom, pooled with the RMS's
        # (read noise is nearly uniform): from the first 8 frames alone a pixel's own
        # noise scatters by a quarter, and floored at the RMS it would raise half the
        # thresholds by ~10 %. The RMS weighs NOISE_PRIOR values while a pixel has up
        # to NOISE_PRIOR of its own, fewer the more it has (1 at 64): a long estimate
        # keeps its per-pixel noise as a dark series does (:func:`_noise_rows`, in one
        # pass over the maps).
        hot = np.empty((h, w), bool)
        noise = np.empty((h, w), np.float32)
        args = (self.centre, self.var, self.w, self.low, check, dark_top, noise_top, rms)
        _run_rows(_noise_rows, h, *args, hot, noise)
        if not self.w.any():
            # the starting median only: its error (pi / 2 sigma**2 / k) widens the noise
            # a threshold sees
            noise[...] = rms * np.float32(math.sqrt(1.0 + 0.5 * math.pi / self._start))
        return self.centre.copy(), noise, hot
