"""The events' part of the corrected dose: electrons per event, tile by tile, pooled over a series.

:class:`DoseEstimator` pools a series' events per tile and their close pairs,
measures the model's exclusion areas from the pairs and inverts each tile's
pooled event density into an electron density (:mod:`streamstore.counting.coincidence`);
:class:`streamstore.counting.dose.DoseCorrector` builds on it (the module
docstring of :mod:`streamstore.counting.dose` explains the model).
"""

from __future__ import annotations

import functools

import numpy as np

from streamstore.counting.coincidence import (
    _check_radii,
    _inverse_table,
    coarse_counts,
    coarse_counts_reference,
    exclusion_areas,
    lookup_events,
    lookup_events_reference,
    lookup_tiles,
    lookup_tiles_reference,
    pair_histogram,
    pair_histogram_reference,
    pool_tiles,
    pool_tiles_reference,
)
from streamstore.events import EventBatch

__all__ = ["DOSE_MODEL_NAME", "DoseEstimator"]

#: Name of the dose model, as a store records it beside the corrected dose.
DOSE_MODEL_NAME = "tile-coincidence"
#: Version of the model (what its recorded parameters mean).
#: 2: the soft area counts the hard core's packing back in (``packing_excess``), and
#: tiles take their coarse tile's density until it holds MIN_EVENTS per tile.
#: 3: that packing scales with the measured hard core (``hard_area / 9`` of the
#: 3 x 3 windows; a counter that keeps electrons a pixel apart apart packs less):
#: the same as 2 for the 3 x 3 rule's events, whose hard core is 9.
DOSE_MODEL_VERSION = 3
#: Far pairs (Chebyshev distance in ``far_radii``) after which the pair count stops:
#: about 28,000 per far offset, so ``g(d)`` is known to 0.6 % and the areas to a few
#: hundredths of a pixel; counting on would cost a pass over the events every frame
#: for nothing.
MAX_FAR_PAIRS = 2_000_000
#: Events of a frame (its first, in raster order) whose pairs are counted: the
#: areas are a property of the point spread and the counting rule, not of where
#: in the frame they are measured, and a full frame's pairs would cost more than
#: counting it (tens of ms at 0.01 e/px/frame on 4092 x 5760)
PAIR_EVENTS_PER_FRAME = 32_768
#: Tiles take the density of their coarse tile (COARSE x COARSE tiles) until the
#: coarse tile has pooled this many events per whole tile: a few events give a
#: noisy density, and the inversion, convex and capped near the hard core's fill,
#: turns noise into a low estimate (a one-frame count() at 0.025 e/px/frame gave
#: 0.885 of the electrons with 8 x 8 tiles alone, 0.98 with 32 x 32 ones; a disk
#: needs the small tiles once they fill). Decided per coarse tile, from its pooled
#: count, not per tile from its own: tiles whose own count ran high by chance
#: would be the first to leave it, and be estimated high.
MIN_EVENTS = 16
#: Side of a coarse tile, in tiles.
COARSE = 4


