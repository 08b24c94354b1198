"""The coincidence model of the corrected dose: inversion, pair counts, loss areas.

The model (:mod:`streamstore.counting.dose` explains it): an event density ``mu``
for an electron density ``lam`` given the hard-core and soft areas ``a`` and
``b`` measured from the pair deficit of the events. A numpy reference of the
pair count (:func:`pair_histogram_reference`) and its numba twin
(:func:`pair_histogram`), equal bit for bit.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit
from numba.cpython.unsafe.numbers import trailing_zeros

from streamstore._numba_cache import serialize_saves
from streamstore.events import EventBatch

__all__ = [
    "HARD_CORE_AREA",
    "MAX_FILL",
    "electrons_from_events",
    "packing_excess",
    "events_from_electrons",
    "exclusion_areas",
    "pair_histogram",
    "pair_histogram_reference",
]

#: Largest ``mu * A`` that is inverted; denser tiles are treated as this full.
MAX_FILL = 0.98
#: Exclusion area of the 3 x 3 local-maximum rule without charge spread (pixels).
HARD_CORE_AREA = 9.0
#: Pairs far away below which the measured excess over the hard core is shrunk
#: toward 0 (few pairs: a noisy excess; it matters little there, the dose is low).
_FAR_PAIRS_PRIOR = 200.0


def events_from_electrons(lam: np.ndarray | float, hard: float, soft: float = 0.0) -> np.ndarray:
    """Event density the model expects for an electron density ``lam``.

    Parameters
    ----------
    lam : array_like
        Electrons per pixel per frame.
    hard : float
        Hard-core area ``a`` (pixels).
    soft : float, default 0.0
        Soft area ``b`` (pixels).

    Returns
    -------
    ndarray
        ``(1 - exp(-lam a)) / a * exp(-lam b / 2)``.
    """
    lam = np.asarray(lam, dtype=np.float64)
    return -np.expm1(-lam * hard) / hard * np.exp(-0.5 * soft * lam)


@functools.lru_cache(maxsize=64)
def _lam_max(hard: float, soft: float) -> float:
    """Largest electron density the model inverts (see the module docstring)."""
    cap = -math.log1p(-MAX_FILL) / hard
    if soft <= 0:
        return float(cap)
    lo, hi = 0.0, float(cap)
    b = 0.5 * soft

    def slope(lam: float) -> float:
        # scalar math: the bisection runs once per new pair of areas, and numpy's
        # per-call overhead made it most of a one-frame count()'s dose model
        mu = -math.expm1(-lam * hard) / hard * math.exp(-b * lam)
        return math.exp(-lam * (hard + b)) - b * mu

    if slope(hi) > 0:
        return hi
    for _ in range(60):  # mu rises then falls: bisect its peak
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(mid) > 0 else (lo, mid)
    return lo


def _electrons_scalar(mu: float, hard: float, soft: float) -> float:
    """:func:`electrons_from_events` of one value, by bisection in scalar math (no
    table: the exclusion areas invert one density at every change of the pairs)."""
    lo, hi = 0.0, _lam_max(hard, soft)
    b = 0.5 * soft
    if -math.expm1(-hi * hard) / hard * math.exp(-b * hi) <= mu:
        return hi
    for _ in range(60):  # rising below lam_max
        mid = 0.5 * (lo + hi)
        if -math.expm1(-mid * hard) / hard * math.exp(-b * mid) < mu:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


_TABLE_SIZE = 4097


def _inverse_table(hard: float, soft: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mu, lam, d2)`` on a grid of ``lam`` from 0 to ``lam_max``; ``d2`` is
    ``d^2 lam / d mu^2`` (for the noise bias of the inversion)."""
    lam = np.linspace(0.0, _lam_max(hard, soft), _TABLE_SIZE)
    mu = events_from_electrons(lam, hard, soft)
    b = 0.5 * soft
    e = np.exp(-lam * (hard + b))
    d1 = e - b * mu
    d2mu = -(hard + b) * e - b * d1
    with np.errstate(divide="ignore", invalid="ignore"):
        d2 = np.where(d1 > 0, -d2mu / np.maximum(d1, 1e-300) ** 3, 0.0)
    return mu, lam, d2


