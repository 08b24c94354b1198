"""Read streamstore event files: windows, dose selection, sums.

``streamstore.open(path)`` (:mod:`streamstore.store.open`) returns a
:class:`Store`. The per-frame arrays (frame ids, timestamps, event counts and
offsets) are loaded when the file is opened; events are read on demand, a
whole HDF5 chunk at a time with ``read_direct_chunk`` and decompressed by
python-blosc2 (multi-threaded), and reduced by the numba kernels of
:mod:`streamstore.store._kernels`.

Doses use one unit system everywhere (argument ``unit``):

* ``"events"``: electron counts;
* ``"e/px"`` (default): events per pixel, ``count / (H * W)``;
* ``"e/A2"``: electrons per square Angstrom, ``count / (H * W * pixel_size_A**2)``
  (needs the file's pixel size).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from streamstore.errors import FormatError
from streamstore.events import EventBatch
from streamstore.idranges import IdRanges
from streamstore.store._chunkio import (
    ChunkReader,
    read_column,
)
from streamstore.store.damage import DamageChecks
from streamstore.store.format import FORMAT_NAME, read_dose_model
from streamstore.store.scan_methods import ScanMethods, analysis_function
from streamstore.store.selection import UNITS, FrameSelection

__all__ = ["Store", "UNITS"]

_SUPPORTED_VERSIONS = (1, 2, 3)
# events per job of sum(): at least _JOB_EVENTS, 2 per image pixel, at most
# _JOB_EVENTS_MAX (scratch = 4 bytes an event). The kernel sweeps the whole image
# once per job, so a job must hold many events per pixel: measured on 24 MP
# frames, 4 M events a job gave 160 M events/s, 32 M gave 570 M events/s.
_JOB_EVENTS = 1 << 22
_JOB_EVENTS_MAX = 1 << 25
# a gap (dataset positions) between selected frames that starts a new sum job
_GAP_SPLIT = 1 << 20
# flat pixels per band of the sum kernel (512 KiB of uint32 accumulator: stays in cache)
_SUM_BAND = 1 << 17
# how sum() uses threads: "bands" (each thread adds a band of rows), or "serial"
_SUM_MODE = "bands"


def _text(v: Any) -> Any:
    if isinstance(v, bytes | np.bytes_):
        return bytes(v).rstrip(b" \x00").decode()
    if isinstance(v, np.generic) or (isinstance(v, np.ndarray) and v.ndim == 0):
        return v.item()
    return v


def _h5_open(path: Path) -> tuple[Any, bool]:
    """Open read-only; fall back to SWMR when the file is (or was) open for writing.

    A file being written by a :class:`~streamstore.StoreWriter`, or left by a
    writer that was killed, refuses a normal open ("already open for write");
    SWMR read mode opens both.
    """
    import h5py
    import hdf5plugin  # noqa: F401  (registers the Blosc2 filter)

    try:
        return h5py.File(path, "r"), False
    except OSError as first:
        # only a writer's mark warrants SWMR: on a truncated or damaged file an SWMR
        # open retries its metadata reads with sleeps and looks hung for minutes
        if "already open for write" not in str(first):
            raise
        try:
            return h5py.File(path, "r", swmr=True), True
        except OSError:
            raise first from None


class Store(FrameSelection, DamageChecks, ScanMethods):
    """A streamstore event file opened for reading (see :func:`open`).

    Dose and frame selections come from
    :class:`~streamstore.store.selection.FrameSelection` (``dose``, ``select``,
    ``fractions``); a scanned (4D-STEM) series also has the scan methods of
    :class:`~streamstore.store.scan_methods.ScanMethods` (``scan``, ``with_scan``,
    ``virtual_image``, ``center_of_mass``, ``diffraction_sum``, ``radial_profile``).

    Parameters
    ----------
    path : str or Path
        The file.
    nthreads : int, optional
        Threads for decompression and sums (default: all cores).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    FormatError
        If it is not a streamstore events file of a supported version.
    """

    def __init__(self, path: str | os.PathLike, *, nthreads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"no such file: {self.path}")
        self.nthreads = int(nthreads or os.cpu_count() or 1)
        try:
            self._f, self.swmr = _h5_open(self.path)
        except OSError as e:
            raise FormatError(f"{self.path} is not a readable HDF5 file ({e})") from None
        try:
            self._init()
        except KeyError as e:  # a dataset or attribute the format requires is absent
            self._f.close()
            raise FormatError(
                f"{self.path} is not a complete streamstore file ({e.args[0] if e.args else e})"
            ) from None
        except BaseException:
            self._f.close()
            raise

    def _init(self) -> None:
        f = self._f
        a = f.attrs
        fmt = _text(a.get("format", ""))
        if fmt != FORMAT_NAME:
            raise FormatError(f"{self.path} is not a {FORMAT_NAME} file (format={fmt!r})")
        ver = int(a.get("format_version", -1))
        if ver not in _SUPPORTED_VERSIONS:
            raise FormatError(
                f"{self.path} has format version {ver}; "
                f"this streamstore reads versions {_SUPPORTED_VERSIONS}"
            )
        self.format_version = ver
        h, w = (int(v) for v in a["frame_shape"])
        self.frame_shape: tuple[int, int] = (h, w)
        self.frame_time_s = float(a["frame_time_s"])
        ps = float(a.get("pixel_size_A", np.nan))
        self.pixel_size_A: float | None = None if np.isnan(ps) else ps
        self.raw_dtype = str(_text(a.get("raw_dtype", "")))
        self._gaps = ChunkReader(f["events/gaps"], self.nthreads, swmr=self.swmr)
        self._sub = (
            ChunkReader(f["events/subpixel"], self.nthreads, swmr=self.swmr)
            if "subpixel" in f["events"]
            else None
        )
        # keep these handles: SWMR refresh() must refresh the very handles we read
        self._frame_ds = {
            k: f["frames"][k] for k in ("frame_id", "timestamp_ns", "event_count", "event_offset")
        }
        # format 3 records the corrected dose beside the event counts
        if "electrons" in f["frames"]:
            self._frame_ds["electrons"] = f["frames"]["electrons"]
        self._miss_ds = f["missing_frame_ids"]
        # newer files record missing ids as [start, stop) pairs; older ones list them
        self._miss_ranges_ds = f["missing_ranges"] if "missing_ranges" in f else None
        self._load_frames()

    def _load_frames(self) -> None:
        names = ["frame_id", "timestamp_ns", "event_count", "event_offset"]
        if "electrons" in self._frame_ds:
            names.append("electrons")
        dss = [self._frame_ds[k] for k in names]
        n = min(int(d.shape[0]) for d in dss)
        damaged = np.zeros(n, bool)
        why: list[tuple[int, int, str]] = []
        cols = []
        for k, d in zip(names, dss, strict=True):
            col, bad = read_column(d, n, self.swmr, np.float64 if k == "electrons" else np.int64)
            for lo, hi, reason in bad:
                damaged[lo:hi] = True
                why.append((lo, hi, reason))
            cols.append(col)
        ids, ts, counts, offs = cols[:4]
        electrons = cols[4] if len(cols) > 4 else None
        if why:
            # placeholders keep the arrays ordered; reading these frames raises
            good = ~damaged
            ids[damaged] = -1
            counts[damaged] = 0
            if electrons is not None:
                electrons[damaged] = 0.0
            prev_end = np.maximum.accumulate(np.where(good, offs + counts, 0))
            offs[damaged] = prev_end[damaged]
            if good.any():
                pos = np.maximum.accumulate(np.where(good, np.arange(n), -1))
                pos[pos < 0] = int(np.argmax(good))
                ts = ts[pos]
        n_ev_file = int(self._gaps.ds.shape[0])
        ends = offs + counts
        if n and int(ends[-1]) > n_ev_file:
            # a frame whose events are not (yet) in the file: keep the complete prefix
            n = int(np.searchsorted(ends, n_ev_file, side="right"))
            ids, ts, counts, offs, ends = (c[:n] for c in (ids, ts, counts, offs, ends))
            if electrons is not None:
                electrons = electrons[:n]
        if n and (np.any(counts < 0) or offs[0] < 0 or np.any(offs[1:] < ends[:-1])):
            raise FormatError(
                f"{self.path}: frames/event_offset and event_count overlap or are negative"
            )
        self._ids, self._ts, self._counts, self._starts = ids, ts, counts, offs
        self._dose_model = read_dose_model(self._frame_ds.get("electrons"))
        self._electrons = electrons if self._dose_model is not None else None
        self._damaged = damaged[:n]
        self._damage_why = [(lo, min(hi, n), r) for lo, hi, r in why if lo < n]
        self._n_events = int(counts.sum())
        miss = self._miss_ds
        ranges = IdRanges()
        ranges.add_ids(miss[: miss.shape[0]].astype(np.int64))
        rds = self._miss_ranges_ds
        if rds is not None:
            flat = rds[: rds.shape[0] // 2 * 2].astype(np.int64).reshape(-1, 2)
            if flat.size and np.any((flat[:, 0] < 0) | (flat[:, 1] < flat[:, 0])):
                raise FormatError(f"{self.path}: missing_ranges holds a reversed or negative range")
            for a, b in flat.tolist():
                ranges.add(a, b)
        self._missing = ranges
        self._missing_list: np.ndarray | None = None

    # ------------------------------------------------------------ life --
    def refresh(self) -> int:
        """Pick up frames appended since opening (SWMR); return the new frame count.

        A file opened after its writer closed cannot grow; then this is a no-op.
        """
        if self.swmr:
            for ds in self._frame_ds.values():
                ds.refresh()
            self._gaps.ds.refresh()
            if self._sub is not None:
                self._sub.ds.refresh()
            self._miss_ds.refresh()
            if self._miss_ranges_ds is not None:
                self._miss_ranges_ds.refresh()
            self._gaps.clear()
            if self._sub is not None:
                self._sub.clear()
            self._load_frames()
        return self.n_frames

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._f.id.valid:
            self._f.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Store({str(self.path)!r}, n_frames={self.n_frames}, "
            f"frame_shape={self.frame_shape}, n_events={self.n_events})"
        )

    # ------------------------------------------------------- metadata --
    @property
    def n_frames(self) -> int:
        """Number of stored frames."""
        return int(self._ids.size)

    @property
    def n_events(self) -> int:
        """Number of stored events."""
        return self._n_events

    @property
    def frame_ids(self) -> np.ndarray:
        """Camera frame id of each stored frame (int64, ascending)."""
        return self._ids

    @property
    def timestamps_ns(self) -> np.ndarray:
        """Acquisition time of each stored frame in ns (int64)."""
        return self._ts

    @property
    def event_counts(self) -> np.ndarray:
        """Events per frame (int64)."""
        return self._counts

    @property
    def missing_frame_ids(self) -> np.ndarray:
        """Frame ids that never arrived (sorted, int64).

        Expanded from :attr:`missing_ranges` on first use: a gap of ten
        million ids makes an 80 MB array; prefer the ranges for large gaps.
        """
        if self._missing_list is None:
            self._missing_list = self._missing.ids()
        return self._missing_list

    @property
    def missing_ranges(self) -> np.ndarray:
        """Frame ids that never arrived as ``(n, 2)`` int64 rows ``[start, stop)``, ascending.

        Files written before ranges were recorded give the same rows, built
        from their ``missing_frame_ids`` list.
        """
        return self._missing.as_array()

    @property
    def n_missing(self) -> int:
        """Number of frame ids that never arrived."""
        return self._missing.n_ids

    @property
    def subpixel(self) -> bool:
        """True if the file stores sub-pixel positions."""
        return self._sub is not None

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes, JSON attributes decoded to Python objects."""
        out: dict[str, Any] = {}
        for k, v in self._f.attrs.items():
            v = _text(v)
            if k in ("calibration", "counting", "meta", "accounting_json") and isinstance(v, str):
                try:
                    v = json.loads(v)
                except ValueError:
                    pass
            elif isinstance(v, np.ndarray):
                v = v.tolist()
            out[k] = v
        return out

    @property
    def calibration_warning(self) -> str:
        """Why the calibration is provisional or was for some frames ("" when it was
        not, or the file predates the ``calibration_warning`` attribute)."""
        v = self._f.attrs.get("calibration_warning")
        return "" if v is None else str(_text(v)).strip()

    @property
    def calibration_summary(self) -> dict[str, Any] | None:
        """The calibration summary written by the counting side, or None."""
        v = self.attrs.get("calibration")
        return v if isinstance(v, dict) else None

    @property
    def meta(self) -> dict[str, Any]:
        """Free metadata given to the writer."""
        v = self.attrs.get("meta")
        return v if isinstance(v, dict) else {}

    @property
    def accounting(self) -> dict[str, Any]:
        """Frame accounting as far as known.

        Keys: ``stored`` and ``missing`` always; ``received``, ``duplicate``,
        ``rejected`` (ints) and ``complete`` (bool) when the ingest side
        recorded them; plus any extra items it recorded.
        """
        a = self.attrs
        acc = a.get("accounting_json")
        out: dict[str, Any] = dict(acc) if isinstance(acc, dict) else {}
        for key in ("received", "duplicate", "rejected"):
            v = int(a.get(f"frames_{key}", -1))
            if v >= 0:
                out[key] = v
            else:
                out.pop(key, None)
        c = int(a.get("series_complete", -1))
        if c >= 0:
            out["complete"] = bool(c)
        out["stored"] = self.n_frames
        out["missing"] = int(self._missing.n_ids)
        return out

    @property
    def bits_per_event(self) -> float:
        """Bytes the event datasets take in the file x 8 / number of events (nan if none)."""
        size = self._gaps.ds.id.get_storage_size()
        if self._sub is not None:
            size += self._sub.ds.id.get_storage_size()
        return float(size * 8 / self.n_events) if self.n_events else float("nan")

    # ---------------------------------------------------------- events --
    def events(self, start: int, stop: int) -> EventBatch:
        """Events of frames ``start:stop`` as an :class:`EventBatch`."""
        from streamstore.store import _kernels

        s, e = self._window(start, stop)
        a, b, starts, counts = self._span(s, e)
        offs = np.zeros(e - s + 1, np.int64)
        np.cumsum(counts, out=offs[1:])
        gaps = self._read_checked(self._gaps, a, starts, counts)
        idx = _kernels.gather_decode(gaps, starts, counts, np.empty(int(offs[-1]), np.uint32))
        sub = None
        if self._sub is not None:
            sub = _kernels.gather(
                self._read_checked(self._sub, a, starts, counts),
                starts,
                counts,
                np.empty(int(offs[-1]), np.uint8),
            )
        el = None if self._electrons is None else self._electrons[s:e].copy()
        return EventBatch(offs, idx, sub, self.frame_shape, electrons=el, validate=False)

    def _span(self, s: int, e: int) -> tuple[int, int, np.ndarray, np.ndarray]:
        """Dataset range ``a:b`` holding frames ``s:e`` and their starts (relative) / counts."""
        if e <= s:
            return 0, 0, np.zeros(0, np.int64), np.zeros(0, np.int64)
        self._check_damaged(np.arange(s, e))
        a = int(self._starts[s])
        b = int(self._starts[e - 1] + self._counts[e - 1])
        return a, b, self._starts[s:e] - a, self._counts[s:e]

    def frames(
        self,
        start: int,
        stop: int,
        *,
        roi: Sequence[int] | None = None,
        dtype: np.dtype | type = np.uint16,
    ) -> np.ndarray:
        """Dense count frames ``(n, h, w)`` of frames ``start:stop``.

        Parameters
        ----------
        start, stop : int
            Frame window (indices into the stored frames); ``start < stop``: an
            empty window raises UserError, as on the command line.
        roi : (row0, row1, col0, col1), optional
            Crop; ``h = row1 - row0``, ``w = col1 - col0``.
        dtype : numpy dtype, default uint16
            Output type.
        """
        from streamstore.store import _kernels

        s, e = self._window(start, stop, empty_ok=False)
        r0, r1, c0, c1 = self._roi(roi)
        out = np.zeros((e - s, r1 - r0, c1 - c0), dtype=dtype)
        a, b, starts, counts = self._span(s, e)
        flat = out.reshape(e - s, (r1 - r0) * (c1 - c0))
        gaps = self._read_checked(self._gaps, a, starts, counts)
        _kernels.dense_frames(gaps, starts, counts, self.frame_shape[1], (r0, r1, c0, c1), flat)
        return out

    def sum(
        self,
        start: int | None = None,
        stop: int | None = None,
        *,
        select: Sequence[int] | np.ndarray | None = None,
        roi: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Summed counts image (uint32, ``(h, w)``) over a window or a selection.

        Parameters
        ----------
        start, stop : int, optional
            Frame window; default the whole series. An empty window
            (``start == stop``) raises UserError, as on the command line.
        select : array_like of int, optional
            Frame indices to sum instead of a window (e.g. from :meth:`select`);
            duplicates count once.
        roi : (row0, row1, col0, col1), optional
            Crop of the image.
        """
        from streamstore.store import _kernels

        r0, r1, c0, c1 = self._roi(roi)
        sel = self._selection(start, stop, select)
        self._check_damaged(sel)
        shape = (r1 - r0, c1 - c0)
        job_events = min(max(_JOB_EVENTS, 2 * shape[0] * shape[1]), _JOB_EVENTS_MAX)
        jobs = self._jobs(sel, job_events)
        roi_t = (r0, r1, c0, c1)
        w = self.frame_shape[1]

        acc = np.zeros(shape[0] * shape[1], np.uint32)
        # scratch buffers for the decoded gaps, reused across jobs (fresh memory
        # costs page faults that were a third of the time on this machine)
        longest = max((j[1] - j[0] for j in jobs), default=0)
        scratch: dict[int, np.ndarray] = {}

        def decode(job: tuple[int, int, np.ndarray, np.ndarray]) -> np.ndarray:
            buf = scratch.get(0)
            if buf is None:
                buf = scratch[0] = np.empty(longest, np.uint32)
            out = buf[: job[1] - job[0]]
            return self._read_checked(self._gaps, job[0], job[2], job[3], out=out)

        def add(gaps: np.ndarray, job: tuple[int, int, np.ndarray, np.ndarray]) -> None:
            _kernels.sum_frames(gaps, job[2], job[3], w, roi_t, acc, _SUM_BAND)

        if not jobs or self.nthreads == 1 or _SUM_MODE == "serial":
            for job in jobs:
                add(decode(job), job)
        else:
            # each thread adds its own band of rows of every frame into the one
            # accumulator (the kernel dominates; decompression is ~10 %)
            nb = min(self.nthreads, r1 - r0)
            edges = [r0 + (r1 - r0) * k // nb for k in range(nb + 1)]
            rw = c1 - c0
            parts = [
                (
                    (edges[k], edges[k + 1], c0, c1),
                    acc[(edges[k] - r0) * rw : (edges[k + 1] - r0) * rw],
                )
                for k in range(nb)
            ]
            with ThreadPoolExecutor(nb) as pool:
                for job in jobs:
                    gaps = decode(job)
                    futs = [
                        pool.submit(
                            _kernels.sum_frames,
                            gaps,
                            job[2],
                            job[3],
                            w,
                            part_roi,
                            part_acc,
                            _SUM_BAND,
                        )
                        for part_roi, part_acc in parts
                    ]
                    for fut in futs:
                        fut.result()
        return acc.reshape(shape)

    # ------------------------------------------------------------ dask --
    def to_dask(self, chunk_frames: int = 64, **kwargs: Any) -> Any:
        """Lazy dask array ``(n, h, w)`` of the dense frames, read in the dask workers.

        See :func:`streamstore.analysis.distributed.to_dask` (needs ``streamstore[dask]``).
        """
        return analysis_function("distributed", "to_dask")(
            self, chunk_frames=chunk_frames, **kwargs
        )

    def map_windows(self, func: Any, window: int, client: Any = None, **kwargs: Any) -> Any:
        """Run ``func(store, start, stop)`` on each window of frames on a dask cluster.

        See :func:`streamstore.analysis.distributed.map_windows` (needs ``streamstore[dask]``).
        """
        return analysis_function("distributed", "map_windows")(
            self, func, window, client=client, **kwargs
        )

    def _jobs(
        self, sel: np.ndarray, size: int = _JOB_EVENTS
    ) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
        """Split selected frames into jobs of about ``size`` dataset positions.

        Each job is ``(a, b, starts, counts)``: the dataset range ``a:b`` to read
        and the selected frames in it (starts relative to ``a``). Frames left
        out of the selection may lie inside a job's range (decoded, not added)
        as long as the gap is at most ``_GAP_SPLIT`` positions; a longer gap
        starts a new job. So a selection that skips single frames still runs
        in big jobs (the kernel's speed grows with events per job).
        """
        if sel.size == 0:
            return []
        s_sel = self._starts[sel]
        c_sel = self._counts[sel]
        e_sel = s_sel + c_sel
        brk = np.flatnonzero(s_sel[1:] - e_sel[:-1] > _GAP_SPLIT) + 1
        bounds = np.concatenate([[0], brk, [sel.size]])
        jobs = []
        for g0, g1 in zip(bounds[:-1], bounds[1:], strict=True):
            i = int(g0)
            while i < g1:
                a = int(s_sel[i])
                # selected frames whose events end within a + size (at least one)
                j = int(np.searchsorted(e_sel[i:g1], a + size, side="right")) + i
                j = min(max(j, i + 1), int(g1))
                b = int(e_sel[j - 1])
                jobs.append((a, b, s_sel[i:j] - a, c_sel[i:j]))
                i = j
        return jobs
