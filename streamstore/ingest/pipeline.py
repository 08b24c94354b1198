"""The ingest pipeline after the socket: count stage, write stage, memory budget.

Data flow (one thread per stage, FIFO queues between them, so a series'
control messages stay in order with its frames)::

    receive (daemon.py) --FrameItem/MissingItem/OpenItem/CloseItem--> CountStage
        --EventsItem/...--> WriteStage --> StoreWriter (HDF5, blosc2 threads)

Memory is bounded by one :class:`ByteBudget` shared by the stages: the
receiver adds the size of every raw frame it holds (zero-copy zmq buffers,
also while they wait in the reorder window), the count stage gives a frame's
bytes back once it is counted and adds the (much smaller) bytes of its events,
and the write stage gives those back once written. The receiver stops reading
from the socket while the budget is full; ZeroMQ's high-water mark then
pushes back on the sender.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamstore.ingest.safety import candidate_paths, is_free

__all__ = [
    "ByteBudget",
    "SeriesInfo",
    "OpenItem",
    "FrameItem",
    "MissingItem",
    "CloseItem",
    "EventsItem",
    "STOP",
    "CountStage",
    "WriteStage",
    "WRITE_DELAY_ENV",
]

log = logging.getLogger("streamstore.ingest")

#: Test hook: seconds to sleep per frame before each append (slow-disk tests).
WRITE_DELAY_ENV = "STREAMSTORE_TEST_WRITE_DELAY_S"


class ByteBudget:
    """Bytes held by the pipeline, against a fixed capacity.

    Parameters
    ----------
    capacity : int
        Bytes the pipeline may hold before the receiver stops reading (> 0).
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"memory budget must be > 0 bytes, got {capacity}")
        self.capacity = int(capacity)
        self._used = 0
        self.peak = 0
        self._cond = threading.Condition()

    @property
    def used(self) -> int:
        """Bytes held now."""
        return self._used

    @property
    def fill(self) -> float:
        """Fraction of the capacity in use (may exceed 1 by about one message)."""
        return self._used / self.capacity

    def add(self, n: int) -> None:
        """Account for ``n`` more bytes held (never blocks: they are in memory already)."""
        with self._cond:
            self._used += int(n)
            self.peak = max(self.peak, self._used)

    def release(self, n: int) -> None:
        """Give ``n`` bytes back and wake a waiting receiver."""
        with self._cond:
            self._used -= int(n)
            self._cond.notify_all()

    def wait_room(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until usage is below capacity; True if it is."""
        with self._cond:
            return self._cond.wait_for(lambda: self._used < self.capacity, timeout)


@dataclass(eq=False)
class SeriesInfo:
    """One series as it travels through the stages.

    The receiver creates it from the ``start`` message; the count stage sets
    the calibration; the write stage sets the path.
    """

    series_id: str
    start: Any  # protocol.Start
    kind: str = "data"  # "data" or "dark"
    calibration: Any = None
    calibration_source: str = "none"
    path: Path | None = None
    # final numbers, filled by the write stage when it closes the series
    stored: int = 0
    events: int = 0
    missing_ids: list[int] = field(default_factory=list)
    complete: bool = False
    # time.monotonic() of the first image received and of the close (benchmarks)
    first_frame_t: float | None = None
    closed_t: float | None = None
    cpu_at_close: dict[str, float] | None = None
    process_cpu_first: float | None = None  # time.process_time() at the first image
    # thread CPU seconds spent on this series, by stage
    cpu_s: dict[str, float] = field(
        default_factory=lambda: {"receive": 0.0, "count": 0.0, "write": 0.0}
    )
    n_expected: int | None = None  # frame ids 0..n-1 expected (end / start), set at close

    @property
    def frame_shape(self) -> tuple[int, int]:
        return tuple(self.start.frame_shape)  # type: ignore[return-value]


@dataclass(eq=False)
class OpenItem:
    series: SeriesInfo


@dataclass(eq=False)
class FrameItem:
    series: SeriesInfo
    frame_id: int
    timestamp_ns: int
    array: np.ndarray  # (H, W) view of the zmq buffer
    nbytes: int


@dataclass(eq=False)
class MissingItem:
    series: SeriesInfo
    frame_ids: list[int]


@dataclass(eq=False)
class CloseItem:
    series: SeriesInfo
    received: int
    duplicate: int
    rejected: int
    complete: bool
    reason: str
    receive_s: float = 0.0  # first to last image received


@dataclass(eq=False)
class EventsItem:
    series: SeriesInfo
    events: Any  # EventBatch
    frame_ids: list[int]
    timestamps_ns: list[int]
    nbytes: int


STOP = object()

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def superblock_eof(path: str | os.PathLike) -> int | None:
    """(helper G) End-of-file address the HDF5 superblock (version 2 or 3) of ``path`` records.

    A write that fails at the end of a file (ENOSPC, EFBIG) can leave the
    superblock, rewritten in place, pointing past the real end; HDF5 then
    refuses the file ("truncated file") although every flushed frame is in it.
    Extending the file with zeros to this size makes it open again.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        head = os.pread(fd, 36, 0)
    finally:
        os.close(fd)
    if len(head) < 36 or head[:8] != _HDF5_SIGNATURE or head[8] not in (2, 3) or head[9] != 8:
        return None
    return int.from_bytes(head[28:36], "little")


def _batch_nbytes(batch: Any) -> int:
    n = batch.offsets.nbytes + batch.indices.nbytes
    if batch.subpixel is not None:
        n += batch.subpixel.nbytes
    return int(n)


class _Stage(threading.Thread):
    """A thread that takes items from ``inbox`` until :data:`STOP`."""

    def __init__(self, name: str, inbox: queue.SimpleQueue) -> None:
        super().__init__(name=name, daemon=True)
        self.inbox = inbox
        self.cpu_s = 0.0  # thread CPU seconds spent working on items
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while True:
                try:
                    item = self.inbox.get(timeout=self.idle_interval)
                except queue.Empty:
                    self.idle()
                    continue
                if item is STOP:
                    self.stop()
                    return
                t0 = time.thread_time()
                try:
                    self.handle(item)
                except Exception as exc:  # no message may stop the daemon
                    self.item_failed(item, exc)
                dt = time.thread_time() - t0
                self.cpu_s += dt
                series = getattr(item, "series", None)
                if series is not None:
                    series.cpu_s[self.name] += dt
        except BaseException as exc:  # logged and re-raised into the daemon by join
            self.error = exc
            log.exception("%s stage failed: %s", self.name, exc)

    idle_interval = 0.25

    def idle(self) -> None:
        pass

    def item_failed(self, item: Any, exc: Exception) -> None:
        """An item raised: log it loudly; the stage carries on."""
        series = getattr(item, "series", None)
        log.error(
            "%s stage: %s of series %s failed: %s: %s",
            self.name,
            type(item).__name__,
            getattr(series, "series_id", "?"),
            type(exc).__name__,
            exc,
        )

    def stop(self) -> None:
        pass

    def handle(self, item: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class CountStage(_Stage):
    """Counts frames into events; turns dark series into the calibration.

    Calibration of a data series, chosen when the series opens: the latest
    dark series' calibration if one arrived, else the ``--calibration`` file,
    else :meth:`Calibration.estimate` on the first ``estimate_frames`` frames.

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
        Frames used by ``Calibration.estimate`` when nothing else is known.
    max_dark_frames : int
        Dark frames kept for the calibration (later ones are counted as
        received but not used).
    """

    def __init__(
        self,
        inbox: queue.SimpleQueue,
        outbox: queue.SimpleQueue,
        budget: ByteBudget,
        counters: Any,
        *,
        calibration: Any = None,
        calibration_label: str = "",
        subpixel: bool = False,
        threads: int | None = None,
        estimate_frames: int = 8,
        max_dark_frames: int = 64,
    ) -> None:
        super().__init__("count", inbox)
        self.outbox = outbox
        self.budget = budget
        self.counters = counters
        self.file_calibration = calibration
        self.file_label = calibration_label
        self.dark_calibration: Any = None
        self.dark_label = ""
        self.subpixel = subpixel
        self.threads = threads
        self.estimate_frames = max(1, int(estimate_frames))
        self.max_dark_frames = int(max_dark_frames)
        self._counter: Any = None
        self._counter_key: Any = None
        self._pending: list[Any] = []  # items of a data series waiting for its estimate
        self._dark: list[np.ndarray] = []
        self._dark_capped = False
        self._estimate_failed = ""

    # -- calibration ---------------------------------------------------------
    def stop(self) -> None:
        self.outbox.put(STOP)  # the write stage drains what is queued before it

    def _pick_calibration(self, series: SeriesInfo) -> None:
        if self.dark_calibration is not None:
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

    def _estimate(self, series: SeriesInfo) -> None:
        from streamstore.calibration import Calibration

        frames = [it.array for it in self._pending if isinstance(it, FrameItem)]
        if frames:
            try:
                series.calibration = Calibration.estimate(np.stack(frames))
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
            series.calibration_source = f"estimate:first {len(frames)} frames of {series.series_id}"
            log.info(
                "series %s: no dark frames or calibration file; estimated the calibration "
                "from its first %d frames",
                series.series_id,
                len(frames),
            )

    def _counter_for(self, series: SeriesInfo) -> Any:
        key = (id(series.calibration), series.start.np_dtype.str)
        if self._counter is None or self._counter_key != key:
            from streamstore.counting import Counter

            self._counter = Counter(
                series.calibration,
                series.start.np_dtype,
                subpixel=self.subpixel,
                threads=self.threads,
            )
            self._counter_key = key
        return self._counter

    # -- items ------------------------------------------------------------------
    def handle(self, item: Any) -> None:
        if isinstance(item, OpenItem):
            self._pending = []
            if item.series.kind == "data":
                self._pick_calibration(item.series)
            self.outbox.put(item)
        elif isinstance(item, FrameItem):
            series = item.series
            if series.kind == "dark":
                # dark copies count against the memory budget (a quarter of it at most)
                held = sum(f.nbytes for f in self._dark)
                if (
                    len(self._dark) < self.max_dark_frames
                    and held + item.nbytes <= self.budget.capacity // 4
                ) or len(self._dark) < 2:
                    self._dark.append(np.array(item.array, copy=True))
                    self.budget.add(item.nbytes)
                elif not self._dark_capped:
                    self._dark_capped = True
                    log.warning(
                        "dark series %s: keeping %d frames for the calibration "
                        "(memory budget / 4 or the dark-frame limit); later ones are not used",
                        series.series_id,
                        len(self._dark),
                    )
                self.budget.release(item.nbytes)
                self.counters.frames_counted += 1
            elif series.calibration is None:
                self._pending.append(item)
                if len(self._pending) >= self.estimate_frames:
                    self._estimate(series)
                    self._drain_pending()
            else:
                self._count([item])
        elif isinstance(item, MissingItem):
            if self._pending:
                self._pending.append(item)
            else:
                self.outbox.put(item)
        elif isinstance(item, CloseItem):
            series = item.series
            if series.kind == "dark":
                self._finish_dark(series)
            elif self._pending:
                self._estimate(series)
                self._drain_pending()
            self.outbox.put(item)
        else:  # pragma: no cover - programming error
            raise TypeError(f"count stage got an unexpected item {item!r}")

    def item_failed(self, item: Any, exc: Exception) -> None:
        super().item_failed(item, exc)
        if isinstance(item, FrameItem):
            self._lose([item])
        elif isinstance(item, CloseItem | OpenItem | MissingItem):
            self.outbox.put(item)  # keep the series' bookkeeping going

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
            self.outbox.put(MissingItem(items[0].series, [it.frame_id for it in items]))

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

    def _count(self, items: list[FrameItem]) -> None:
        from streamstore.events import EventBatch

        series = items[0].series
        batches = []
        try:
            counter = self._counter_for(series)
        except Exception:
            log.exception("series %s: cannot build a counter", series.series_id)
            self._lose(items)
            return
        for k, it in enumerate(items):
            try:
                batches.append(counter(it.array))
            except Exception:
                log.exception("series %s: counting failed", series.series_id)
                self._lose(items[k:])  # the ones before k are counted and go on
                items = items[:k]
                break
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
            )
        )

    def _finish_dark(self, series: SeriesInfo) -> None:
        from streamstore.calibration import Calibration

        frames, self._dark = self._dark, []
        self._dark_capped = False
        self.budget.release(sum(f.nbytes for f in frames))
        if len(frames) < 2:
            log.warning(
                "dark series %s brought %d frame(s); a calibration needs at least 2: ignored",
                series.series_id,
                len(frames),
            )
            return
        try:
            cal = Calibration.from_dark_frames(np.stack(frames))
        except ValueError as exc:
            log.error("dark series %s: cannot calibrate: %s", series.series_id, exc)
            return
        self.dark_calibration = cal
        self.dark_label = f"dark_frames:{series.series_id} ({len(frames)} frames)"
        series.calibration = cal
        series.calibration_source = self.dark_label
        log.info(
            "dark series %s: calibration from %d frames (%d pixels masked) "
            "for the following series",
            series.series_id,
            len(frames),
            cal.n_masked,
        )


