"""Export to and import from stempy's sparse HDF5 format (version 3).

stempy (the 4D Camera counting library) stores counted frames as::

    /                          attribute version = 3
    /electron_events/frames    1-d vlen uint32, one entry per frame: flat pixel
                               indices; attributes Nx, Ny (see below)
    /electron_events/scan_positions  int64, one per scan position;
                               attributes Nx = scan columns, Ny = scan rows
    /metadata                  groups and attributes (free metadata)

Axis names are a known trap in stempy's format. ``SparseArray.from_hdf5``
takes ``frame_shape = (frames.attrs["Nx"], frames.attrs["Ny"])`` and unravels
a flat index ``i`` as ``(i // frame_shape[1], i % frame_shape[1])``. So to
keep ``index = row * W + col`` meaning the same pixel, the export writes
``Nx = H`` (rows) and ``Ny = W`` (columns) and the import reads them back that
way. The scan attributes follow stempy's own writer: ``Nx`` is the number of
scan columns, ``Ny`` the number of rows, and ``from_hdf5`` returns
``scan_shape = (Ny, Nx)``. A movie exports with ``scan_shape = (1, n_frames)``
unless you give one. A store with a scan geometry (``store.scan``) exports its
scan: the frames in position order, ``frames_per_position`` entries per
position, flyback positions dropped; a position short of frames (lost ones)
gets empty entries, counted in the ``metadata`` attribute ``empty_entries``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamstore.events import EventBatch

__all__ = ["StempyData", "export_stempy", "import_stempy"]

STEMPY_VERSION = 3


@dataclass
class StempyData:
    """Contents of a stempy sparse HDF5 file.

    Attributes
    ----------
    events : EventBatch
        One frame per entry of ``electron_events/frames``, in file order.
    scan_shape : tuple of int
        ``(rows, cols)`` of the scan, as ``SparseArray.from_hdf5`` reports it.
    scan_positions : ndarray of int64
        Scan position of each stored entry (``electron_events/scan_positions``).
    frames_per_scan : int
        Frames per scan position (``n_frames // prod(scan_shape)``).
    version : int
        The file's stempy format version.
    metadata : dict
        Attributes of the ``metadata`` group (nested groups as dicts).
    """

    events: EventBatch
    scan_shape: tuple[int, int]
    scan_positions: np.ndarray
    frames_per_scan: int
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)


def _load_group(group: Any) -> dict[str, Any]:
    import h5py

    out: dict[str, Any] = {}
    for k, v in group.attrs.items():
        out[k] = v.item() if isinstance(v, np.generic) else v
    for k, v in group.items():
        if isinstance(v, h5py.Group):
            out[k] = _load_group(v)
    return out


def export_stempy(
    store_or_path: Any,
    out_path: str | os.PathLike,
    *,
    start: int | None = None,
    stop: int | None = None,
    scan_shape: tuple[int, int] | None = None,
) -> Path:
    """Write frames of a streamstore file as a stempy sparse HDF5 file (version 3).

    Parameters
    ----------
    store_or_path : Store or str or Path
        An open :class:`streamstore.Store` or the path of a streamstore file.
    out_path : str or Path
        File to create; it must not exist (never overwritten).
    start, stop : int, optional
        Frame window to export (default: all frames).
    scan_shape : (rows, cols), optional
        Scan shape whose size divides the number of exported frames (frames
        per scan position = n / (rows * cols)). Default: the store's scan
        geometry if it has one (then the window limits which frames fill it),
        else ``(1, n)``.

    Returns
    -------
    Path
        ``out_path``.

    Raises
    ------
    FileExistsError
        If ``out_path`` exists.
    UserError
        On a bad window or a scan shape that does not fit the frames.
    """
    import h5py

    from streamstore.errors import UserError
    from streamstore.store.reader import Store

    out = Path(out_path)
    own = not isinstance(store_or_path, Store)
    store = Store(store_or_path) if own else store_or_path
    try:
        s = 0 if start is None else start
        e = store.n_frames if stop is None else stop
        ev = store.events(s, e)
        n = ev.n_frames
        empty_entries = 0
        if scan_shape is None and store.scan is not None:
            ev, scan_shape, empty_entries = _scan_order(store, ev, s, e)
            n = ev.n_frames
        elif scan_shape is None:
            scan_shape = (1, n)
        try:
            rows, cols = (int(v) for v in scan_shape)
        except (TypeError, ValueError):
            raise UserError(f"scan_shape must be (rows, cols), got {scan_shape!r}") from None
        if rows < 1 or cols < 1 or n % (rows * cols):
            raise UserError(
                f"scan_shape {(rows, cols)} does not divide the {n} exported frames "
                "into whole scan positions"
            )
        h, w = store.frame_shape
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(out, flags, 0o644)
        except FileExistsError:
            raise FileExistsError(f"{out} already exists; export never overwrites a file") from None
        os.close(fd)
        data = np.empty(n, dtype=object)
        for i in range(n):
            data[i] = ev.indices[ev.offsets[i] : ev.offsets[i + 1]]
        with h5py.File(out, "w") as f:
            f.attrs["version"] = STEMPY_VERSION
            g = f.create_group("electron_events")
            sp = g.create_dataset("scan_positions", data=np.arange(rows * cols, dtype=np.int64))
            sp.attrs["Nx"] = cols
            sp.attrs["Ny"] = rows
            frames = g.create_dataset("frames", (n,), dtype=h5py.vlen_dtype(np.dtype(np.uint32)))
            frames.attrs["Nx"] = h  # stempy: frame_shape = (Nx, Ny), index = r * Ny + c
            frames.attrs["Ny"] = w
            if n:
                frames[...] = data
            md = f.create_group("metadata")
            md.attrs["source"] = str(store.path.name)
            md.attrs["source_format"] = "streamstore.events"
            md.attrs["frame_time_s"] = store.frame_time_s
            if store.pixel_size_A is not None:
                md.attrs["pixel_size_A"] = store.pixel_size_A
            md.attrs["first_frame_index"] = s
            md.attrs["empty_entries"] = empty_entries
            if n:
                md.attrs["first_frame_id"] = int(store.frame_ids[s])
                md.attrs["last_frame_id"] = int(store.frame_ids[e - 1])
            # the dose of the exported frames, and which dose it is (corrected or counted)
            md.attrs["dose_electrons"] = float(np.sum(store.dose("events")[s:e]))
            md.attrs["dose"] = str(getattr(store, "dose_label", "dose: counted events"))
    finally:
        if own:
            store.close()
    return out


def _scan_order(store: Any, ev: EventBatch, s: int, e: int) -> tuple[EventBatch, Any, int]:
    """Frames ``s:e`` of a scanned store as stempy entries: position order, F per position."""
    from streamstore.analysis.stem import _selection

    geom = store.scan
    sel, local, shape = _selection(store, None, s, e)
    fpp = geom.frames_per_position
    n_pos = shape[0] * shape[1]
    # slot of each kept frame: its position's block, then its rank within the position
    order = np.argsort(local, kind="stable")
    have = np.bincount(local, minlength=n_pos)
    first = np.zeros(n_pos, np.int64)
    np.cumsum(have[:-1], out=first[1:])
    rank = np.empty(local.size, np.int64)
    rank[order] = np.arange(local.size) - first[local[order]]
    slot = local * fpp + rank
    counts = np.zeros(n_pos * fpp, np.int64)
    rel = sel - s
    counts[slot] = ev.counts[rel]
    offs = np.zeros(n_pos * fpp + 1, np.int64)
    np.cumsum(counts, out=offs[1:])
    idx = np.empty(int(offs[-1]), np.uint32)
    for k, f in zip(slot.tolist(), rel.tolist(), strict=True):
        idx[offs[k] : offs[k + 1]] = ev.indices[ev.offsets[f] : ev.offsets[f + 1]]
    empty = n_pos * fpp - int(local.size)
    return EventBatch(offs, idx, None, ev.frame_shape, validate=False), shape, empty


def import_stempy(path: str | os.PathLike) -> StempyData:
    """Read a stempy sparse HDF5 file (format versions 1-3).

    Parameters
    ----------
    path : str or Path
        The stempy file.

    Returns
    -------
    StempyData
        The events (indices sorted within each frame) and the scan metadata.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    FormatError
        If the file lacks stempy's datasets or attributes.
    """
    import h5py

    from streamstore.errors import FormatError

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file: {p}")
    with h5py.File(p, "r") as f:
        try:
            frames = f["electron_events/frames"]
            sp = f["electron_events/scan_positions"]
            frame_shape = (int(frames.attrs["Nx"]), int(frames.attrs["Ny"]))
            scan_shape = (int(sp.attrs["Ny"]), int(sp.attrs["Nx"]))
        except KeyError as exc:
            raise FormatError(f"{p} is not a stempy sparse file: missing {exc}") from None
        version = int(f.attrs.get("version", 1))
        if version not in (1, 2, 3):
            raise FormatError(f"{p} has stempy version {version}; streamstore reads 1-3")
        data = frames[()]
        scan_positions = np.asarray(sp[()], dtype=np.int64)
        metadata = _load_group(f["metadata"]) if "metadata" in f else {}
    n = len(data)
    counts = np.fromiter((len(a) for a in data), dtype=np.int64, count=n)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    indices = np.concatenate(list(data)).astype(np.uint32) if n else np.zeros(0, np.uint32)
    # stempy does not promise ascending indices within a frame: sort per frame
    frame_of = np.repeat(np.arange(n, dtype=np.int64), counts)
    order = np.lexsort((indices, frame_of))
    indices = indices[order]
    events = EventBatch(offsets, indices, None, frame_shape)
    n_pos = scan_shape[0] * scan_shape[1]
    return StempyData(
        events=events,
        scan_shape=scan_shape,
        scan_positions=scan_positions,
        frames_per_scan=n // n_pos if n_pos else 0,
        version=version,
        metadata=metadata,
    )
