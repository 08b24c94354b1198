"""``streamstore.open``: a path to the reader that fits it.

A ``.h5`` events file opens as a :class:`~streamstore.store.reader.Store`; a
series written by several ingest workers (its directory or its
``manifest.json``) as a :class:`~streamstore.store.shards.ShardedStore`. It
lives apart from both so that neither reader module imports the other's
subclass.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from streamstore.errors import UserError
from streamstore.store.reader import Store
from streamstore.store.shards import ShardedStore, is_series

__all__ = ["open"]


def open(path: str | os.PathLike, **kwargs: Any) -> Store:  # noqa: A001 - public API name
    """Open a streamstore events file for reading.

    Parameters
    ----------
    path : str or Path
        A ``.h5`` file written by :class:`streamstore.StoreWriter` (also while
        it is being written, or after its writer was killed: the file is then
        opened in SWMR mode).
        Or a series written by several ingest workers: its directory or its
        ``manifest.json``; that returns a :class:`streamstore.store.shards.ShardedStore`
        (a Store over all shards, ordered by frame id).
    **kwargs
        Passed to :class:`Store` (``nthreads``).

    Returns
    -------
    Store
    """
    p = Path(path)
    if p.is_dir() or p.suffix == ".json":
        if is_series(p):  # a series written by several ingest workers
            return ShardedStore(p, **kwargs)
    if p.is_dir():
        raise UserError(
            f"{p} is a directory but not a series (no manifest.json or shard-*.h5 in it); "
            "streamstore.open reads a .h5 events file or a series directory"
        )
    return Store(p, **kwargs)
