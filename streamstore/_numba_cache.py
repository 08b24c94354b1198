"""numba's on-disk cache, safe for several processes compiling one function at once.

numba keeps one index file per function, mapping each compiled signature to a
numbered data file. Saving a new signature reads the index, picks the first
free number, writes the index back and then the data. Two processes that
compile *different* signatures of one function at the same moment (the
start-up's compile pool, several ingest workers after an install, test
workers) can both pick the same number: the index then names one signature's
machine code for the other, which a later process would load and call with the
wrong argument types. :func:`serialize_saves` holds an exclusive file lock
around each save, so the read-pick-write sequence of one process never
interleaves with another's. Loading is unaffected: numba replaces both files
atomically.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: saves stay as numba makes them
    fcntl = None  # type: ignore[assignment]

__all__ = ["cached_overloads", "compiling_alone", "serialize_saves"]


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def serialize_saves(*dispatchers: Any) -> None:
    """Make each dispatcher's cache saves exclusive across processes.

    Parameters
    ----------
    *dispatchers : numba dispatchers
        Functions compiled with ``cache=True``. Others (and platforms without
        ``fcntl``, or a numba whose cache is laid out differently) are left as
        they are.
    """
    if fcntl is None:
        return
    for d in dispatchers:
        cache_file = getattr(getattr(d, "_cache", None), "_cache_file", None)
        save = getattr(cache_file, "save", None)
        index = getattr(cache_file, "_index_path", None)
        if save is None or index is None or getattr(save, "_serialized", False):
            continue

        def locked_save(key: Any, data: Any, _save: Any = save, _lock: str = index + ".lock"):
            os.makedirs(os.path.dirname(_lock), exist_ok=True)
            with _locked(_lock):
                return _save(key, data)

        locked_save._serialized = True  # type: ignore[attr-defined]
        cache_file.save = locked_save


def cached_overloads(dispatcher: Any) -> int | None:
    """How many compiled signatures of ``dispatcher`` numba's on-disk cache holds
    for its current source (None where that cannot be told)."""
    cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    try:
        return len(cache_file._load_index())  # type: ignore[union-attr]
    except Exception:  # a numba laid out differently: unknown
        return None


@contextlib.contextmanager
def compiling_alone(dispatcher: Any) -> Iterator[None]:
    """Hold a host-wide lock beside ``dispatcher``'s cache while compiling into it:
    daemons started together after an install (``ingest --workers N``) then compile
    once, in the first, and the others load what it wrote. One lock per kernel:
    processes compiling different kernels of one folder do not wait for each other."""
    path = getattr(getattr(dispatcher, "_cache", None), "_cache_path", None)
    if fcntl is None or path is None:
        yield
        return
    os.makedirs(path, exist_ok=True)
    name = getattr(getattr(dispatcher, "py_func", None), "__name__", "kernel")
    with _locked(os.path.join(path, f"streamstore-compile-{name}.lock")):
        yield