def electrons_from_events(mu: np.ndarray | float, hard: float, soft: float = 0.0) -> np.ndarray:
    """Electron density for an event density ``mu`` (inverse of :func:`events_from_electrons`).

    Parameters
    ----------
    mu : array_like
        Events per pixel per frame.
    hard, soft : float
        Areas ``a`` and ``b`` of the model (pixels).

    Returns
    -------
    ndarray
        ``lam`` with ``events_from_electrons(lam) == mu``, at most ``lam_max``.
    """
    tmu, tlam, _ = _inverse_table(hard, soft)
    mu = np.asarray(mu, dtype=np.float64)
    lam = np.interp(mu, tmu, tlam)
    # one Newton step polishes the table's linear interpolation
    slope = np.exp(-lam * (hard + 0.5 * soft)) - 0.5 * soft * events_from_electrons(lam, hard, soft)
    inside = (mu < tmu[-1]) & (slope > 0)
    step = (events_from_electrons(lam, hard, soft) - mu) / np.where(inside, slope, 1.0)
    return np.where(inside, lam - step, lam)


def _check_radii(pair_radius: int, far_radii: tuple[int, int]) -> tuple[int, int, int]:
    lo, hi = (int(v) for v in far_radii)
    if not 1 <= int(pair_radius) < lo <= hi:
        raise ValueError(
            f"need 1 <= pair_radius < far_radii[0] <= far_radii[1], got {pair_radius}, {far_radii}"
        )
    return int(pair_radius), lo, hi


def pair_histogram_reference(
    batch: EventBatch, radius: int, first_events: int | None = None
) -> np.ndarray:
    """Count pairs of events of the same frame by their lattice offset (numpy reference).

    Parameters
    ----------
    batch : EventBatch
        Events.
    radius : int
        Largest Chebyshev distance counted.
    first_events : int, optional
        Only a frame's first ``first_events`` events (in raster order) are the
        first event of a pair; the second may be any. Each counted event sees its
        whole neighbourhood, so the pair rates per event are those of the frame's
        top rows, at a cost bounded per frame. None: every event.

    Returns
    -------
    ndarray of int64, shape (radius + 1, 2 * radius + 1)
        ``h[dy, dx + radius]``: pairs whose second event lies ``dy`` rows below and
        ``dx`` columns right of the first; each unordered pair once (``dy > 0``, or
        ``dy == 0`` and ``dx > 0``); other cells 0.
    """
    h, w = batch.frame_shape
    hist = np.zeros((radius + 1, 2 * radius + 1), np.int64)
    for f in range(batch.n_frames):
        idx = batch.indices[batch.offsets[f] : batch.offsets[f + 1]].astype(np.int64)
        first = idx if first_events is None else idx[: max(int(first_events), 0)]
        r, c = np.divmod(first, w)
        for dy in range(radius + 1):
            for dx in range(-radius, radius + 1):
                if dy == 0 and dx <= 0:
                    continue
                ok = (r + dy < h) & (c + dx >= 0) & (c + dx < w)
                target = first[ok] + dy * w + dx
                pos = np.searchsorted(idx, target)
                inside = pos < idx.size
                hist[dy, dx + radius] += int(np.sum(idx[pos[inside]] == target[inside]))
    return hist


