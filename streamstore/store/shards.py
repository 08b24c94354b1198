"""A series written by several ingest workers, read as one store.

Layout of a scaled-out series (written by ``streamstore ingest --workers N``
or by workers on several hosts with ``--worker-id K``)::

    DIR/<series_id>/shard-0.h5      one streamstore events file per worker
    DIR/<series_id>/shard-1.h5      (its share of the frames, ascending ids)
    DIR/<series_id>/manifest.json   the series manifest (below)

The manifest (JSON, ``"format": "streamstore.series"``, version 1) holds
``series_id``, ``frame_shape``, ``frames_announced`` (the sender's ``start``),
``n_workers`` (when known) and ``shards``: one entry per closed shard with
``worker_id``, ``file``, ``frames_stored``, ``events``, ``complete``,
``frames_expected`` (the sender's ``end``), ``calibration_source`` and
``closed_unix_s``. Each worker adds its entry when it closes its shard, under
a file lock.

:class:`ShardedStore` does not trust the manifest alone: it also opens every
``shard-*.h5`` in the directory, so the shard of a worker that died (no
manifest entry; its file holds every frame it flushed, SWMR) is read too. The
frames are merged by frame id; an id stored in two shards is kept once and
counted as a duplicate. Frame ids that no shard holds -- below the number of
frames the sender announced or ended with, or below the highest id stored --
are reported missing, so frames lost with a dead worker are reported, not
hidden.

``streamstore.open(path)`` returns a :class:`ShardedStore` for a series
directory or its manifest file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from streamstore.errors import CorruptDataError, FormatError
from streamstore.events import EventBatch
from streamstore.idranges import IdRanges
from streamstore.store._chunkio import format_ranges, true_ranges
from streamstore.store.reader import Store

__all__ = ["ShardedStore", "is_series", "read_manifest", "MANIFEST_FORMAT", "MANIFEST_VERSION"]

MANIFEST_FORMAT = "streamstore.series"
MANIFEST_VERSION = 1
_MANIFEST_NAME = "manifest.json"
_SHARD_GLOB = "shard-*.h5"
# most missing frame ids a series may report (2 GiB of int64): a larger claim is an error
_MAX_MISSING = 1 << 28


def is_series(path: str | os.PathLike) -> bool:
    """True if ``path`` is a series directory (manifest or shards inside) or a manifest file."""
    p = Path(path)
    if p.is_dir():
        return (p / _MANIFEST_NAME).is_file() or any(p.glob(_SHARD_GLOB))
    return p.suffix == ".json" and p.is_file()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a series manifest.

    Raises
    ------
    FormatError
        If the file is not a streamstore series manifest of a supported version.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except ValueError as exc:
        raise FormatError(f"{p}: not a JSON series manifest ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise FormatError(f"{p}: not a {MANIFEST_FORMAT} manifest (format={got!r})")
    if data.get("format_version") != MANIFEST_VERSION:
        raise FormatError(
            f"{p}: manifest version {data.get('format_version')!r}; "
            f"this streamstore reads version {MANIFEST_VERSION}"
        )
    shards = data.get("shards", [])
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and isinstance(s.get("file"), str) for s in shards
    ):
        raise FormatError(f"{p}: 'shards' must be a list of objects with a 'file' name")
    for s in shards:
        name = s["file"]
        if Path(name).name != name or name.startswith("."):
            raise FormatError(f"{p}: shard file {name!r} must be a plain name in the directory")
    return data


def _take(batch: EventBatch, rel: np.ndarray) -> EventBatch:
    """Frames ``rel`` (ascending indices) of ``batch``."""
    counts = batch.counts[rel]
    offs = np.zeros(rel.size + 1, np.int64)
    np.cumsum(counts, out=offs[1:])
    src = np.repeat(batch.offsets[:-1][rel] - offs[:-1], counts) + np.arange(offs[-1])
    sub = None if batch.subpixel is None else batch.subpixel[src]
    return EventBatch(offs, batch.indices[src], sub, batch.frame_shape, validate=False)


class ShardedStore(Store):
    """The shards of a scaled-out series, read as one :class:`~streamstore.Store`.

    Frames are ordered by frame id across the shards; every method of
    :class:`~streamstore.Store` works on the merged series (frame indices are
    positions in that order). Reads go to the shards: a window maps to one
    contiguous range of frames in each shard.

    Parameters
    ----------
    path : str or Path
        The series directory or its ``manifest.json``.
    nthreads : int, optional
        Threads per shard for decompression and sums.

    Attributes
    ----------
    shards : list of Store
        The readable shards, in worker-id order.
    shard_errors : dict
        Shard file name -> why it could not be read (its frames count as missing).
    manifest : dict
        The manifest (empty if there is none yet).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    FormatError
        If no shard is readable, the manifest is invalid, or the shards disagree
        on frame shape or frame time.
    """

    def __init__(self, path: str | os.PathLike, *, nthreads: int | None = None) -> None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"no such series: {p}")
        self.path = p
        self.series_dir = p if p.is_dir() else p.parent
        self.nthreads = int(nthreads or os.cpu_count() or 1)
        self.swmr = False
        self.shards: list[Store] = []
        self.shard_errors: dict[str, str] = {}
        self._open_shards()
        try:
            self._merge()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ opening --
    def _open_shards(self) -> None:
        mpath = self.path if self.path.is_file() else self.series_dir / _MANIFEST_NAME
        self.manifest: dict[str, Any] = read_manifest(mpath) if mpath.is_file() else {}
        listed = {s["file"]: s for s in self.manifest.get("shards", [])}
        names = set(listed) | {f.name for f in self.series_dir.glob(_SHARD_GLOB)}
        self._listed = listed

        def key(name: str) -> tuple[int, str]:
            wid = listed.get(name, {}).get("worker_id")
            if wid is None:
                digits = name.removeprefix("shard-").removesuffix(".h5")
                wid = int(digits) if digits.isdigit() else 1 << 30
            return int(wid), name

        self._names: list[str] = []
        for name in sorted(names, key=key):
            f = self.series_dir / name
            try:
                store = Store(f, nthreads=self.nthreads)
            except (OSError, FormatError, KeyError, ValueError) as exc:
                self.shard_errors[name] = f"{type(exc).__name__}: {exc}"
                continue
            self.shards.append(store)
            self._names.append(name)
        if not self.shards:
            why = "; ".join(f"{k}: {v}" for k, v in self.shard_errors.items()) or "none found"
            raise FormatError(f"{self.path}: no readable shard ({why})")
        first = self.shards[0]
        for s in self.shards[1:]:
            for attr in ("frame_shape", "frame_time_s", "pixel_size_A", "subpixel"):
                if getattr(s, attr) != getattr(first, attr):
                    raise FormatError(
                        f"{self.path}: shards disagree on {attr}: {getattr(first, attr)!r} "
                        f"({first.path.name}) vs {getattr(s, attr)!r} ({s.path.name})"
                    )
        self.frame_shape = first.frame_shape
        self.frame_time_s = first.frame_time_s
        self.pixel_size_A = first.pixel_size_A
        self.raw_dtype = first.raw_dtype
        self.format_version = first.format_version
        self.swmr = any(s.swmr for s in self.shards)

    def _merge(self) -> None:
        ids = np.concatenate([s.frame_ids for s in self.shards])
        src = np.concatenate([np.full(s.n_frames, k, np.int64) for k, s in enumerate(self.shards)])
        loc = np.concatenate([np.arange(s.n_frames, dtype=np.int64) for s in self.shards])
        ts = np.concatenate([s.timestamps_ns for s in self.shards])
        counts = np.concatenate([s.event_counts for s in self.shards])
        # the corrected dose only when every shard records one with the same model
        # name: a merged series whose shards disagree falls back to the counted events
        models = [s._dose_model for s in self.shards]
        same = all(m is not None for m in models) and len({m["name"] for m in models}) == 1
        electrons = np.concatenate([s._electrons for s in self.shards]) if same else counts
        known = ids >= 0  # a damaged frame_id chunk: those frames cannot be placed (missing)
        ids, src, loc, ts, counts, electrons = (
            c[known] for c in (ids, src, loc, ts, counts, electrons)
        )
        order = np.lexsort((src, ids))  # by frame id, then by shard
        ids = ids[order]
        keep = np.ones(ids.size, bool)
        if ids.size > 1:
            keep[1:] = ids[1:] != ids[:-1]  # an id in two shards: the first shard's copy
        self._cross_duplicates = int(ids.size - np.count_nonzero(keep))
        sel = order[keep]
        self._ids, self._src, self._loc = ids[keep], src[sel], loc[sel]
        self._ts, self._counts = ts[sel], counts[sel]
        self._electrons = electrons[sel].astype(np.float64) if same else None
        # each shard pooled its own frames: the model of the first shard, with the
        # parameters of every shard
        self._dose_model = None
        if same:
            self._dose_model = dict(models[0])
            self._dose_model["shards"] = [dict(m) for m in models]
        self._n_events = int(self._counts.sum())
        self._frames_expected = self._expected()
        known_missing = np.concatenate([s.missing_frame_ids for s in self.shards])
        never = np.setdiff1d(np.arange(self._frames_expected, dtype=np.int64), self._ids)
        missing = np.setdiff1d(np.union1d(never, known_missing), self._ids).astype(np.int64)
        self._missing = IdRanges()
        self._missing.add_ids(missing)
        self._missing_list = missing

    def _expected(self) -> int:
        """Number of frame ids the series should hold, as far as anybody knows."""
        cands = [int(self._ids[-1]) + 1 if self._ids.size else 0]
        for v in [self.manifest.get("frames_announced")] + [
            e.get("frames_expected") for e in self._listed.values()
        ]:
            if isinstance(v, int) and not isinstance(v, bool):
                cands.append(v)
        for s in self.shards:
            ing = s.meta.get("ingest")
            v = ing.get("n_frames_announced") if isinstance(ing, dict) else None
            if isinstance(v, int) and not isinstance(v, bool):
                cands.append(v)
        expected = max(cands)
        if expected - self._ids.size > _MAX_MISSING:
            raise FormatError(
                f"{self.path}: the series claims {expected} frames (frames_announced / "
                f"frames_expected) but holds {self._ids.size}: more than {_MAX_MISSING} "
                "missing ids to list; the manifest or the sender's count is wrong"
            )
        return expected

    # --------------------------------------------------------------- life --
    def refresh(self) -> int:
        """Pick up frames the shards received since opening; return the frame count."""
        for s in self.shards:
            s.refresh()
        mpath = self.path if self.path.is_file() else self.series_dir / _MANIFEST_NAME
        if mpath.is_file():
            self.manifest = read_manifest(mpath)
            self._listed = {s["file"]: s for s in self.manifest.get("shards", [])}
        self._merge()
        return self.n_frames

    def close(self) -> None:
        """Close every shard (idempotent)."""
        for s in self.shards:
            s.close()

    def __enter__(self) -> ShardedStore:
        return self

    def __repr__(self) -> str:
        return (
            f"ShardedStore({str(self.path)!r}, shards={len(self.shards)}, "
            f"n_frames={self.n_frames}, missing={self._missing.n_ids}, "
            f"frame_shape={self.frame_shape}, n_events={self.n_events})"
        )

    # ----------------------------------------------------------- metadata --
    @property
    def subpixel(self) -> bool:
        return self.shards[0].subpixel

    @property
    def shard_of_frame(self) -> np.ndarray:
        """Index into :attr:`shards` of the shard holding each frame."""
        return self._src

    @property
    def attrs(self) -> dict[str, Any]:
        """The first shard's attributes, plus ``series`` (the manifest) and ``shard_files``."""
        out = self.shards[0].attrs
        out["series"] = self.manifest
        out["shard_files"] = list(self._names)
        return out

    @property
    def meta(self) -> dict[str, Any]:
        return self.shards[0].meta

    @property
    def accounting(self) -> dict[str, Any]:
        """Frame accounting combined over the shards.

        ``stored`` and ``missing`` are those of the merged series; ``received``,
        ``duplicate`` and ``rejected`` are sums over the shards (duplicates
        include ids stored by two shards); ``complete`` is True only if every
        expected shard closed with its series' end and is readable. Also:
        ``shards``, ``shards_expected``, ``shards_unreadable``,
        ``shards_unclosed`` (shard files without a manifest entry: their
        worker died or is still writing), ``shards_absent`` (expected shards
        with no file at all), ``workers_lost`` (workers the broker lost
        during the series; empty without a broker) and ``frames_expected``.
        ``rejected`` includes the images the broker rejected.
        """
        accs = [s.accounting for s in self.shards]
        out: dict[str, Any] = {}
        for key in ("received", "duplicate", "rejected"):
            vals = [a[key] for a in accs if key in a]
            if vals:
                out[key] = int(sum(vals))
        out["duplicate"] = out.get("duplicate", 0) + self._cross_duplicates
        # a broker's report (series written before brokers have none): what it rejected
        # and the workers it lost mid-series
        broker = self.manifest.get("broker")
        broker = broker if isinstance(broker, dict) else {}
        lost = broker.get("workers_lost")
        lost = sorted(int(k) for k in lost if isinstance(k, int)) if isinstance(lost, list) else []
        b_rej = broker.get("rejected")
        if isinstance(b_rej, int) and not isinstance(b_rej, bool) and b_rej > 0:
            out["rejected"] = out.get("rejected", 0) + b_rej
        n_workers = self.manifest.get("n_workers")
        unclosed = [n for n in self._names if n not in self._listed]
        complete = (
            all(a.get("complete") is True for a in accs)
            and not self.shard_errors
            and not unclosed
            and not lost
            and (not isinstance(n_workers, int) or len(self.shards) >= n_workers)
        )
        out.update(
            complete=complete,
            stored=self.n_frames,
            missing=int(self._missing.n_ids),
            frames_expected=self._frames_expected,
            shards=len(self.shards),
            shards_expected=n_workers,
            shards_unreadable=sorted(self.shard_errors),
            shards_unclosed=unclosed,
            workers_lost=lost,
            shards_absent=max(0, n_workers - len(self._names) - len(self.shard_errors))
            if isinstance(n_workers, int)
            else None,
        )
        return out

    @property
    def bits_per_event(self) -> float:
        sizes = [s.bits_per_event * s.n_events for s in self.shards if s.n_events]
        return float(sum(sizes) / self.n_events) if self.n_events else float("nan")

    # ------------------------------------------------------------- reading --
    @contextlib.contextmanager
    def _as_series(self, k: int) -> Iterator[None]:
        """Re-raise a shard's :class:`CorruptDataError` with the series' frame indices."""
        try:
            yield
        except CorruptDataError as exc:
            mine = np.flatnonzero(self._src == k)  # ascending in the shard's own order too
            hit = np.zeros(self.n_frames, bool)
            for a, b in exc.frames:
                pos = np.searchsorted(self._loc[mine], [a, b])
                hit[mine[pos[0] : pos[1]]] = True
            ranges = true_ranges(hit)
            name = self.shards[k].path.name
            raise CorruptDataError(
                f"frames {format_ranges(ranges)} of the series {self.series_dir} are damaged "
                f"(in {name}: {exc})",
                ranges,
                str(self.series_dir),
            ) from None

    @property
    def damaged_frames(self) -> list[tuple[int, int]]:
        """Frames whose per-frame data failed its check in their shard (``(start, stop)``)."""
        hit = np.zeros(self.n_frames, bool)
        for k, s in enumerate(self.shards):
            bad = np.zeros(s.n_frames, bool)
            for a, b in s.damaged_frames:
                bad[a:b] = True
            mine = self._src == k
            hit[mine] = bad[self._loc[mine]]
        return true_ranges(hit)

    def _parts(self, sel: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Per shard: (shard index, positions in ``sel``, local frame indices ascending)."""
        src = self._src[sel]
        out = []
        for k in np.unique(src):
            pos = np.flatnonzero(src == k)
            out.append((int(k), pos, self._loc[sel[pos]]))
        return out

    def events(self, start: int, stop: int) -> EventBatch:
        """Events of frames ``start:stop`` of the merged series as an :class:`EventBatch`."""
        s, e = self._window(start, stop)
        offs = np.zeros(e - s + 1, np.int64)
        np.cumsum(self._counts[s:e], out=offs[1:])
        idx = np.empty(int(offs[-1]), np.uint32)
        sub = np.empty(int(offs[-1]), np.uint8) if self.subpixel else None
        for k, pos, local in self._parts(np.arange(s, e)):
            lo, hi = int(local[0]), int(local[-1]) + 1
            with self._as_series(k):
                b = self.shards[k].events(lo, hi)
            if local.size != hi - lo:
                b = _take(b, local - lo)
            dest = np.repeat(offs[pos] - b.offsets[:-1], b.counts) + np.arange(b.n_events)
            idx[dest] = b.indices
            if sub is not None:
                sub[dest] = b.subpixel
        el = None if self._electrons is None else self._electrons[s:e].copy()
        return EventBatch(offs, idx, sub, self.frame_shape, electrons=el, validate=False)

    def frames(
        self,
        start: int,
        stop: int,
        *,
        roi: Sequence[int] | None = None,
        dtype: np.dtype | type = np.uint16,
    ) -> np.ndarray:
        """Dense count frames ``(n, h, w)`` of frames ``start:stop`` (see :meth:`Store.frames`)."""
        s, e = self._window(start, stop, empty_ok=False)
        r0, r1, c0, c1 = self._roi(roi)
        out = np.zeros((e - s, r1 - r0, c1 - c0), dtype=dtype)
        for k, pos, local in self._parts(np.arange(s, e)):
            lo, hi = int(local[0]), int(local[-1]) + 1
            with self._as_series(k):
                block = self.shards[k].frames(lo, hi, roi=(r0, r1, c0, c1), dtype=dtype)
            out[pos] = block[local - lo]
        return out

    def sum(
        self,
        start: int | None = None,
        stop: int | None = None,
        *,
        select: Sequence[int] | np.ndarray | None = None,
        roi: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Summed counts image (uint32) over a window or a selection (see :meth:`Store.sum`)."""
        r0, r1, c0, c1 = self._roi(roi)
        sel = self._selection(start, stop, select)
        total = np.zeros((r1 - r0, c1 - c0), np.uint32)
        for k, _pos, local in self._parts(sel):
            with self._as_series(k):
                total += self.shards[k].sum(select=local, roi=(r0, r1, c0, c1))
        return total
