"""StoreWriter: stream counted events into a streamstore HDF5 file.

The file layout ("streamstore.events" version 3) is specified in
``docs/format.md``. In short: a flat gap-encoded event dataset (CSR) plus
per-frame datasets, every dataset chunked and compressed with Blosc2 (HDF5
filter 32026) by python-blosc2 ourselves and written with
``write_direct_chunk``; the file is written in SWMR mode so readers see frames
while they arrive, and a SIGKILLed writer leaves every flushed frame readable.

Chunk policy
------------
Rewriting a compressed chunk makes HDF5 allocate new space and, under SWMR,
never reuse the old (measured: flushing a growing tail chunk 100 times made a
file 20 x too big). So:

* Event datasets (``events/gaps``, ``events/subpixel``) are write-once. A
  chunk is compressed and written as soon as it fills. At a flush the open
  chunk is padded with zeros and written, and the next events start at the
  next chunk boundary: the padding is a hole that no frame addresses
  (``event_offset`` is the dataset position of a frame's first event; a
  frame's events are always contiguous). Zeros compress to almost nothing.
  At close the extent ends at the last event if it was written by the final
  flush (HDF5 datasets are never shrunk: that would rewrite a chunk through the
  filter), so trailing padding may remain inside the extent.
* Per-frame datasets (row ``i`` is frame ``i``, no holes possible): a chunk
  written whole is compressed (ZSTD); a chunk that must be published while
  partly filled is stored with blosc2 level 0 (fixed size, 32 bytes a frame
  over the five columns) and overwritten in place as it fills; HDF5 reuses the
  space of a same-size chunk and the bytes of already published frames do not
  change, so a concurrent reader never sees them torn. A last chunk never
  published before close is compressed; chunks hold 256 frames, so a short
  series pays at most 8 KiB for a published, uncompressed last chunk.

Order of a flush (what makes a concurrent SWMR reader safe): event datasets
first, then the per-frame datasets, ``frame_id`` last. A reader takes the
number of frames as the shortest per-frame dataset and never trusts an event
beyond ``event_offset[-1] + event_count[-1]``.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from streamstore.abc import ChunkCodec
from streamstore.events import EventBatch
from streamstore.idranges import IdRanges, ranges_of_ids
from streamstore.store.format import (
    ACCOUNTING_JSON_BYTES,
    ACCOUNTING_KEYS,
    CAL_WARNING_BYTES,
    DEFAULT_CHUNK_EVENTS,
    DEFAULT_CHUNK_FRAMES,
    FORMAT_NAME,
    FORMAT_VERSION,
    FRAME_COLUMNS,
    check_dose_model,
    create_layout,
    dumps,
    electrons_of,
    jsonable,
    write_dose_model,
)

__all__ = ["StoreWriter", "FORMAT_NAME", "FORMAT_VERSION"]


def _open_exclusive(path: Path) -> int:
    """Create ``path`` exclusively without following a symlink; return the fd."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.open(path, flags, 0o644)
    except FileExistsError:
        raise FileExistsError(
            f"{path} already exists; streamstore never overwrites a file (choose a new name)"
        ) from None


