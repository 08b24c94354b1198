"""The "resolve" counting rule: its parameters, its maps, and one electron's charge.

The peak rule (``_reference.py``) reports a pixel when it passes a threshold
of ``n_sigma`` noise and is a 3 x 3 local maximum. It misses electrons whose
charge is spread over several pixels (none of them passes), and two electrons
within one pixel of each other give one event. The resolve rule
(``_resolve_reference.py`` is its specification) keeps the one-compare
candidate test at a lower threshold, accepts a local maximum on the peak rule
or on the charge of its brightest 2 x 2 quadrant against that quadrant's
noise, and splits an event in two when its charge and its elongation say so.

:func:`resolve_maps` derives the integer maps from a calibration;
:func:`electron_charge` measures one electron's charge (the split unit) from
frames with beam.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from streamstore.counting.calibration import Calibration

__all__ = [
    "ResolveParams",
    "charge_units",
    "anisotropy",
    "quadrant_noise_factor",
    "resolve_maps",
    "single_electron",
]

_INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class ResolveParams:
    """Thresholds of the resolve rule.

    Attributes
    ----------
    candidate_sigma : float
        A pixel is a candidate when its dark-subtracted value exceeds this many
        of its noise sigmas (the calibration's ``n_sigma`` stays the peak rule's).
    quadrant_sigma : float
        A local maximum is accepted on charge when a 2 x 2 quadrant holding it
        has more than this many sigmas of the quadrant's summed noise.
    pair_charge : float
        With an anisotropy of ``pair_spread`` or more, an event of this many
        electrons' charge or more is split in two.
    any_charge : float
        An event of this many electrons' charge or more is split in two whatever
        its shape.
    pair_spread : float
        Anisotropy (square pixels) beyond one electron's own from which an event
        of ``pair_charge`` is split: the variance of its charge along the axis to
        its brightest neighbour less the variance across it. A single electron's
        cloud is round (near 0); two electrons ``d`` apart add ``d^2 / 4``. 16 or
        more: no split on shape.
    fit_drop : float
        Method "fit" (:mod:`streamstore.counting.fit`): an event is split where
        two clouds leave a chi-square lower than one cloud by more than this.
    fit_charge : float
        Method "fit": events of less charge (electrons, in their 3 x 3) are not
        tried as two.
    fit_model_error : float
        Method "fit": the cloud model's error as a share of each pixel's charge
        (the gain spread a calibration without a gain map leaves, a cloud's shape
        beside a Gaussian's), added to the noise in the fit's weights: without
        it, bright single electrons split (with one cloud width for every
        event: precision 0.9985 at a point spread of 0.3 px or a gain spread of
        10 %, 0.9994 and 0.9996 with 0.06).

    Notes
    -----
    ``pair_spread`` is counted from one electron's own anisotropy, measured on
    the data (:func:`single_electron`; about 0.04 px^2 at a point spread of 0.5
    px, 0.18 at 0.8). Splitting on charge alone (``any_charge``) is off by
    default: a single electron from the long tail of the deposit and two merged
    ones have the same charge, and even 3.5 electrons' charge cost a precision of
    0.999 at read noise 6 ADU. The defaults keep a precision of 0.999 where the
    detection has it (128 x 192 emulator frames; docs/counting.md has the table).
    """

    candidate_sigma: float = 3.0
    quadrant_sigma: float = 5.0
    pair_charge: float = 1.6
    any_charge: float = 64.0
    pair_spread: float = 0.45
    fit_drop: float = 30.0
    fit_charge: float = 0.8
    fit_model_error: float = 0.06

    def integers(self, spread_offset: float = 0.0) -> tuple[int, int, int]:
        """``(pair16, any16, spread16)``: the split thresholds in sixteenths;
        ``spread_offset`` (one electron's own anisotropy, at least 0) is added to
        ``pair_spread``."""
        return (
            int(round(16 * self.pair_charge)),
            int(round(16 * self.any_charge)),
            int(round(16 * (self.pair_spread + max(0.0, spread_offset)))),
        )


def resolve_maps(
    calibration: Calibration, dtype: Any, params: ResolveParams, noise_factor: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray, int]:
    """Integer maps of the resolve rule: ``(lo, lo_c, dark, gain, qthr, xray_level)``.

    ``lo``, ``dark``, ``gain`` and ``xray_level`` are
    :meth:`~streamstore.Calibration.threshold_maps`; ``lo_c`` is ``lo`` at
    ``params.candidate_sigma`` (masked pixels: the type's maximum); ``qthr[r, c]``
    (int64) is the charge threshold of the 2 x 2 quadrant with top-left corner
    ``(r, c)`` in signal units, ``floor(quadrant_sigma * noise_factor *
    sqrt(sum((noise * gain)^2)))`` over its unmasked pixels, and ``INT64_MAX``
    where the quadrant leaves the frame or is all masked. ``noise_factor``
    (:func:`quadrant_noise_factor`) widens the sum's noise where pixels' noise is
    correlated (a common offset per row).
    """
    from streamstore.counting.calibration import Calibration

    lo, dark, gain, xray_level = calibration.threshold_maps(dtype)
    low = Calibration(
        calibration.dark,
        calibration.noise,
        gain=calibration.gain,
        mask=calibration.mask,
        n_sigma=params.candidate_sigma,
        xray_threshold=calibration.xray_threshold,
        xray_radius=calibration.xray_radius,
        wrapped=calibration.wrapped,
    )
    lo_c = low.threshold_maps(dtype)[0]
    top = np.iinfo(lo.dtype).max
    masked = lo_c == top
    sig = np.where(masked, 0.0, calibration.noise.astype(np.float64))  # masked noise: any value
    if gain is not None:
        sig = sig * gain
    var = sig * sig
    h, w = var.shape
    qthr = np.full((h, w), _INT64_MAX, np.int64)
    if h > 1 and w > 1:
        qv = var[:-1, :-1] + var[:-1, 1:] + var[1:, :-1] + var[1:, 1:]
        k = params.quadrant_sigma * float(noise_factor)
        t = np.minimum(np.floor(k * np.sqrt(qv)), 2.0**62).astype(np.int64)
        qthr[:-1, :-1] = np.where(qv > 0, t, _INT64_MAX)
    return lo, lo_c, dark, gain, qthr, xray_level


def charge_units(calibration: Calibration, dtype: Any) -> float:
    """Signal units of the kernels per gain-corrected ADU: 1 without a gain map, else
    the relative gain map's scale (:meth:`~streamstore.Calibration.threshold_maps`)."""
    if calibration.gain is None:
        return 1.0
    from streamstore.counting.calibration import GAIN_SCALE

    good = np.ones(calibration.frame_shape, bool) if calibration.mask is None else ~calibration.mask
    top = float(calibration.gain[good].max()) if good.any() else 1.0
    return GAIN_SCALE / top


def anisotropy(s: np.ndarray, good: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The split rule's anisotropy (square pixels) of the events ``(rows, cols)``.

    ``s`` is the signal (0 on masked pixels), ``good`` the unmasked pixels. The
    variance of the charge of ``W`` along the axis to the brightest neighbour
    less the variance across it (``_resolve_reference.py``, rule 5), in float64
    (NaN without a neighbour or without charge).
    """
    from streamstore.counting._resolve_reference import brightest_neighbour

    h, w = s.shape
    sp = np.zeros((h + 4, w + 4), np.int64)
    sp[2:-2, 2:-2] = s
    okp = np.zeros((h + 4, w + 4), bool)
    okp[2:-2, 2:-2] = good
    ey, ex, has = brightest_neighbour(sp, okp, rows, cols)
    e2 = ey * ey + ex * ex
    sums = np.zeros((5, rows.size), np.float64)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            inside = ((abs(dy) <= 1) & (abs(dx) <= 1)) | (
                (np.abs(dy - ey) <= 1) & (np.abs(dx - ex) <= 1)
            )
            v = np.where(inside, sp[rows + dy + 2, cols + dx + 2], 0).astype(np.float64)
            u = 2 * (dy * ey + dx * ex) - e2
            x = 2 * (dy * ex - dx * ey)
            sums += np.stack([v, v * u, v * u * u, v * x, v * x * x])
    big, su, suu, sv, svv = sums
    with np.errstate(divide="ignore", invalid="ignore"):
        out = ((big * suu - su * su) - (big * svv - sv * sv)) / (4.0 * e2 * big * big)
    return np.where(has & (big > 0), out, np.nan)


def single_electron(
    frames: np.ndarray,
    maps: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray, int],
    radius: int,
    max_frames: int = 64,
    window: int = 1024,
    enough: int = 1000,
) -> tuple[int, float] | None:
    """One electron's charge (signal units) and anisotropy (square pixels), measured
    on frames with beam.

    The median 3 x 3 charge and the median :func:`anisotropy` of the accepted events
    (the resolve rule without splits) that have no other event within Chebyshev
    distance 3, in the central ``window`` x ``window`` pixels of the first
    ``max_frames`` frames, 8 frames at a time until ``enough`` such events are
    found (the estimate's spread costs splits). Merged electrons look isolated too, so at high doses
    the charge reads high (about 10 % at 0.05 e/px/frame), which makes splits
    rarer: the safe side. The anisotropy of one electron is near 0 but not 0:
    its window is 4 pixels long and 3 across, so a wide cloud (point spread 0.8
    px) loses more across (about 0.15 px^2): the split threshold is counted from
    it. None below 50 such events.

    Parameters
    ----------
    frames : ndarray (n, H, W)
        Frames with beam, of the kernel type of ``maps``.
    maps : tuple
        :func:`resolve_maps` of the calibration.
    radius : int
        X-ray exclusion radius.
    max_frames, window, enough : int
        How much of ``frames`` is looked at.

    Returns
    -------
    (int, float) or None
    """
    from streamstore.counting._resolve_kernels import count_resolve_frames

    lo, lo_c, dark, gain, qthr, xray_level = maps
    h0, w0 = frames.shape[1:]
    r0, c0 = max(0, (h0 - window) // 2), max(0, (w0 - window) // 2)
    win = (slice(r0, r0 + window), slice(c0, c0 + window))
    lo, lo_c, dark, qthr = (np.ascontiguousarray(m[win]) for m in (lo, lo_c, dark, qthr))
    qthr[-1, :] = _INT64_MAX  # the window's last row and column of quadrants leave it
    qthr[:, -1] = _INT64_MAX
    if gain is not None:
        gain = np.ascontiguousarray(gain[win])
    good = lo_c != np.iinfo(lo_c.dtype).max
    charges: list[np.ndarray] = []
    shapes: list[np.ndarray] = []
    big = 2**40
    n_alone = 0
    for start in range(0, min(max_frames, frames.shape[0]), 8):
        if n_alone >= enough:
            break
        stop = min(start + 8, max_frames, frames.shape[0])
        sample = np.ascontiguousarray(frames[start:stop, win[0], win[1]])
        offsets, found, _ = count_resolve_frames(
            sample, lo, lo_c, dark, gain, qthr, xray_level, radius, False, 1, big, big, big,
            threads=1,
        )  # fmt: skip
        for i, raw in enumerate(sample):
            idx = found[offsets[i] : offsets[i + 1]]
            h, w = raw.shape
            s = raw.astype(np.int64) - dark.astype(np.int64)
            if gain is not None:
                s *= gain.astype(np.int64)
            s[~good] = 0
            r, c = np.divmod(idx.astype(np.int64), w)
            occ = np.zeros((h + 6, w + 6), np.int32)
            np.add.at(occ, (r + 3, c + 3), 1)
            crowd = np.zeros(idx.size, np.int32)
            for dy in range(-3, 4):
                for dx in range(-3, 4):
                    crowd += occ[r + 3 + dy, c + 3 + dx]
            sp = np.zeros((h + 2, w + 2), np.int64)
            sp[1:-1, 1:-1] = s
            q = np.zeros(idx.size, np.int64)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    q += sp[r + 1 + dy, c + 1 + dx]
            alone = crowd == 1
            charges.append(q[alone])
            shapes.append(anisotropy(s, good, r[alone], c[alone]))
            n_alone += int(alone.sum())
    allq = np.concatenate(charges) if charges else np.zeros(0, np.int64)
    if allq.size < 50:
        return None
    a = np.concatenate(shapes)
    a = a[np.isfinite(a)]
    e_unit = max(1, int(math.floor(float(np.median(allq)))))
    return e_unit, round(float(np.median(a)), 4) if a.size else 0.0


def quadrant_noise_factor(
    calibration: Calibration,
    frames: np.ndarray,
    max_frames: int = 8,
    window: int = 1024,
) -> float:
    """How much wider the noise of a 2 x 2 sum is on ``frames`` than the calibration's
    per-pixel noise says (independent pixels), at least 1.

    A common offset per row and frame adds to every pixel of a row alike, so a
    quadrant's two pixels of one row add it twice: at read noise 2 ADU and a row
    noise of 1 ADU the sum's sigma is 10 % wider than the calibration's noise
    map gives, and a threshold of 5 sigmas lets noise through. Measured on the
    quadrants without masked pixels of the central ``window`` x ``window``
    pixels of the first ``max_frames`` frames, each divided by its predicted
    sigma: a third of the distance of their 0.135 % quantile below zero (electrons
    only add charge, so the far low side is noise alone, and at high doses, where
    electrons touch most quadrants, it reads low: the factor errs towards 1 where
    noise events matter least). 1.0 with fewer than 1000 quadrants.

    Parameters
    ----------
    calibration : Calibration
        Dark, noise, gain and mask.
    frames : ndarray (n, H, W)
        Frames of the calibration's kernel type (with or without beam).
    max_frames, window : int
        How much of ``frames`` is looked at.

    Returns
    -------
    float
    """
    key = ("quadrant_sigmas", window)
    derived = calibration._derived()  # the calibration's part, made once
    if key not in derived:
        derived[key] = _quadrant_sigmas(calibration, window)
    win, dark, gain, ok, sd = derived[key]
    if ok.sum() * min(max_frames, frames.shape[0]) < 1000:
        return 1.0
    z: list[np.ndarray] = []
    for raw in frames[:max_frames, win[0], win[1]]:
        s = (raw.astype(np.float64) - dark) * gain
        q = s[:-1, :-1] + s[:-1, 1:] + s[1:, :-1] + s[1:, 1:]
        z.append(q[ok] / sd)
    low = float(np.quantile(np.concatenate(z), 0.00135))
    return max(1.0, round(-low / 3.0, 3))


def _quadrant_sigmas(calibration: Calibration, window: int) -> tuple[Any, ...]:
    """The calibration's part of :func:`quadrant_noise_factor`: the central window,
    its dark (rounded) and gain, the quadrants without masked pixels and their
    predicted sigmas."""
    h0, w0 = calibration.frame_shape
    r0, c0 = max(0, (h0 - window) // 2), max(0, (w0 - window) // 2)
    win = (slice(r0, r0 + window), slice(c0, c0 + window))
    good = np.ones(calibration.frame_shape, bool)
    if calibration.mask is not None:
        good = ~calibration.mask
    good = good[win]
    dark = np.where(good, np.rint(calibration.dark[win].astype(np.float64)), 0.0)
    noise = np.where(good, calibration.noise[win].astype(np.float64), 0.0)
    gain = 1.0 if calibration.gain is None else np.where(good, calibration.gain[win], 0.0)
    var = (noise * gain) ** 2
    qv = var[:-1, :-1] + var[:-1, 1:] + var[1:, :-1] + var[1:, 1:]
    ok = good[:-1, :-1] & good[:-1, 1:] & good[1:, :-1] & good[1:, 1:] & (qv > 0)
    return win, dark, gain, ok, np.sqrt(qv[ok])
