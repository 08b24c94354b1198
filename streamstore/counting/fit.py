"""The "fit" counting rule: every event fitted with electron clouds, merged ones split.

The resolve rule splits an event on two numbers, its charge and its
anisotropy; a single electron from the deposit's long tail and two merged ones
overlap there, and its events sit on the brightest pixel, a pixel off a wide
cloud's centre once noise is added. The fit rule uses each event's whole 5 x 5
pixel pattern instead. The resolve rule finds the events (its own splits off);
each event's window is fitted by weighted least squares with its cloud beside
the clouds of the other events within Chebyshev distance 3 (their charge reaches
into the window), and, where the event has ``fit_charge`` electrons' charge or
more in its 3 x 3 and that fit leaves a chi-square above ``fit_drop``, again
with the event's cloud as two (``_fit_reference.py`` is the fit's
specification). Then, event by event:

* *split*, at the two clouds' centres, where two clouds leave a chi-square lower
  by more than ``fit_drop``, each holds a quarter of an electron or more, both
  lie within the window, neither within a pixel of a neighbour's pixel centre,
  and the second lies farther than a pixel from every other event (else it is
  that event's electron seen twice);
* else *moved* to its cloud's centre, where that lies within its 3 x 3;
* else left as the resolve rule found it.

Events whose places come within :data:`MERGE_PX` of each other are one electron
found twice: the one of the lesser cloud goes. A pixel holds one event: where a
split or moved event lands on a pixel another holds, it steps down (split,
moved, left) until none is claimed twice.

The cloud is a pixel-integrated Gaussian (a table of its profile,
:func:`cloud_table`, is all the fit knows of it). Its width is the series'
(:func:`cloud_width` measures it on lone events of one electron's charge, as
:func:`~streamstore.counting.resolve.single_electron` measures the charge) for
the neighbours and for the two clouds, and free for the event's one cloud, held
near the series' by a prior of ``WIDTH_SPREAD`` (0.1 px): electrons spread
differently (the depth they stop at, a detector's own physics), and a wide one
fitted with the series' width looks like two narrow ones. Each pixel's weight is
1 / (its noise variance + (``fit_model_error`` x its charge)^2): the model's own
error grows with the charge.

Costly beside the per-pixel pass (tens of microseconds an event on one core),
so a method of its own, for frames counted after the fact or at modest rates.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from streamstore.counting._fit_reference import WIDTHS

__all__ = [
    "MERGE_PX",
    "NEIGHBOURS",
    "REACH",
    "cloud_table",
    "cloud_width",
    "event_windows",
    "fit_forms",
    "fit_maps",
    "fit_splits",
]

_T0 = -8.0  # the table spans [-8, 8] widths from the cloud's centre,
_INV_H = 128.0  # in steps of 1/128 width
#: Events whose places come closer than this (pixels) are one electron found twice.
MERGE_PX = 0.75


def cloud_table() -> tuple[np.ndarray, np.ndarray, float, float]:
    """A cloud's profile along one axis, in widths from its centre: ``(cdf, pdf,
    t0, inv_h)`` for the fit, the standard normal distribution and its density
    at ``u = t0 + k / inv_h``. The fit scales it by each cloud's width."""
    from scipy.special import ndtr

    u = _T0 + np.arange(int(-2 * _T0 * _INV_H) + 1) / _INV_H
    return ndtr(u), np.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi), _T0, _INV_H


def fit_maps(calibration: Any, gain: np.ndarray | None) -> np.ndarray:
    """Weight of each pixel in the fit: 1 / its noise variance in signal units
    (``noise * gain``, the kernels' gain map), 0 where masked or without noise."""
    noise = calibration.noise.astype(np.float64)
    if gain is not None:
        noise = noise * gain
    with np.errstate(divide="ignore"):
        iv = np.where(noise > 0, 1.0 / (noise * noise), 0.0)
    if calibration.mask is not None:
        iv[calibration.mask] = 0.0
    return iv


#: Other events within this Chebyshev distance are fitted beside an event (their
#: clouds reach into its 5 x 5 window), the nearest NEIGHBOURS of them.
REACH = 3
NEIGHBOURS = 4


def fit_forms(implementation: str, threads: int | None = 1) -> tuple[Any, Any, Any]:
    """One form's ``(window_pixels, neighbours, fit_windows)`` (``implementation``:
    "numba", "reference" or "native"; the same arguments and results); the numba
    fit runs on ``threads``."""
    if implementation == "reference":
        from streamstore.counting import _fit_reference as ref

        return ref.window_pixels_reference, ref.neighbours_reference, ref.fit_windows_reference
    if implementation == "native":
        import native_ref

        return (
            native_ref.window_pixels_native,
            native_ref.neighbours_native,
            native_ref.fit_windows_native,
        )
    from functools import partial

    from streamstore.counting import _fit_kernels as nb

    return nb.window_pixels, nb.neighbours, partial(nb.fit_windows, threads=threads)


