"""The "fit" counting rule: merged electrons found by fitting one cloud and two.

The resolve rule splits an event on two numbers, its charge and its
anisotropy; a single electron from the deposit's long tail and two merged ones
overlap there. The fit rule uses the whole 5 x 5 pixel pattern instead: the
resolve rule finds the events (its own splits off), and each event with no
other event within Chebyshev distance 3 and at least ``fit_charge`` electrons'
charge in its 3 x 3 has its window fitted by weighted least squares with one
electron's cloud and with two (``_fit_reference.py`` is the fit's
specification). Where two clouds leave a chi-square lower by more than
``fit_drop``, each of at least a quarter of an electron and both centred within
the event's 3 x 3, the event becomes two, at the clouds' centres.

The cloud is a pixel-integrated Gaussian whose width :func:`cloud_width`
measures from the data (lone events of one electron's charge), as
:func:`~streamstore.counting.resolve.single_electron` measures the charge: a
table of its profile (:func:`cloud_table`) is all the fit knows of it.

Costly beside the per-pixel pass: a few microseconds an event fitted (a fifth of the
events at 0.01 e/px/frame), so it is a method of its own, for frames counted
after the fact or at modest rates.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["cloud_table", "cloud_width", "fit_maps", "fit_splits", "lone_windows"]

_T0 = -8.0  # the table spans [-8, 8] pixels from the cloud's centre,
_INV_H = 128.0  # in steps of 1/128 pixel
_WIDTHS = np.round(np.arange(0.20, 1.2001, 0.02), 2)  # widths cloud_width tries


def cloud_table(width: float) -> tuple[np.ndarray, np.ndarray, float, float]:
    """One electron's cloud along one axis: ``(cdf, pdf, t0, inv_h)`` for the fit.

    A Gaussian of standard deviation ``width`` pixels: ``cdf`` its share of the
    charge before ``t``, ``pdf`` its derivative, at ``t = t0 + k / inv_h``.
    """
    from scipy.special import erf

    if not (np.isfinite(width) and width > 0):
        raise ValueError(f"width must be positive, got {width!r}")
    t = _T0 + np.arange(int(-2 * _T0 * _INV_H) + 1) / _INV_H
    cdf = 0.5 * (1.0 + erf(t / (math.sqrt(2.0) * width)))
    pdf = np.exp(-0.5 * (t / width) ** 2) / (math.sqrt(2.0 * math.pi) * width)
    return cdf, pdf, _T0, _INV_H


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


def lone_windows(
    frames: np.ndarray,
    dark: np.ndarray,
    gain: np.ndarray | None,
    iv_map: np.ndarray,
    offsets: np.ndarray,
    indices: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The events with no other event within Chebyshev distance 3, and their windows.

    Returns ``(which, charge, win, iv)``: the positions in ``indices`` of the lone
    events, their 3 x 3 charge (int64, signal units), and their 5 x 5 windows of
    signal and of weight (float64, (m, 25); 0 off the frame and on masked pixels,
    where ``iv_map`` is 0).
    """
    n, h, w = frames.shape
    hw = h * w
    frame_of = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
    key = frame_of * hw + indices.astype(np.int64)  # ascending: frame, then pixel
    r, c = np.divmod(indices.astype(np.int64), w)
    crowd = np.zeros(key.size, np.int64)
    left, right = np.maximum(c - 3, 0), np.minimum(c + 3, w - 1)
    for dy in range(-3, 4):
        rr = r + dy
        inside = (rr >= 0) & (rr < h)
        base = frame_of * hw + rr * w
        hi = np.searchsorted(key, base + right, "right")
        lo = np.searchsorted(key, base + left, "left")
        crowd += np.where(inside, hi - lo, 0)
    which = np.flatnonzero(crowd == 1)
    f, r, c = frame_of[which], r[which], c[which]
    flat_frames = frames.reshape(n, hw)
    dark_flat = dark.reshape(hw).astype(np.int64)
    gain_flat = None if gain is None else gain.reshape(hw).astype(np.int64)
    iv_flat = iv_map.reshape(hw)
    win = np.zeros((which.size, 25), np.float64)
    wiv = np.zeros((which.size, 25), np.float64)
    charge = np.zeros(which.size, np.int64)
    for q in range(25):
        dy, dx = q // 5 - 2, q % 5 - 2
        rr, cc = r + dy, c + dx
        inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        p = np.where(inside, rr * w + cc, 0)
        s = flat_frames[f, p].astype(np.int64) - dark_flat[p]
        if gain_flat is not None:
            s *= gain_flat[p]
        weight = np.where(inside, iv_flat[p], 0.0)
        s = np.where(weight > 0, s, 0)  # masked and off-frame pixels hold no charge
        win[:, q] = s
        wiv[:, q] = weight
        if abs(dy) <= 1 and abs(dx) <= 1:
            charge += s
    return which, charge, win, wiv


def cloud_width(win: np.ndarray, iv: np.ndarray, threads: int | None = 1) -> float:
    """One electron's cloud width (pixels) that fits ``win`` best: the width of
    least summed chi-square of one-cloud fits, over widths 0.2 to 1.2 px in steps
    of 0.02, refined between the best and its neighbours by a parabola."""
    from streamstore.counting._fit_kernels import fit_windows

    chi = np.empty(_WIDTHS.size)
    for k, width in enumerate(_WIDTHS):
        cdf, pdf, t0, inv_h = cloud_table(float(width))
        chi[k] = fit_windows(win, iv, cdf, pdf, t0, inv_h, math.inf, threads=threads)[:, 0].sum()
    k = int(np.argmin(chi))
    if 0 < k < _WIDTHS.size - 1:
        a, b, c = chi[k - 1], chi[k], chi[k + 1]
        den = a - 2.0 * b + c
        shift = 0.5 * (a - c) / den if den > 0 else 0.0
        return round(float(_WIDTHS[k] + 0.02 * shift), 4)
    return float(_WIDTHS[k])