class WriteStage(_Stage):
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
    """

    def __init__(
        self,
        inbox: queue.SimpleQueue,
        budget: ByteBudget,
        counters: Any,
        out_dir: str | os.PathLike,
        *,
        subpixel: bool = False,
        flush_interval_s: float = 1.0,
        on_closed: Any = None,
        paths: Any = None,
        encode_threads: int | None = None,
    ) -> None:
        super().__init__("write", inbox)
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
        self._writers: dict[int, Any] = {}  # id(series) -> StoreWriter
        self._open_series: dict[int, SeriesInfo] = {}
        self._failed: set[int] = set()
        self._summaries: dict[int, tuple[Any, dict]] = {}
        self._last_flush = time.monotonic()
        self._closed_bytes = 0

    # -- files ----------------------------------------------------------------------
    def _open(self, series: SeriesInfo) -> Any:
        key = id(series)
        if key in self._writers:
            return self._writers[key]
        from streamstore.store import StoreWriter

        start = series.start
        meta = {
            "series_id": series.series_id,
            "detector": getattr(start, "detector", None),
            "calibration_source": series.calibration_source,
            "sender_meta": getattr(start, "meta", None) or {},
            "ingest": {"n_frames_announced": getattr(start, "n_frames", None)},
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
                    calibration=self._calibration_summary(series.calibration),
                    meta=meta,
                    raw_dtype=start.np_dtype,
                    subpixel=self.subpixel,
                    flush_interval_s=self.flush_interval_s,
                    nthreads=self.encode_threads,
                )
            except FileExistsError:
                continue  # somebody created it between the check and now
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
        self._writers[key] = writer
        self._open_series[key] = series
        log.info("series %s -> %s", series.series_id, path)
        return writer

    def _calibration_summary(self, cal: Any) -> Any:
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
    def handle(self, item: Any) -> None:
        if isinstance(item, OpenItem):
            return  # files open lazily, once the calibration is known
        series = item.series
        if series.kind == "dark":
            if isinstance(item, CloseItem):
                self._close_dark(item)
            return
        if isinstance(item, EventsItem):
            self._append(item)
        elif isinstance(item, MissingItem):
            self._mark_missing(series, item.frame_ids)
        elif isinstance(item, CloseItem):
            self._close(item)
        else:  # pragma: no cover - programming error
            raise TypeError(f"write stage got an unexpected item {item!r}")

    def _append(self, item: EventsItem) -> None:
        series = item.series
        try:
            if id(series) in self._failed:
                raise OSError("an earlier write to this series failed")
            writer = self._open(series)
            if self.delay_s:
                time.sleep(self.delay_s * len(item.frame_ids))
            writer.append(item.events, item.frame_ids, item.timestamps_ns)
        except Exception as exc:  # OSError, or RuntimeError from h5py (helper G)
            self._write_failed(series, item.frame_ids, exc)
        except ValueError as exc:  # refused by the writer: these frames only are lost
            log.error(
                "series %s: frames %s not stored: %s", series.series_id, item.frame_ids[:8], exc
            )
            self._mark_missing(series, list(item.frame_ids))
        else:
            series.stored += len(item.frame_ids)
            series.events += item.events.n_events
            self.counters.frames_stored += len(item.frame_ids)
            self.counters.events_stored += item.events.n_events
        finally:
            self.budget.release(item.nbytes)

    def _write_failed(self, series: SeriesInfo, frame_ids: list[int], exc: BaseException) -> None:
        if id(series) not in self._failed:
            log.error(
                "series %s: WRITE FAILED (%s); the file keeps every frame flushed before this, "
                "and the frames that cannot be stored are counted as missing",
                series.series_id,
                exc,
            )
            # (helper G) frames appended since the writer's last completed flush are
            # not in the file either: count them as missing, not stored
            writer = self._writers.get(id(series))
            given = set(frame_ids)
            lost = [] if writer is None else [int(i) for i in writer.unflushed_frame_ids]
            lost = [i for i in lost if i not in given]
            if lost:
                log.error(
                    "series %s: %d frame(s) appended since the last good flush are lost too",
                    series.series_id,
                    len(lost),
                )
                series.stored -= len(lost)
                self.counters.frames_stored -= len(lost)
                series.missing_ids.extend(lost)
                self.counters.missing += len(lost)
        self._failed.add(id(series))
        self.counters.write_errors += 1
        series.missing_ids.extend(frame_ids)
        self.counters.missing += len(frame_ids)

    def _mark_missing(self, series: SeriesInfo, ids: list[int]) -> None:
        series.missing_ids.extend(ids)
        self.counters.missing += len(ids)
        if id(series) in self._failed:
            return
        try:
            self._open(series).mark_missing(ids)
        except Exception as exc:  # OSError, or RuntimeError from h5py (helper G)
            self._write_failed(series, [], exc)

    def _close(self, item: CloseItem) -> None:
        series = item.series
        series.complete = item.complete
        key = id(series)
        try:
            writer = self._open(series) if key not in self._failed else self._writers.get(key)
            if writer is not None:
                if key in self._failed:
                    lost = sorted(set(series.missing_ids))
                    try:
                        writer.mark_missing(lost)
                    except Exception:
                        pass
                writer.update_accounting(
                    received=item.received,
                    duplicate=item.duplicate,
                    rejected=item.rejected,
                    complete=item.complete and key not in self._failed,
                    reason=item.reason,
                    receive_seconds=round(item.receive_s, 6),
                )
                writer.close()
        except Exception as exc:  # OSError, or RuntimeError from h5py (helper G)
            self._write_failed(series, [], exc)
        if key in self._failed and series.path is not None:
            self._repair_eof(series)
        self._writers.pop(key, None)
        self._open_series.pop(key, None)
        self._closed_bytes += self._file_bytes(series)
        self.counters.bytes_written = self._closed_bytes
        n_missing = len(set(series.missing_ids))
        log.info(
            "series %s %s (%s): received %d, stored %d, missing %d, duplicate %d, rejected %d, "
            "%d events -> %s",
            series.series_id,
            "complete" if series.complete else "INCOMPLETE",
            item.reason,
            item.received,
            series.stored,
            n_missing,
            item.duplicate,
            item.rejected,
            series.events,
            series.path,
        )
        self._finish(series)

    def _repair_eof(self, series: SeriesInfo) -> None:
        """(helper G) After a failed write, extend the file to its superblock's end if short."""
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
            try:
                writer.flush()
            except Exception as exc:  # OSError, or RuntimeError from h5py (helper G)
                log.error("flush failed: %s", exc)
                series = self._open_series.get(key)
                if series is not None:
                    self._write_failed(series, [], exc)
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
