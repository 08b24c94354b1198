"""Charge of dense tiles and of isolated electrons, for the corrected dose.

Integer signals (raw x 16 minus ``rint(16 dark)``, times the counting's integer
gain; masked pixels, saturated pixels and X-ray hits count 0), so sums do not
depend on their order and each numba kernel equals its numpy reference bit for
bit. :class:`streamstore.counting.dose.DoseCorrector` uses them.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from streamstore._numba_cache import serialize_saves
from streamstore.counting._maps import unsigned_bits

__all__ = [
    "CHARGE_LAM",
    "tile_charge",
    "tile_charge_reference",
    "window_charge",
    "window_charge_reference",
]
#
# Where a tile is so dense that its events say little about its dose (a bright
# disk: one event per 3 x 3 neighbourhood whatever the dose), the electrons are
# estimated from the charge instead: the dark-subtracted signal of the tile over
# the mean charge of one electron, which no coincidence changes. The charge of
# one electron is measured from the series itself, from the 5 x 5 window of
# isolated events in dim tiles. Signals are integers (raw and dark in 1/16 ADU,
# times the counting's integer gain), so the numba kernels and their numpy
# references agree bit for bit and sums do not depend on their order.

#: Fixed-point scale of the dark level in the charge sums (1/16 ADU).
CHARGE_SCALE = 16
#: Half side of the window whose charge is one isolated electron's (5 x 5).
WINDOW_HALF = 2
#: An event is isolated when no other event of its frame lies within this
#: Chebyshev distance (its window holds no other event's centre, nor most of its spread).
ISOLATION = 4
#: Tiles whose estimated electron density is above this are estimated from their
#: charge (e/px/frame): there the 3 x 3 rule has lost a sixth of the events, and
#: the event model, fed the few hundred events a tile pools, errs by a percent or
#: more (measured on the emulator's disk: 0.9895 of the truth at a frame mean of
#: 0.005 against 0.9697 with 0.05 here, 128 x 192 frames, 40 frames)
CHARGE_LAM = 0.03
#: Isolated events are taken from tiles below this electron density (e/px/frame),
#: where an event's window rarely holds a second, merged electron.
WINDOW_LAM = 0.012
#: Windows (isolated events) needed before the charge of one electron is used.
MIN_WINDOWS = 300
#: Windows sampled per frame at most, and in all: enough for a 0.3 % mean.
WINDOWS_PER_FRAME = 256
MAX_WINDOWS = 100_000


def _signal_maps(calibration, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """``(dark16, gain, good, xray_level, tmax)`` for the charge sums.

    ``dark16`` is ``rint(dark * 16)`` (int32: half the memory of int64, 95 MB
    less per calibration at 4092 x 5760); ``gain`` the counting's integer gain
    (uint16, 1 everywhere without a gain map); ``good`` 1 on unmasked pixels;
    ``xray_level`` the counting's (integer signal units, see
    :meth:`~streamstore.Calibration.threshold_maps`); ``tmax`` the frame type's maximum.
    """
    cache = calibration._derived()
    key = ("dose_signal_maps", np.dtype(dtype).str)
    if key not in cache:
        kdt = calibration.frame_dtype(dtype)
        _, _, gain_k, xray_level = calibration.threshold_maps(dtype)
        dark16 = np.rint(np.asarray(calibration.dark, np.float64) * CHARGE_SCALE).astype(np.int32)
        good = np.ones(calibration.frame_shape, np.uint8)
        if calibration.mask is not None:
            good[np.asarray(calibration.mask, bool)] = 0
        gain = np.ones(calibration.frame_shape, np.uint16) if gain_k is None else gain_k
        cache[key] = (dark16, gain, good, int(xray_level), int(np.iinfo(kdt).max))
    return cache[key]


def _pixel_signal(raw, dark16, gain, good, xray_level, tmax) -> np.ndarray:
    """Integer signal of every pixel (numpy): ``(16 raw - dark16) * gain``, 0 on masked
    pixels and X-ray hits (saturated, or above the counting's X-ray level)."""
    r = raw.astype(np.int64)
    s = (r * CHARGE_SCALE - dark16) * gain.astype(np.int64)
    # the counting's X-ray rule, on its own integer signal (raw - rint(dark)) * gain
    coarse = (r - np.rint(dark16 / CHARGE_SCALE).astype(np.int64)) * gain.astype(np.int64)
    xray = (r == tmax) | (coarse > xray_level)
    return np.where((good != 0) & ~xray, s, 0)


def tile_charge_reference(raw, dark16, gain, good, xray_level, tmax, tile, flags) -> np.ndarray:
    """Charge (integer signal) of each flagged tile of one frame (numpy reference).

    Parameters
    ----------
    raw : ndarray (H, W)
        The frame, in the counting's frame type.
    dark16, gain, good, xray_level, tmax
        From :func:`_signal_maps`.
    tile : int
        Tile side.
    flags : ndarray of bool, (n_ty, n_tx)
        Tiles to sum; the others are 0.

    Returns
    -------
    ndarray of int64, (n_ty, n_tx)
    """
    h, w = raw.shape
    s = _pixel_signal(raw, dark16, gain, good, xray_level, tmax)
    n_ty, n_tx = flags.shape
    pad = np.zeros((n_ty * tile, n_tx * tile), np.int64)
    pad[:h, :w] = s
    sums = pad.reshape(n_ty, tile, n_tx, tile).sum(axis=(1, 3))
    return np.where(flags, sums, 0)


@njit(nogil=True, cache=True, inline="always")
def _coarse_dark(d):  # pragma: no cover - numba
    """``rint(d / 16)`` as numpy rounds (half to even): the counting's integer dark,
    for its X-ray rule, from the charge sums' ``dark16``."""
    q = d // 16
    rem = d - q * 16
    if rem > 8 or (rem == 8 and (q & 1) == 1):
        q += 1
    return q


@njit(nogil=True, cache=True, inline="always")
def _raw_value(u, wrap):  # pragma: no cover - numba
    """The value of frame bits ``u`` (:func:`~streamstore.counting._maps.unsigned_bits`):
    less ``wrap``, twice the sign bit, at and above the sign bit where the frame is
    signed (``wrap`` 0 where it is not)."""
    v = np.int64(u)
    return v - wrap if v >= wrap >> 1 else v


@njit(nogil=True, cache=True)
def _tile_charge_kernel(
    raw, wrap, dark16, gain, good, xray_level, tmax, tile, flags, out
):  # pragma: no cover
    h, w = raw.shape
    n_tx = flags.shape[1]
    for r in range(h):
        ty = r // tile
        for tx in range(n_tx):
            if not flags[ty, tx]:
                continue
            acc = np.int64(0)
            c1 = min(w, (tx + 1) * tile)
            for c in range(tx * tile, c1):
                if good[r, c] == 0:
                    continue
                v = _raw_value(raw[r, c], wrap)
                g = np.int64(gain[r, c])
                d = np.int64(dark16[r, c])
                if v == tmax:
                    continue
                if (v - _coarse_dark(d)) * g > xray_level:
                    continue
                acc += (v * 16 - d) * g
            out[ty, tx] += acc
    return out


def tile_charge(raw, dark16, gain, good, xray_level, tmax, tile, flags) -> np.ndarray:
    """Charge of each flagged tile of one frame (numba; equal to :func:`tile_charge_reference`)."""
    out = np.zeros(flags.shape, np.int64)
    if flags.any():
        args = (int(xray_level), int(tmax), int(tile), flags, out)
        bits, half = unsigned_bits(raw)  # one overload per width, not per signedness
        _tile_charge_kernel(bits, 2 * half, dark16, gain, good, *args)
    return out


def window_charge_reference(raw, dark16, gain, good, xray_level, tmax, indices, allowed, tile,
                            limit) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Charge of the 5 x 5 windows of isolated events (numpy reference).

    An event qualifies when its tile is ``allowed``, its window lies inside the
    frame and no other event of the frame lies within :data:`ISOLATION`
    (Chebyshev); the first ``limit`` that qualify, in index order, are taken.

    Returns
    -------
    (ndarray of int64, ndarray of int64)
        The windows' charges and the flat tile index of each.
    """
    h, w = raw.shape
    n_tx = allowed.shape[1]
    idx = np.asarray(indices, np.int64)
    r, c = np.divmod(idx, w)
    k = WINDOW_HALF
    ok = (r >= k) & (r < h - k) & (c >= k) & (c < w - k)
    ok &= allowed[r // tile, c // tile]
    iso = np.ones(idx.size, bool)
    for dy in range(-ISOLATION, ISOLATION + 1):
        for dx in range(-ISOLATION, ISOLATION + 1):
            if dy == 0 and dx == 0:
                continue
            rr, cc = r + dy, c + dx
            inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
            target = np.where(inside, rr * w + cc, -1)
            pos = np.searchsorted(idx, target)
            hit = (pos < idx.size) & inside
            hit[hit] = idx[pos[hit]] == target[hit]
            iso &= ~hit
    take = np.flatnonzero(ok & iso)[: max(int(limit), 0)]
    s = _pixel_signal(raw, dark16, gain, good, xray_level, tmax)
    q = np.zeros(take.size, np.int64)
    for dy in range(-k, k + 1):
        for dx in range(-k, k + 1):
            q += s[r[take] + dy, c[take] + dx]
    return q, (r[take] // tile) * n_tx + c[take] // tile


@njit(nogil=True, cache=True)
def _window_charge_kernel(raw, wrap, dark16, gain, good, xray_level, tmax, indices, allowed,
                          tile, limit, q_out, t_out):  # pragma: no cover  # fmt: skip
    h, w = raw.shape
    n_tx = allowed.shape[1]
    n = indices.size
    k = 2
    iso_r = 4
    got = 0
    for i in range(n):
        if got >= limit:
            break
        e = np.int64(indices[i])
        r = e // w
        c = e - r * w
        if r < k or r >= h - k or c < k or c >= w - k:
            continue
        if not allowed[r // tile, c // tile]:
            continue
        lone = True
        for dy in range(-iso_r, iso_r + 1):
            rr = r + dy
            if rr < 0 or rr >= h:
                continue
            lo = rr * w + max(c - iso_r, 0)
            hi = rr * w + min(c + iso_r, w - 1)
            # events ascend: binary search for the first index >= lo
            a = 0
            b = n
            while a < b:
                m = (a + b) // 2
                if np.int64(indices[m]) < lo:
                    a = m + 1
                else:
                    b = m
            while a < n and np.int64(indices[a]) <= hi:
                if np.int64(indices[a]) != e:
                    lone = False
                    break
                a += 1
            if not lone:
                break
        if not lone:
            continue
        acc = np.int64(0)
        for rr in range(r - k, r + k + 1):
            for cc in range(c - k, c + k + 1):
                if good[rr, cc] == 0:
                    continue
                v = _raw_value(raw[rr, cc], wrap)
                if v == tmax:
                    continue
                g = np.int64(gain[rr, cc])
                d = np.int64(dark16[rr, cc])
                if (v - _coarse_dark(d)) * g > xray_level:
                    continue
                acc += (v * 16 - d) * g
        q_out[got] = acc
        t_out[got] = (r // tile) * n_tx + c // tile
        got += 1
    return got


def window_charge(raw, dark16, gain, good, xray_level, tmax, indices, allowed, tile,
                  limit) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Charge of the windows of isolated events (numba; equal to
    :func:`window_charge_reference`)."""
    limit = max(int(limit), 0)
    q = np.zeros(limit, np.int64)
    t = np.zeros(limit, np.int64)
    if limit == 0 or indices.size == 0:
        return q[:0], t[:0]
    args = (int(xray_level), int(tmax), np.ascontiguousarray(indices), allowed, int(tile))
    bits, half = unsigned_bits(raw)
    n = _window_charge_kernel(bits, 2 * half, dark16, gain, good, *args, limit, q, t)
    return q[:n], t[:n]


serialize_saves(_tile_charge_kernel, _window_charge_kernel)
