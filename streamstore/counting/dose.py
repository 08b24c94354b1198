"""Corrected dose: the electrons that arrived, estimated from the events counted.

The counter reports one event per 3 x 3 local maximum, so two electrons that land
close together make one event: the event count falls behind the dose as the local
dose rises (coincidence loss). This module estimates, per frame, how many
electrons arrived: from the events, and where the events are too dense to say,
from the charge (below). :class:`DoseCorrector` does both for a series, frame
after frame; it fills :attr:`EventBatch.electrons` for ``count`` and ``Counter``
and for the ingest daemon, and the store records it (``frames/electrons``).

Model
-----
An electron is found when no other electron of its neighbourhood takes its
event. Two zones, both measured from the events (below):

* the *hard core* of area ``a`` (pixels): two electrons there always make one
  event, the brighter one's. Arrivals are Poisson with local density ``lam``
  (e/px/frame), so ``K``, the others in the zone, is Poisson(``lam * a``) and, the
  signals being exchangeable, the electron wins with probability
  ``E[1 / (K + 1)] = (1 - exp(-lam a)) / (lam a)``. Without charge spread this is
  exact for the 3 x 3 rule with ``a = 9``: a pixel holds an event when it is hit
  and its value beats every hit pixel of its 3 x 3 neighbourhood, and the nine
  pixels are alike;
* a *soft* zone of area ``b`` (the pair deficit beyond the hard core): charge
  spread lets electrons two pixels apart merge, sometimes. Rare and partial,
  these merges are taken as independent, each taking one of the two events:
  the electron survives them with probability ``exp(-lam b / 2)``.

So the density of events is::

    mu = (1 - exp(-lam * a)) / a * exp(-lam * b / 2)

inverted numerically (:func:`electrons_from_events`). To first order,
``mu = lam - lam**2 (a + b) / 2``.

``a`` and ``b`` are not constants fitted to an emulator but measured from the
events: ``g(d)``, the pair correlation of the events at lattice offset ``d``
(pairs at ``d`` over pairs far away), is 0 where two events cannot coexist and
below 1 where electrons sometimes merge; ``a`` is the sum of ``1 - g(d)`` over
``|d|_inf <= 1`` (with ``g(0) = 0``), ``b`` over ``2 <= |d|_inf <= pair_radius``.
To first order in the dose, a pair of electrons at ``d`` that the counter merges
removes one pair of events at ``d`` and one event, so the pair deficit and the
areas of the model are the same numbers. Pairs are pooled over every frame seen,
so a series measures its own detector (point spread, deposits, noise,
threshold) at its own dose.

``mu`` is local: events are pooled per tile of ``tile x tile`` pixels over the
frames seen, so a bright disk is corrected as a disk and a dim halo as a halo.
Each event of a frame counts ``lam_t / mu_t`` electrons of its tile ``t``. The
bias that the noise of the pooled count puts into the (convex) inversion is
removed to first order.

What the model cannot see: electrons the counter misses when alone (a deposit
no pixel of which passes the threshold) leave no event and no pair, so they are
not in the estimate; nor can it invert a tile near saturation (beyond a local
dose of a few ``1 / a`` the count carries almost no information on the dose):
the inversion stops at ``lam_max``, where the hard core is :data:`MAX_FILL` full
or the soft losses make ``mu`` fall again, whichever comes first.

Dense tiles: the charge
-----------------------
Where a tile holds more than :data:`CHARGE_LAM` e/px/frame (a bright disk at
0.2-0.5 e/px/frame has one event per 3 x 3 whatever its dose), a
:class:`DoseCorrector` given the frames and their calibration estimates the
tile from its charge instead: the dark-subtracted, gain-weighted signal of the
tile (saturated pixels and X-ray hits left out, as counting leaves them) over
the charge of one electron. That charge is measured from the series itself: the
5 x 5 windows of isolated events (no other event within :data:`ISOLATION` px)
in tiles below :data:`WINDOW_LAM` e/px/frame, each divided by the electrons its
event stands for (the model's ``lam / mu``). Signals are integers (raw x 16
minus ``rint(16 dark)``, times the counting's integer gain), so sums do not
depend on their order and the numba kernels equal their numpy references
(:func:`tile_charge`, :func:`window_charge`).

What neither part can see: a lone electron the counter misses (no pixel above
the threshold) makes no event, and the windows that measure one electron's
charge are those of found electrons, about as much brighter than the average
electron as the counter misses (measured at the emulator's defaults: 2.1 % of
lone electrons missed, windows 1.5 % above the mean deposit). The estimate is so
low by about the counter's lone-electron loss. Estimating that loss from the
data needs the charge of the missed electrons, which the dark level's error
(its row-noise part does not average out over a few dozen dark frames) hides
at the doses where it matters.

Implementations: numpy references of the pair count (:func:`pair_histogram_reference`)
and of the charge sums, and their numba twins, equal bit for bit.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from streamstore._numba_cache import serialize_saves
from streamstore.events import EventBatch

__all__ = [
    "CHARGE_LAM",
    "DOSE_MODEL_NAME",
    "DoseCorrector",
    "DoseEstimator",
    "MAX_FILL",
    "corrected_electrons",
    "electrons_from_events",
    "events_from_electrons",
    "exclusion_areas",
    "pair_histogram",
    "pair_histogram_reference",
    "tile_charge",
    "tile_charge_reference",
    "window_charge",
    "window_charge_reference",
]

#: Name of this module's model, as a store records it beside the corrected dose.
DOSE_MODEL_NAME = "tile-coincidence"
#: Version of the model (what its recorded parameters mean).
DOSE_MODEL_VERSION = 1
#: Largest ``mu * A`` that is inverted; denser tiles are treated as this full.
MAX_FILL = 0.98
#: Exclusion area of the 3 x 3 local-maximum rule without charge spread (pixels).
HARD_CORE_AREA = 9.0
#: Far pairs (Chebyshev distance in ``far_radii``) after which the pair count stops:
#: about 28,000 per far offset, so ``g(d)`` is known to 0.6 % and the areas to a few
#: hundredths of a pixel; counting on would cost a pass over the events every frame
#: for nothing.
MAX_FAR_PAIRS = 2_000_000
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


def _lam_max(hard: float, soft: float) -> float:
    """Largest electron density the model inverts (see the module docstring)."""
    cap = -np.log1p(-MAX_FILL) / hard
    if soft <= 0:
        return float(cap)
    lo, hi = 0.0, float(cap)
    b = 0.5 * soft

    def slope(lam: float) -> float:
        return np.exp(-lam * (hard + b)) - b * float(events_from_electrons(lam, hard, soft))

    if slope(hi) > 0:
        return hi
    for _ in range(60):  # mu rises then falls: bisect its peak
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(mid) > 0 else (lo, mid)
    return lo


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


def pair_histogram_reference(batch: EventBatch, radius: int) -> np.ndarray:
    """Count pairs of events of the same frame by their lattice offset (numpy reference).

    Parameters
    ----------
    batch : EventBatch
        Events.
    radius : int
        Largest Chebyshev distance counted.

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
        r, c = np.divmod(idx, w)
        for dy in range(radius + 1):
            for dx in range(-radius, radius + 1):
                if dy == 0 and dx <= 0:
                    continue
                ok = (r + dy < h) & (c + dx >= 0) & (c + dx < w)
                target = idx[ok] + dy * w + dx
                pos = np.searchsorted(idx, target)
                inside = pos < idx.size
                hist[dy, dx + radius] += int(np.sum(idx[pos[inside]] == target[inside]))
    return hist