class StoreWriter:
    """Write a series of counted frames to a streamstore file (SWMR, crash-safe).

    Parameters
    ----------
    path : str or Path
        File to create. Must not exist (never clobbered: FileExistsError); a
        symlink at the path is refused, not followed.
    frame_shape : tuple of int
        ``(H, W)`` of the camera frames.
    frame_time_s : float
        Time between frames in seconds (> 0).
    pixel_size_A : float, optional
        Pixel size at the specimen in Angstrom; needed for doses in e/A^2.
    calibration : Calibration or dict, optional
        A :class:`streamstore.Calibration` (its ``summary()`` and ``source``
        are stored) or a plain dict of counting parameters.
    meta : dict, optional
        Free metadata (JSON-able), stored as the ``meta`` attribute.
    raw_dtype : str, default "uint16"
        dtype of the raw camera frames the events were counted from.
    subpixel : bool, default False
        Store the sub-pixel byte of each event (``EventBatch.subpixel``).
    flush_interval_s : float, default 1.0
        :meth:`append` flushes when this much wall-clock time has passed since
        the last flush, or this much data time (frames x frame_time_s) was
        appended. Call :meth:`flush` yourself when the stream idles.
    nthreads : int, optional
        Threads blosc2 uses to compress; None means all cores.
    codec : ChunkCodec, optional
        Codec of the event gaps (default :class:`Blosc2ChunkCodec`, ZSTD level 1
        + SHUFFLE).
    chunk_events : int, default 1048576
        Events per HDF5 chunk.
    chunk_frames : int, default 256
        Frames per HDF5 chunk of the per-frame datasets.
    counting : dict, optional
        Counting parameters (thresholds, method), stored as JSON.
    checksums : bool, default True
        Give every chunk of every dataset HDF5's Fletcher-32 checksum, so
        damaged chunks are found on read (:class:`streamstore.CorruptDataError`)
        and by ``streamstore verify``. False only to measure its cost.
    scan : ScanGeometry or dict, optional
        Scan geometry of a 4D-STEM series (``scan_shape``,
        ``frames_per_position``, ``flyback``, ``first_frame_id``), stored as
        root attributes (see :mod:`streamstore.scan`).

    Raises
    ------
    FileExistsError
        If ``path`` exists (including a symlink).
    ValueError
        On a bad parameter; the message names it.

    Examples
    --------
    >>> with StoreWriter("run.h5", (256, 384), frame_time_s=1e-3) as w:  # doctest: +SKIP
    ...     w.append(batch, frame_ids, timestamps_ns)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        frame_shape: tuple[int, int],
        *,
        frame_time_s: float,
        pixel_size_A: float | None = None,
        calibration: Any = None,
        meta: dict[str, Any] | None = None,
        raw_dtype: str = "uint16",
        subpixel: bool = False,
        flush_interval_s: float = 1.0,
        nthreads: int | None = None,
        codec: ChunkCodec | None = None,
        chunk_events: int = DEFAULT_CHUNK_EVENTS,
        chunk_frames: int = DEFAULT_CHUNK_FRAMES,
        counting: dict[str, Any] | None = None,
        checksums: bool = True,
        scan: Any = None,
    ) -> None:
        import h5py

        from streamstore import __version__
        from streamstore.scan import ScanGeometry
        from streamstore.store.codec import Blosc2ChunkCodec, hdf5_filter

        shape = tuple(int(s) for s in frame_shape)
        if len(shape) != 2 or min(shape) <= 0:
            raise ValueError(f"frame_shape must be two positive ints (H, W), got {frame_shape!r}")
        if shape[0] * shape[1] > 2**32:
            raise ValueError(f"frame_shape {shape} has more than 2**32 pixels")
        self.frame_shape: tuple[int, int] = (shape[0], shape[1])
        if not (isinstance(frame_time_s, int | float) and np.isfinite(frame_time_s)) or (
            frame_time_s <= 0
        ):
            raise ValueError(f"frame_time_s must be a positive number, got {frame_time_s!r}")
        if pixel_size_A is not None and not (np.isfinite(pixel_size_A) and pixel_size_A > 0):
            raise ValueError(
                f"pixel_size_A must be a positive number or None, got {pixel_size_A!r}"
            )
        try:
            raw_dt = np.dtype(raw_dtype)
        except TypeError:
            raise ValueError(f"raw_dtype is not a numpy dtype: {raw_dtype!r}") from None
        if flush_interval_s <= 0:
            raise ValueError(f"flush_interval_s must be > 0, got {flush_interval_s!r}")
        for name, val in (("chunk_events", chunk_events), ("chunk_frames", chunk_frames)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if nthreads is not None and (not isinstance(nthreads, int) or nthreads < 1):
            raise ValueError(f"nthreads must be a positive int or None, got {nthreads!r}")
        self.frame_time_s = float(frame_time_s)
        self.pixel_size_A = None if pixel_size_A is None else float(pixel_size_A)
        self.subpixel = bool(subpixel)
        self.flush_interval_s = float(flush_interval_s)
        if codec is None:
            codec = Blosc2ChunkCodec(nthreads=nthreads)
        elif nthreads is not None:
            codec = Blosc2ChunkCodec.from_config(codec.get_config(), nthreads=nthreads)
        small = Blosc2ChunkCodec(codec="ZSTD", clevel=5, filter="SHUFFLE", nthreads=nthreads)
        stored = Blosc2ChunkCodec(codec="ZSTD", clevel=0, filter="NOFILTER", nthreads=nthreads)

        cal_summary: dict[str, Any] | None
        cal_source = ""
        if calibration is None:
            cal_summary = None
        elif isinstance(calibration, dict):
            cal_summary = dict(calibration)
            cal_source = str(calibration.get("source", ""))
        elif hasattr(calibration, "summary"):
            cal_summary = dict(calibration.summary())
            cal_source = str(getattr(calibration, "source", ""))
        else:
            raise ValueError(
                "calibration must be a streamstore.Calibration, a dict or None, "
                f"got {type(calibration).__name__}"
            )
        self._scan = ScanGeometry.parse(scan)
        if meta is not None and not isinstance(meta, dict):
            raise ValueError(f"meta must be a dict or None, got {type(meta).__name__}")

        self._checksums = bool(checksums)
        self.path = Path(path)
        fd = _open_exclusive(self.path)
        self._file = None
        try:
            st_fd = os.fstat(fd)
            # no HDF5 file lock: a reader polling the directory (a live viewer) would
            # otherwise make this open or the switch to SWMR fail with EAGAIN; the
            # O_EXCL create above is what keeps a second writer out
            f = h5py.File(self.path, "w", libver="latest", locking=False)
            self._file = f
            st_path = os.lstat(self.path)
            if not stat.S_ISREG(st_path.st_mode) or (st_path.st_ino, st_path.st_dev) != (
                st_fd.st_ino,
                st_fd.st_dev,
            ):
                raise FileExistsError(f"{self.path} was replaced while opening; refusing to write")
            layout = create_layout(
                f,
                frame_shape=self.frame_shape,
                raw_dtype=raw_dt,
                frame_time_s=self.frame_time_s,
                pixel_size_A=self.pixel_size_A,
                subpixel=self.subpixel,
                cal_summary=cal_summary,
                cal_source=cal_source,
                counting=counting,
                meta=meta,
                scan=self._scan,
                codec=codec,
                small=small,
                stored=stored,
                chunk_events=chunk_events,
                chunk_frames=chunk_frames,
                checksums=self._checksums,
                version=__version__,
                hdf5_filter=hdf5_filter,
            )
            self._gaps = layout.gaps
            self._sub = layout.subpixel
            self._cols = layout.frames
            self._missing = layout.missing
            self._cal_warning = ""
        except BaseException:
            # a file that could not be made whole (full disk, ...) is not left behind
            if self._file is not None:
                try:
                    self._file.close()
                except Exception:
                    pass
            try:
                if (os.lstat(self.path).st_ino, os.lstat(self.path).st_dev) == (
                    st_fd.st_ino,
                    st_fd.st_dev,
                ):
                    os.unlink(self.path)
            except (OSError, NameError):
                pass
            os.close(fd)
            raise
        os.close(fd)

        self._n_frames = 0
        self._n_events = 0
        self._n_flushed = 0
        self._n_events_flushed = 0
        self._last_id: int | None = None
        self._ids = np.empty(1024, np.int64)  # every stored frame id (for mark_missing)
        self._missing_ids = IdRanges()
        self._accounting: dict[str, Any] = {}
        self._last_flush = time.monotonic()
        self._frames_since_flush = 0
        self._closed = False
        self._corrected: bool | None = None  # batches carry electrons (the first decides)
        self._dose_model: dict[str, Any] | None = None
        self._dose_model_dirty = False

    # ------------------------------------------------------------ state --
    @property
    def n_frames_written(self) -> int:
        """Frames appended so far (buffered or in the file)."""
        return self._n_frames

    @property
    def n_flushed(self) -> int:
        """Frames that are in the file and survive a crash (as of the last flush)."""
        return self._n_flushed

    @property
    def unflushed_frame_ids(self) -> np.ndarray:
        """Ids of the frames appended since the last completed flush (lost if writing fails now)."""
        return self._ids[self._n_flushed : self._n_frames].copy()

    @property
    def frame_ids(self) -> np.ndarray:
        """Ids of the frames appended so far, ascending (a copy)."""
        return self._ids[: self._n_frames].copy()

    @property
    def n_events_flushed(self) -> int:
        """Events of the frames in the file as of the last flush."""
        return self._n_events_flushed

    @property
    def n_events_written(self) -> int:
        """Events appended so far."""
        return self._n_events

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"StoreWriter for {self.path} is closed")

    # ------------------------------------------------------------ write --
    def append(
        self,
        events: EventBatch,
        frame_ids: Sequence[int] | np.ndarray,
        timestamps_ns: Sequence[int] | np.ndarray,
    ) -> None:
        """Append counted frames.

        Parameters
        ----------
        events : EventBatch
            Events of ``n`` frames with this writer's frame shape (and
            sub-pixel data if and only if the writer has ``subpixel=True``).
        frame_ids : array_like of int, shape (n,)
            Strictly increasing, and greater than every id appended before.
        timestamps_ns : array_like of int, shape (n,)
            Acquisition time of each frame in nanoseconds.

        Raises
        ------
        ValueError
            On a shape/type mismatch, ids that do not increase, mixed ``electrons``.
        """
        self._check_open()
        if not isinstance(events, EventBatch):
            raise ValueError(f"events must be an EventBatch, got {type(events).__name__}")
        if events.frame_shape != self.frame_shape:
            raise ValueError(
                f"events have frame_shape {events.frame_shape}, the store has {self.frame_shape}"
            )
        if (events.subpixel is not None) != self.subpixel:
            raise ValueError(
                "events carry sub-pixel data but the store was created with subpixel=False"
                if events.subpixel is not None
                else "the store was created with subpixel=True but the events have no subpixel"
            )
        n = events.n_frames
        ids = np.asarray(frame_ids)
        ts = np.asarray(timestamps_ns)
        if ids.shape != (n,) or ts.shape != (n,):
            raise ValueError(
                f"frame_ids and timestamps_ns need one value per frame ({n}), "
                f"got shapes {ids.shape} and {ts.shape}"
            )
        if ids.dtype.kind not in "iu" or ts.dtype.kind not in "iu":
            if n:
                raise ValueError("frame_ids and timestamps_ns must be integers")
        ids = ids.astype(np.int64)
        ts = ts.astype(np.int64)
        if n == 0:
            return
        electrons, has_el = electrons_of(events, self._corrected)
        if n > 1 and np.any(np.diff(ids) <= 0):
            raise ValueError("frame_ids must be strictly increasing within a batch")
        if self._last_id is not None and ids[0] <= self._last_id:
            raise ValueError(
                f"frame_ids must increase across appends: got {int(ids[0])} after {self._last_id}"
            )
        if self._missing_ids.overlaps(int(ids[0]), int(ids[-1]) + 1):
            bad = [i for i in ids.tolist() if i in self._missing_ids]
            if bad:
                raise ValueError(f"frame ids {bad[:5]} were marked missing and cannot be stored")

        from streamstore.store.codec import gap_encode

        gaps = gap_encode(events.indices, events.offsets, self.frame_shape[0] * self.frame_shape[1])
        first = self._gaps.length  # dataset position of this batch's first event
        self._gaps.extend(gaps, write_full=True)
        if self._sub is not None:
            self._sub.extend(events.subpixel, write_full=True)
        counts = events.counts
        self._cols["event_offset"].extend(events.offsets[:-1] + first, write_full=False)
        self._cols["event_count"].extend(counts, write_full=False)
        self._cols["timestamp_ns"].extend(ts, write_full=False)
        self._cols["electrons"].extend(electrons, write_full=False)
        self._cols["frame_id"].extend(ids, write_full=False)
        if self._corrected is None:
            self._corrected = has_el
            self._dose_model_dirty = True
        if self._n_frames + n > self._ids.size:
            grown = np.empty(max(2 * self._ids.size, self._n_frames + n), np.int64)
            grown[: self._n_frames] = self._ids[: self._n_frames]
            self._ids = grown
        self._ids[self._n_frames : self._n_frames + n] = ids
        self._n_frames += n
        self._n_events += events.n_events
        self._last_id = int(ids[-1])
        self._frames_since_flush += n
        if (
            time.monotonic() - self._last_flush >= self.flush_interval_s
            or self._frames_since_flush * self.frame_time_s >= self.flush_interval_s
        ):
            self.flush()

    def mark_missing(self, frame_ids: Sequence[int] | np.ndarray) -> None:
        """Record frame ids that never arrived (stored as ranges in ``missing_ranges``).

        Raises
        ------
        ValueError
            If an id is already stored as a frame; ids already marked missing
            are ignored.
        """
        self.mark_missing_ranges(ranges_of_ids(np.asarray(frame_ids, dtype=np.int64).ravel()))

    def mark_missing_ranges(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Record the frame ids ``[start, stop)`` of each range as missing (constant space).

        Raises
        ------
        ValueError
            If a range is reversed or negative, or holds an id already stored as
            a frame; ids already marked missing are ignored.
        """
        self._check_open()
        stored = self._ids[: self._n_frames]
        checked = []
        for a, b in ranges:
            a, b = int(a), int(b)
            if a < 0 or b < a:
                raise ValueError(f"missing range [{a}, {b}) is not a range of ids >= 0")
            lo, hi = np.searchsorted(stored, [a, b])
            if hi > lo:
                raise ValueError(f"frame ids {stored[lo:hi][:5].tolist()} are stored, not missing")
            checked.append((a, b))
        new = []
        for a, b in checked:
            new.extend(self._missing_ids.add(a, b))
        if new:
            self._missing.extend(np.asarray(new, np.int64).ravel(), write_full=False)

    @property
    def n_missing(self) -> int:
        """Frame ids recorded missing so far."""
        return self._missing_ids.n_ids

    def update_accounting(
        self,
        *,
        received: int | None = None,
        duplicate: int | None = None,
        rejected: int | None = None,
        complete: bool | None = None,
        **extra: Any,
    ) -> None:
        """Record what the ingest side knows (written at the next flush and at close).

        Parameters
        ----------
        received, duplicate, rejected : int, optional
            Frame counts seen by the receiver.
        complete : bool, optional
            True if the series ended cleanly, False if it was closed without
            its end (e.g. after an idle timeout: "incomplete").
        **extra
            Further JSON-able items (e.g. ``reason="idle timeout"``).
        """
        self._check_open()
        for key, val in (("received", received), ("duplicate", duplicate), ("rejected", rejected)):
            if val is not None:
                if int(val) < 0:
                    raise ValueError(f"{key} must be >= 0, got {val!r}")
                self._accounting[key] = int(val)
        if complete is not None:
            self._accounting["complete"] = bool(complete)
        self._accounting.update(jsonable(extra))

    def _write_accounting(self) -> None:
        acc = dict(self._accounting)
        acc["stored"] = self._n_flushed
        acc["missing"] = self._missing_ids.n_ids
        a = self._file.attrs
        for key in ACCOUNTING_KEYS:
            a.modify(f"frames_{key}", np.int64(acc.get(key, -1)))
        a.modify("series_complete", np.int8(-1 if "complete" not in acc else int(acc["complete"])))
        text = dumps(acc).encode()
        if len(text) > ACCOUNTING_JSON_BYTES:
            raise ValueError(
                f"accounting extras take {len(text)} bytes as JSON, "
                f"at most {ACCOUNTING_JSON_BYTES} fit"
            )
        a.modify("accounting_json", np.bytes_(text.ljust(ACCOUNTING_JSON_BYTES)))

    def set_calibration_warning(self, text: str) -> None:
        """Say in the file that its calibration is provisional ("" when it is not).

        Stored in the root attribute ``calibration_warning`` (UTF-8, space-padded,
        at most 1024 bytes, longer text is cut) and readable while the file is
        written.
        """
        self._check_open()
        data = str(text).encode()[:CAL_WARNING_BYTES].decode(errors="ignore").encode()
        self._file.attrs.modify("calibration_warning", np.bytes_(data.ljust(CAL_WARNING_BYTES)))
        self._cal_warning = str(text)

    def set_dose_model(self, model: dict[str, Any] | None) -> None:
        """Record the model (JSON-able dict with ``name``, or None) that made the
        batches' ``electrons``, at the next flush; a series whose first batch has no
        electrons stores the counts in ``frames/electrons`` and says ``"none"``."""
        self._check_open()
        self._dose_model = None if model is None else check_dose_model(model)
        self._dose_model_dirty = True

    @property
    def calibration_warning(self) -> str:
        """The text last given to :meth:`set_calibration_warning` ("" if none)."""
        return self._cal_warning

    def flush(self) -> None:
        """Write every buffered frame to the file so it survives a crash."""
        self._check_open()
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if self._dose_model_dirty and self._corrected is not None:  # before frame_id publishes
            write_dose_model(self._cols["electrons"].ds, self._corrected, self._dose_model)
            self._dose_model_dirty = False
        self._gaps.commit(final)
        if self._sub is not None:
            self._sub.commit(final)
        for name in FRAME_COLUMNS:  # frame_id last: it publishes the frames
            self._cols[name].commit(final)
        self._missing.commit(final)
        self._n_flushed = self._n_frames
        self._n_events_flushed = self._n_events
        self._write_accounting()
        self._file.flush()
        self._last_flush = time.monotonic()
        self._frames_since_flush = 0

    def close(self) -> None:
        """Flush and close the file (idempotent)."""
        if self._closed:
            return
        try:
            if self._file is not None and self._file.id.valid:
                self._flush(final=True)
        finally:
            self._closed = True
            if self._file is not None and self._file.id.valid:
                self._file.close()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"StoreWriter({str(self.path)!r}, frame_shape={self.frame_shape}, "
            f"n_frames_written={self._n_frames}, {state})"
        )
