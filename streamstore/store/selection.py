"""Which frames and pixels a read of a store covers: windows, ROIs, dose and time.

Each rule has one validator here, used by the store's readers and by every
stage above them (exports, figures, the command line):

* :func:`check_window` -- a ``[start, stop)`` window of stored frames;
* :func:`check_roi` -- a ``(row0, row1, col0, col1)`` crop of the frame;
* :func:`check_range` -- a closed ``(lo, hi)`` range of a quantity;
* :func:`unit_scale` -- a dose unit, and the factor from counts to it.

:class:`FrameSelection` gives :class:`~streamstore.store.reader.Store` the
methods built on them (``dose``, ``select``, ``fractions``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from streamstore.errors import UserError

__all__ = [
    "UNITS",
    "FrameSelection",
    "check_range",
    "check_roi",
    "check_window",
    "unit_scale",
]

#: dose units: counts per frame, electrons per pixel, electrons per square angstrom
UNITS = ("events", "e/px", "e/A2")


def check_window(
    n_frames: int,
    start: int | None,
    stop: int | None,
    *,
    empty_ok: bool = True,
    need_frames: bool = False,
) -> tuple[int, int]:
    """Resolve a ``[start, stop)`` window of stored frames, or raise UserError.

    Parameters
    ----------
    n_frames : int
        Frames in the series.
    start, stop : int or None
        Frame positions (0-based, ``stop`` exclusive); None means the series
        start / end. Negative values are not accepted (say what you mean).
    empty_ok : bool, default True
        With False, an explicit empty window (``start == stop``) is refused, as
        the command line refuses it; the default window of an empty series
        still resolves to ``(0, 0)``.
    need_frames : bool, default False
        Refuse a series that holds no frames (a picture or a file of no frame
        cannot be made).

    Returns
    -------
    (int, int)
        The window.
    """
    if need_frames and n_frames == 0:
        raise UserError("the series holds no frames yet")
    s = 0 if start is None else start
    e = n_frames if stop is None else stop
    try:
        s, e = int(s), int(e)
    except (TypeError, ValueError):
        raise UserError(f"frame window must be integers, got {start!r}:{stop!r}") from None
    if not (0 <= s <= e <= n_frames):
        raise UserError(
            f"frame window {s}:{e} is outside the series: valid windows lie in 0:{n_frames} "
            f"({n_frames} frames)"
        )
    if s == e and not empty_ok and (start is not None or stop is not None):
        raise UserError(
            f"frame window {s}:{e} is empty: every frame lies outside it (need start < stop)"
        )
    return s, e


def check_roi(roi: Any, frame_shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Validate ``roi = (row0, row1, col0, col1)`` against ``frame_shape``.

    Parameters
    ----------
    roi : sequence of 4 int, str or None
        The crop, or the command line's form ``"r0,r1,c0,c1"``; None: no crop.
    frame_shape : (int, int)
        Height and width of a frame.

    Returns
    -------
    tuple of 4 int or None
        The crop (None for None).

    Raises
    ------
    UserError
        Naming the problem.
    """
    if roi is None:
        return None
    if isinstance(roi, str):
        try:
            roi = tuple(int(p.strip()) for p in roi.split(","))
        except ValueError:
            raise UserError(
                f"--roi must be four integers row0,row1,col0,col1, got {roi!r}"
            ) from None
    try:
        vals = tuple(int(v) for v in roi)
    except (TypeError, ValueError):
        raise UserError(f"roi must be (row0, row1, col0, col1), got {roi!r}") from None
    if len(vals) != 4:
        raise UserError(f"roi must be (row0, row1, col0, col1), got {roi!r}")
    r0, r1, c0, c1 = vals
    h, w = frame_shape
    if not (0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w):
        raise UserError(
            f"roi rows {r0}:{r1}, cols {c0}:{c1} is not inside the {h} x {w} frame "
            f"(need 0 <= row0 < row1 <= {h} and 0 <= col0 < col1 <= {w})"
        )
    return r0, r1, c0, c1


def check_range(name: str, rng: Any) -> tuple[float, float]:
    """Validate a closed range ``(lo, hi)`` of numbers named ``name``, or raise UserError."""
    try:
        lo, hi = (float(v) for v in rng)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a pair (lo, hi) of numbers, got {rng!r}") from None
    if np.isnan(lo) or np.isnan(hi):
        raise UserError(f"{name} must not contain NaN, got {rng!r}")
    if lo > hi:
        raise UserError(f"{name} range is empty: lo {lo:g} > hi {hi:g}")
    return lo, hi


