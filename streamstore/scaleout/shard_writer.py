"""A worker's share of a scaled-out series: frame order, shard paths, the manifest.

Each ingest worker of a scaled-out stream (``--worker-id K``) writes its
frames to ``DIR/<series_id>/shard-<K>.h5`` and, when it closes the series,
adds an entry to ``DIR/<series_id>/manifest.json`` (read back as one series
by :mod:`streamstore.store.shards`). A shard never declares frame ids missing (the
other workers hold them); the combined store does, from the ids the sender
announced or ended with.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "ShardTracker",
    "shard_paths",
    "record_shard",
    "OrphanRecord",
    "MANIFEST_NAME",
    "SHARD_PATTERN",
    "ORPHANS_NAME",
    "ORPHANS_FORMAT",
    "ORPHANS_VERSION",
]

#: Name of the series manifest inside a series directory.
MANIFEST_NAME = "manifest.json"
#: Glob of shard files inside a series directory.
SHARD_PATTERN = "shard-*.h5"
#: Record, in the output directory, of rejected messages that no series manifest holds.
ORPHANS_NAME = "orphans.json"
ORPHANS_FORMAT = "streamstore.orphans"
ORPHANS_VERSION = 1
# distinct series ids named per record; the rest are summed under one key
_MAX_SERIES_IDS = 64


class ShardTracker:
    """Frame-id bookkeeping of one worker's share of a series.

    The interface of :class:`streamstore.ingest.series.FrameTracker`, but a
    gap in the ids is normal (the other workers got those frames), so nothing
    is ever declared missing here. Frames are released in ascending id order:
    a frame is held while a lower id may still come, that is until an id at
    least ``window`` higher arrived, more than ``window`` frames are held, or
    it was held for ``max_hold_s`` (:meth:`release_older`, from the daemon's
    housekeeping, so frames reach the disk at low rates too). An id seen
    before is a duplicate; an id below one already released is *late* (a
    shard is written in ascending order).
    """

    def __init__(self, window: int = 64) -> None:
        from streamstore.ingest.series import Offer

        if window < 0:
            raise ValueError(f"reorder window must be >= 0 frames, got {window}")
        self._offer = Offer
        self.window = int(window)
        self._held: dict[int, Any] = {}
        self._since: dict[int, float] = {}
        self._seen: set[int] = set()
        self.last_released = -1
        self.received = 0
        self.released = 0
        self.duplicate = 0
        self.late = 0
        self.max_id = -1
        self.next_id = 0  # compatibility: lowest id that may still be stored

    @property
    def n_held(self) -> int:
        return len(self._held)

    @property
    def n_missing(self) -> int:
        return 0

    @property
    def missing_ids(self) -> list[int]:
        return []

    def held_items(self) -> list[Any]:
        return list(self._held.values())

    def offer(self, frame_id: int, item: Any) -> Any:
        if frame_id < 0:
            raise ValueError(f"frame_id must be >= 0, got {frame_id}")
        self.received += 1
        if frame_id in self._seen:
            self.duplicate += 1
            return self._offer("duplicate")
        if frame_id <= self.last_released:
            self.late += 1
            return self._offer("late")
        self._seen.add(frame_id)
        self.max_id = max(self.max_id, frame_id)
        self._held[frame_id] = item
        self._since[frame_id] = time.monotonic()
        out = self._offer("accepted")
        while self._held and (
            len(self._held) > self.window or min(self._held) <= self.max_id - self.window
        ):
            self._release_lowest(out)
        return out

    def release_older(self, max_hold_s: float) -> Any:
        """Release (in id order) every frame up to the last one held longer than ``max_hold_s``."""
        out = self._offer("accepted")
        if self._held:
            cutoff = time.monotonic() - max_hold_s
            old = [f for f, t in self._since.items() if t <= cutoff]
            if old:
                last = max(old)
                while self._held and min(self._held) <= last:
                    self._release_lowest(out)
        return out

    def release_lowest(self) -> Any:
        out = self._offer("accepted")
        if self._held:
            self._release_lowest(out)
        return out

    def finish(self, n_expected: int | None = None) -> Any:
        out = self._offer("accepted")
        while self._held:
            self._release_lowest(out)
        return out

    def _release_lowest(self, out: Any) -> None:
        low = min(self._held)
        out.ready.append((low, self._held.pop(low)))
        del self._since[low]
        self.released += 1
        self.last_released = low
        self.next_id = low + 1


# -------------------------------------------------------------------- shards
def shard_paths(worker_id: int) -> Callable[[str | os.PathLike, str], Iterator[Path]]:
    """Candidate paths of worker ``worker_id``'s shard of a series.

    ``DIR/<series_id>/shard-<K>.h5``; if that exists (an earlier run of the
    same series id), ``DIR/<series_id>-1/shard-<K>.h5``, ``-2``, ... The
    workers choose independently, so runs with the same set of workers land
    in the same directory.
    """
    from streamstore.ingest.safety import candidate_paths

    def paths(out_dir: str | os.PathLike, series_id: str) -> Iterator[Path]:
        for p in candidate_paths(out_dir, series_id):
            series_dir = p.with_suffix("")
            yield series_dir / f"shard-{worker_id}.h5"

    return paths


def _locked_update(path: Path, update: Callable[[dict[str, Any]], None]) -> None:
    """Read-modify-write a JSON file under an exclusive lock, replaced atomically."""
    import fcntl

    lock = path.with_name(f".{path.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            data = {}
        update(data)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    finally:
        os.close(fd)  # releases the lock


def record_shard(series: Any, *, worker_id: int, n_workers: int | None) -> Path | None:
    """Add a closed shard to its series' manifest; return the manifest path.

    Parameters
    ----------
    series : SeriesInfo
        A closed data series (``path`` set by the write stage).
    worker_id : int
    n_workers : int, optional
        Workers the series was dealt over, when known.

    Notes
    -----
    A broker (:mod:`streamstore.scaleout.broker`) adds ``workers`` and
    ``block_frames`` to the ``start`` and a ``broker`` object to the ``end``
    (images it rejected or could not deliver, workers it lost); the manifest
    keeps them as ``n_workers``, ``block_frames`` and ``broker``.
    """
    if series.path is None or series.kind != "data":
        return None
    manifest = Path(series.path).parent / MANIFEST_NAME
    start = series.start
    entry = {
        "worker_id": int(worker_id),
        "file": Path(series.path).name,
        "frames_stored": int(series.stored),
        "events": int(series.events),
        "complete": bool(series.complete),
        "frames_expected": getattr(series, "n_expected", None),
        "calibration_source": series.calibration_source,
        "closed_unix_s": round(time.time(), 3),
    }

    def update(data: dict[str, Any]) -> None:
        from streamstore.store.shards import MANIFEST_FORMAT, MANIFEST_VERSION

        data.setdefault("format", MANIFEST_FORMAT)
        data.setdefault("format_version", MANIFEST_VERSION)
        data["series_id"] = series.series_id
        data.setdefault("frame_shape", list(start.frame_shape))
        data.setdefault("frames_announced", getattr(start, "n_frames", None))
        extra = getattr(start, "extra", None) or {}
        told = extra.get("workers")  # the broker's count
        block = extra.get("block_frames")
        if isinstance(block, int) and not isinstance(block, bool) and block > 0:
            data["block_frames"] = block
        broker = (getattr(series, "end_extra", None) or {}).get("broker")
        if isinstance(broker, dict):  # every worker gets the same end: the last one stays
            data["broker"] = broker
        if isinstance(told, int) and not isinstance(told, bool) and told > 0:
            data["n_workers"] = told  # the workers the series was dealt over, from its start
        elif isinstance(n_workers, int) and not isinstance(n_workers, bool) and n_workers > 0:
            data["n_workers"] = max(n_workers, int(data.get("n_workers") or 0))
        shards = [s for s in data.get("shards", []) if s.get("file") != entry["file"]]
        shards.append(entry)
        data["shards"] = sorted(shards, key=lambda s: (s["worker_id"], s["file"]))

    _locked_update(manifest, update)
    return manifest


# -------------------------------------------------------------------- orphans
class OrphanRecord:
    """One process's rejected messages that no series manifest holds: ``DIR/orphans.json``.

    An image whose series has no ``start`` (or arrives after its series
    closed, or after the broker's last series) belongs to no series
    directory, so the process that rejected it (a broker, or a worker fed by
    a multi-stream camera) records it here. The file holds one entry per
    process (``role``, ``worker_id``, ``host``, ``pid``, ``started_unix_s``)
    with its cumulative counts; several processes share the file under an
    exclusive ``flock``, as they share a series manifest.

    Parameters
    ----------
    out_dir : str or os.PathLike
        The output directory (the workers' ``--out``).
    role : str
        ``"broker"`` or ``"worker"``.
    worker_id : int, optional
        The worker's id (``--worker-id``).
    """

    def __init__(self, out_dir: str | os.PathLike, role: str, worker_id: int | None = None) -> None:
        self.path = Path(out_dir) / ORPHANS_NAME
        self.role = role
        self.worker_id = worker_id
        self.by_reason: Counter[str] = Counter()
        self.by_series: Counter[str] = Counter()
        self.started = round(time.time(), 3)
        self._written = 0
        self._last_write = 0.0

    @property
    def total(self) -> int:
        """Messages counted so far."""
        return int(sum(self.by_reason.values()))

    @property
    def pending(self) -> bool:
        """True when counts were added since the last :meth:`write`."""
        return self.total != self._written

    def add(self, reason: str, series_id: str | None = None, n: int = 1) -> None:
        """Count ``n`` rejected messages (of series ``series_id``, when it is known)."""
        self.by_reason[reason] += n
        if series_id is not None:
            key = str(series_id)
            if key not in self.by_series and len(self.by_series) >= _MAX_SERIES_IDS:
                key = "(other series)"
            self.by_series[key] += n

    def write(self) -> Path | None:
        """Write this process's entry (replacing its earlier one); None if nothing was counted.

        Raises
        ------
        OSError
            If the directory cannot be written.
        """
        if not self.total:
            return None
        self._last_write = time.monotonic()  # a failed write is retried after the interval too
        entry = {
            "role": self.role,
            "worker_id": self.worker_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_unix_s": self.started,
            "updated_unix_s": round(time.time(), 3),
            "rejected": self.total,
            "rejected_by_reason": dict(sorted(self.by_reason.items())),
            "series_ids": dict(sorted(self.by_series.items())),
        }
        key = (entry["role"], entry["worker_id"], entry["host"], entry["pid"], self.started)

        def update(data: dict[str, Any]) -> None:
            data.setdefault("format", ORPHANS_FORMAT)
            data.setdefault("format_version", ORPHANS_VERSION)
            records = [
                r
                for r in data.get("records", [])
                if (r.get("role"), r.get("worker_id"), r.get("host"), r.get("pid"),
                    r.get("started_unix_s")) != key
            ]  # fmt: skip
            records.append(entry)
            data["records"] = records
            data["rejected"] = int(sum(int(r.get("rejected") or 0) for r in records))

        self.path.parent.mkdir(parents=True, exist_ok=True)
        _locked_update(self.path, update)
        self._written = entry["rejected"]
        return self.path

    def write_if_due(self, interval_s: float) -> Path | None:
        """:meth:`write` if counts are pending and the last write is ``interval_s`` old."""
        if self.pending and time.monotonic() - self._last_write >= interval_s:
            return self.write()
        return None