def event_windows(
    frames: np.ndarray,
    dark: np.ndarray,
    gain: np.ndarray | None,
    iv_map: np.ndarray,
    offsets: np.ndarray,
    indices: np.ndarray,
    model_error: float = 0.0,
    implementation: str = "numba",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every event's 5 x 5 window, and the neighbours fitted beside it, cut by one of
    the three forms (``implementation``: "numba", "reference" or "native"; the same
    arrays).

    Returns ``(charge, win, iv, nb, nn, alone)``, one row per event: the 3 x 3
    charge (int64, signal units); the 5 x 5 windows of signal and of weight
    (float64, (m, 25); 0 off the frame and on masked pixels, where ``iv_map`` is
    0; the weight is 1 / (the noise variance + (``model_error`` x the pixel's
    charge)^2): the cloud model's own error, gain spread and shape, grows with
    the charge); the clouds the other events within Chebyshev distance 3 start from
    (``nb`` (m, NEIGHBOURS, 3): their 3 x 3 charge, at least 0, at their pixel's
    centre in the window's coordinates; the nearest first, by Chebyshev then
    Euclidean distance then raster order; ``nn`` how many); and whether the
    event has no such neighbour.
    """
    window_pixels, neighbours, _ = fit_forms(implementation)
    n, h, w = frames.shape
    hw = h * w
    frame_of = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
    key = frame_of * hw + indices.astype(np.int64)  # ascending: frame, then pixel
    r, c = np.divmod(indices.astype(np.int64), w)
    charge, win, wiv = window_pixels(frames, dark, gain, iv_map, frame_of, r, c, model_error)
    nb, nn, alone = neighbours(key, r, c, charge, h, w, REACH, NEIGHBOURS)
    return charge, win, wiv, nb, nn, alone


def cloud_width(win: np.ndarray, iv: np.ndarray, threads: int | None = 1) -> float:
    """One electron's cloud width (pixels): the median width of one-cloud fits to
    the windows ``win`` of lone events. Each fit's width is held near the guess
    by the fit's prior, so the median is fitted again from itself until it moves
    less than 0.001 px (at most 12 times, from 0.5)."""
    from streamstore.counting._fit_kernels import fit_windows

    nb = np.zeros((win.shape[0], 0, 3))
    nn = np.zeros(win.shape[0], np.int64)
    width = 0.5
    for _ in range(12):
        fits = fit_windows(win, iv, nb, nn, *cloud_table(), width, math.inf, threads=threads)
        new = float(np.clip(np.median(fits[:, 11]), *WIDTHS))
        if abs(new - width) < 0.001:
            width = new
            break
        width = new
    return round(width, 4)


def fit_splits(
    shape: tuple[int, int, int],
    windows: tuple[np.ndarray, ...],
    offsets: np.ndarray,
    indices: np.ndarray,
    sub: np.ndarray | None,
    e_unit: int,
    width: float,
    drop: float,
    charge16: int,
    fitter: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Fit the events ``(offsets, indices, sub)`` of frames of ``shape`` (the
    resolve rule's, its splits off): each moves to its cloud's centre, and splits
    where two clouds fit better than one (module docstring).

    ``windows``: :func:`event_windows` of the events; ``charge16``: the least 3 x
    3 charge tried as two, in sixteenths of ``e_unit``; ``fitter``: one of the
    three forms of the fit (``fit_windows``). Returns the events in the same
    form, in ascending pixel order in each frame.
    """
    n, h, w = shape
    charge, win, iv, nb, nn, _ = windows
    m = indices.size
    if m == 0:
        return offsets, indices, sub
    heavy = 16 * charge >= charge16 * e_unit  # only these are tried as two
    drops = np.where(heavy, drop, math.inf)
    out = fitter(win, iv, nb, nn, *cloud_table(), float(np.clip(width, *WIDTHS)), drops)
    a, y, x = out[:, 2:5].T
    a1, y1, x1, a2, y2, x2 = out[:, 5:11].T

    def centred(*v: np.ndarray, lo=-1.0, hi=2.0) -> np.ndarray:  # within the event's 3 x 3
        return np.logical_and.reduce([(c >= lo) & (c < hi) for c in v])

    split = (out[:, 0] - out[:, 1] > drop) & (np.minimum(a1, a2) > 0.25 * e_unit)
    split &= centred(y1, x1, y2, x2, lo=-2.0, hi=3.0)  # within the window
    # a cloud on a neighbour's pixel is the neighbour's electron, not a second one
    has = np.arange(nb.shape[1])[None, :] < nn[:, None]

    def clear(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        d2 = (yy[:, None] - nb[:, :, 1]) ** 2 + (xx[:, None] - nb[:, :, 2]) ** 2
        return ~(has & (d2 < 1.0)).any(1)  # within a pixel of a neighbour's centre

    split &= clear(y1, x1) & clear(y2, x2)
    # two clouds in one pixel: the second goes to the neighbour it leans towards,
    # on that pixel's near edge (one event per pixel)
    fy1, fx1, fy2, fx2 = (np.floor(v) for v in (y1, x1, y2, x2))
    same = (fy1 == fy2) & (fx1 == fx2)
    along_y = np.abs(y2 - y1) >= np.abs(x2 - x1)
    up, left = y2 < y1, x2 < x1
    y2 = np.where(same & along_y, np.where(up, fy2 - 1e-9, fy2 + 1.0), y2)
    x2 = np.where(same & ~along_y, np.where(left, fx2 - 1e-9, fx2 + 1.0), x2)
    r0, c0 = np.divmod(indices.astype(np.int64), w)
    if sub is None:
        own = (r0 + 0.5, c0 + 0.5)
    else:
        own = (r0 + ((sub >> 2) + 0.5) / 4.0, c0 + ((sub & 3) + 0.5) / 4.0)
    one, two1, two2 = (r0 + y, c0 + x), (r0 + y1, c0 + x1), (r0 + y2, c0 + x2)

    def in_frame(p: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        return (p[0] >= 0) & (p[0] < h) & (p[1] >= 0) & (p[1] < w)

    # each event's fate: 2 split in two, 1 moved to its cloud's centre (a wide
    # cloud's brightest pixel, with noise, may lie a pixel off it), 0 left home
    movable = (a > 0) & centred(y, x) & in_frame(one)
    fallback = np.where(movable, 1, 0)
    state = np.where(split & in_frame(two1) & in_frame(two2), 2, fallback)
    frame_of = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))

    def first_at() -> tuple[np.ndarray, np.ndarray]:
        pick = [state == 2, state == 1]
        return (
            np.select(pick, [two1[0], one[0]], own[0]),
            np.select(pick, [two1[1], one[1]], own[1]),
        )

    apart = 4.0 * (h + w)  # frames far apart in the trees' space

    def places_tree() -> Any:
        """A tree of the events' places as they stand (frame, row, column)."""
        from scipy.spatial import cKDTree

        fy, fx = first_at()
        return cKDTree(np.stack([frame_of * apart, fy, fx], 1))

    # a second cloud within a pixel of another event is that event's electron seen
    # twice (a neighbour beyond the fit's reach, or one the fit moved)
    seconds = np.flatnonzero(state == 2)
    if seconds.size:
        probe = np.stack([frame_of[seconds] * apart, two2[0][seconds], two2[1][seconds]], 1)
        near = places_tree().query_ball_point(probe, 1.0)
        twice = np.array([any(j != e for j in js) for e, js in zip(seconds, near, strict=True)])
        state[seconds[twice]] = fallback[seconds[twice]]
    gone = np.zeros(m, bool)
    if MERGE_PX:
        pairs = places_tree().query_pairs(MERGE_PX, output_type="ndarray")
        if pairs.size:
            i, j = pairs[:, 0], pairs[:, 1]
            lose = np.where(a[i] < a[j], i, j)
            gone[lose] = True
            state[lose] = 0
    hw = h * w
    home = frame_of * hw + indices.astype(np.int64)

    def key(p: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        # a fit that failed (NaN) is never taken: any pixel will do for its key
        rows, cols = (np.floor(np.nan_to_num(np.clip(v, -1.0, h + w))).astype(np.int64) for v in p)
        return frame_of * hw + np.clip(rows, 0, h - 1) * w + np.clip(cols, 0, w - 1)

    k_one, k_two1, k_two2 = key(one), key(two1), key(two2)
    # a pixel is one event's: an event whose first or second pixel another event
    # holds (or lands on too) steps down (split, moved, home) until none is claimed twice
    for _ in range(8):
        first = np.select([state == 2, state == 1], [k_two1, k_one], home)
        first = np.where(gone, -1 - m - np.arange(m), first)  # merged away: holds no pixel
        keys = np.concatenate([first, np.where(state == 2, k_two2, -1 - np.arange(m))])
        _, inv, counts = np.unique(keys, return_inverse=True, return_counts=True)
        clash = counts[inv] > 1
        down = (clash[:m] & (state > 0)) | clash[m:]
        if not down.any():
            break
        state = np.where(down & (state == 2), fallback, np.where(down, 0, state))
    first = np.select([state == 2, state == 1], [k_two1, k_one], home)
    key_all = np.concatenate([np.where(gone, -1, first), k_two2[state == 2]])
    new_sub = None
    if sub is not None:

        def cell(v: np.ndarray) -> np.ndarray:
            return np.clip(np.floor(4.0 * (v - np.floor(v))), 0, 3).astype(np.int64)

        fy, fx = first_at()
        moved = (cell(fy) << 2) | cell(fx)
        second = ((cell(two2[0]) << 2) | cell(two2[1]))[state == 2]
        new_sub = np.concatenate([np.where(state > 0, moved, sub), second]).astype(np.uint8)
    order = np.argsort(key_all, kind="stable")
    key_all = key_all[order]
    keep = np.ones(key_all.size, bool)  # a safety net: the loop above leaves no clash
    keep[1:] = key_all[1:] != key_all[:-1]
    keep &= key_all >= 0
    key_all = key_all[keep]
    frame_of, pix = np.divmod(key_all, hw)
    new_offsets = np.searchsorted(frame_of, np.arange(n + 1), "left").astype(np.int64)
    if new_sub is not None:
        new_sub = new_sub[order][keep]
    return new_offsets, pix.astype(np.uint32), new_sub