@njit(nogil=True, cache=True)
def _pair_histogram_kernel(offsets, indices, h, w, radius, hist):  # pragma: no cover - numba
    ptr = np.empty(radius + 1, np.int64)
    for f in range(offsets.size - 1):
        a = offsets[f]
        b = offsets[f + 1]
        for dy in range(radius + 1):
            ptr[dy] = a
        for i in range(a, b):
            e = np.int64(indices[i])
            r = e // w
            c = e - r * w
            for dy in range(radius + 1):
                if r + dy >= h:
                    break
                lo = e + dy * w - radius
                p = ptr[dy]
                # events ascend, so each row's window start only moves forward
                while p < b and np.int64(indices[p]) < lo:
                    p += 1
                ptr[dy] = p
                hi = e + dy * w + radius
                q = p
                while q < b and np.int64(indices[q]) <= hi:
                    t = np.int64(indices[q])
                    rq = t // w
                    dx = t - rq * w - c
                    if rq == r + dy and (dy > 0 or dx > 0):
                        hist[dy, dx + radius] += 1
                    q += 1
    return hist


def pair_histogram(batch: EventBatch, radius: int) -> np.ndarray:
    """Count pairs of events by lattice offset (numba; same result as
    :func:`pair_histogram_reference`, in O(events * radius + pairs))."""
    h, w = batch.frame_shape
    hist = np.zeros((radius + 1, 2 * radius + 1), np.int64)
    if batch.n_events:
        _pair_histogram_kernel(batch.offsets, batch.indices, h, w, int(radius), hist)
    return hist


