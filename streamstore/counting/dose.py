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
areas of the model are the same numbers. The hard core alone pushes the other
way: two electrons two pixels apart share three, two or one pixels of their
3 x 3 windows, where one brighter third electron takes both, so surviving pairs
there are more frequent than far apart (``g(d) > 1``, about ``1 + lam O / 3``
for ``O`` shared pixels). The soft area is the measured deficit plus that
excess (:func:`~streamstore.counting.coincidence.packing_excess`, exact for the
hard core, at the electron density of the events whose pairs were counted):
0.49 px of area at 0.05 e/px/frame, left out it put the dose 1.4 % low there.
Pairs are pooled over every frame seen, so a series measures its own detector
(point spread, deposits, noise, threshold) at its own dose.

``mu`` is local: events are pooled per tile of ``tile x tile`` pixels over the
frames seen, so a bright disk is corrected as a disk and a dim halo as a halo.
Until a tile's neighbourhood has pooled enough events (``MIN_EVENTS`` per tile
over the coarse tile of ``COARSE x COARSE`` tiles that holds it), its events take
the coarse tile's density: a tile of a few events has a noisy density, which the
convex, capped inversion turns into a low estimate (a one-frame ``count()`` at
0.025 e/px/frame gave 0.885 of the electrons on 8 x 8 tiles alone; 0.98 now).
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

from streamstore.counting.charge import (  # noqa: F401  (re-exported: the dose API)
    CHARGE_LAM,
    CHARGE_SCALE,
    ISOLATION,
    MAX_WINDOWS,
    MIN_WINDOWS,
    WINDOW_HALF,
    WINDOW_LAM,
    WINDOWS_PER_FRAME,
    _pixel_signal,
    _signal_maps,
    tile_charge,
    tile_charge_reference,
    window_charge,
    window_charge_reference,
)
from streamstore.counting.coincidence import (  # noqa: F401  (re-exported: the dose API)
    HARD_CORE_AREA,
    MAX_FILL,
    _check_radii,
    _inverse_table,
    coarse_counts,
    coarse_counts_reference,
    electrons_from_events,
    events_from_electrons,
    exclusion_areas,
    packing_excess,
    pair_histogram,
    pair_histogram_reference,
    pool_tiles,
    pool_tiles_reference,
)
from streamstore.counting.tile_dose import (  # noqa: F401  (re-exported: the dose API)
    DOSE_MODEL_NAME,
    DOSE_MODEL_VERSION,
    MAX_FAR_PAIRS,
    MIN_EVENTS,
    PAIR_EVENTS_PER_FRAME,
    DoseEstimator,
)
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


#: The corrector's tile flags: dense tiles (estimated from their charge) and dim
#: ones (whose isolated events give the charge of one electron).
_DENSE, _LOW = 0, 1
_FLAG_LIMITS = ((CHARGE_LAM, np.inf), (-np.inf, WINDOW_LAM))


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
        kwargs["flag_limits"] = _FLAG_LIMITS
        self.estimator = DoseEstimator(frame_shape, **kwargs)
        self.charge = bool(charge)
        self._maps = None
        self._kdt = None
        if calibration is not None:
            self.use(calibration, dtype)
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

    def _flag(self, k: int) -> np.ndarray | None:
        """Tiles in interval ``k`` of the estimator's flags (_DENSE, _LOW) at its last
        refresh, None where there are none (most often known from the tables alone)."""
        est = self.estimator
        if not est.may_flag(k):
            return None
        flags = est.tile_flags()[k]
        return flags if flags.any() else None

    def _sample_windows(self, raw: np.ndarray, indices: np.ndarray) -> None:
        if self._win_n >= MAX_WINDOWS:
            return
        low = self._flag(_LOW)
        if low is None:
            return
        limit = min(WINDOWS_PER_FRAME, MAX_WINDOWS - self._win_n)
        est = self.estimator
        impl = window_charge if est.implementation == "numba" else window_charge_reference
        q, t = impl(raw, *self._maps, indices, low, est.tile, limit)
        if q.size:
            self._win_charge += int(q.sum())
            self._win_electrons += float(np.sum(est.event_factors(t)))
            self._win_n += int(q.size)

    def _frame_electrons(self, tiles: np.ndarray, raw: np.ndarray | None) -> float:
        """Electrons of one frame whose events lie in ``tiles``, with the pooled state."""
        est = self.estimator
        per_event = est.event_factors(tiles)
        q1 = self.electron_charge
        dense = None if raw is None or q1 is None else self._flag(_DENSE)
        if dense is None:
            return float(per_event.sum())
        in_dense = dense.ravel()[tiles]
        impl = tile_charge if est.implementation == "numba" else tile_charge_reference
        charge = impl(raw, *self._maps, est.tile, dense)
        return float(per_event[~in_dense].sum()) + float(charge.sum()) / (q1 * CHARGE_SCALE)

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
            tiles = self.estimator.pool(fb)
            if raw is not None:
                self._sample_windows(raw, fb.indices)
            out[i] = self._frame_electrons(tiles, raw)
        return batch.with_electrons(out)

    def pooled(self, batch: EventBatch, frames: np.ndarray | None = None) -> np.ndarray:
        """Electrons per frame of a whole series in one batch, every frame corrected
        with the state pooled over all of them (a fresh corrector only)."""
        if self.estimator.frames_seen:
            raise ValueError("pooled() needs a fresh DoseCorrector")
        est = self.estimator
        est.refresh = max(1, batch.n_frames)
        tiles = est.pool(batch) if batch.n_frames else np.zeros(0, np.int64)
        # the windows give one electron's charge, which only dense tiles use: with
        # every count of the series pooled, whether any tile is dense is known now
        if frames is not None and self._maps is not None and self.charge and est.may_flag(_DENSE):
            for i in range(batch.n_frames):
                a, b = int(batch.offsets[i]), int(batch.offsets[i + 1])
                self._sample_windows(self._raw(frames, i), batch.indices[a:b])
        out = np.empty(batch.n_frames, np.float64)
        for i in range(batch.n_frames):
            a, b = int(batch.offsets[i]), int(batch.offsets[i + 1])
            out[i] = self._frame_electrons(tiles[a:b], self._raw(frames, i))
        return out

    def model(self) -> dict:
        """The model and its current parameters (:meth:`DoseEstimator.model`, plus the
        charge estimate: ``charge_lam``, ``window_lam``, ``electron_charge_adu``,
        ``windows`` and ``charge_tiles``)."""
        out = self.estimator.model()
        q1 = self.electron_charge
        used = q1 is not None and self._maps is not None and self.charge
        dense = self._flag(_DENSE) if used else None
        out.update(
            charge=bool(self.charge and self._maps is not None),
            charge_lam=CHARGE_LAM,
            window_lam=WINDOW_LAM,
            electron_charge_adu=None if q1 is None else round(q1, 6),
            windows=int(self._win_n),
            charge_tiles=int(dense.sum()) if used and dense is not None else 0,
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
