"""What flows between the ingest stages: items, the memory budget, the stage thread.

See :mod:`streamstore.ingest.pipeline` for the data flow. Items carry one
series' frames and control messages in order; :class:`ByteBudget` bounds the
bytes they hold; :class:`_Stage` is the thread loop each stage runs (no item
may stop it: a failing item is logged and accounted for by the stage).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeAlias, TypeVar

import numpy as np

from streamstore.idranges import IdRanges, ranges_of_ids

if TYPE_CHECKING:
    from streamstore.counting.calibration import Calibration
    from streamstore.events import EventBatch
    from streamstore.link.protocol import Start

__all__ = [
    "ByteBudget",
    "SeriesInfo",
    "OpenItem",
    "FrameItem",
    "MissingItem",
    "CloseItem",
    "EventsItem",
    "CountInput",
    "WriteInput",
    "STOP",
    "WRITE_DELAY_ENV",
    "superblock_eof",
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
    start: Start
    kind: str = "data"  # "data" or "dark"
    calibration: Calibration | None = None
    calibration_source: str = "none"
    # the calibration (and its source) the first frames were counted with, kept when
    # the count stage refines it before the write stage has opened the file: the file
    # records what its first frames were counted with
    opening_calibration: tuple[Calibration, str] | None = None
    # the calibration's summary once the object itself is freed (all frames counted)
    calibration_summary: dict[str, Any] | None = None
    # non-empty while (or after) frames are counted with a provisional calibration
    calibration_warning: str = ""
    path: Path | None = None
    # final numbers, filled by the write stage; stored and events count flushed frames only
    stored: int = 0
    events: int = 0
    missing: IdRanges = field(default_factory=IdRanges)
    complete: bool = False
    # why the sender's account contradicts what arrived (e.g. an end below the frames
    # received); empty when it does not
    inconsistent: str = ""
    # the daemon's calibration changes up to this series' start (recorded in its file)
    calibration_changes: list[dict[str, Any]] = field(default_factory=list)
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
    end_extra: dict[str, Any] | None = None  # extra keys of the end (a broker's report)

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
    """Frame ids of a series that will never be stored, as ``[start, stop)`` ranges."""

    series: SeriesInfo
    ranges: list[tuple[int, int]]

    @classmethod
    def of_ids(cls, series: SeriesInfo, ids: list[int]) -> MissingItem:
        return cls(series, ranges_of_ids(ids))

    @property
    def n_ids(self) -> int:
        return sum(b - a for a, b in self.ranges)


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
    events: EventBatch  # with ``electrons``, the corrected dose, when the count stage made it
    frame_ids: list[int]
    timestamps_ns: list[int]
    nbytes: int
    #: the model that made ``events.electrons`` and its parameters as of these frames
    dose_model: dict[str, Any] | None = None


#: What the receiver hands the count stage, in a series' order.
CountInput: TypeAlias = OpenItem | FrameItem | MissingItem | CloseItem
#: What the count stage hands the write stage: a frame's events in place of the frame.
WriteInput: TypeAlias = OpenItem | EventsItem | MissingItem | CloseItem
#: The items a stage handles (:class:`_Stage`'s type parameter).
ItemT = TypeVar("ItemT", CountInput, WriteInput)

STOP = object()

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def superblock_eof(path: str | os.PathLike) -> int | None:
    """End-of-file address the HDF5 superblock (version 2 or 3) of ``path`` records.

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


def _batch_nbytes(batch: EventBatch) -> int:
    n = batch.offsets.nbytes + batch.indices.nbytes
    if batch.subpixel is not None:
        n += batch.subpixel.nbytes
    if batch.electrons is not None:
        n += batch.electrons.nbytes
    return int(n)


class _Stage(threading.Thread, Generic[ItemT]):
    """A thread that takes items (``ItemT``: :data:`CountInput` or
    :data:`WriteInput`) from ``inbox`` until :data:`STOP`."""

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

    def item_failed(self, item: ItemT, exc: Exception) -> None:
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

    def handle(self, item: ItemT) -> None:  # pragma: no cover - abstract
        raise NotImplementedError
