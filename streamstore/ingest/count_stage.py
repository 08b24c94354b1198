"""The count stage: raw frames -> events; dark series -> the calibration."""

from __future__ import annotations

import datetime as _dt
import logging
import queue
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

from streamstore.abc import FrameCounter
from streamstore.ingest.estimating import DataOnlyCalibration
from streamstore.ingest.items import (
    STOP,
    ByteBudget,
    CloseItem,
    CountInput,
    EventsItem,
    FrameItem,
    MissingItem,
    OpenItem,
    SeriesInfo,
    _batch_nbytes,
    _Stage,
)

if TYPE_CHECKING:
    from streamstore.counting.calibration import Calibration
    from streamstore.counting.dark_estimate import DarkEstimator
    from streamstore.counting.dark_sums import DarkSums
    from streamstore.counting.dose import DoseCorrector
    from streamstore.ingest.status import Counters

__all__ = ["CountStage"]

log = logging.getLogger("streamstore.ingest")


#: A series' first frame whose median sits this many noise sigmas below the dark
#: level of the calibration in use is reported (frames the camera dark-subtracted).
LEVEL_SIGMAS = 20.0


class CountStage(DataOnlyCalibration, _Stage[CountInput]):
    """Counts frames into events; turns dark series into the calibration.

    Calibration of a data series, chosen when the series opens: the
    ``--calibration`` file if one was given, else the latest dark series'
    calibration, else :meth:`Calibration.estimate` on the first
    ``estimate_frames`` frames. With ``calibration_from_dark_series`` a dark
    series replaces the file's calibration for the series after it. Every
    change of the calibration in use is logged at WARNING and recorded in
    :attr:`changes`, which each data series carries into its file.

    Several series may be open at once: the state of a series (frames waiting
    for its estimate, dark frames) is swapped in when one of its items
    arrives (:data:`PER_SERIES`).

    Parameters
    ----------
    inbox, outbox : queue.SimpleQueue
    budget : ByteBudget
    counters : status.Counters
    calibration : Calibration, optional
        From ``--calibration FILE``.
    subpixel : bool
    threads : int, optional
        Threads of the counting kernel (None: numba's default, all cores).
    estimate_frames : int
        Frames used by ``Calibration.estimate`` when nothing else is known (fewer
        where they would fill the memory budget).
    refine_frames : int
        Raw frames (a fixed dark pattern) get a per-pixel estimate that keeps
        refining on every frame counted until this many frames; meanwhile the
        calibration is provisional, rebuilt at 16, 32, 64, ... frames, and the
        status line and the file say so as a WARNING.
    max_dark_frames : int or None
        Dark frames used for the calibration (later ones are counted as
        received but not used); None: all. Each dark frame is folded into
        running sums (:class:`~streamstore.counting.dark_sums.DarkSums`, 16 bytes per
        pixel per open dark series) and released at once, so the number of
        dark frames does not change the memory used.
    calibration_from_dark_series : bool, default False
        Let a dark series replace the ``--calibration`` file's calibration.
    abort : threading.Event, optional
        Once set (a second stop signal), frames not yet counted are recorded
        missing instead of counted, so shutdown does not wait for the kernel.
    xray_threshold : float, "auto" or None
        X-ray threshold (dark-subtracted signal, ADU) of the calibrations made
        here: from a dark series and by ``Calibration.estimate``. "auto": the
        estimate's own rule, and for a dark-series calibration
        ``DEFAULT_XRAY_FACTOR`` times the median electron peak of the first
        ``estimate_frames`` frames of the next data series (dark frames hold
        no electrons). None: saturated pixels only. A ``--calibration`` file
        keeps its own threshold.
    gain_reference : ndarray (H, W), optional
        The gain map (``--gain-reference``) of the calibrations made here, for
        series of its shape; ``gain_label`` names it in their source.
    """

    def __init__(
        self,
        inbox: queue.SimpleQueue,
        outbox: queue.SimpleQueue,
        budget: ByteBudget,
        counters: Counters,
        *,
        calibration: Calibration | None = None,
        calibration_label: str = "",
        subpixel: bool = False,
        threads: int | None = None,
        estimate_frames: int = 8,
        refine_frames: int = 64,
        max_dark_frames: int | None = None,
        xray_threshold: float | str | None = "auto",
        calibration_from_dark_series: bool = False,
        abort: threading.Event | None = None,
        gain_reference: np.ndarray | None = None,
        gain_label: str = "",
    ) -> None:
        super().__init__("count", inbox)
        self.calibration_from_dark_series = bool(calibration_from_dark_series)
        self.abort = abort if abort is not None else threading.Event()
        self._aborted_frames = 0
        #: every change of the calibration in use, oldest first (the last 64)
        self.changes: deque[dict[str, Any]] = deque(maxlen=64)
        self._states: dict[int, tuple] = {}  # id(series) -> saved PER_SERIES values
        self._current: SeriesInfo | None = None
        self.outbox = outbox
        self.budget = budget
        self.counters = counters
        self.file_calibration = calibration
        self.gain_reference = gain_reference
        self.gain_label = gain_label
        self._gain_said: set[str] = set()
        self.file_label = calibration_label
        self.dark_calibration: Calibration | None = None
        self.dark_label = ""
        self.subpixel = subpixel
        self.threads = threads
        self.estimate_frames = max(1, int(estimate_frames))
        self.refine_frames = int(refine_frames)
        # (series, its estimator) while a calibration is provisional
        self._refining: tuple[SeriesInfo, DarkEstimator] | None = None
        # frames of that series counted but not yet added to its estimator
        self._held: list[FrameItem] = []
        self.max_dark_frames = None if max_dark_frames is None else int(max_dark_frames)
        self.xray_threshold = xray_threshold
        self._xray_for: SeriesInfo | None = None  # series whose first frames set the X-ray level
        self._counter: FrameCounter | None = None
        self._counter_key: Any = None
        # items of a data series waiting for its estimate
        self._pending: list[FrameItem | MissingItem] = []
        # the series' dose correction: pools the series' frames in frame order, so the
        # electrons of a frame do not depend on batching or on the counting threads
        self._dose: DoseCorrector | None = None
        self._dark: dict[str, DarkSums] = {}  # series id -> sums of its frames so far
        self._dark_capped: set[str] = set()
        self._estimate_failed = ""

    #: attributes that belong to one series; swapped in by :meth:`_switch`
    #: (dark-frame sums are kept by series id already)
    PER_SERIES = ("_pending", "_xray_for", "_refining", "_dose", "_held", "_levels_checked")

    def _fresh_state(self) -> tuple:
        return ([], None, None, None, [], False)

    def _switch(self, series: SeriesInfo) -> None:
        """Make ``series``' state current (several series may be open at once)."""
        cur = self._current
        if cur is series:
            return
        if cur is not None:
            self._states[id(cur)] = tuple(getattr(self, n) for n in self.PER_SERIES)
        saved = self._states.pop(id(series), None)
        for name, value in zip(self.PER_SERIES, saved or self._fresh_state(), strict=True):
            setattr(self, name, value)
        self._current = series

    def _forget(self, series: SeriesInfo) -> None:
        """Drop a closed series' state (its calibration goes with the series)."""
        saved = self._states.pop(id(series), None)
        if saved is not None:
            self._release(saved[self.PER_SERIES.index("_held")])
        if self._current is series:
            self._release(self._held)
            for name, value in zip(self.PER_SERIES, self._fresh_state(), strict=True):
                setattr(self, name, value)
            self._current = None

    def _release_calibration(self, series: SeriesInfo) -> None:
        """Every frame of the series is counted: keep only the summary of its own calibration.

        An estimated calibration belongs to its series alone (about 300 MB at 4092 x
        5760); while the series waits for the disk only its summary is needed.
        """
        cal = series.calibration
        if series.kind != "data" or cal is None:
            return
        if cal is self.dark_calibration or cal is self.file_calibration:
            return  # shared with later series
        series.calibration_summary = dict(cal.summary())
        series.calibration = None

    def _record_change(self, old: str, new: str, by: str) -> None:
        """Log a change of the calibration in use at WARNING and keep it for the files."""
        change = {
            "utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "from": old or "none",
            "to": new,
            "by": by,
        }
        self.changes.append(change)
        log.warning("calibration changes from %s to %s (by %s)", change["from"], new, by)

    # -- calibration ---------------------------------------------------------
    def stop(self) -> None:
        self.outbox.put(STOP)  # the write stage drains what is queued before it

    def _pick_calibration(self, series: SeriesInfo) -> None:
        series.calibration_changes = list(self.changes)
        use_dark = self.file_calibration is None or self.calibration_from_dark_series
        if self.dark_calibration is not None and use_dark:
            series.calibration = self.dark_calibration
            series.calibration_source = self.dark_label
        elif self.file_calibration is not None:
            series.calibration = self.file_calibration
            series.calibration_source = self.file_label
        if series.calibration is not None and series.calibration.frame_shape != series.frame_shape:
            log.warning(
                "series %s: calibration (%s) is for frames %s but the series has %s; "
                "estimating from the series' first frames instead",
                series.series_id,
                series.calibration_source,
                series.calibration.frame_shape,
                series.frame_shape,
            )
            series.calibration = None
            series.calibration_source = "none"
        cal = series.calibration
        if (
            cal is not None
            and cal is self.dark_calibration
            and cal.xray_threshold is None
            and self.xray_threshold == "auto"
        ):
            self._xray_for = series  # hold its first frames to place the X-ray threshold

    def _check_levels(self, series: SeriesInfo, item: FrameItem) -> None:
        """Warn (log and file) when a series' first frame sits far below the dark
        level of a calibration it did not make: frames the camera dark-subtracted,
        counted with a raw dark series' or a file's calibration, give almost no
        events, and nothing else would say why."""
        cal = series.calibration
        if item.array is None or cal is None or cal.source == "estimate":
            return
        summary = cal.summary()  # its medians are computed once per calibration
        dark, noise = summary["median_dark_adu"], summary["median_noise_adu"]
        if dark is None or not noise:
            return
        raw = np.asarray(item.array).reshape(-1)
        raw = raw.view(cal.frame_dtype(raw.dtype))  # signed where the frames wrapped
        level = float(np.median(raw[:: max(1, raw.size // 4096)]))
        if level >= dark - LEVEL_SIGMAS * noise:
            return
        text = (
            f"its frames sit at {level:.0f} ADU, {(dark - level) / noise:.0f} noise sigmas "
            f"below the dark level of the calibration in use ({dark:.0f} ADU, "
            f"{series.calibration_source}): frames the camera dark-subtracted? They are "
            "counted with it and give few events; send such series with no calibration "
            "file and no dark series before them, or with a calibration made for them"
        )
        series.calibration_warning = text
        log.warning("series %s: %s", series.series_id, text)

    def _derive_xray(self, series: SeriesInfo, frames: list[np.ndarray]) -> None:
        """Dark-series calibration + "auto": the X-ray threshold from the first data frames."""
        from streamstore.counting.calibration import DEFAULT_XRAY_FACTOR

        self._xray_for = None
        cal = series.calibration
        try:
            peak = cal.electron_peak_signal(np.stack(frames))
        except ValueError as exc:
            log.warning("series %s: cannot place the X-ray threshold: %s", series.series_id, exc)
            return
        if peak is None:
            log.warning(
                "series %s: fewer than 20 electron peaks in its first %d frames; X-ray hits "
                "are excluded only when saturated (set one with --xray-threshold ADU)",
                series.series_id,
                len(frames),
            )
            return
        xt = DEFAULT_XRAY_FACTOR * peak
        new = cal.with_xray_threshold(xt)
        if self.dark_calibration is cal:  # the following series reuse it
            old = self.dark_label
            self.dark_calibration = new
            self.dark_label += f", X-ray threshold {xt:.0f} ADU from {series.series_id}"
            series.calibration_source = self.dark_label
            self._record_change(old, self.dark_label, series.series_id)
            series.calibration_changes = list(self.changes)
        series.calibration = new
        log.info(
            "series %s: X-ray threshold %.0f ADU (%g x the median electron peak %.1f ADU of "
            "its first %d frames)",
            series.series_id,
            xt,
            DEFAULT_XRAY_FACTOR,
            peak,
            len(frames),
        )

    def _counter_for(self, series: SeriesInfo) -> FrameCounter:
        key = (id(series.calibration), series.start.np_dtype.str)
        if self._counter is None or self._counter_key != key:
            from streamstore.counting import Counter

            self._counter = Counter(
                series.calibration,
                series.start.np_dtype,
                subpixel=self.subpixel,
                threads=self.threads,
                dose=False,  # the series' own DoseCorrector fills electrons (_count)
            )
            self._counter_key = key
        return self._counter

    # -- items ------------------------------------------------------------------
    def handle(self, item: CountInput) -> None:
        self._switch(item.series)
        if isinstance(item, FrameItem) and self.abort.is_set():
            self._abandon(item)
        elif isinstance(item, OpenItem):
            if item.series.kind == "data":
                self._pick_calibration(item.series)
            self.outbox.put(item)
        elif isinstance(item, FrameItem):
            series = item.series
            if series.kind == "dark":
                self._add_dark(item)
            elif series.calibration is None or self._xray_for is series:
                self._pending.append(item)
                if len(self._pending) >= self.estimate_frames or self._fill_budget(self._pending):
                    self._estimate(series)
                    self._drain_pending()
            else:
                if not self._levels_checked:
                    self._levels_checked = True
                    self._check_levels(series, item)
                refining = self._refining is not None and self._refining[0] is series
                self._count([item], keep=refining)
                if refining and item.array is not None:  # counted: the estimator's turn
                    self._hold(item)
        elif isinstance(item, MissingItem):
            if self._pending:
                self._pending.append(item)
            else:
                self.outbox.put(item)
        elif isinstance(item, CloseItem):
            series = item.series
            if self._refining is not None and self._refining[0] is series:
                n = self._refining[1].n_frames + len(self._held)
                self._release(self._held)
                self._refining = None
                self._set_warning(
                    series,
                    f"provisional calibration: dark and noise estimated from the data (no "
                    f"dark series or calibration file); the series ended after {n} of the "
                    f"{self.refine_frames} frames that refine it",
                )
            if series.kind == "dark":
                self._finish_dark(series)
            elif self._pending:
                self._estimate(series)
                self._drain_pending()
            self._release_calibration(series)
            self._forget(series)
            self.outbox.put(item)
        else:  # pragma: no cover - programming error
            raise TypeError(f"count stage got an unexpected item {item!r}")

    def item_failed(self, item: CountInput, exc: Exception) -> None:
        super().item_failed(item, exc)
        if isinstance(item, FrameItem):
            self._lose([item])
        elif isinstance(item, CloseItem | OpenItem | MissingItem):
            self.outbox.put(item)  # keep the series' bookkeeping going

    def _abandon(self, item: FrameItem) -> None:
        """Shutdown cut short: a frame not counted yet is recorded missing, quickly."""
        if self._aborted_frames == 0:
            log.warning("stop cut short: frames not counted yet are recorded missing")
        self._aborted_frames += 1
        if item.series.kind == "dark":
            self.budget.release(item.nbytes)
            item.array = None  # type: ignore[assignment]
            return
        pending = [it for it in self._pending if isinstance(it, FrameItem)]
        if pending:  # frames waiting for an estimate go the same way
            self._pending = [it for it in self._pending if not isinstance(it, FrameItem)]
            self._lose_quietly(pending)
        self._lose_quietly([item])

    def _lose_quietly(self, items: list[FrameItem]) -> None:
        for it in items:
            if it.array is not None:
                self.budget.release(it.nbytes)
                it.array = None  # type: ignore[assignment]
        self.outbox.put(MissingItem.of_ids(items[0].series, [it.frame_id for it in items]))

    def _lose(self, items: list[FrameItem]) -> None:
        """Frames that cannot be counted: give their memory back, record them missing."""
        for it in items:
            if it.array is not None:
                self.budget.release(it.nbytes)
                it.array = None  # type: ignore[assignment]
        if items:
            if items[0].series.series_id != self._estimate_failed:
                log.error(
                    "series %s: %d frame(s) could not be counted and are recorded as missing",
                    items[0].series.series_id,
                    len(items),
                )
            self.outbox.put(MissingItem.of_ids(items[0].series, [it.frame_id for it in items]))

    def _drain_pending(self) -> None:
        pending, self._pending = self._pending, []
        frames = [it for it in pending if isinstance(it, FrameItem)]
        if frames and frames[0].series.calibration is None:
            self._lose(frames)
        elif frames:
            self._count(frames)
        for it in pending:
            if isinstance(it, MissingItem):
                self.outbox.put(it)

    def _count(self, items: list[FrameItem], keep: bool = False) -> None:
        """Count frames and send their events on; their memory is given back unless
        ``keep`` (frames the estimator still reads: :meth:`_hold`)."""
        from streamstore.events import EventBatch

        series = items[0].series
        batches = []
        try:
            counter = self._counter_for(series)
        except Exception:
            log.exception("series %s: cannot build a counter", series.series_id)
            self._lose(items)
            return
        if self._dose is None or self._dose.frame_shape != series.frame_shape:
            from streamstore.counting.dose import DoseCorrector

            self._dose = DoseCorrector(series.frame_shape)
        # the charge of dense tiles is read with the calibration the frames are counted with
        self._dose.use(series.calibration, series.start.np_dtype)
        for k, it in enumerate(items):
            try:
                frame = np.asarray(it.array).reshape((1, *series.frame_shape))
                batches.append(self._dose(counter(it.array), frame))
            except Exception:
                log.exception("series %s: counting failed", series.series_id)
                self._lose(items[k:])  # the ones before k are counted and go on
                items = items[:k]
                break
            if not keep:
                self.budget.release(it.nbytes)
                it.array = None  # type: ignore[assignment]  # drop the zmq buffer now
        if not items:
            return
        events = batches[0] if len(batches) == 1 else EventBatch.concatenate(batches)
        nbytes = _batch_nbytes(events)
        self.budget.add(nbytes)
        self.counters.frames_counted += len(items)
        self.counters.events += events.n_events
        self.outbox.put(
            EventsItem(
                series,
                events,
                [it.frame_id for it in items],
                [it.timestamp_ns for it in items],
                nbytes,
                dose_model=self._dose.model(),
            )
        )

    def _add_dark(self, item: FrameItem) -> None:
        """Fold a dark frame into its series' running sums and release the frame at once."""
        from streamstore.counting.dark_sums import DarkSums

        sid = item.series.series_id
        sums = self._dark.get(sid)
        if sums is None:
            sums = self._dark[sid] = DarkSums(f"dark series {sid}: frame")
        if self.max_dark_frames is None or sums.n < self.max_dark_frames:
            sums.add(item.array)
        elif sid not in self._dark_capped:
            self._dark_capped.add(sid)
            log.warning(
                "dark series %s: using %d frames for the calibration (the dark-frame limit); "
                "later ones are not used",
                sid,
                sums.n,
            )
        self.budget.release(item.nbytes)
        item.array = None  # type: ignore[assignment]  # drop the zmq buffer now
        self.counters.frames_counted += 1

    def _gain_for(self, series: SeriesInfo) -> np.ndarray | None:
        """The gain reference for a calibration of ``series``' frames: None without
        one, or (said once a series) where the frames have another shape."""
        gain = self.gain_reference
        if gain is None or gain.shape == tuple(series.frame_shape):
            return gain
        if series.series_id not in self._gain_said:
            self._gain_said.add(series.series_id)
            log.warning(
                "series %s: the gain reference is %d x %d, its frames %d x %d: "
                "calibrated without it",
                series.series_id,
                *gain.shape,
                *series.frame_shape,
            )
        return None

    def _gain_note(self, gain: np.ndarray | None) -> str:
        return f" with gain reference {self.gain_label}" if gain is not None else ""

    def _finish_dark(self, series: SeriesInfo) -> None:
        from streamstore.counting.calibration import Calibration

        sums = self._dark.pop(series.series_id, None)
        self._dark_capped.discard(series.series_id)
        n_frames = 0 if sums is None else sums.n
        if sums is None or n_frames < 2:
            log.warning(
                "dark series %s brought %d frame(s); a calibration needs at least 2: ignored",
                series.series_id,
                n_frames,
            )
            return
        try:
            xt = None if isinstance(self.xray_threshold, str) else self.xray_threshold
            gain = self._gain_for(series)
            cal = Calibration.from_dark_frames(sums, xray_threshold=xt, gain=gain)
        except ValueError as exc:
            log.error("dark series %s: cannot calibrate: %s", series.series_id, exc)
            return
        label = f"dark_frames:{series.series_id} ({n_frames} frames){self._gain_note(gain)}"
        series.calibration = cal
        series.calibration_source = label
        log.info(
            "dark series %s: calibration from %d frames (%d pixels masked)",
            series.series_id,
            n_frames,
            cal.n_masked,
        )
        self._adopt_dark(series, cal, label)

    def _adopt_dark(self, series: SeriesInfo, cal: Calibration, label: str) -> None:
        """Use a dark series' calibration for the following series, unless a file rules."""
        if self.file_calibration is not None and not self.calibration_from_dark_series:
            log.warning(
                "dark series %s: its calibration is saved but NOT used: the --calibration "
                "file (%s) stays in use (pass --calibration-from-dark-series to use dark series)",
                series.series_id,
                self.file_label,
            )
            return
        old = self.dark_label or (self.file_label if self.file_calibration is not None else "")
        self.dark_calibration = cal
        self.dark_label = label
        self._record_change(old, label, series.series_id)