def exclusion_areas(
    hist: np.ndarray,
    frame_shape: tuple[int, int],
    pair_radius: int = 2,
    far_radii: tuple[int, int] = (4, 5),
) -> tuple[float, float]:
    """Hard-core and soft areas ``(a, b)`` (pixels) from a pair histogram.

    Pairs per offset (:func:`pair_histogram`) are divided by the number of places
    the offset fits in a frame, and by their mean over the far offsets (Chebyshev
    distance in ``far_radii``) to give ``g(d)``. ``a = 1 + 2 * sum (1 - g(d))`` over
    the half plane with ``|d|_inf == 1``; ``b = 2 * sum (1 - g(d))`` for
    ``2 <= |d|_inf <= pair_radius``, shrunk toward 0 while few far pairs are seen
    and never below 0. Without pairs: ``(9, 0)``, the 3 x 3 rule's hard core.

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

    Returns
    -------
    tuple of float
    """
    near, lo, hi = _check_radii(pair_radius, far_radii)
    radius = (hist.shape[1] - 1) // 2
    if hist.shape != (radius + 1, 2 * radius + 1) or radius < hi:
        raise ValueError(f"hist: expected shape (R + 1, 2 R + 1) with R >= {hi}, got {hist.shape}")
    h, w = frame_shape
    dy = np.arange(radius + 1)[:, None]
    dx = np.arange(-radius, radius + 1)[None, :]
    half = (dy > 0) | (dx > 0)
    cheb = np.maximum(dy, np.abs(dx))
    places = np.maximum((h - dy) * (w - np.abs(dx)), 1).astype(np.float64)
    far = half & (cheb >= lo) & (cheb <= hi)
    n_far = float(hist[far].sum())
    if n_far == 0:
        return HARD_CORE_AREA, 0.0
    rate = hist / places
    deficit = 1.0 - rate / rate[far].mean()
    hard = 1.0 + 2.0 * float(np.sum(deficit[half & (cheb == 1)]))
    soft = 2.0 * float(np.sum(deficit[half & (cheb >= 2) & (cheb <= near)]))
    soft *= n_far / (n_far + _FAR_PAIRS_PRIOR)
    return max(hard, 1.0), max(soft, 0.0)


