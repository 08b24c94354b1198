"""The write stage: events -> one StoreWriter (SWMR HDF5) per series."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamstore.ingest.items import (
    WRITE_DELAY_ENV,
    ByteBudget,
    CloseItem,
    EventsItem,
    MissingItem,
    OpenItem,
    SeriesInfo,
    WriteInput,
    _Stage,
    superblock_eof,
)
from streamstore.ingest.safety import candidate_paths, is_free

if TYPE_CHECKING:
    from streamstore.counting.calibration import Calibration
    from streamstore.ingest.status import Counters
    from streamstore.link.protocol import Start
    from streamstore.scan import ScanGeometry
    from streamstore.store.writer import StoreWriter

__all__ = ["WriteStage"]

log = logging.getLogger("streamstore.ingest")


class WriteStage(_Stage[WriteInput]):
    """Writes counted frames into one StoreWriter per series.

    Parameters
    ----------
    inbox : queue.SimpleQueue
    budget : ByteBudget
    counters : status.Counters
    out_dir : path
    subpixel : bool
    flush_interval_s : float
        At most this much time of frames is unflushed (SIGKILL loses no more).
    on_closed : callable, optional
        Called with each closed :class:`SeriesInfo` (status, exit-after-N).
    encode_threads : int, optional
        Threads blosc2 uses to compress (None: all cores).
    paths : callable, optional
        ``paths(out_dir, series_id)`` yields candidate file paths of a series;
        default :func:`~streamstore.ingest.safety.candidate_paths`.
    abort : threading.Event, optional
        Once set (a second stop signal), counted frames not yet written are
        recorded missing instead of written; every file is still closed with
        its accounting.

    A frame counts as stored (``series.stored``, ``counters.frames_stored``)
    once a flush has put it in the file, never before.
    """

    def __init__(
        self,
        inbox: queue.SimpleQueue,
        budget: ByteBudget,
        counters: Counters,
        out_dir: str | os.PathLike,
        *,
        subpixel: bool = False,
        flush_interval_s: float = 1.0,
        on_closed: Callable[[SeriesInfo], None] | None = None,
        paths: Callable[[str | os.PathLike, str], Iterable[Path]] | None = None,
        encode_threads: int | None = None,
        abort: threading.Event | None = None,
    ) -> None:
        super().__init__("write", inbox)
        self.abort = abort if abort is not None else threading.Event()
        self.encode_threads = encode_threads
        # candidate file paths of a series (scale-out workers: DIR/<id>/shard-K.h5)
        self.paths = paths if paths is not None else candidate_paths
        self.budget = budget
        self.counters = counters
        self.out_dir = Path(out_dir)
        self.subpixel = subpixel
        self.flush_interval_s = float(flush_interval_s)
        self.on_closed = on_closed
        self.delay_s = float(os.environ.get(WRITE_DELAY_ENV, "0") or 0)
        self._writers: dict[int, StoreWriter] = {}  # id(series) -> its writer
        self._open_series: dict[int, SeriesInfo] = {}
        self._failed: set[int] = set()
        self._summaries: dict[int, tuple[Any, dict]] = {}
        self._last_flush = time.monotonic()
        self._closed_bytes = 0

    # -- files ----------------------------------------------------------------------
    def _open(self, series: SeriesInfo) -> StoreWriter:
        key = id(series)
        if key in self._writers:
            return self._writers[key]
        from streamstore.store.writer import StoreWriter

        start = series.start
        # the calibration the first frames were counted with, whatever the count stage
        # has refined since
        calibration, source = series.opening_calibration or (
            series.calibration,
            series.calibration_source,
        )
        meta = {
            "series_id": series.series_id,
            "detector": getattr(start, "detector", None),
            "calibration_source": source,
            "sender_meta": getattr(start, "meta", None) or {},
            "ingest": {
                "n_frames_announced": getattr(start, "n_frames", None),
                # every change of the daemon's calibration before this series opened
                "calibration_changes": series.calibration_changes,
            },
        }
        for path in self.paths(self.out_dir, series.series_id):
            if not is_free(path):
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                writer = StoreWriter(
                    path,
                    series.frame_shape,
                    frame_time_s=start.frame_time_s,
                    pixel_size_A=getattr(start, "pixel_size_A", None),
                    calibration=self._calibration_summary(calibration)
                    if calibration is not None
                    else series.calibration_summary,
                    meta=meta,
                    raw_dtype=start.np_dtype,
                    subpixel=self.subpixel,
                    flush_interval_s=self.flush_interval_s,
                    nthreads=self.encode_threads,
                    scan=_scan_of(start),
                )
            except FileExistsError:
                continue  # somebody created it between the check and now
            except Exception as exc:  # OSError, or RuntimeError from h5py
                log.error(
                    "series %s: CANNOT CREATE %s (%s); nothing is left at that path and "
                    "the series' frames are counted as missing",
                    series.series_id,
                    path,
                    getattr(exc, "strerror", None) or exc,
                )
                raise
            break
        first = next(iter(self.paths(self.out_dir, series.series_id)))
        if path != first:
            log.warning(
                "series %s: %s exists already; writing to %s instead",
                series.series_id,
                first,
                path.relative_to(self.out_dir),
            )
        series.path = path
        series.opening_calibration = None  # recorded: its maps need not stay in memory
        if series.calibration_warning:
            writer.set_calibration_warning(series.calibration_warning)
        self._writers[key] = writer
        self._open_series[key] = series
        log.info("series %s -> %s", series.series_id, path)
        return writer

    def _sync_warning(self, series: SeriesInfo) -> None:
        """Carry the count stage's calibration warning into the open file."""
        writer = self._writers.get(id(series))
        if writer is None or writer.closed or id(series) in self._failed:
            return
        if writer.calibration_warning != series.calibration_warning:
            try:
                writer.set_calibration_warning(series.calibration_warning)
            except Exception as exc:  # OSError, or RuntimeError from h5py
                log.warning(
                    "series %s: cannot record the calibration warning: %s", series.series_id, exc
                )

    def _calibration_summary(self, cal: Calibration | None) -> dict[str, Any] | None:
        """``cal.summary()``, computed once per calibration (about 1 s at 24 MP)."""
        if cal is None or not hasattr(cal, "summary"):
            return cal
        hit = self._summaries.get(id(cal))
        if hit is None or hit[0] is not cal:
            hit = (cal, dict(cal.summary()))
            self._summaries = {id(cal): hit}  # keep the latest only
        return dict(hit[1])

    def _file_bytes(self, series: SeriesInfo) -> int:
        try:
            return os.stat(series.path).st_size if series.path else 0
        except OSError:
            return 0

    # -- items --------------------------------------------------------------------------
    def handle(self, item: WriteInput) -> None:
        if isinstance(item, OpenItem):
            return  # files open lazily, once the calibration is known
        series = item.series
        if series.kind == "dark":
            if isinstance(item, CloseItem):
                self._close_dark(item)
            return
        if isinstance(item, EventsItem):
            self._append(item)
            self._sync_warning(series)
        elif isinstance(item, MissingItem):
            self._mark_missing(series, item.ranges)
        elif isinstance(item, CloseItem):
            self._close(item)
        else:  # pragma: no cover - programming error
            raise TypeError(f"write stage got an unexpected item {item!r}")

    def _append(self, item: EventsItem) -> None:
        series = item.series
        try:
            if self.abort.is_set():
                self._mark_missing(series, [(i, i + 1) for i in item.frame_ids])
                return
            if id(series) in self._failed:
                raise OSError("an earlier write to this series failed")
            writer = self._open(series)
            if self.delay_s:
                time.sleep(self.delay_s * len(item.frame_ids))
            if item.dose_model is not None:
                writer.set_dose_model(item.dose_model)  # written with the frames' next flush
            writer.append(item.events, item.frame_ids, item.timestamps_ns)
        # ValueError first: it is an Exception too, and a refused append costs only its
        # own frames, where a failing file (OSError, h5py's RuntimeError) ends the series
        except ValueError as exc:
            self._refused(series, item.frame_ids, exc)
        except Exception as exc:  # OSError, or RuntimeError from h5py
            self._write_failed(series, item.frame_ids, exc)
        else:
            self._sync_stored(series, writer)
        finally:
            self.budget.release(item.nbytes)

    def _sync_stored(self, series: SeriesInfo, writer: StoreWriter) -> None:
        """Count the frames the writer's flushes have put in the file (and only those)."""
        n, e = writer.n_flushed, writer.n_events_flushed
        self.counters.frames_stored += n - series.stored
        self.counters.events_stored += e - series.events
        series.stored, series.events = n, e

    def _refused(self, series: SeriesInfo, frame_ids: list[int], exc: BaseException) -> None:
        """The writer refused an append: those frames are missing, the series goes on.

        Ids the file already holds (a late second copy) stay stored: only the
        others are marked missing (marking a stored id missing would fail the file).
        """
        writer = self._writers.get(id(series))
        ids = [int(i) for i in frame_ids]
        if writer is not None and ids:
            held = set(writer.frame_ids.tolist())
            ids = [i for i in ids if i not in held]
        log.error(
            "series %s: %d frame(s) not stored (%s..., refused by the writer): %s",
            series.series_id,
            len(ids),
            ids[:8],
            exc,
        )
        self._mark_missing(series, [(i, i + 1) for i in ids])

    def _write_failed(self, series: SeriesInfo, frame_ids: list[int], exc: BaseException) -> None:
        new = series.missing.add_ids(frame_ids)
        if id(series) not in self._failed:
            log.error(
                "series %s: WRITE FAILED (%s); the file keeps every frame flushed before this, "
                "and the frames that cannot be stored are counted as missing",
                series.series_id,
                exc,
            )
            # frames appended since the writer's last completed flush are not in the
            # file either (they were never counted as stored)
            writer = self._writers.get(id(series))
            if writer is not None:
                lost = series.missing.add_ids(writer.unflushed_frame_ids.tolist())
                if lost:
                    log.error(
                        "series %s: %d frame(s) appended since the last good flush are lost too",
                        series.series_id,
                        sum(b - a for a, b in lost),
                    )
                new += lost
        self._failed.add(id(series))
        self.counters.write_errors += 1
        self.counters.missing += sum(b - a for a, b in new)

    def _mark_missing(self, series: SeriesInfo, ranges: list[tuple[int, int]]) -> None:
        new = []
        for a, b in ranges:
            new.extend(series.missing.add(a, b))
        self.counters.missing += sum(b - a for a, b in new)
        if id(series) in self._failed or not new:
            return
        try:
            self._open(series).mark_missing_ranges(new)
        except Exception as exc:  # OSError, or RuntimeError from h5py
            self._write_failed(series, [], exc)

    def _close(self, item: CloseItem) -> None:
        series = item.series
        series.complete = item.complete and not series.inconsistent
        key = id(series)
        try:
            writer = self._open(series) if key not in self._failed else self._writers.get(key)
            if writer is not None:
                if key in self._failed:
                    try:
                        writer.mark_missing_ranges(list(series.missing))
                    except Exception:
                        pass
                self._sync_warning(series)
                extra = {"inconsistent": series.inconsistent} if series.inconsistent else {}
                writer.update_accounting(
                    received=item.received,
                    duplicate=item.duplicate,
                    rejected=item.rejected,
                    complete=series.complete and key not in self._failed,
                    reason=item.reason,
                    receive_seconds=round(item.receive_s, 6),
                    **extra,
                )
                writer.close()
                self._sync_stored(series, writer)
        except Exception as exc:  # OSError, or RuntimeError from h5py
            self._write_failed(series, [], exc)
        if key in self._failed and series.path is not None and series.path.exists():
            self._repair_eof(series)
        self._writers.pop(key, None)
        self._open_series.pop(key, None)
        self._closed_bytes += self._file_bytes(series)
        self.counters.bytes_written = self._closed_bytes
        failed = key in self._failed
        self._failed.discard(key)
        if failed:
            level, state = logging.ERROR, "FAILED"
        elif series.inconsistent:
            level, state = logging.WARNING, "INCONSISTENT"
        elif not series.complete:
            level, state = logging.WARNING, "INCOMPLETE"
        else:
            level, state = logging.INFO, "complete"
        log.log(
            level,
            "series %s %s (%s): received %d, stored %d, missing %d, duplicate %d, rejected %d, "
            "%d events -> %s%s",
            series.series_id,
            state,
            item.reason,
            item.received,
            series.stored,
            series.missing.n_ids,
            item.duplicate,
            item.rejected,
            series.events,
            series.path,
            f"; {series.inconsistent}" if series.inconsistent else "",
        )
        self._finish(series)

    def _repair_eof(self, series: SeriesInfo) -> None:
        """After a failed write, extend the file to its superblock's end if short."""
        path = series.path
        try:
            eof = superblock_eof(path)
            size = os.stat(path).st_size
            if eof is None or eof <= size or eof - size > 1 << 30:
                return
        except OSError as exc:
            log.error(
                "series %s: cannot check %s after the write failure: %s",
                series.series_id,
                path,
                exc,
            )
            return
        try:
            # zeros as a sparse hole: needs no free blocks on most file systems
            os.truncate(path, eof)
        except OSError as exc:
            log.error(
                "series %s: %s ends at byte %d but its HDF5 superblock says %d, so HDF5 will not "
                "open it (%s); once there is room run: truncate -s %d %s",
                series.series_id,
                path,
                size,
                eof,
                exc,
                eof,
                path,
            )
        else:
            log.warning(
                "series %s: extended %s from %d to %d bytes (the end its HDF5 superblock records) "
                "so it opens with every frame flushed before the write failure",
                series.series_id,
                path,
                size,
                eof,
            )

    def _close_dark(self, item: CloseItem) -> None:
        series = item.series
        cal = series.calibration
        if cal is not None:
            for path in candidate_paths(self.out_dir, series.series_id + ".calibration"):
                if is_free(path):
                    break
            try:
                cal.save(path)
                series.path = path
                log.info("dark series %s: calibration saved to %s", series.series_id, path)
            except OSError as exc:
                log.error("dark series %s: cannot save the calibration: %s", series.series_id, exc)
        series.complete = item.complete
        self._finish(series)

    def _finish(self, series: SeriesInfo) -> None:
        # a closed series keeps its summary only: its calibration (estimated ones are
        # hundreds of MB at full frames) is freed with it
        series.calibration = None
        series.calibration_summary = None
        series.closed_t = time.monotonic()
        self.counters.series_closed += 1
        if self.on_closed is not None:
            self.on_closed(series)

    def idle(self) -> None:
        now = time.monotonic()
        if now - self._last_flush < self.flush_interval_s / 2:
            return
        self._last_flush = now
        for key, writer in list(self._writers.items()):
            if key in self._failed or writer.closed:
                continue
            series = self._open_series.get(key)
            try:
                writer.flush()
            except Exception as exc:  # OSError, or RuntimeError from h5py
                log.error("flush failed: %s", exc)
                if series is not None:
                    self._write_failed(series, [], exc)
            else:
                if series is not None:
                    self._sync_stored(series, writer)
        self._update_bytes()

    def _update_bytes(self) -> None:
        # bytes of closed files plus the open ones, for bits/event in the status
        open_bytes = sum(self._file_bytes(s) for s in self._open_series.values())
        self.counters.bytes_written = self._closed_bytes + open_bytes

    def stop(self) -> None:
        for writer in self._writers.values():
            try:
                writer.close()
            except Exception as exc:  # pragma: no cover - best effort at exit
                log.error("closing a file at shutdown failed: %s", exc)
        self._writers.clear()


def _scan_of(start: Start) -> ScanGeometry | None:
    """The scan geometry announced in a start message, or None."""
    shape = getattr(start, "scan_shape", None)
    if shape is None:
        return None
    from streamstore.scan import ScanGeometry

    return ScanGeometry(
        tuple(shape),
        getattr(start, "frames_per_position", None) or 1,
        getattr(start, "scan_flyback", None) or 0,
    )
