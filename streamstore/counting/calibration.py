"""Per-pixel calibration for electron counting: dark offset, noise, gain, mask, thresholds.

A :class:`Calibration` says, for every pixel ``(row, col)`` of the frame, what
a pixel reads without beam (``dark``, ADU), how much it fluctuates (``noise``,
ADU, one standard deviation), an optional multiplicative ``gain`` applied to the
dark-subtracted signal, and an optional bad-pixel ``mask`` (True = ignore).
All maps have the frame's own orientation: shape ``(H, W)``, indexed
``[row, col]`` exactly like the frames.

Two scalar thresholds complete it:

- ``n_sigma``: a pixel is a candidate event when its dark-subtracted value
  exceeds ``n_sigma * noise`` of that pixel (raw ADU; the gain cancels);
- ``xray_threshold``: a pixel whose dark-subtracted, gain-corrected signal
  exceeds it is an X-ray hit, and no event is reported within
  ``xray_radius`` pixels (Chebyshev distance) of it. ``None`` means only
  saturated pixels count as X-ray hits.

Counting turns these into per-pixel threshold maps in the frame's integer
type (:meth:`Calibration.threshold_maps`), so the hot loop is one comparison
per pixel. See ``docs/counting.md`` for the exact semantics.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from streamstore.counting import calibration_estimate, calibration_io, gain_reference
from streamstore.counting.calibration_checks import as_map

__all__ = ["Calibration"]

#: Default background threshold, in standard deviations of each pixel's noise.
DEFAULT_N_SIGMA = 5.0
#: Default X-ray exclusion radius (pixels, Chebyshev distance).
DEFAULT_XRAY_RADIUS = 2
#: Default X-ray threshold of :meth:`Calibration.estimate`, in units of the
#: median signal of a single-electron peak.
DEFAULT_XRAY_FACTOR = 10.0
_MAX_GAIN = 1e6
#: The largest pixel's gain in the kernels' relative gain map: with 16-bit frames
#: |(raw - dark) * gain| <= 65535 * 32767 < 2**31, so signals fit an int32.
GAIN_SCALE = 32767
#: Pixels of the threshold maps computed at a time (:meth:`Calibration.threshold_maps`).
_MAP_ROWS_PIXELS = 1 << 16
_SOURCES = ("dark_frames", "estimate", "file", "manual")


class Calibration:
    """Per-pixel dark, noise, gain and mask plus the counting thresholds.

    Parameters
    ----------
    dark : array_like, shape (H, W)
        Dark offset of each pixel in ADU (what it reads without beam).
    noise : array_like, shape (H, W)
        Read noise of each pixel in ADU (one standard deviation), > 0 where not masked.
    gain : array_like, shape (H, W), optional
        Multiplicative gain applied to the dark-subtracted signal, same
        ``[row, col]`` orientation as the frame; > 0 and < 1e6 where not
        masked. None means 1 everywhere.
    mask : array_like of bool, shape (H, W), optional
        True marks a bad pixel: it never yields an event, never counts as an
        X-ray hit, and contributes nothing to its neighbours' tests.
    n_sigma : float, default 5.0
        Background threshold in units of each pixel's ``noise``.
    xray_threshold : float, optional
        Dark-subtracted, gain-corrected signal above which a pixel is an
        X-ray hit. None: only saturated pixels are X-ray hits.
    xray_radius : int, default 2
        No event is reported within this Chebyshev distance of an X-ray hit.
    wrapped : bool, default False
        The frames are pedestal-subtracted by the camera and negative values
        wrapped around the unsigned type (e.g. -3 stored as 65533): counting
        reinterprets them as two's-complement signed integers.
    source : str, default "manual"
        Where the calibration came from: "dark_frames", "estimate", "file" or "manual".

    Raises
    ------
    ValueError
        When a map has the wrong shape or type, or a value is out of range.

    Notes
    -----
    A calibration is immutable: its maps are read-only (an input array that
    could still change is copied), and setting ``dark``, ``noise``, ``gain``,
    ``mask``, ``n_sigma``, ``xray_threshold``, ``xray_radius`` or ``wrapped``
    again raises AttributeError. What counting derives from it (integer maps,
    the kernel's maps) is therefore computed once and kept with it.
    """

    def __init__(
        self,
        dark: Any,
        noise: Any,
        *,
        gain: Any = None,
        mask: Any = None,
        n_sigma: float = DEFAULT_N_SIGMA,
        xray_threshold: float | None = None,
        xray_radius: int = DEFAULT_XRAY_RADIUS,
        wrapped: bool = False,
        source: str = "manual",
    ) -> None:
        self.dark = as_map("dark", dark, None, np.float32)
        shape = self.dark.shape
        self.noise = as_map("noise", noise, shape, np.float32)
        self.mask = None if mask is None else as_map("mask", mask, shape, bool)
        self.gain = None if gain is None else as_map("gain", gain, shape, np.float32)
        good = np.ones(shape, bool) if self.mask is None else ~self.mask
        if not np.all(np.isfinite(self.dark[good])):
            raise ValueError("dark must be finite on every unmasked pixel")
        if not np.all(np.isfinite(self.noise[good]) & (self.noise[good] > 0)):
            raise ValueError("noise must be finite and > 0 on every unmasked pixel (mask the rest)")
        if self.gain is not None:
            g = self.gain[good]
            if not np.all(np.isfinite(g) & (g > 0) & (g < _MAX_GAIN)):
                raise ValueError(
                    f"gain must be finite, > 0 and < {_MAX_GAIN:g} on every unmasked pixel"
                )
        n_sigma = float(n_sigma)
        if not (math.isfinite(n_sigma) and n_sigma > 0):
            raise ValueError(f"n_sigma must be a positive number, got {n_sigma!r}")
        self.n_sigma = n_sigma
        if xray_threshold is not None:
            xray_threshold = float(xray_threshold)
            if not (math.isfinite(xray_threshold) and xray_threshold > 0):
                raise ValueError(f"xray_threshold must be positive or None, got {xray_threshold!r}")
        self.xray_threshold = xray_threshold
        if int(xray_radius) != xray_radius or not 0 <= int(xray_radius) <= 16:
            raise ValueError(f"xray_radius must be an integer in 0..16, got {xray_radius!r}")
        self.xray_radius = int(xray_radius)
        self.wrapped = bool(wrapped)
        if source not in _SOURCES:
            raise ValueError(f"source must be one of {_SOURCES}, got {source!r}")
        self.source = source
        self.__dict__["_derived_cache"] = {}  # from here on the defining attributes are fixed

    #: Attributes that define the calibration: fixed once it is built (what is
    #: derived from them is cached with it; the maps themselves are read-only).
    _DEFINING = frozenset(
        ("dark", "noise", "gain", "mask", "n_sigma", "xray_threshold", "xray_radius", "wrapped")
    )

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._DEFINING and "_derived_cache" in self.__dict__:
            raise AttributeError(
                f"a Calibration is immutable: {name} cannot be set again; build a new one "
                "(with_xray_threshold for another X-ray threshold)"
            )
        object.__setattr__(self, name, value)

    def _derived(self) -> dict[Any, Any]:
        """Cache of values derived from the maps and a frame type (the counting
        kernel's maps, its row-type choice), freed with the calibration.

        Keys are small tuples of names and dtypes, so it stays bounded. Like the
        integer maps, it does not depend on the X-ray threshold and is shared with
        the calibrations :meth:`with_xray_threshold` derives.
        """
        return self.__dict__.setdefault("_derived_cache", {})

    # -- shape and description --------------------------------------------
    @property
    def frame_shape(self) -> tuple[int, int]:
        """``(H, W)`` of the frames this calibration fits."""
        return (int(self.dark.shape[0]), int(self.dark.shape[1]))

    @property
    def n_masked(self) -> int:
        """Number of masked pixels."""
        return 0 if self.mask is None else int(self.mask.sum())

    def _medians(self) -> tuple[float | None, float | None]:
        """Median dark and noise over unmasked pixels, computed once (maps are read-only)."""
        cached = self.__dict__.get("_median_cache")
        if cached is None:
            good = np.ones(self.frame_shape, bool) if self.mask is None else ~self.mask
            if good.any():
                cached = (float(np.median(self.dark[good])), float(np.median(self.noise[good])))
            else:
                cached = (None, None)
            self.__dict__["_median_cache"] = cached
        return cached

    @property
    def background_threshold(self) -> float:
        """Median background threshold ``n_sigma * noise`` over unmasked pixels (ADU)."""
        noise = self._medians()[1]
        return float("nan") if noise is None else self.n_sigma * noise

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable scalars describing the calibration (for file attributes).

        The medians are computed on the first call and kept: treat the maps as read-only.
        """
        dark, noise = self._medians()
        return {
            "source": self.source,
            "frame_shape": list(self.frame_shape),
            "n_sigma": self.n_sigma,
            "xray_threshold": self.xray_threshold,
            "xray_radius": self.xray_radius,
            "wrapped": self.wrapped,
            "median_dark_adu": dark,
            "median_noise_adu": noise,
            "background_threshold_adu": None if noise is None else self.n_sigma * noise,
            "n_masked": self.n_masked,
            "has_gain": self.gain is not None,
        }

    def __repr__(self) -> str:
        s = self.summary()
        return (
            f"Calibration(frame_shape={self.frame_shape}, source={self.source!r}, "
            f"n_sigma={self.n_sigma:g}, xray_threshold={self.xray_threshold}, "
            f"median_noise={s['median_noise_adu']}, n_masked={self.n_masked})"
        )

    # -- construction --------------------------------------------------------
    @classmethod
    def from_dark_frames(
        cls,
        dark_frames: Any,
        *,
        n_sigma: float = DEFAULT_N_SIGMA,
        xray_threshold: float | None = None,
        gain: Any = None,
        mask: Any = None,
        xray_radius: int = DEFAULT_XRAY_RADIUS,
        hot_sigma: float = 10.0,
    ) -> Calibration:
        """Calibrate from frames taken with the beam off.

        Parameters
        ----------
        dark_frames : array_like, shape (n, H, W), or iterable of (H, W) frames
            At least 2 beam-off frames (more give a better noise map; 50+ is good).
            An iterator (a generator, an HDF5 dataset) is read one frame at a
            time into running sums, so memory does not grow with the number of
            frames; for integer frames the result equals that of the stacked
            array (:mod:`streamstore.counting.dark_sums`).
        n_sigma : float, default 5.0
            Background threshold in units of each pixel's noise.
        xray_threshold : float, optional
            Signal above which a pixel is an X-ray hit; None: saturation only.
        gain : array_like, shape (H, W), optional
            Gain map, same orientation as the frames.
        mask : array_like of bool, shape (H, W), optional
            Known bad pixels; hot pixels found here are added to it.
        xray_radius : int, default 2
            X-ray exclusion radius (Chebyshev distance, pixels).
        hot_sigma : float, default 10.0
            A pixel is hot (and masked) when its dark level or its noise lies
            more than ``hot_sigma`` robust standard deviations above the
            median of all pixels; pixels with zero noise are masked too.

        Returns
        -------
        Calibration
            With ``source == "dark_frames"``.
        """
        return calibration_estimate.from_dark_frames(
            cls,
            dark_frames,
            n_sigma=n_sigma,
            xray_threshold=xray_threshold,
            gain=gain,
            mask=mask,
            xray_radius=xray_radius,
            hot_sigma=hot_sigma,
        )

    @classmethod
    def estimate(
        cls,
        frames: Any,
        *,
        n_sigma: float = DEFAULT_N_SIGMA,
        xray_threshold: float | str | None = "auto",
        xray_factor: float = DEFAULT_XRAY_FACTOR,
        xray_radius: int = DEFAULT_XRAY_RADIUS,
        gain: Any = None,
        mask: Any = None,
        n_samples: int = 200_000,
        seed: int = 0,
        pedestal_subtracted: bool | None = None,
        per_pixel: bool | None = None,
        estimator_out: list | None = None,
    ) -> Calibration:
        """Estimate thresholds from frames with beam, without dark frames.

        For data whose dark offset the camera already subtracted (the 4D
        Camera does this), and for raw frames without a dark series: when the
        frames carry a fixed dark pattern, the dark and noise are estimated per
        pixel from the frames themselves (see ``per_pixel``). Otherwise it samples
        up to ``n_samples`` pixel values and fits a Gaussian to the logarithm of
        their histogram on the clean side of the noise peak (electrons only add
        signal), falling back to median/MAD with clipped refits; sets a uniform
        dark (the peak centre) and noise (its sigma).
        Unsigned values that wrapped below zero (65533 for -3) are detected
        and read as negative; the result has ``wrapped=True`` so counting
        reads the frames the same way. Values cut at 0 (more than 10 % of them
        exactly 0: frames dark-subtracted and clipped) are fitted from the share
        at or below each value, with one dark level (see docs/counting.md).

        Parameters
        ----------
        frames : array_like, shape (n, H, W) or (H, W)
            Frames with beam (dose around 0.01 e/px/frame or less is ideal).
        n_sigma : float, default 5.0
            Background threshold in units of the fitted noise sigma.
        xray_threshold : float, "auto" or None, default "auto"
            "auto": ``xray_factor`` times the median signal of the
            single-electron peaks found in the sample frames (None when there
            are fewer than 20 of them). A number sets it; None disables it
            (saturation only).
        xray_factor : float, default 10.0
            Multiple of the median electron peak used by "auto".
        xray_radius : int, default 2
            X-ray exclusion radius (Chebyshev distance, pixels).
        gain, mask : array_like, optional
            As in :class:`Calibration`. Hot pixels found in (up to 16 of) the
            frames are added to the mask: values more than ``n_sigma`` noise
            sigmas below the noise peak, or (with 4 or more frames) above the
            background threshold far more often than their neighbours.
        n_samples : int, default 200000
            Number of pixel values sampled for the noise fit.
        seed : int, default 0
            Seed of the pixel sampler (the result is reproducible).
        pedestal_subtracted : bool, optional
            Force (True/False) or auto-detect (None) whether values wrapped.
        per_pixel : bool, optional
            Estimate a per-pixel dark map (:class:`~.dark_estimate.DarkEstimator`,
            from up to 64 frames, at least 2) instead of one dark level. None
            (default): per pixel when the pooled noise peak is more than 1.1 x
            the per-pixel noise, i.e. the frames carry a fixed dark pattern (raw
            frames); pedestal-subtracted frames keep the single level.
        estimator_out : list, optional
            When the estimate is per pixel, its ``DarkEstimator`` is appended
            here, to keep refining it on later frames and rebuild the
            calibration with :meth:`from_estimator` (not kept otherwise: it
            holds 24 bytes per pixel).

        Returns
        -------
        Calibration
            With ``source == "estimate"``.
        """
        return calibration_estimate.estimate(
            cls,
            frames,
            n_sigma=n_sigma,
            xray_threshold=xray_threshold,
            xray_factor=xray_factor,
            xray_radius=xray_radius,
            gain=gain,
            mask=mask,
            n_samples=n_samples,
            seed=seed,
            pedestal_subtracted=pedestal_subtracted,
            per_pixel=per_pixel,
            estimator_out=estimator_out,
        )

    @classmethod
    def from_estimator(
        cls,
        estimator: Any,
        *,
        n_sigma: float = DEFAULT_N_SIGMA,
        xray_threshold: float | str | None = "auto",
        xray_factor: float = DEFAULT_XRAY_FACTOR,
        xray_radius: int = DEFAULT_XRAY_RADIUS,
        gain: Any = None,
        mask: Any = None,
        frames: Any = None,
    ) -> Calibration:
        """Calibration from a :class:`~streamstore.counting.dark_estimate.DarkEstimator`'s maps.

        Parameters
        ----------
        estimator : DarkEstimator
            Per-pixel running estimate (refined by this call).
        n_sigma, xray_radius, gain, mask
            As in :meth:`estimate`; the estimator's hot pixels join ``mask``.
        xray_threshold : float, "auto" or None
            "auto" places it at ``xray_factor`` times the median electron peak
            of ``frames`` (None without frames or with fewer than 20 peaks).
        frames : array_like, optional
            A few frames with beam for "auto".

        Returns
        -------
        Calibration
            With ``source == "estimate"``.
        """
        return calibration_estimate.from_estimator(
            cls,
            estimator,
            n_sigma=n_sigma,
            xray_threshold=xray_threshold,
            xray_factor=xray_factor,
            xray_radius=xray_radius,
            gain=gain,
            mask=mask,
            frames=frames,
        )

    # -- X-ray threshold from frames with beam ----------------------------------
    def electron_peak_signal(self, frames: Any) -> float | None:
        """Median signal of single-electron peaks in frames with beam.

        The signal is dark-subtracted and gain-corrected, like
        ``xray_threshold``; a peak is a 3 x 3 local maximum above the
        background threshold of its pixel (masked pixels excluded). Looks at up
        to 8 frames, at most their central 1024 x 1024 pixels. Used to set an
        X-ray threshold for a calibration made from dark frames, which hold no
        electrons (:meth:`estimate` does the same with ``xray_threshold="auto"``).

        Parameters
        ----------
        frames : array_like, shape (n, H, W) or (H, W)
            uint8 or uint16 frames with beam, of this calibration's frame shape.

        Returns
        -------
        float or None
            None when fewer than 20 peaks are found.
        """
        return calibration_estimate.electron_peak_signal(self, frames)

    def _replace(self, **changes: Any) -> Calibration:
        """This calibration with the defining attributes (and ``source``) named changed."""
        fields = {name: getattr(self, name) for name in (*self._DEFINING, "source")}
        fields.update(changes)
        return Calibration(fields.pop("dark"), fields.pop("noise"), **fields)

    def with_xray_threshold(self, xray_threshold: float | None) -> Calibration:
        """This calibration (same maps and source) with another X-ray threshold."""
        new = self._replace(xray_threshold=xray_threshold)
        # the kernel's integer maps do not depend on the X-ray threshold: share them
        new.__dict__["_int_maps_cache"] = self.__dict__.setdefault("_int_maps_cache", {})
        new.__dict__["_derived_cache"] = self._derived()
        return new

    def with_gain_reference(self, flat_frames: Any, *, edge: int = 2) -> Calibration:
        """This calibration (same maps, thresholds and source) with the gain that
        flat-field frames measure, in place of any gain it had.

        Signals are multiplied by the median pixel's mean signal under a uniform
        beam over this pixel's; saturated values, X-ray hits, masked pixels and
        the charge the frame's edge misses are left out (:mod:`.gain_reference`).

        Parameters
        ----------
        flat_frames : array_like or iterable of array_like
            uint8 / uint16 frames under a uniform beam, (n, H, W) or (H, W), or
            an iterable of such arrays. A per-pixel precision of about 2 % takes
            some 350 frames at 2 e/px/frame.
        edge : int, default 2
            Rows and columns at each edge whose charge deficit is taken out first.

        Raises
        ------
        ValueError
            When the frames have the wrong shape or type, hold no beam on an
            unmasked pixel, are too bright (1 % of values above the X-ray
            threshold) or too few or dim to measure the gains to 5 %.
        """
        return self.with_gain(gain_reference.gain_from_flats(self, flat_frames, edge=edge))

    def with_gain(self, gain: Any) -> Calibration:
        """This calibration (same maps, thresholds and source) with ``gain`` as its
        gain map (None: none); checked as the constructor checks it."""
        return self._replace(gain=gain)

    # -- persistence -------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the calibration to an HDF5 file (overwrites ``path``)."""
        calibration_io.save(self, path)

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a calibration written by :meth:`save`; ``source`` becomes "file".

        Raises
        ------
        FileNotFoundError
            When ``path`` does not exist.
        FormatError
            When the file holds no streamstore calibration.
        """
        return calibration_io.load(cls, path)

    # -- maps for the kernels -------------------------------------------------------
    def frame_dtype(self, dtype: Any) -> np.dtype:
        """The integer type counting reads frames of ``dtype`` as (signed when ``wrapped``)."""
        dt = np.dtype(dtype)
        if dt not in (np.dtype(np.uint8), np.dtype(np.uint16)):
            raise ValueError(f"frames must be uint8 or uint16, got dtype {dt}")
        if self.wrapped:
            return np.dtype(f"int{8 * dt.itemsize}")
        return dt

    def threshold_maps(self, dtype: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
        """Per-pixel integer maps and the X-ray level the counting kernels use.

        Parameters
        ----------
        dtype : uint8 or uint16
            The frames' dtype.

        Returns
        -------
        lo : ndarray (H, W) of the kernel type
            A pixel is a candidate when ``raw > lo``. ``lo = max(floor(dark +
            n_sigma * noise), rint(dark))`` clipped to the type's range;
            masked pixels get the type's maximum (never a candidate).
        dark : ndarray (H, W) of the kernel type
            ``rint(dark)`` clipped to the type's range (the type's maximum on
            masked pixels, so their signal ``raw - dark`` is <= 0).
        gain : ndarray (H, W) of uint16, or None
            Relative gain ``rint(32767 * gain / max(gain))``, at least 1 (only
            ratios matter for comparisons and centres of mass; the thresholds
            already include the gain); 0 on masked pixels. None without a gain map.
        xray_level : int
            A candidate whose signal ``(raw - dark) * gain`` (gain 1 without a
            map) exceeds this is an X-ray hit: ``floor(xray_threshold)``, times
            ``32767 / max(gain)`` with a gain map; ``2**62`` without a threshold
            (saturated candidates are X-ray hits regardless).

        The kernel type is the frames' dtype, or its signed twin when ``wrapped``.
        The maps are computed once per type and shared, read-only, by the
        calibrations :meth:`with_xray_threshold` derives (they do not depend on it).
        """
        dt = self.frame_dtype(dtype)
        cache = self.__dict__.setdefault("_int_maps_cache", {})
        if dt.str not in cache:
            cache[dt.str] = self._int_maps(dt)
        lo, dark_k, gain_k, scale = cache[dt.str]
        if self.xray_threshold is None:
            xray_level = 2**62
        else:
            xray_level = int(min(math.floor(self.xray_threshold * scale), 2**62))
        return lo, dark_k, gain_k, xray_level

    def _int_maps(self, dt: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float]:
        """``(lo, dark, gain, gain scale)`` of :meth:`threshold_maps`."""
        info = np.iinfo(dt)
        h, w = self.frame_shape
        lo = np.empty((h, w), dt)
        dark_k = np.empty((h, w), dt)
        # a few rows at a time: the float64 temporaries stay in cache (whole 4092 x
        # 5760 maps took 1.7 s, a daemon's stall at each series' first frame)
        step = max(1, _MAP_ROWS_PIXELS // max(w, 1))
        for r in range(0, h, step):
            dark = self.dark[r : r + step].astype(np.float64)
            dark_i = np.rint(dark)
            noise = self.noise[r : r + step].astype(np.float64)
            low = np.maximum(np.floor(dark + self.n_sigma * noise), dark_i)
            lo[r : r + step] = np.clip(low, info.min, info.max)
            dark_k[r : r + step] = np.clip(dark_i, info.min, info.max)
        good = np.ones(self.frame_shape, bool) if self.mask is None else ~self.mask
        gain_k = None
        scale = 1.0
        if self.gain is not None:
            top = float(self.gain[good].max()) if good.any() else 1.0
            scale = GAIN_SCALE / top
            gain_k = np.clip(np.rint(self.gain * scale), 1, GAIN_SCALE).astype(np.uint16)
        if self.mask is not None:
            lo[self.mask] = info.max
            dark_k[self.mask] = info.max
            if gain_k is not None:
                gain_k[self.mask] = 0
        # shared by every caller: treat as read-only (not flagged so, which would make
        # numba compile a second, read-only variant of every kernel)
        return (
            np.ascontiguousarray(lo),
            np.ascontiguousarray(dark_k),
            None if gain_k is None else np.ascontiguousarray(gain_k),
            scale,
        )