def fit_splits(
    shape: tuple[int, int, int],
    lone: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    offsets: np.ndarray,
    indices: np.ndarray,
    sub: np.ndarray | None,
    e_unit: int,
    width: float,
    drop: float,
    charge16: int,
    fitter: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Split the events ``(offsets, indices, sub)`` of frames of ``shape`` (the
    resolve rule's, its splits off) where two clouds fit better than one (module
    docstring).

    ``lone``: :func:`lone_windows` of the events; ``charge16``: the least 3 x 3
    charge fitted, in sixteenths of ``e_unit``; ``fitter``: one of the three
    forms of the fit (``fit_windows``). Returns the events in the same form, in
    ascending pixel order in each frame.
    """
    n, h, w = shape
    which, charge, win, iv = lone
    if which.size == 0:
        return offsets, indices, sub
    cdf, pdf, t0, inv_h = cloud_table(width)
    out = np.zeros((which.size, 11))
    heavy = 16 * charge >= charge16 * e_unit
    for part, least in ((heavy, drop), (~heavy, math.inf)):  # two clouds for heavy ones only
        if part.any():
            out[part] = fitter(win[part], iv[part], cdf, pdf, t0, inv_h, least)
    a, y, x = out[:, 2:5].T
    a1, y1, x1, a2, y2, x2 = out[:, 5:].T

    def centred(*v: np.ndarray) -> np.ndarray:  # within the event's 3 x 3
        return np.logical_and.reduce([(c >= -1.0) & (c < 2.0) for c in v])

    split = (out[:, 0] - out[:, 1] > drop) & (np.minimum(a1, a2) > 0.25 * e_unit)
    split &= centred(y1, x1, y2, x2)
    # an event not split moves to its cloud's centre (a wide cloud's brightest
    # pixel, with noise, may lie a pixel off it)
    moved = ~split & (a > 0) & centred(y, x)
    y1, x1 = np.where(split, y1, y), np.where(split, x1, x)
    y2, x2 = np.where(split, y2, y), np.where(split, x2, x)
    r0, c0 = np.divmod(indices[which].astype(np.int64), w)
    fy1, fx1, fy2, fx2 = (np.floor(v).astype(np.int64) for v in (y1, x1, y2, x2))
    # two clouds in one pixel: the second goes to the neighbour it leans towards,
    # on that pixel's near edge (one event per pixel)
    same = split & (fy1 == fy2) & (fx1 == fx2)
    dy, dx = y2 - y1, x2 - x1
    along_y = np.abs(dy) >= np.abs(dx)
    step_y = np.where(same & along_y, np.where(dy >= 0, 1, -1), 0)
    step_x = np.where(same & ~along_y, np.where(dx >= 0, 1, -1), 0)
    y2 = np.where(step_y > 0, fy2 + 1.0, np.where(step_y < 0, fy2 - 1e-9, y2))
    x2 = np.where(step_x > 0, fx2 + 1.0, np.where(step_x < 0, fx2 - 1e-9, x2))
    fy2, fx2 = fy2 + step_y, fx2 + step_x
    rows1, cols1, rows2, cols2 = r0 + fy1, c0 + fx1, r0 + fy2, c0 + fx2
    inside = (rows1 >= 0) & (rows1 < h) & (cols1 >= 0) & (cols1 < w)
    inside &= (rows2 >= 0) & (rows2 < h) & (cols2 >= 0) & (cols2 < w)
    split &= inside
    first = (split | moved) & inside
    which, y1, x1 = which[first], y1[first], x1[first]
    rows1, cols1 = rows1[first], cols1[first]
    second = split[first]
    y2, x2, rows2, cols2 = (
        y2[first][second],
        x2[first][second],
        rows2[first][second],
        cols2[first][second],
    )

    frame_of = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
    hw = h * w
    key = frame_of * hw + indices.astype(np.int64)
    key[which] = frame_of[which] * hw + rows1 * w + cols1
    key = np.concatenate([key, frame_of[which[second]] * hw + rows2 * w + cols2])
    new_sub = None
    if sub is not None:

        def cell(v: np.ndarray) -> np.ndarray:
            return np.clip(np.floor(4.0 * (v - np.floor(v))), 0, 3).astype(np.uint8)

        s = sub.copy()
        s[which] = (cell(y1) << 2) | cell(x1)
        new_sub = np.concatenate([s, (cell(y2) << 2) | cell(x2)])
    # ascending pixels in each frame; two events on one pixel (lone events are 4
    # pixels apart, their clouds' pixels 2 at most) keep the first
    order = np.argsort(key, kind="stable")
    key = key[order]
    keep = np.ones(key.size, bool)
    keep[1:] = key[1:] != key[:-1]
    key = key[keep]
    frame_of, pix = np.divmod(key, hw)
    new_offsets = np.searchsorted(frame_of, np.arange(n + 1), "left").astype(np.int64)
    if new_sub is not None:
        new_sub = new_sub[order][keep]
    return new_offsets, pix.astype(np.uint32), new_sub