@njit(nogil=True, cache=True)
def _pair_histogram_kernel(offsets, indices, h, w, radius, first, hist):  # pragma: no cover
    # A bit per pixel, rows padded by ``radius`` zero bits on both sides: an event's
    # partners in a row below are the set bits of one (2 radius + 1)-bit window,
    # two word loads and shifts instead of a walk along the events of that row.
    # Events ascend within a frame: both passes follow the row instead of dividing
    # each index by the width, and a window's partners are taken lowest bit first
    # (trailing_zeros) instead of shifting through its empty bits.
    win = 2 * radius + 1
    words = (w + 2 * radius + 63) // 64 + 1  # + 1: a window's second word exists
    full = (np.uint64(1) << np.uint64(win)) - np.uint64(1)
    right = full & ~((np.uint64(1) << np.uint64(radius + 1)) - np.uint64(1))  # dx > 0
    for f in range(offsets.size - 1):
        a = offsets[f]
        b = offsets[f + 1]
        last = min(b, a + first)
        if last <= a:
            continue
        r0 = np.int64(indices[a]) // w
        rows = min(np.int64(indices[last - 1]) // w + radius, h - 1) - r0 + 1
        bits = np.zeros((rows, words), np.uint64)
        stop = (r0 + rows) * w
        row = np.int64(0)  # of the bit rows
        base = r0 * w  # flat index of its first pixel
        for i in range(a, b):
            e = np.int64(indices[i])
            if e >= stop:
                break
            while e >= base + w:
                base += w
                row += 1
            c = e - base + radius
            bits[row, c >> 6] |= np.uint64(1) << np.uint64(c & 63)
        row = np.int64(0)
        base = r0 * w
        for i in range(a, last):
            e = np.int64(indices[i])
            while e >= base + w:
                base += w
                row += 1
            c = e - base  # the window's first padded column
            wi = c >> 6
            sh = np.uint64(c & 63)
            for dy in range(min(radius + 1, rows - row)):
                m = bits[row + dy, wi] >> sh
                if sh != 0:
                    m |= bits[row + dy, wi + 1] << (np.uint64(64) - sh)
                m &= full if dy > 0 else right
                while m != 0:  # bit k: the partner dx = k - radius columns right
                    hist[dy, trailing_zeros(m)] += 1
                    m &= m - np.uint64(1)
    return hist


def pair_histogram(batch: EventBatch, radius: int, first_events: int | None = None) -> np.ndarray:
    """Count pairs of events by lattice offset (numba; same result as
    :func:`pair_histogram_reference`, in O(events * radius)). ``radius`` is at most 31
    (a row's window of partners fits one 64-bit word)."""
    if not 0 <= int(radius) <= 31:
        raise ValueError(f"radius: expected 0 to 31, got {radius!r}")
    h, w = batch.frame_shape
    hist = np.zeros((radius + 1, 2 * radius + 1), np.int64)
    first = np.iinfo(np.int64).max // 2 if first_events is None else max(int(first_events), 0)
    if batch.n_events:
        _pair_histogram_kernel(batch.offsets, batch.indices, h, w, int(radius), first, hist)
    return hist


def pool_tiles_reference(
    indices: np.ndarray, width: int, tile: int, n_tx: int, counts: np.ndarray | None = None
) -> np.ndarray:
    """Tile of each event (flat index ``(row // tile) * n_tx + col // tile``), and one
    added to ``counts`` per event when given (numpy reference of :func:`pool_tiles`)."""
    r, c = np.divmod(indices.astype(np.int64), width)
    tiles = (r // tile) * n_tx + c // tile
    if counts is not None:
        counts += np.bincount(tiles, minlength=counts.size)
    return tiles


@njit(nogil=True, cache=True)
def _pool_tiles_kernel(indices, width, tile, n_tx, counts, tiles):  # pragma: no cover - numba
    # events ascend within a frame: follow the row instead of dividing per event
    col_tile = np.arange(width) // tile
    base = np.int64(0)  # flat index of the current row's first pixel
    row = np.int64(0)
    row_tile = np.int64(0)
    for i in range(indices.size):
        e = np.int64(indices[i])
        if e < base:  # the next frame's events begin
            base = 0
            row = 0
            row_tile = 0
        if e >= base + width:
            row = e // width
            base = row * width
            row_tile = (row // tile) * n_tx
        t = row_tile + col_tile[e - base]
        tiles[i] = t
        counts[t] += 1.0
    return tiles


def pool_tiles(
    indices: np.ndarray, width: int, tile: int, n_tx: int, counts: np.ndarray
) -> np.ndarray:
    """Tile of each event, and one added to ``counts`` (float64) per event: one pass
    over the events instead of the reference's several (a frame's pooling costs
    about a third of counting it otherwise)."""
    tiles = np.empty(indices.size, np.int64)
    return _pool_tiles_kernel(indices, int(width), int(tile), int(n_tx), counts, tiles)


def coarse_counts_reference(counts: np.ndarray, n_ty: int, n_tx: int, coarse: int) -> np.ndarray:
    """Pooled counts of the coarse tiles (``coarse x coarse`` tiles of the ``(n_ty,
    n_tx)`` grid ``counts``, flat), the frame's edge padded with 0: per coarse tile,
    each of its rows summed left to right from 0, then the rows top to bottom from 0
    (the order :func:`coarse_counts` adds in, so the two are equal bit for bit)."""
    n_cy, n_cx = -(-n_ty // coarse), -(-n_tx // coarse)
    grid = np.zeros((n_cy * coarse, n_cx * coarse))
    grid[:n_ty, :n_tx] = counts.reshape(n_ty, n_tx)
    cols = sum(grid[:, j::coarse] for j in range(coarse))
    return sum(cols[j::coarse] for j in range(coarse)).ravel()


@njit(nogil=True, cache=True)
def _coarse_counts_kernel(counts, n_ty, n_tx, coarse, out):  # pragma: no cover - numba
    # row by row through the tiles (sequential reads); each coarse tile takes its
    # rows' sums in order, from 0, as the reference does
    n_cx = -(-n_tx // coarse)
    out[:] = 0.0
    for ty in range(n_ty):
        base = (ty // coarse) * n_cx
        src = ty * n_tx
        for cx in range(n_cx):
            row = 0.0
            for tx in range(cx * coarse, min(cx * coarse + coarse, n_tx)):
                row += counts[src + tx]
            out[base + cx] += row
    return out


def coarse_counts(counts: np.ndarray, n_ty: int, n_tx: int, coarse: int) -> np.ndarray:
    """:func:`coarse_counts_reference` in one pass over the tiles (numpy's strided
    sums took 0.6 ms of a one-frame ``count()``'s dose at 4092 x 5760)."""
    n_cy, n_cx = -(-n_ty // coarse), -(-n_tx // coarse)
    out = np.empty(n_cy * n_cx, np.float64)
    return _coarse_counts_kernel(counts, int(n_ty), int(n_tx), int(coarse), out)


def lookup_events_reference(
    tiles: np.ndarray,
    counts: np.ndarray,
    classes: np.ndarray,
    lut: np.ndarray,
    coarse_of: np.ndarray,
    own: np.ndarray,
    coarse: np.ndarray,
) -> np.ndarray:
    """The value of the tile ``t`` of each event: ``lut[classes[t], counts[t]]``, a
    value per tile class (a whole tile, or one the frame's edge cuts short) and
    pooled count (whole numbers held as float64), where its coarse tile ``k =
    coarse_of[t]`` says ``own[k]``, else the coarse tile's ``coarse[k]``. Numpy
    reference of :func:`lookup_events`."""
    k = coarse_of[tiles]
    fine = lut[classes[tiles], counts[tiles].astype(np.int64)]
    return np.where(own[k], fine, coarse[k])


@njit(nogil=True, cache=True)
def _lookup_events_kernel(
    tiles, counts, classes, lut, coarse_of, own, coarse, out
):  # pragma: no cover - numba
    for i in range(tiles.size):
        t = tiles[i]
        k = coarse_of[t]
        if own[k]:
            out[i] = lut[classes[t], np.int64(counts[t])]
        else:
            out[i] = coarse[k]


def lookup_events(
    tiles: np.ndarray,
    counts: np.ndarray,
    classes: np.ndarray,
    lut: np.ndarray,
    coarse_of: np.ndarray,
    own: np.ndarray,
    coarse: np.ndarray,
) -> np.ndarray:
    """:func:`lookup_events_reference` in one pass over the events: the electrons
    each event stands for come from the pooled count of its tile, with no map of
    every tile (368,640 at 4092 x 5760, which a one-frame ``count()`` would build
    for its 200,000 events)."""
    out = np.empty(tiles.size, np.float64)
    _lookup_events_kernel(tiles, counts, classes, lut, coarse_of, own, coarse, out)
    return out


def lookup_tiles_reference(counts: np.ndarray, classes: np.ndarray, luts: np.ndarray) -> np.ndarray:
    """``luts[k, classes[t], counts[t]]`` for every tile ``t``: shape
    ``(len(luts), counts.size)`` (numpy reference of :func:`lookup_tiles`)."""
    return luts[:, classes, counts.astype(np.int64)]


@njit(nogil=True, cache=True)
def _lookup_tiles_kernel(counts, classes, luts, out):  # pragma: no cover - numba
    for k in range(luts.shape[0]):
        for t in range(counts.size):
            out[k, t] = luts[k, classes[t], np.int64(counts[t])]


def lookup_tiles(counts: np.ndarray, classes: np.ndarray, luts: np.ndarray) -> np.ndarray:
    """:func:`lookup_tiles_reference` without numpy's fancy-indexing passes."""
    out = np.empty((luts.shape[0], counts.size), luts.dtype)
    _lookup_tiles_kernel(counts, classes, luts, out)
    return out


def packing_excess(lam: float, pair_radius: int = 2, hard: float = HARD_CORE_AREA) -> float:
    """What the hard core alone adds to ``2 * sum (g(d) - 1)`` over the half plane's
    offsets ``2 <= |d|_inf <= pair_radius``, at electron density ``lam``.

    An electron makes an event when it is the brightest of the electrons in its
    3 x 3 window (signals exchangeable). Two electrons two pixels apart are not in
    each other's window, but a brighter third one in the ``O`` pixels the windows
    share takes both, so both survive with probability ``P = (2 / beta) ((1 -
    exp(-alpha)) / alpha - (1 - exp(-alpha - beta)) / (alpha + beta))``,
    ``alpha = 9 lam``, ``beta = (9 - O) lam``, against ``p**2`` for two far apart
    (``p = (1 - exp(-alpha)) / alpha``): events pack, ``g(d) = P / p**2 > 1``
    (about ``1 + lam O / 3``). Charge spread merges pairs at the same offsets,
    ``g < 1``; the pair deficit measures the soft area only once this is added
    back (at 0.05 e/px/frame it is 0.49 px of area, worth about 1.7 % of dose).
    Windows three or more pixels apart share no pixel: nothing to add there.

    ``hard``, the measured hard-core area, scales the windows: a counter that
    keeps electrons one pixel apart apart (``hard`` below 9, as a fit of clouds
    does) takes fewer pairs in the shared pixels, ``hard / 9`` of them each.
    """
    if lam <= 0:
        return 0.0
    fill = min(max(hard, 1.0), HARD_CORE_AREA) / HARD_CORE_AREA
    alpha = HARD_CORE_AREA * fill * lam
    p = -math.expm1(-alpha) / alpha  # scalar math: numpy's per-call cost, 12 times
    total = 0.0
    for dy in range(0, min(pair_radius, 2) + 1):
        for dx in range(-min(pair_radius, 2), min(pair_radius, 2) + 1):
            if (dy == 0 and dx <= 0) or max(dy, abs(dx)) < 2:
                continue
            shared = (3 - dy) * (3 - abs(dx)) * fill
            beta = (HARD_CORE_AREA * fill - shared) * lam
            both = 2.0 / beta * (p + math.expm1(-alpha - beta) / (alpha + beta))
            total += both / (p * p) - 1.0
    return 2.0 * total


@functools.lru_cache(maxsize=16)
def _pair_geometry(
    h: int, w: int, radius: int, near: int, lo: int, hi: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """For the offsets of a pair histogram of radius ``radius`` on ``h x w`` frames:
    the places each fits in a frame (float64), the half plane's far offsets
    (Chebyshev distance ``lo..hi``), its hard-core (1) and soft (``2..near``)
    offsets, and the share of an event's far partners inside the frame summed over
    the far offsets (read-only: one per estimator shape)."""
    dy = np.arange(radius + 1)[:, None]
    dx = np.arange(-radius, radius + 1)[None, :]
    half = (dy > 0) | (dx > 0)
    cheb = np.maximum(dy, np.abs(dx))
    places = np.maximum((h - dy) * (w - np.abs(dx)), 1).astype(np.float64)
    far = half & (cheb >= lo) & (cheb <= hi)
    inside = (h - dy) * (w - np.abs(dx)) / float(h * w)
    out = (places, far, half & (cheb == 1), half & (cheb >= 2) & (cheb <= near))
    for a in out:
        a.flags.writeable = False
    return (*out, float(inside[far].sum()))


def exclusion_areas(
    hist: np.ndarray,
    frame_shape: tuple[int, int],
    pair_radius: int = 2,
    far_radii: tuple[int, int] = (4, 5),
    pair_events: int | None = None,
) -> tuple[float, float]:
    """Hard-core and soft areas ``(a, b)`` (pixels) from a pair histogram.

    Pairs per offset (:func:`pair_histogram`) are divided by the number of places
    the offset fits in a frame, and by their mean over the far offsets (Chebyshev
    distance in ``far_radii``) to give ``g(d)``. ``a = 1 + 2 * sum (1 - g(d))`` over
    the half plane with ``|d|_inf == 1``; ``b = 2 * sum (1 - g(d))`` for
    ``2 <= |d|_inf <= pair_radius``, plus what the hard core's packing took from it
    (:func:`packing_excess`, at the electron density of the pairs' events: their
    far pairs per event, inverted with ``a`` and the uncorrected ``b``) where
    ``pair_events``, the events whose pairs were counted, is given; shrunk toward
    0 while few far pairs are seen and never below 0. Without pairs: ``(9, 0)``,
    the 3 x 3 rule's hard core.

    Parameters
    ----------
    hist : ndarray, shape (R + 1, 2 R + 1)
        Pair counts, ``R >= far_radii[1]``.
    frame_shape : tuple of int
        ``(H, W)``.
    pair_radius : int, default 2
        Largest Chebyshev distance of the deficit sum.
    far_radii : tuple of int, default (4, 5)
        Chebyshev distances that normalise ``g``.
    pair_events : int, optional
        Events whose pairs ``hist`` counts (the first of each pair).

    Returns
    -------
    tuple of float
    """
    near, lo, hi = _check_radii(pair_radius, far_radii)
    radius = (hist.shape[1] - 1) // 2
    if hist.shape != (radius + 1, 2 * radius + 1) or radius < hi:
        raise ValueError(f"hist: expected shape (R + 1, 2 R + 1) with R >= {hi}, got {hist.shape}")
    places, far, hard_zone, soft_zone, inside_far = _pair_geometry(
        int(frame_shape[0]), int(frame_shape[1]), radius, near, lo, hi
    )
    n_far = float(hist[far].sum())
    if n_far == 0:
        return HARD_CORE_AREA, 0.0
    rate = hist / places
    deficit = 1.0 - rate / rate[far].mean()
    hard = 1.0 + 2.0 * float(np.sum(deficit[hard_zone]))
    soft = 2.0 * float(np.sum(deficit[soft_zone]))
    if pair_events:
        # partners per event at the far offsets (less those past the frame's edge)
        mu = n_far / (pair_events * inside_far)
        lam = _electrons_scalar(mu, max(hard, 1.0), max(soft, 0.0))
        soft += packing_excess(lam, near, max(hard, 1.0))
    soft *= n_far / (n_far + _FAR_PAIRS_PRIOR)
    return max(hard, 1.0), max(soft, 0.0)


# several processes may compile this at once (see streamstore._numba_cache)
serialize_saves(_pair_histogram_kernel)
serialize_saves(_pool_tiles_kernel)
serialize_saves(_lookup_events_kernel)
serialize_saves(_coarse_counts_kernel)
serialize_saves(_lookup_tiles_kernel)
