"""Analysis of stores on Dask: lazy dense frames and windowed reductions on a cluster.

Both functions send only the store's *path* to the workers: each worker opens
the file (or the series directory of a sharded store) itself, reads the HDF5
chunks it needs and returns what the task computes. Dense frames are never
built on the client and shipped. The path must therefore be readable at the
same name on every worker (a shared filesystem on a multi-host cluster).

``dask`` (and ``distributed`` for a cluster) are imported only when these are
called: install the ``streamstore[dask]`` extra.

Use them through the store::

    store = streamstore.open("run.h5")
    frames = store.to_dask(chunk_frames=64)        # dask.array (n, h, w)
    image = frames.sum(axis=0).compute()

    from streamstore.analysis.distributed import window_sum
    with distributed.Client(cluster) as client:
        image = store.map_windows(window_sum, 1000, client, combine=operator.add)
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from streamstore.errors import UserError

__all__ = ["to_dask", "map_windows", "window_sum", "window_dose", "open_cached"]

_CACHE_SIZE = 8
_cache: OrderedDict[tuple[str, int], Any] = OrderedDict()
_cache_lock = threading.Lock()


def open_cached(path: str | os.PathLike) -> Any:
    """Open a store once per worker process and keep it (a small LRU of open stores).

    A store is keyed by path and modification time, so a file that changed on
    disk (a series still being written) is opened afresh.
    """
    import streamstore

    p = os.fspath(path)
    try:
        mtime = os.stat(p).st_mtime_ns
    except OSError:
        mtime = -1
    key = (p, mtime)
    with _cache_lock:
        store = _cache.get(key)
        if store is not None:
            _cache.move_to_end(key)
            return store
        store = streamstore.open(p)
        _cache[key] = store
        while len(_cache) > _CACHE_SIZE:
            _, old = _cache.popitem(last=False)
            old.close()
        return store


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class _FrameSource:
    """What ``dask.array.from_array`` slices: reads dense frames from the file on access.

    Picklable (it carries the path, not the data), so every block is read in
    the worker that computes it.
    """

    def __init__(self, path: str, n: int, shape: tuple[int, int], roi: Any, dtype: Any) -> None:
        self.path = path
        self.roi = roi
        self.dtype = np.dtype(dtype)
        self.shape = (n, shape[0], shape[1])
        self.ndim = 3

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        k0 = key[0]
        if not isinstance(k0, slice) or k0.step not in (None, 1):
            # dask asks for contiguous frame ranges; anything else: read and index
            return self[:][key]
        a, b, _ = k0.indices(self.shape[0])
        store = open_cached(self.path)
        block = store.frames(a, max(a, b), roi=self.roi, dtype=self.dtype)
        return block[(slice(None),) + key[1:]]


def to_dask(
    store: Any,
    *,
    chunk_frames: int = 64,
    roi: tuple[int, int, int, int] | None = None,
    dtype: Any = np.uint16,
) -> Any:
    """A lazy dask array ``(n_frames, h, w)`` of the store's dense count frames.

    Parameters
    ----------
    store : Store or ShardedStore
        An open store; only its path, frame count and shape go into the graph.
    chunk_frames : int, default 64
        Frames per dask chunk (a chunk is ``chunk_frames x h x w`` of ``dtype``
        in the worker's memory).
    roi : (row0, row1, col0, col1), optional
        Crop every frame.
    dtype : numpy dtype, default uint16
        Type of the dense frames.

    Returns
    -------
    dask.array.Array
        Chunked along frames only; computing a chunk opens the file in the
        worker and calls ``store.frames(a, b, roi=roi, dtype=dtype)``.
    """
    import dask.array as da
    from dask.base import tokenize

    chunk_frames = _check_int("chunk_frames", chunk_frames, 1)
    r0, r1, c0, c1 = store._roi(roi)
    roi_t = (r0, r1, c0, c1)
    src = _FrameSource(os.fspath(store.path), store.n_frames, (r1 - r0, c1 - c0), roi_t, dtype)
    h, w = r1 - r0, c1 - c0
    token = tokenize(os.fspath(store.path), store.n_frames, roi_t, str(dtype))
    name = f"streamstore-frames-{token}"
    return da.from_array(
        src,
        chunks=(chunk_frames, h, w),
        name=name,
        lock=False,
        asarray=True,
        fancy=False,
        meta=np.empty((0, 0, 0), dtype=src.dtype),
    )


def _run_window(path: str, func: Callable[..., Any], start: int, stop: int) -> Any:
    return func(open_cached(path), start, stop)


def window_sum(store: Any, start: int, stop: int) -> np.ndarray:
    """Summed image (uint64) of frames ``start:stop``: a ready-made ``map_windows`` reduction."""
    return store.sum(start, stop).astype(np.uint64)


def window_dose(store: Any, start: int, stop: int) -> np.ndarray:
    """Events per frame of ``start:stop``, counted from the events read in the worker."""
    return store.events(start, stop).counts.astype(np.int64)


def map_windows(
    store: Any,
    func: Callable[[Any, int, int], Any],
    window: int,
    client: Any = None,
    *,
    start: int | None = None,
    stop: int | None = None,
    combine: Callable[[Any, Any], Any] | None = None,
) -> Any:
    """Apply ``func(store, start, stop)`` to consecutive windows of frames, on a cluster.

    Parameters
    ----------
    store : Store or ShardedStore
        An open store; the workers open its path themselves.
    func : callable
        ``func(store, a, b)`` gets the store as opened in the worker and a frame
        window ``a:b``; it reads what it needs (``store.sum(a, b)``,
        ``store.events(a, b)``, ...) and returns a (small) result. It must be
        picklable by cloudpickle.
    window : int
        Frames per window (the last window may be shorter).
    client : distributed.Client, optional
        The cluster to run on. None: the current default client if there is
        one, else dask's local threaded scheduler on this store.
    start, stop : int, optional
        Frame range to cover (default: the whole series).
    combine : callable, optional
        ``combine(x, y)``: reduce the window results pairwise (a tree, on the
        cluster) and return the single result instead of the list.

    Returns
    -------
    list or object
        The window results in frame order, or their combination.
    """
    window = _check_int("window", window, 1)
    s, e = store._window(start, stop)
    bounds = [(a, min(a + window, e)) for a in range(s, e, window)]
    if client is None:
        try:
            from distributed import default_client

            client = default_client()
        except (ImportError, ValueError):
            client = None
    if client is None:
        import dask

        tasks = [dask.delayed(func)(store, a, b) for a, b in bounds]
        results = list(dask.compute(*tasks, scheduler="threads"))
        if combine is None or not results:
            return results
        total = results[0]
        for r in results[1:]:
            total = combine(total, r)
        return total
    path = os.fspath(store.path)
    futures = [client.submit(_run_window, path, func, a, b, pure=False) for a, b in bounds]
    if combine is None:
        return client.gather(futures)
    if not futures:
        return []
    while len(futures) > 1:  # pairwise tree on the cluster: only the result travels back
        pairs = zip(futures[0::2], futures[1::2], strict=False)
        nxt = [client.submit(combine, x, y, pure=False) for x, y in pairs]
        if len(futures) % 2:
            nxt.append(futures[-1])
        futures = nxt
    return futures[0].result()
