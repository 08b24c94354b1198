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
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["ShardTracker", "shard_paths", "record_shard", "MANIFEST_NAME", "SHARD_PATTERN"]

#: Name of the series manifest inside a series directory.
MANIFEST_NAME = "manifest.json"
#: Glob of shard files inside a series directory.
SHARD_PATTERN = "shard-*.h5"


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
