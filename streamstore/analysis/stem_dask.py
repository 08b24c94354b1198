"""4D-STEM analyses on a dask cluster: reductions in the workers, or a lazy 4-D array.

:func:`map_scan` splits a scan analysis of :mod:`streamstore.analysis.stem` into
windows of stored frames (:func:`streamstore.analysis.distributed.map_windows`): each
worker opens the file, computes its window's additive share from the events,
and the shares are added on the cluster; only images travel.
:func:`scan_to_dask` is the scan as a lazy ``(rows, cols, H, W)`` dask array
for tools that want one (densified a chunk at a time, in the worker).

``dask`` (and ``distributed`` for a cluster) are imported only when these run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamstore.analysis.stem import (
    _FALLBACK_FRAMES,
    _center,
    _finish_com,
    _geometry,
    _moments,
    _pattern_center,
    _radial_edges,
    _selection,
    diffraction_sum,
    radial_profile,
    virtual_image,
)
from streamstore.errors import UserError
from streamstore.scan import ScanGeometry

__all__ = ["map_scan", "scan_to_dask"]

_ANALYSES = ("virtual_image", "center_of_mass", "diffraction_sum", "radial_profile")


def _window_part(
    store: Any, start: int, stop: int, *, name: str, geom: ScanGeometry, params: dict
) -> Any:
    """One frame window's additive share of an analysis (run in a dask worker)."""
    view = store.with_scan(
        geom.scan_shape, geom.frames_per_position, geom.flyback, first_frame_id=geom.first_frame_id
    )
    if name == "center_of_mass":
        return _moments(view, params.get("mask"), params.get("scan_roi"), start, stop)[0]
    if name == "radial_profile":
        return radial_profile(view, start=start, stop=stop, **params)[0]
    if name == "virtual_image":
        return virtual_image(view, start=start, stop=stop, **params)
    return diffraction_sum(view, start=start, stop=stop, **params).astype(np.uint64)


def map_scan(store: Any, name: str, window: int = 4096, client: Any = None, **params: Any) -> Any:
    """Run a scan analysis on a dask cluster, one task per window of stored frames.

    Each task opens the file in its worker, computes its window's share, and the
    shares are added on the cluster (:func:`streamstore.analysis.distributed.map_windows`);
    only images travel. The result equals the store method of the same name.

    Parameters
    ----------
    store : Store
        A store with a scan geometry (from the file or :meth:`~ScanMethods.with_scan`).
    name : {"virtual_image", "center_of_mass", "diffraction_sum", "radial_profile"}
        The analysis.
    window : int, default 4096
        Stored frames per task.
    client : distributed.Client, optional
        The cluster; None: the default client, else dask's local threads.
    **params
        The analysis' own arguments (``inner_radius``, ``mask``, ``scan_roi``, ...).
    """
    import functools
    import operator

    if name not in _ANALYSES:
        raise UserError(f"name must be one of {_ANALYSES}, got {name!r}")
    geom = _geometry(store)
    params = dict(params)
    if name in ("virtual_image", "radial_profile") and params.get("mask") is None:
        if params.get("center") is None:  # one centre for every window
            sel, _l, _s = _selection(store, params.get("scan_roi"), None, None)
            params["center"] = _pattern_center(store, sel)
    edges = None
    if name == "radial_profile":
        edges = _radial_edges(store.frame_shape, _center(params["center"]), params.get("bins"))
        params["bins"] = edges
    part = functools.partial(_window_part, name=name, geom=geom, params=params)
    total = store.map_windows(part, window, client, combine=operator.add)
    if name == "center_of_mass":
        _sel, _local, shape = _selection(store, params.get("scan_roi"), None, None)
        return _finish_com(total, shape)
    if name == "radial_profile":
        return total, edges
    if name == "diffraction_sum":
        return total.astype(np.uint32)
    return total


class _ScanSource:
    """What ``dask.array.from_array`` slices for :func:`scan_to_dask`: whole scan rows.

    Picklable (path and geometry only); a block is read in the worker that
    computes it, the frames of a position added together.
    """

    def __init__(self, path: str, geom: ScanGeometry, frame_shape: Any, dtype: Any) -> None:
        self.path = path
        self.geom = geom
        self.dtype = np.dtype(dtype)
        self.shape = (*geom.scan_shape, *frame_shape)
        self.ndim = 4

    def __getitem__(self, key: Any) -> np.ndarray:
        from streamstore.analysis.distributed import open_cached

        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (4 - len(key))
        r0, r1, _ = key[0].indices(self.shape[0]) if isinstance(key[0], slice) else (0, 0, 0)
        if not isinstance(key[0], slice) or r1 <= r0:
            return self[:][key]
        g = self.geom
        store = open_cached(self.path).with_scan(
            g.scan_shape, g.frames_per_position, g.flyback, first_frame_id=g.first_frame_id
        )
        cols = self.shape[1]
        out = np.zeros((r1 - r0, cols, *self.shape[2:]), self.dtype)
        sel, local, _shape = _selection(store, (r0, r1, 0, cols), None, None)
        flat = out.reshape((r1 - r0) * cols, *self.shape[2:])
        for i in range(0, sel.size, _FALLBACK_FRAMES):
            part = sel[i : i + _FALLBACK_FRAMES]
            block = store.frames(int(part[0]), int(part[-1]) + 1, dtype=self.dtype)
            np.add.at(flat, local[i : i + part.size], block[part - part[0]])
        return out[(slice(None),) + key[1:]]


def scan_to_dask(store: Any, *, chunk_rows: int = 1, dtype: Any = np.uint16) -> Any:
    """A lazy dask array ``(rows, cols, H, W)`` of the scan, for dask-based 4D-STEM tools.

    Each chunk is ``chunk_rows`` whole scan rows, read in the worker that
    computes it (a position's frames added); nothing is densified before a
    chunk is computed. Reductions over it equal the store's own analyses, e.g.
    ``(arr * mask).sum(axis=(2, 3))`` is ``store.virtual_image(mask=mask)``.
    Needs ``streamstore[dask]``.
    """
    import os

    import dask.array as da
    from dask.base import tokenize

    from streamstore.analysis.distributed import _check_int

    chunk_rows = _check_int("chunk_rows", chunk_rows, 1)
    geom = _geometry(store)
    src = _ScanSource(os.fspath(store.path), geom, tuple(store.frame_shape), dtype)
    name = "streamstore-scan-" + tokenize(os.fspath(store.path), store.n_frames, geom, str(dtype))
    return da.from_array(
        src,
        chunks=(chunk_rows, src.shape[1], *src.shape[2:]),
        name=name,
        lock=False,
        asarray=True,
        fancy=False,
        meta=np.empty((0, 0, 0, 0), dtype=src.dtype),
    )
