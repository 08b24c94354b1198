"""The count stage's calibration from the data frames, for a camera with no dark
series and no calibration file: the first frames' estimate, then the refinement.

A part of :class:`streamstore.ingest.count_stage.CountStage`, kept apart because
it is one job of its own: hold the counted frames, add them to the per-pixel
estimate in batches (smaller where the memory budget holds fewer frames), swap
in the refined calibration at the estimator's
refinement points, and say while it is provisional.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from streamstore.ingest.items import FrameItem, SeriesInfo

if TYPE_CHECKING:
    from streamstore.counting.dark_estimate import DarkEstimator

__all__ = ["DataOnlyCalibration"]

log = logging.getLogger("streamstore.ingest")


class DataOnlyCalibration:
    """The count stage's methods that estimate and refine a calibration from the
    data (its state: ``_pending``, ``_refining``, ``_held``, ``_estimate_failed``,
    ``refine_frames``, ``xray_threshold``, ``budget``, ``counters``; and its
    ``_gain_for`` / ``_gain_note``: the gain reference a new calibration takes)."""

    def _estimate(self, series: SeriesInfo) -> None:
        from streamstore.counting.calibration import Calibration

        frames = [it.array for it in self._pending if isinstance(it, FrameItem)]
        if frames and series.calibration is not None:  # a dark calibration without X-ray level
            self._derive_xray(series, frames)
            return
        if frames:
            estimators: list[DarkEstimator] = []
            gain = self._gain_for(series)
            try:
                series.calibration = Calibration.estimate(
                    np.stack(frames),
                    xray_threshold=self.xray_threshold,
                    estimator_out=estimators,
                    gain=gain,
                )
            except ValueError as exc:
                if series.series_id != self._estimate_failed:  # once per series
                    self._estimate_failed = series.series_id
                    log.error(
                        "series %s: cannot estimate a calibration from its first %d frames "
                        "(%s); its frames are recorded missing until an estimate succeeds",
                        series.series_id,
                        len(frames),
                        exc,
                    )
                return
            series.calibration_source = (
                f"estimate:first {len(frames)} frames of {series.series_id}{self._gain_note(gain)}"
            )
            est = estimators[0] if estimators else None
            if est is not None and est.n_frames < self.refine_frames:
                self._refining = (series, est)
                self._set_warning(
                    series,
                    f"provisional calibration: dark and noise estimated from the data "
                    f"(first {est.n_frames} frames of {series.series_id}, no dark series or "
                    f"calibration file), refined until frame {self.refine_frames}",
                )
            log.warning(
                "series %s: no dark frames or calibration file; estimated the calibration "
                "from its first %d frames (%s)",
                series.series_id,
                len(frames),
                "per-pixel dark map" if est is not None else "one dark level",
            )

    def _set_warning(self, series: SeriesInfo, text: str) -> None:
        series.calibration_warning = text
        self.counters.calibration_warning = text if self._refining is not None else ""

    def _fill_budget(self, items: list) -> bool:
        """Whether the frames among ``items`` (held for the estimate or its next
        batch) fill the memory budget: the receiver admits no frame until some are
        given back, so waiting for a full count of them would stall the series for
        good; the estimate then goes on with the frames it has."""
        held = sum(it.nbytes for it in items if isinstance(it, FrameItem))
        return held >= self.budget.capacity

    def _hold(self, item: FrameItem) -> None:
        """Keep a counted frame for the provisional estimate; add the held frames to
        it together once there are ``BATCH`` of them or they reach a refinement point.

        The estimator's pass reads and writes its per-pixel sums once per batch, not
        once per frame: the pause before each frame is counted at the start of a
        series shrinks to a few bytes per pixel. The frames are counted first with
        the calibration in use, so a frame at a refinement point is counted with
        the calibration before it.
        """
        from streamstore.counting.dark_estimate import BATCH, REFINE_AT

        self._held.append(item)
        series, est = self._refining
        n = est.n_frames + len(self._held)
        full = len(self._held) >= BATCH or self._fill_budget(self._held)
        if not (full or n in REFINE_AT or n >= self.refine_frames):
            return
        try:
            self._refine()
        except Exception:  # the frames are counted: a failed refinement loses none of them
            log.exception("series %s: calibration refinement stopped", series.series_id)
            self._release(self._held)
            self._refining = None
            self.counters.calibration_warning = ""

    def _release(self, items: list[FrameItem]) -> None:
        """Give the memory of counted frames back."""
        for it in items:
            if it.array is not None:
                self.budget.release(it.nbytes)
                it.array = None  # type: ignore[assignment]  # drop the zmq buffer now
        items.clear()

    def _refine(self) -> None:
        """Add the held frames to the provisional estimate; rebuild the calibration at
        the estimator's refinement points, and finish at ``refine_frames``."""
        from streamstore.counting.calibration import Calibration
        from streamstore.counting.dark_estimate import REFINE_AT

        series, est = self._refining
        try:
            est.update_batch([it.array for it in self._held])
        except ValueError as exc:  # e.g. a frame of another shape: keep what we have
            log.warning("series %s: calibration refinement stopped: %s", series.series_id, exc)
            self._release(self._held)
            self._refining = None
            self.counters.calibration_warning = ""
            return
        self._release(self._held)
        done = est.n_frames >= self.refine_frames
        if not (done or est.n_frames in REFINE_AT):
            return
        old = series.calibration
        if series.path is None and series.opening_calibration is None:  # file not open yet
            series.opening_calibration = (old, series.calibration_source)
        series.calibration = Calibration.from_estimator(
            est,
            n_sigma=old.n_sigma,
            xray_threshold=old.xray_threshold,
            xray_radius=old.xray_radius,
            gain=old.gain,
        )
        series.calibration_source = (
            f"estimate:first {est.n_frames} frames of {series.series_id} (per-pixel dark)"
            f"{self._gain_note(old.gain)}"
        )
        if done:
            self._refining = None
            self._set_warning(
                series,
                f"calibration estimated from the data (no dark series or calibration file); "
                f"frames before {est.n_frames} of the series were counted while it was "
                "provisional",
            )
            log.info(
                "series %s: calibration refined on its first %d frames (noise %.2f ADU)",
                series.series_id,
                est.n_frames,
                est.noise_sigma,
            )