def unit_scale(unit: str, frame_shape: tuple[int, int], pixel_size_A: float | None) -> float:
    """Factor from counts to the dose ``unit``, or raise UserError.

    Raises
    ------
    UserError
        On a unit not in :data:`UNITS`, or "e/A2" without a pixel size.
    """
    h, w = frame_shape
    if unit == "events":
        return 1.0
    if unit == "e/px":
        return 1.0 / (h * w)
    if unit == "e/A2":
        if not pixel_size_A:
            raise UserError(
                "dose in e/A2 needs the pixel size, and this series has none recorded; "
                'use unit "e/px" (--unit e/px) or "events"'
            )
        return 1.0 / (h * w * pixel_size_A**2)
    raise UserError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")


class FrameSelection:
    """Dose, selections and windows of a store's frames (a mixin of the readers).

    Uses the reader's ``frame_shape``, ``pixel_size_A``, ``n_frames``,
    ``format_version``, ``_counts`` (events per frame), ``_electrons`` (the
    corrected dose per frame, None when the file records no correction),
    ``_dose_model`` and ``_ts`` (timestamps).

    The dose is the corrected one (electrons that arrived, coincidence loss
    corrected, :mod:`streamstore.counting.dose`) wherever the file records it,
    else the counted events; :attr:`dose_label` says which.
    """

    frame_shape: tuple[int, int]
    pixel_size_A: float | None
    format_version: int
    _counts: np.ndarray
    _electrons: np.ndarray | None
    _dose_model: dict[str, Any] | None
    _ts: np.ndarray

    @property
    def dose_corrected(self) -> bool:
        """True when the file records a coincidence-corrected dose (format 3 and a model)."""
        return self._electrons is not None

    @property
    def dose_model(self) -> dict[str, Any] | None:
        """The model of the corrected dose: ``name`` plus its parameters; None when
        the file records no correction (formats 1-2, or a series counted without one)."""
        return None if self._dose_model is None else dict(self._dose_model)

    @property
    def dose_label(self) -> str:
        """One line saying what :meth:`dose` returns by default."""
        if self._electrons is not None:
            return f"dose: electrons, coincidence-corrected (model {self._dose_model['name']})"
        return (
            "dose: counted events, no coincidence correction recorded "
            f"(format {self.format_version})"
        )

    def _per_frame(self, corrected: bool) -> np.ndarray:
        """Electrons per frame (float64) where corrected and recorded, else event counts."""
        if corrected and self._electrons is not None:
            return self._electrons
        return self._counts

    @property
    def n_frames(self) -> int:  # pragma: no cover - the reader defines it
        raise NotImplementedError

    def _unit_scale(self, unit: str) -> float:
        """Factor from counts to ``unit``."""
        return unit_scale(unit, self.frame_shape, self.pixel_size_A)

    def dose(self, unit: str = "e/px", *, corrected: bool = True) -> np.ndarray:
        """Per-frame dose in ``unit``.

        Parameters
        ----------
        unit : {"events", "e/px", "e/A2"}, default "e/px"
            "events" is electrons per frame (the corrected dose, float64) or
            events per frame (the counts, int64).
        corrected : bool, default True
            The coincidence-corrected dose (``frames/electrons``) where the file
            records one; a file without (formats 1-2) gives the counted events,
            as ``corrected=False`` does (:attr:`dose_corrected` says which).

        Returns
        -------
        ndarray
            int64 for counted events in "events", else float64.
        """
        scale = self._unit_scale(unit)
        d = self._per_frame(corrected)
        if unit == "events":
            return d.copy()
        return d * scale

    def select(
        self,
        *,
        dose: tuple[float, float] | None = None,
        cumulative_dose: tuple[float, float] | None = None,
        time_s: tuple[float, float] | None = None,
        unit: str = "e/px",
        corrected: bool = True,
    ) -> np.ndarray:
        """Indices (ascending, int64) of the frames meeting every given criterion.

        Parameters
        ----------
        dose : (lo, hi), optional
            Keep frames whose own dose is in the closed range ``[lo, hi]``.
        cumulative_dose : (lo, hi), optional
            Keep frames whose running dose -- the dose from the series start up
            to and including the frame -- is in ``[lo, hi]``.
        time_s : (t0, t1), optional
            Keep frames whose time since the first stored frame
            (``(timestamp_ns - timestamp_ns[0]) / 1e9``) is in ``[t0, t1]``.
        unit : str, default "e/px"
            Unit of ``dose`` and ``cumulative_dose``.
        corrected : bool, default True
            Doses are the corrected dose where the file records it (see :meth:`dose`).

        Raises
        ------
        UserError
            On a malformed or empty range, or an unknown / unusable unit.
        """
        keep = np.ones(self.n_frames, dtype=bool)
        if dose is not None or cumulative_dose is not None:
            per = self._per_frame(corrected)
            d = per * self._unit_scale(unit)
            if dose is not None:
                lo, hi = check_range("dose", dose)
                keep &= (d >= lo) & (d <= hi)
            if cumulative_dose is not None:
                lo, hi = check_range("cumulative_dose", cumulative_dose)
                cum = np.cumsum(per) * self._unit_scale(unit)
                keep &= (cum >= lo) & (cum <= hi)
        else:
            self._unit_scale(unit)  # validate the unit anyway
        if time_s is not None:
            t0, t1 = check_range("time_s", time_s)
            t = (self._ts - (self._ts[0] if self.n_frames else 0)) / 1e9
            keep &= (t >= t0) & (t <= t1)
        return np.flatnonzero(keep).astype(np.int64)

    def fractions(
        self, dose_per_fraction: float, *, unit: str = "e/px", corrected: bool = True
    ) -> list[slice]:
        """Group consecutive frames into dose fractions.

        Frame ``i`` goes to fraction ``k = floor(D_i / dose_per_fraction)``,
        where ``D_i`` is the dose before frame ``i`` (so fraction ``k`` holds
        the frames that start in ``[k, k + 1) * dose_per_fraction``; rounding
        never drifts along the series). Empty fractions (one frame more dosed
        than a fraction) are skipped. The remainder -- a last fraction with
        less than ``dose_per_fraction`` -- is returned as the last slice, never
        dropped; compare its dose with the others to decide. The dose is the
        corrected one where the file records it (``corrected``, see :meth:`dose`).

        Returns
        -------
        list of slice
            Contiguous frame-index slices covering all frames in order.

        Raises
        ------
        UserError
            If ``dose_per_fraction`` is not a positive number, or on a bad unit.
        """
        try:
            target = float(dose_per_fraction)
        except (TypeError, ValueError):
            raise UserError(
                f"dose_per_fraction must be a positive number, got {dose_per_fraction!r}"
            ) from None
        if not np.isfinite(target) or target <= 0:
            raise UserError(f"dose_per_fraction must be a positive number, got {target!r}")
        scale = self._unit_scale(unit)
        if self.n_frames == 0:
            return []
        per = self._per_frame(corrected)
        before = (np.cumsum(per) - per) * scale
        k = np.floor(before / target + 1e-12).astype(np.int64)
        cut = np.flatnonzero(np.diff(k)) + 1
        bounds = np.concatenate([[0], cut, [self.n_frames]])
        return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def _selection(
        self,
        start: int | None,
        stop: int | None,
        select: Sequence[int] | np.ndarray | None,
    ) -> np.ndarray:
        """Frame indices (int64, ascending, unique) of a window or an explicit selection."""
        if select is None:
            s, e = self._window(start, stop, empty_ok=False)
            return np.arange(s, e, dtype=np.int64)
        if start is not None or stop is not None:
            raise UserError("give either a window (start, stop) or select, not both")
        sel = np.unique(np.asarray(select).astype(np.int64, copy=False))
        if sel.size and (sel[0] < 0 or sel[-1] >= self.n_frames):
            raise UserError(
                f"select holds frame indices outside 0..{self.n_frames - 1} "
                f"({self.n_frames} frames)"
            )
        return sel

    def _window(
        self, start: int | None, stop: int | None, *, empty_ok: bool = True
    ) -> tuple[int, int]:
        """Resolve ``[start, stop)`` (:func:`check_window`)."""
        return check_window(self.n_frames, start, stop, empty_ok=empty_ok)

    def _roi(self, roi: Sequence[int] | None) -> tuple[int, int, int, int]:
        """The crop ``roi`` (:func:`check_roi`), the whole frame for None."""
        h, w = self.frame_shape
        checked = check_roi(roi, self.frame_shape)
        return (0, h, 0, w) if checked is None else checked