class DoseEstimator:
    """Running estimate of the electrons that arrived in each frame of a series.

    Feed it the series' events batch after batch with :meth:`update`; it pools
    events per tile and close pairs over every frame seen and returns, per frame
    of each batch, the electrons the model estimates arrived (float64).

    Parameters
    ----------
    frame_shape : tuple of int
        ``(H, W)``.
    tile : int, default 8
        Side of the square tiles whose pooled event density sets the local
        correction. Small enough to follow a disk's edge; a pooled tile needs a
        few hundred events for a good estimate where the correction is large.
    pair_radius : int, default 2
        Chebyshev radius of the close-pair deficit (:func:`exclusion_area`).
    far_radii : tuple of int, default (4, 5)
        Chebyshev distances whose pairs normalise the pair correlation.
    memory : float, optional
        Frames over which tile densities are averaged (exponential forgetting,
        for patterns that drift); None pools every frame seen.
    refresh : int, default 64
        The tile corrections are recomputed after this many new frames at most
        (early on after 1, 2, 4, ... frames, as many as were pooled before).
    exclusion_areas : tuple of float, optional
        Use these areas ``(a, b)`` instead of measuring them.
    implementation : {"numba", "reference"}, default "numba"
        Pair counting by :func:`pair_histogram` or :func:`pair_histogram_reference`.
    """

    def __init__(
        self,
        frame_shape: tuple[int, int],
        *,
        tile: int = 8,
        pair_radius: int = 2,
        far_radii: tuple[int, int] = (4, 5),
        memory: float | None = None,
        refresh: int = 64,
        exclusion_areas: tuple[float, float] | None = None,
        implementation: str = "numba",
    ) -> None:
        h, w = (int(v) for v in frame_shape)
        if h < 1 or w < 1:
            raise ValueError(f"frame_shape: expected two positive ints, got {frame_shape!r}")
        if int(tile) != tile or tile < 1:
            raise ValueError(f"tile: expected an int >= 1, got {tile!r}")
        if memory is not None and not memory >= 1:
            raise ValueError(f"memory: expected None or >= 1 frames, got {memory!r}")
        if int(refresh) != refresh or refresh < 1:
            raise ValueError(f"refresh: expected an int >= 1, got {refresh!r}")
        if exclusion_areas is not None:
            exclusion_areas = (float(exclusion_areas[0]), float(exclusion_areas[1]))
            if not (exclusion_areas[0] > 0 and exclusion_areas[1] >= 0):
                raise ValueError(f"exclusion_areas: expected (> 0, >= 0), got {exclusion_areas!r}")
        if implementation not in ("numba", "reference"):
            raise ValueError(f"implementation: 'numba' or 'reference', got {implementation!r}")
        self.frame_shape = (h, w)
        self.tile = int(tile)
        self.pair_radius, lo, hi = _check_radii(pair_radius, far_radii)
        self.far_radii = (lo, hi)
        self.memory = memory
        self.refresh = int(refresh)
        self.fixed_areas = exclusion_areas
        self.implementation = implementation
        self.n_ty = -(-h // self.tile)
        self.n_tx = -(-w // self.tile)
        ty = np.minimum(self.tile, h - self.tile * np.arange(self.n_ty))
        tx = np.minimum(self.tile, w - self.tile * np.arange(self.n_tx))
        self._tile_area = (ty[:, None] * tx[None, :]).astype(np.float64).ravel()
        self._counts = np.zeros(self.n_ty * self.n_tx, np.float64)
        self._weight = 0.0  # frames pooled (sum of weights)
        self._weight2 = 0.0  # sum of squared weights, for the noise of the pooled density
        self._pairs = np.zeros((hi + 1, 2 * hi + 1), np.int64)
        dy = np.arange(hi + 1)[:, None]
        dx = np.arange(-hi, hi + 1)[None, :]
        cheb = np.maximum(dy, np.abs(dx))
        self._far = ((dy > 0) | (dx > 0)) & (cheb >= lo) & (cheb <= hi)
        #: True once :data:`MAX_FAR_PAIRS` far pairs are pooled: the areas stay as measured
        self.pairs_complete = False
        self._factor: np.ndarray | None = None
        self._stale = 0
        self._refreshed_at = 0
        self._table: tuple[tuple[float, float], tuple[np.ndarray, ...]] | None = None
        self.frames_seen = 0

    # ------------------------------------------------------------------ state
    @property
    def exclusion_areas(self) -> tuple[float, float]:
        """The areas ``(a, b)`` in use (pixels): fixed, or measured from the pairs."""
        if self.fixed_areas is not None:
            return self.fixed_areas
        return exclusion_areas(self._pairs, self.frame_shape, self.pair_radius, self.far_radii)

    def pair_counts(self) -> np.ndarray:
        """The pooled pair histogram (a copy; see :func:`pair_histogram`)."""
        return self._pairs.copy()

    def event_density(self) -> np.ndarray:
        """Pooled events per pixel per frame, per tile, shape ``(n_ty, n_tx)``."""
        mu = self._counts / (self._tile_area * max(self._weight, 1e-300))
        return mu.reshape(self.n_ty, self.n_tx)

    def electron_density(self) -> np.ndarray:
        """Estimated electrons per pixel per frame, per tile, shape ``(n_ty, n_tx)``."""
        return (self._tile_factor() * self.event_density().ravel()).reshape(self.n_ty, self.n_tx)

    def _tile_ids(self, indices: np.ndarray) -> np.ndarray:
        r, c = np.divmod(indices.astype(np.int64), self.frame_shape[1])
        return (r // self.tile) * self.n_tx + c // self.tile

    def _tile_factor(self) -> np.ndarray:
        """Electrons per event in each tile (>= 1), from the pooled densities."""
        areas = self.exclusion_areas
        if self._table is None or self._table[0] != areas:
            self._table = (areas, _inverse_table(*areas))
        tmu, tlam, td2 = self._table[1]
        w = max(self._weight, 1e-300)
        mu = self._counts / (self._tile_area * w)
        lam = np.interp(mu, tmu, tlam)
        # E[lam(mu_hat)] = lam(mu) + lam''(mu) var(mu_hat) / 2 for the convex inversion.
        # Events are thinner than Poisson (none in the hard core of another): the
        # variance of a tile's count is about mu (1 - mu (a + b)), less what pairs
        # across the tile edge keep of the spread
        fill = mu * (areas[0] + areas[1]) * max(0.0, 1.0 - 2.0 / self.tile) ** 2
        var = mu * np.maximum(1.0 - fill, 0.0) * (self._weight2 / (w * w)) / self._tile_area
        lam = lam - 0.5 * np.interp(mu, tmu, td2) * var
        with np.errstate(invalid="ignore", divide="ignore"):
            factor = np.where(mu > 0, lam / mu, 1.0)
        return np.maximum(factor, 1.0)

    # ----------------------------------------------------------------- update
    def update(self, batch: EventBatch) -> np.ndarray:
        """Pool ``batch`` and estimate the electrons that arrived in each of its frames.

        Parameters
        ----------
        batch : EventBatch
            The next frames' events, of this estimator's frame shape.

        Returns
        -------
        ndarray of float64, shape (batch.n_frames,)
            Estimated electrons per frame (the event count where nothing is lost).
        """
        if tuple(batch.frame_shape) != self.frame_shape:
            raise ValueError(
                f"batch: frame shape {batch.frame_shape} is not the estimator's {self.frame_shape}"
            )
        n = batch.n_frames
        if n == 0:
            return np.zeros(0, np.float64)
        tiles = self._tile_ids(batch.indices)
        counts = batch.counts
        if self.memory is None:
            self._counts += np.bincount(tiles, minlength=self._counts.size)
            self._weight += n
            self._weight2 += n
        else:
            keep = 1.0 - 1.0 / float(self.memory)
            # frame j of the batch (0-based) is weighted keep ** (n - 1 - j)
            wf = keep ** np.arange(n - 1, -1, -1, dtype=np.float64)
            ew = np.repeat(wf, counts)
            decay = keep**n
            self._counts *= decay
            self._counts += np.bincount(tiles, weights=ew, minlength=self._counts.size)
            self._weight = self._weight * decay + float(wf.sum())
            self._weight2 = self._weight2 * decay * decay + float(np.sum(wf * wf))
        if self.fixed_areas is None and not self.pairs_complete:
            radius = self._pairs.shape[0] - 1
            if self.implementation == "numba":
                self._pairs += pair_histogram(batch, radius)
            else:
                self._pairs += pair_histogram_reference(batch, radius)
            self.pairs_complete = int(self._pairs[self._far].sum()) >= MAX_FAR_PAIRS
        self.frames_seen += n
        self._stale += n
        # early on the pooled map changes fast: refresh after 1, 2, 4, ... frames
        if self._factor is None or self._stale >= min(self.refresh, self._refreshed_at):
            self._factor = self._tile_factor()
            self._stale = 0
            self._refreshed_at = self.frames_seen
        per_event = self._factor[tiles]
        frame_of = np.repeat(np.arange(n), counts)
        return np.bincount(frame_of, weights=per_event, minlength=n).astype(np.float64)

    def model(self) -> dict:
        """The model and its parameters, as a store records them (JSON-able).

        Returns
        -------
        dict
            ``name``, ``version``, the settings (``tile``, ``pair_radius``,
            ``far_radii``, ``memory``, ``refresh``), the areas in use
            (``hard_area``, ``soft_area``, and whether they were ``measured``) and
            ``frames_seen``.
        """
        hard, soft = self.exclusion_areas
        return {
            "name": DOSE_MODEL_NAME,
            "version": DOSE_MODEL_VERSION,
            "tile": self.tile,
            "pair_radius": self.pair_radius,
            "far_radii": list(self.far_radii),
            "memory": self.memory,
            "refresh": self.refresh,
            "hard_area": round(float(hard), 6),
            "soft_area": round(float(soft), 6),
            "measured": self.fixed_areas is None,
            "far_pairs": int(self._pairs[self._far].sum()),
            "frames_seen": int(self.frames_seen),
        }


class DoseCorrector:
    """Fill :attr:`EventBatch.electrons` for the frames of one series, in order.

    A :class:`DoseEstimator` fed one frame at a time, so the electrons of a
    frame depend on the frames before it and on nothing else: not on how the
    frames were grouped into batches, nor on the counter's threads.

    Given the frames and their calibration (:meth:`use`), tiles denser than
    :data:`CHARGE_LAM` e/px/frame are estimated from their charge instead of
    their events: the tile's signal over the mean charge of one electron,
    measured from the 5 x 5 windows of isolated events in tiles below
    :data:`WINDOW_LAM` (each window divided by the electrons its event stands
    for, the model's ``lam / mu``). Until :data:`MIN_WINDOWS` windows are seen,
    or without frames, every tile is estimated from its events.

    Parameters
    ----------
    frame_shape : tuple of int
        ``(H, W)``.
    calibration : Calibration, optional
        The frames' calibration (see :meth:`use`).
    dtype : uint8 or uint16, default uint16
        The frames' type.
    charge : bool, default True
        Estimate dense tiles from their charge when frames are given.
    **kwargs
        :class:`DoseEstimator` parameters.
    """

    def __init__(
        self,
        frame_shape: tuple[int, int],
        *,
        calibration=None,
        dtype=np.uint16,
        charge: bool = True,
        **kwargs,
    ) -> None:
        self.estimator = DoseEstimator(frame_shape, **kwargs)
        self.charge = bool(charge)
        self._maps = None
        self._kdt = None
        if calibration is not None:
            self.use(calibration, dtype)
        est = self.estimator
        self._dense = np.zeros((est.n_ty, est.n_tx), bool)
        self._low = np.zeros((est.n_ty, est.n_tx), bool)
        self._flags_at = -1  # frames_seen of the estimator's refresh the flags follow
        self._win_charge = 0  # summed window charge (integer signal)
        self._win_electrons = 0.0  # electrons the windows' events stand for
        self._win_n = 0

    @property
    def frame_shape(self) -> tuple[int, int]:
        """``(H, W)``."""
        return self.estimator.frame_shape

    def use(self, calibration, dtype=np.uint16) -> None:
        """Read the next frames' charge with ``calibration`` (frames of ``dtype``)."""
        if tuple(calibration.frame_shape) != self.frame_shape:
            raise ValueError(
                f"calibration: frame shape {calibration.frame_shape} is not {self.frame_shape}"
            )
        self._maps = _signal_maps(calibration, dtype)
        self._kdt = calibration.frame_dtype(dtype)

    @property
    def electron_charge(self) -> float | None:
        """Mean charge of one electron (ADU, gain-weighted), None until measured."""
        if self._win_n < MIN_WINDOWS or self._win_electrons <= 0:
            return None
        return self._win_charge / self._win_electrons / CHARGE_SCALE

    def _refresh_flags(self) -> None:
        est = self.estimator
        if est._refreshed_at == self._flags_at:
            return
        lam = est.electron_density()
        self._dense = lam > CHARGE_LAM
        self._low = (lam < WINDOW_LAM) & (est.event_density() > 0)
        self._flags_at = est._refreshed_at

    def _sample_windows(self, raw: np.ndarray, indices: np.ndarray) -> None:
        if self._win_n >= MAX_WINDOWS or not self._low.any():
            return
        limit = min(WINDOWS_PER_FRAME, MAX_WINDOWS - self._win_n)
        impl = (
            window_charge if self.estimator.implementation == "numba" else (window_charge_reference)
        )
        est = self.estimator
        q, t = impl(raw, *self._maps, indices, self._low, est.tile, limit)
        if q.size:
            self._win_charge += int(q.sum())
            self._win_electrons += float(np.sum(est._factor[t]))
            self._win_n += int(q.size)

    def _frame_electrons(self, fb: EventBatch, raw: np.ndarray | None) -> float:
        """Electrons of the one-frame batch ``fb`` with the current pooled state."""
        est = self.estimator
        tiles = est._tile_ids(fb.indices)
        per_event = est._factor[tiles]
        q1 = self.electron_charge
        if raw is None or q1 is None or not self._dense.any():
            return float(per_event.sum())
        dense = self._dense.ravel()[tiles]
        impl = tile_charge if est.implementation == "numba" else tile_charge_reference
        charge = impl(raw, *self._maps, est.tile, self._dense)
        return float(per_event[~dense].sum()) + float(charge.sum()) / (q1 * CHARGE_SCALE)

    def _raw(self, frames, i: int) -> np.ndarray | None:
        if frames is None or self._maps is None or not self.charge:
            return None
        raw = np.asarray(frames[i])
        return raw.view(self._kdt) if raw.dtype != self._kdt else raw

    def __call__(self, batch: EventBatch, frames: np.ndarray | None = None) -> EventBatch:
        """``batch`` with its ``electrons`` (the same events, no copy).

        Parameters
        ----------
        batch : EventBatch
            The next frames of the series.
        frames : ndarray (n, H, W), optional
            Their raw frames, for the charge of dense tiles (needs :meth:`use`).

        Returns
        -------
        EventBatch
        """
        n = batch.n_frames
        if frames is not None and len(frames) != n:
            raise ValueError(f"frames: {len(frames)} frames for a batch of {n}")
        out = np.empty(n, np.float64)
        for i in range(n):  # frame by frame: the result does not depend on batching
            fb = batch.slice(i, i + 1)
            raw = self._raw(frames, i)
            self.estimator.update(fb)
            self._refresh_flags()
            if raw is not None:
                self._sample_windows(raw, fb.indices)
            out[i] = self._frame_electrons(fb, raw)
        return batch.with_electrons(out)

    def pooled(self, batch: EventBatch, frames: np.ndarray | None = None) -> np.ndarray:
        """Electrons per frame of a whole series in one batch, every frame corrected
        with the state pooled over all of them (a fresh corrector only)."""
        if self.estimator.frames_seen:
            raise ValueError("pooled() needs a fresh DoseCorrector")
        est = self.estimator
        est.refresh = max(1, batch.n_frames)
        est.update(batch)
        self._refresh_flags()
        if frames is not None and self._maps is not None and self.charge:
            for i in range(batch.n_frames):
                a, b = int(batch.offsets[i]), int(batch.offsets[i + 1])
                self._sample_windows(self._raw(frames, i), batch.indices[a:b])
        out = np.empty(batch.n_frames, np.float64)
        for i in range(batch.n_frames):
            out[i] = self._frame_electrons(batch.slice(i, i + 1), self._raw(frames, i))
        return out

    def model(self) -> dict:
        """The model and its current parameters (:meth:`DoseEstimator.model`, plus the
        charge estimate: ``charge_lam``, ``window_lam``, ``electron_charge_adu``,
        ``windows`` and ``charge_tiles``)."""
        out = self.estimator.model()
        q1 = self.electron_charge
        used = q1 is not None and self._maps is not None and self.charge
        out.update(
            charge=bool(self.charge and self._maps is not None),
            charge_lam=CHARGE_LAM,
            window_lam=WINDOW_LAM,
            electron_charge_adu=None if q1 is None else round(q1, 6),
            windows=int(self._win_n),
            charge_tiles=int(self._dense.sum()) if used else 0,
        )
        return out


def corrected_electrons(
    batch: EventBatch, frames: np.ndarray | None = None, calibration=None, **kwargs
) -> np.ndarray:
    """Estimated electrons per frame of a whole series held in one batch.

    Pools the whole batch first (tile densities and pairs, and the charge of
    one electron when frames are given), then corrects each frame with the
    pooled estimate, so early frames are corrected as well as late ones.

    Parameters
    ----------
    batch : EventBatch
        The series' events.
    frames : ndarray (n, H, W), optional
        The raw frames, for the charge of dense tiles (with ``calibration``).
    calibration : Calibration, optional
        Their calibration.
    **kwargs
        :class:`DoseCorrector` and :class:`DoseEstimator` parameters (``tile``, ...).

    Returns
    -------
    ndarray of float64, shape (batch.n_frames,)
    """
    if frames is not None and calibration is not None:
        kwargs.setdefault("dtype", np.asarray(frames).dtype)
        kwargs["calibration"] = calibration
    return DoseCorrector(batch.frame_shape, **kwargs).pooled(batch, frames)


# several processes may compile this at once (see streamstore._numba_cache)
serialize_saves(_pair_histogram_kernel)


# --------------------------------------------------------------------- charge
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

    ``dark16`` is ``rint(dark * 16)`` (int64); ``gain`` the counting's integer gain
    (uint16, 1 everywhere without a gain map); ``good`` 1 on unmasked pixels;
    ``xray_level`` the counting's (integer signal units, see
    :meth:`~streamstore.Calibration.threshold_maps`); ``tmax`` the frame type's maximum.
    """
    cache = calibration._derived()
    key = ("dose_signal_maps", np.dtype(dtype).str)
    if key not in cache:
        kdt = calibration.frame_dtype(dtype)
        _, _, gain_k, xray_level = calibration.threshold_maps(dtype)
        dark16 = np.rint(np.asarray(calibration.dark, np.float64) * CHARGE_SCALE).astype(np.int64)
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


@njit(nogil=True, cache=True)
def _tile_charge_kernel(
    raw, dark16, gain, good, xray_level, tmax, tile, flags, out
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
                v = np.int64(raw[r, c])
                g = np.int64(gain[r, c])
                d = dark16[r, c]
                if v == tmax:
                    continue
                # rint(dark16 / 16) as numpy rounds (half to even)
                q = d // 16
                rem = d - q * 16
                if rem > 8 or (rem == 8 and (q & 1) == 1):
                    q += 1
                if (v - q) * g > xray_level:
                    continue
                acc += (v * 16 - d) * g
            out[ty, tx] += acc
    return out


def tile_charge(raw, dark16, gain, good, xray_level, tmax, tile, flags) -> np.ndarray:
    """Charge of each flagged tile of one frame (numba; equal to :func:`tile_charge_reference`)."""
    out = np.zeros(flags.shape, np.int64)
    if flags.any():
        args = (int(xray_level), int(tmax), int(tile), flags, out)
        _tile_charge_kernel(raw, dark16, gain, good, *args)
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
def _window_charge_kernel(raw, dark16, gain, good, xray_level, tmax, indices, allowed, tile,
                          limit, q_out, t_out):  # pragma: no cover  # fmt: skip
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
                v = np.int64(raw[rr, cc])
                if v == tmax:
                    continue
                g = np.int64(gain[rr, cc])
                d = dark16[rr, cc]
                q = d // 16
                rem = d - q * 16
                if rem > 8 or (rem == 8 and (q & 1) == 1):
                    q += 1
                if (v - q) * g > xray_level:
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
    n = _window_charge_kernel(raw, dark16, gain, good, *args, limit, q, t)
    return q[:n], t[:n]


serialize_saves(_tile_charge_kernel, _window_charge_kernel)