@functools.lru_cache(maxsize=8)
def _tile_geometry(h: int, w: int, tile: int) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Area of each tile (float64, flat), each tile's class (uint8, flat: 0 whole,
    1 in the last column, 2 in the last row, 3 both, when the frame's edge cuts
    them short) and the area of each class. Read-only, the same for every
    estimator of a frame shape (a one-frame ``count()`` builds one each call)."""
    n_ty, n_tx = -(-h // tile), -(-w // tile)
    ty = np.minimum(tile, h - tile * np.arange(n_ty))
    tx = np.minimum(tile, w - tile * np.arange(n_tx))
    area = (ty[:, None] * tx[None, :]).astype(np.float64).ravel()
    classes = np.zeros((n_ty, n_tx), np.uint8)
    classes[:, -1] |= np.uint8(tx[-1] != tile)
    classes[-1, :] |= np.uint8(2 * (ty[-1] != tile))
    classes = classes.ravel()
    class_areas = tuple(float(a * b) for b in (tile, ty[-1]) for a in (tile, tx[-1]))
    area.flags.writeable = False
    classes.flags.writeable = False
    return area, classes, class_areas


@functools.lru_cache(maxsize=8)
def _coarse_of(h: int, w: int, tile: int, coarse: int) -> np.ndarray:
    """The coarse tile (``coarse x coarse`` tiles) of each tile, flat (int64,
    read-only)."""
    n_ty, n_tx = -(-h // tile), -(-w // tile)
    n_cx = -(-n_tx // coarse)
    out = (
        (np.arange(n_ty) // coarse)[:, None] * n_cx + (np.arange(n_tx) // coarse)[None, :]
    ).ravel()
    out.flags.writeable = False
    return out


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
        Until the coarse tile of :data:`COARSE` x :data:`COARSE` tiles that holds
        it has pooled :data:`MIN_EVENTS` events per tile, a tile's events take the
        coarse tile's density.
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
        Pair counting by :func:`pair_histogram` or :func:`pair_histogram_reference`
        (and the tile pooling and lookups by their numba kernels or references).
    threads : int, optional, default 1
        Threads for the pooling (None: all cores); the result does not depend on it.
    flag_limits : sequence of (float, float), default ()
        Electron densities ``(low, high)`` whose open interval :meth:`tile_flags`
        marks, per tile, at each refresh.
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
        threads: int | None = 1,
        flag_limits: tuple[tuple[float, float], ...] = (),
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
        if threads is not None and (int(threads) != threads or threads < 1):
            raise ValueError(f"threads: expected None or an int >= 1, got {threads!r}")
        self.threads = None if threads is None else int(threads)
        self.flag_limits = tuple((float(lo_), float(hi_)) for lo_, hi_ in flag_limits)
        self.n_ty = -(-h // self.tile)
        self.n_tx = -(-w // self.tile)
        self._tile_area, self._classes, self._class_areas = _tile_geometry(h, w, self.tile)
        # coarse tiles: their density serves the tiles of those that hold fewer
        # than MIN_EVENTS events a tile
        self._coarse_area, self._coarse_classes, self._coarse_class_areas = _tile_geometry(
            h, w, self.tile * COARSE
        )
        self._coarse_of = _coarse_of(h, w, self.tile, COARSE)
        self._counts = np.zeros(self.n_ty * self.n_tx, np.float64)
        self._weight = 0.0  # frames pooled (sum of weights)
        self._weight2 = 0.0  # sum of squared weights, for the noise of the pooled density
        self._pairs = np.zeros((hi + 1, 2 * hi + 1), np.int64)
        self._pair_events = 0  # events whose pairs were counted (the first of a pair)
        self._areas: tuple[float, float] | None = None  # measured from the pairs
        dy = np.arange(hi + 1)[:, None]
        dx = np.arange(-hi, hi + 1)[None, :]
        cheb = np.maximum(dy, np.abs(dx))
        self._far = ((dy > 0) | (dx > 0)) & (cheb >= lo) & (cheb <= hi)
        #: True once :data:`MAX_FAR_PAIRS` far pairs are pooled: the areas stay as measured
        self.pairs_complete = False
        # at each refresh: with pooled (whole) counts, the electrons per event and the
        # flags per tile class and count (tables); with forgetting, maps of every tile
        self._lut: np.ndarray | None = None
        self._flag_luts: np.ndarray | None = None
        self._coarse_factor = np.ones(self._coarse_area.size)  # per coarse tile
        self._own = np.zeros(self._coarse_area.size, bool)
        # the pooled counts the tables were made for (none before the first refresh):
        # the counts grow between refreshes, and a count past a table's end has no entry
        self._lut_counts = np.zeros(0)
        self._factor: np.ndarray | None = None
        self._flags: np.ndarray | None = None  # made when first asked for
        self._ready = False
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
        if self._areas is None:  # measured once per change of the pairs
            self._areas = exclusion_areas(
                self._pairs, self.frame_shape, self.pair_radius, self.far_radii, self._pair_events
            )
        return self._areas

    def pair_counts(self) -> np.ndarray:
        """The pooled pair histogram (a copy; see :func:`pair_histogram`)."""
        return self._pairs.copy()

    def event_density(self) -> np.ndarray:
        """Pooled events per pixel per frame, per tile, shape ``(n_ty, n_tx)``."""
        mu = self._counts / (self._tile_area * max(self._weight, 1e-300))
        return mu.reshape(self.n_ty, self.n_tx)

    def electron_density(self) -> np.ndarray:
        """Estimated electrons per pixel per frame, per tile, shape ``(n_ty, n_tx)``:
        from the tile's pooled events, or its coarse tile's while that holds fewer
        than :data:`MIN_EVENTS` a tile."""
        counts, area, side = self._effective()
        mu = counts / (area * max(self._weight, 1e-300))
        return (self._factor_of(counts, area, side) * mu).reshape(self.n_ty, self.n_tx)

    def _threads(self) -> int:
        if self.threads is not None:
            return self.threads
        import numba

        return int(numba.config.NUMBA_NUM_THREADS)

    def _refresh(self) -> None:
        """Recompute the electrons per event from the pooled densities."""
        self._flags = None
        if self.memory is not None:
            self._lut_counts = self._counts.copy()
            self._factor = self._tile_factor()
            return
        coarse = None
        if self.implementation == "numba" and self._threads() > 1:
            # the coarse counts (a pass over every tile, no GIL) beside the tables
            from streamstore.counting._launch import _thread_pool

            coarse = _thread_pool().submit(self._coarse_counts)
        self._lut, self._flag_luts = self._tables()
        # the tables' counts: these counts, until the next pooling copies them (a
        # one-call count() pools once and refreshes once: no copy)
        self._lut_counts = self._counts
        coarse = self._coarse_counts() if coarse is None else coarse.result()
        self._own = self._own_of(coarse)
        # the coarse tiles that count (not own) hold fewer than MIN_EVENTS events a
        # whole tile: a table by class and count, as for the tiles
        size = int(MIN_EVENTS) * COARSE * COARSE + 1
        grid = np.tile(np.arange(float(size)), len(self._coarse_class_areas))
        area = np.repeat(np.asarray(self._coarse_class_areas), size)
        table = self._factor_of(grid, area, COARSE * self.tile).reshape(-1, size)
        used = np.where(self._own, 0, np.minimum(coarse, size - 1)).astype(np.int64)
        self._coarse_factor = table[self._coarse_classes, used]

    def _coarse_counts(self) -> np.ndarray:
        """Pooled counts of the coarse tiles, flat."""
        impl = coarse_counts if self.implementation == "numba" else coarse_counts_reference
        return impl(self._counts, self.n_ty, self.n_tx, COARSE)

    def _own_of(self, coarse: np.ndarray) -> np.ndarray:
        """Per coarse tile: whether its tiles' own counts are used (MIN_EVENTS)."""
        return coarse * (self.tile * self.tile / self._coarse_area) >= MIN_EVENTS

    def _effective(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per tile, the pooled count, area and side its density is taken from: its
        own, or its coarse tile's while that holds fewer than MIN_EVENTS per tile."""
        coarse = self._coarse_counts()
        low = ~self._own_of(coarse)[self._coarse_of]
        counts = np.where(low, coarse[self._coarse_of], self._counts)
        area = np.where(low, self._coarse_area[self._coarse_of], self._tile_area)
        return counts, area, np.where(low, COARSE * self.tile, self.tile)

    def _lookup_args(self) -> tuple:
        return self._coarse_of, self._own, self._coarse_factor

    def _tables(self) -> tuple[np.ndarray, np.ndarray]:
        """Electrons per event and flags per tile class and pooled count, now: pooled
        counts are whole numbers, so the tables give the same values as inverting
        every tile, at the cost of a handful of inversions."""
        size = int(self._counts.max(initial=0)) + 1
        # one inversion of every (class, count) pair: the per-call costs of the model
        # (its areas from the pairs, the inverse table) are paid once per refresh
        counts = np.tile(np.arange(float(size)), len(self._class_areas))
        area = np.repeat(np.asarray(self._class_areas), size)
        lut = self._factor_of(counts, area)
        flag_luts = self._flags_of(lut, counts, area)
        classes = len(self._class_areas)
        return lut.reshape(classes, size), flag_luts.reshape(-1, classes, size)

    def event_factors(self, tiles: np.ndarray) -> np.ndarray:
        """Electrons each event of these tiles stands for (>= 1), at the last refresh.

        Parameters
        ----------
        tiles : ndarray of int64
            Flat tile indices (as :meth:`pool` returns them).
        """
        if self._lut is None:
            return self._factor[tiles]
        lookup = lookup_events if self.implementation == "numba" else lookup_events_reference
        return lookup(tiles, self._lut_counts, self._classes, self._lut, *self._lookup_args())

    def _tile_factor(self) -> np.ndarray:
        """Electrons per event in each tile (>= 1), from the pooled densities."""
        return self._factor_of(*self._effective())

    def _flags_of(
        self, factor: np.ndarray, counts: np.ndarray, area: np.ndarray | float
    ) -> np.ndarray:
        """Whether ``factor * mu`` lies in each interval of ``flag_limits`` (and mu > 0)."""
        mu = counts / (area * max(self._weight, 1e-300))
        lam = factor * mu
        out = np.empty((len(self.flag_limits), np.size(counts)), np.bool_)
        for k, (low, high) in enumerate(self.flag_limits):
            out[k] = (lam > low) & (lam < high) & (mu > 0)
        return out

    def may_flag(self, k: int) -> bool:
        """False where no tile can be in interval ``k`` of ``flag_limits`` at the last
        refresh (no count of any tile class maps into it): no map to make or scan."""
        if not self._ready:
            return False
        if self._flag_luts is not None:
            return bool(self._flag_luts[k].any())
        return bool(self.tile_flags()[k].any())

    def tile_flags(self) -> np.ndarray:
        """Per tile, whether the electron density of its own pooled count lies in each
        interval of ``flag_limits``, at the last refresh: bool, shape ``(k, n_ty,
        n_tx)``, made when first asked for. Its own count even where its events take
        their coarse tile's density (:data:`MIN_EVENTS`): the flags choose where the
        charge is read, which is local."""
        if not self._ready:
            return np.zeros((len(self.flag_limits), self.n_ty, self.n_tx), np.bool_)
        if self._flags is None:
            if self._flag_luts is None:
                counts = self._lut_counts
                own = self._factor_of(counts, self._tile_area)
                self._flags = self._flags_of(own, counts, self._tile_area)
            else:
                lookup = lookup_tiles if self.implementation == "numba" else lookup_tiles_reference
                self._flags = lookup(self._lut_counts, self._classes, self._flag_luts)
        return self._flags.reshape(-1, self.n_ty, self.n_tx)

    def _factor_of(
        self, counts: np.ndarray, area: np.ndarray | float, tile: np.ndarray | int | None = None
    ) -> np.ndarray:
        """Electrons per event of tiles of these pooled counts and areas (``tile``:
        their sides, for the variance of their count; default this estimator's)."""
        areas = self.exclusion_areas
        tile = self.tile if tile is None else tile
        if self._table is None or self._table[0] != areas:
            self._table = (areas, _inverse_table(*areas))
        tmu, tlam, td2 = self._table[1]
        w = max(self._weight, 1e-300)
        mu = counts / (area * w)
        lam = np.interp(mu, tmu, tlam)
        # E[lam(mu_hat)] = lam(mu) + lam''(mu) var(mu_hat) / 2 for the convex inversion.
        # Events are thinner than Poisson (none in the hard core of another): the
        # variance of a tile's count is about mu (1 - mu (a + b)), less what pairs
        # across the tile edge keep of the spread
        edge = np.maximum(0.0, 1.0 - 2.0 / np.asarray(tile, np.float64)) ** 2
        fill = mu * (areas[0] + areas[1]) * edge
        var = mu * np.maximum(1.0 - fill, 0.0) * (self._weight2 / (w * w)) / area
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
        n = batch.n_frames
        if n == 0 and tuple(batch.frame_shape) == self.frame_shape:
            return np.zeros(0, np.float64)
        tiles = self.pool(batch)
        per_event = self.event_factors(tiles)
        frame_of = np.repeat(np.arange(n), batch.counts)
        return np.bincount(frame_of, weights=per_event, minlength=n).astype(np.float64)

    def pool(self, batch: EventBatch) -> np.ndarray:
        """Pool ``batch`` (the :meth:`update` without the per-frame sums); return the
        tile of each of its events (flat index into the tiles)."""
        if tuple(batch.frame_shape) != self.frame_shape:
            raise ValueError(
                f"batch: frame shape {batch.frame_shape} is not the estimator's {self.frame_shape}"
            )
        n = batch.n_frames
        counts = batch.counts
        pairs = None
        if self.fixed_areas is None and not self.pairs_complete:
            radius = self._pairs.shape[0] - 1
            if self.implementation == "reference":
                pairs = pair_histogram_reference(batch, radius, PAIR_EVENTS_PER_FRAME)
            elif self._threads() > 1:  # beside the pooling below: both release the GIL
                from streamstore.counting._launch import _thread_pool

                pairs = _thread_pool().submit(pair_histogram, batch, radius, PAIR_EVENTS_PER_FRAME)
            else:
                pairs = pair_histogram(batch, radius, PAIR_EVENTS_PER_FRAME)
        if self._lut_counts is self._counts:  # the tables' counts stay as they were
            self._lut_counts = self._counts.copy()
        if self.memory is None:
            pool = pool_tiles if self.implementation == "numba" else pool_tiles_reference
            tiles = pool(batch.indices, self.frame_shape[1], self.tile, self.n_tx, self._counts)
            self._weight += n
            self._weight2 += n
        else:
            tiles = pool_tiles_reference(batch.indices, self.frame_shape[1], self.tile, self.n_tx)
            keep = 1.0 - 1.0 / float(self.memory)
            # frame j of the batch (0-based) is weighted keep ** (n - 1 - j)
            wf = keep ** np.arange(n - 1, -1, -1, dtype=np.float64)
            ew = np.repeat(wf, counts)
            decay = keep**n
            self._counts *= decay
            self._counts += np.bincount(tiles, weights=ew, minlength=self._counts.size)
            self._weight = self._weight * decay + float(wf.sum())
            self._weight2 = self._weight2 * decay * decay + float(np.sum(wf * wf))
        if pairs is not None:
            self._pairs += pairs if isinstance(pairs, np.ndarray) else pairs.result()
            self._pair_events += int(np.minimum(counts, PAIR_EVENTS_PER_FRAME).sum())
            self._areas = None
            self.pairs_complete = int(self._pairs[self._far].sum()) >= MAX_FAR_PAIRS
        self.frames_seen += n
        self._stale += n
        # early on the pooled map changes fast: refresh after 1, 2, 4, ... frames
        if not self._ready or self._stale >= min(self.refresh, self._refreshed_at):
            self._refresh()
            self._ready = True
            self._stale = 0
            self._refreshed_at = self.frames_seen
        return tiles

    def model(self) -> dict:
        """The model and its parameters, as a store records them (JSON-able).

        Returns
        -------
        dict
            ``name``, ``version``, the settings (``tile``, ``coarse_tile``,
            ``min_events``, ``pair_radius``, ``far_radii``, ``memory``, ``refresh``),
            the areas in use (``hard_area``, ``soft_area``, and whether they were
            ``measured``) and ``frames_seen``.
        """
        hard, soft = self.exclusion_areas
        return {
            "name": DOSE_MODEL_NAME,
            "version": DOSE_MODEL_VERSION,
            "tile": self.tile,
            "coarse_tile": self.tile * COARSE,
            "min_events": MIN_EVENTS,
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
