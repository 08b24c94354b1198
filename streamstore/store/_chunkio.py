"""Reading chunks of streamstore datasets with their integrity checked.

Every chunk read for events goes through :class:`ChunkReader`: it reads the
stored bytes (``read_direct_chunk``), checks the Fletcher-32 checksum when the
dataset carries one (:mod:`streamstore.store.checksum`), and only then lets blosc2
decode them. Per-frame datasets are read a chunk at a time through HDF5
(:func:`read_column`), which checks the same checksum itself. A chunk that
fails either step is reported with the dataset positions it covers, so the
reader can name the frames it holds and keep serving the others.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["BadChunk", "ChunkReader", "format_ranges", "read_column", "true_ranges"]


def _text(v: Any) -> Any:
    if isinstance(v, bytes | np.bytes_):
        return bytes(v).rstrip(b" \x00").decode()
    return v


class BadChunk(Exception):
    """A chunk that failed its checksum or did not decode (``lo:hi`` dataset positions)."""

    def __init__(self, lo: int, hi: int, reason: str) -> None:
        super().__init__(reason)
        self.lo, self.hi, self.reason = lo, hi, reason


# errors a damaged chunk raises on its way through h5py, the checksum and blosc2
_DECODE_ERRORS = (OSError, RuntimeError, ValueError, TypeError, KeyError, IndexError)
# a file being written rewrites its per-frame tail chunk in place: a read that
# races that write may see new bytes and an old checksum, so re-read before
# calling a chunk damaged
_SWMR_RETRIES = 3
_SWMR_RETRY_S = 0.05


def _why(exc: BaseException) -> str:
    from streamstore.store.checksum import ChecksumError

    if isinstance(exc, ChecksumError):
        return "checksum mismatch"
    if isinstance(exc, OSError) and "filter" in str(exc).lower():
        return "checksum mismatch or undecodable chunk (HDF5 filter failed)"
    return f"undecodable chunk ({type(exc).__name__}: {exc})"


class ChunkReader:
    """Reads and decodes whole chunks of one 1-d dataset, with a small LRU cache.

    A chunk is checked against its Fletcher-32 checksum (when the dataset has
    one) before blosc2 sees it; a chunk that fails, or does not decode, raises
    :class:`BadChunk`, or is zero-filled and reported when the caller collects
    damage (``read(..., bad=[])``) to name the frames it touches.
    """

    def __init__(self, ds: Any, nthreads: int, cache_chunks: int = 4, swmr: bool = False) -> None:
        from streamstore.store.checksum import has_checksum
        from streamstore.store.codec import Blosc2ChunkCodec

        self.ds = ds
        self.chunk = int(ds.chunks[0])
        self.dtype = ds.dtype
        self.checksum = has_checksum(ds)
        self.swmr = swmr
        cfg = ds.attrs.get("codec")
        self.codec = (
            Blosc2ChunkCodec.from_config(_text(cfg), nthreads=nthreads)
            if cfg is not None
            else Blosc2ChunkCodec(nthreads=nthreads)
        )
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_n = cache_chunks
        self._lock = threading.Lock()

    def _decode_into(self, ci: int, dst: np.ndarray) -> None:
        """Decode chunk ``ci`` into ``dst`` (one chunk long) or raise :class:`BadChunk`."""
        from streamstore.store.checksum import unseal

        c = self.chunk
        tries = _SWMR_RETRIES if self.swmr else 1
        for attempt in range(tries):
            try:
                with self._lock:
                    mask, buf = self.ds.id.read_direct_chunk((ci * c,))
                if mask != 0:
                    # a chunk written through the HDF5 filter pipeline with some filter
                    # skipped: let HDF5 decode (and check) it
                    data = self.ds[ci * c : (ci + 1) * c]
                    dst[: data.size] = data
                    dst[data.size :] = 0
                else:
                    if self.checksum:
                        buf = unseal(buf)
                    self.codec.decode(buf, (c,), self.dtype, out=dst)
                return
            except _DECODE_ERRORS as exc:
                why = _why(exc)
                if attempt + 1 < tries:
                    time.sleep(_SWMR_RETRY_S)
        raise BadChunk(ci * c, (ci + 1) * c, f"{self.ds.name} chunk {ci}: {why}")

    def chunk_data(self, ci: int) -> np.ndarray:
        with self._lock:
            hit = self._cache.get(ci)
            if hit is not None:
                self._cache.move_to_end(ci)
                return hit
        out = np.empty(self.chunk, self.dtype)
        self._decode_into(ci, out)
        with self._lock:
            self._cache[ci] = out
            while len(self._cache) > self._cache_n:
                self._cache.popitem(last=False)
        return out

    def read(
        self,
        a: int,
        b: int,
        out: np.ndarray | None = None,
        bad: list[BadChunk] | None = None,
    ) -> np.ndarray:
        """Elements ``a:b`` (whole chunks decoded, then sliced).

        With ``bad`` a list, a damaged chunk's elements are zeros and the
        :class:`BadChunk` is appended; else it raises.
        """
        if out is None:
            out = np.empty(max(b - a, 0), self.dtype)
        pos = a
        c = self.chunk
        while pos < b:
            ci = pos // c
            end = min(b, (ci + 1) * c)
            try:
                if pos == ci * c and end == pos + c and ci not in self._cache:
                    # a whole chunk: decompress straight into the output, no cache, no copy
                    self._decode_into(ci, out[pos - a : end - a])
                else:
                    out[pos - a : end - a] = self.chunk_data(ci)[pos - ci * c : end - ci * c]
            except BadChunk as exc:
                if bad is None:
                    raise
                out[pos - a : end - a] = 0
                bad.append(exc)
            pos = end
        return out

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()


def read_column(
    ds: Any, n: int, swmr: bool, dtype: Any = np.int64
) -> tuple[np.ndarray, list[tuple[int, int, str]]]:
    """Rows ``0:n`` of a 1-d dataset as ``dtype``, chunk by chunk through HDF5.

    HDF5 checks each chunk's Fletcher-32 (when present) and decodes it; a chunk
    that fails reads as zeros and is returned as ``(lo, hi, reason)`` rows.
    """
    c = int(ds.chunks[0]) if ds.chunks else max(n, 1)
    out = np.zeros(n, dtype)
    bad: list[tuple[int, int, str]] = []
    tries = _SWMR_RETRIES if swmr else 1
    for lo in range(0, n, c):
        hi = min(n, lo + c)
        for attempt in range(tries):
            try:
                out[lo:hi] = ds[lo:hi]
                break
            except _DECODE_ERRORS as exc:
                if attempt + 1 < tries:
                    time.sleep(_SWMR_RETRY_S)
                else:
                    bad.append((lo, hi, f"{ds.name} chunk {lo // c}: {_why(exc)}"))
    return out, bad


def true_ranges(mask: np.ndarray) -> list[tuple[int, int]]:
    """Half-open ``(start, stop)`` runs of True in a bool array."""
    m = np.concatenate([[False], np.asarray(mask, bool), [False]])
    edges = np.flatnonzero(m[1:] != m[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def format_ranges(ranges: Sequence[tuple[int, int]], limit: int = 8) -> str:
    """``"350:400, 800:810"`` (at most ``limit`` ranges, then how many more)."""
    text = ", ".join(f"{a}:{b}" for a, b in ranges[:limit])
    return text + (f" and {len(ranges) - limit} more ranges" if len(ranges) > limit else "")
