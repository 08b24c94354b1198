"""Export a scanned series to LiberTEM's ``raw_csr`` dataset (a TOML descriptor + three raw files).

LiberTEM (``libertem.io.dataset.raw_csr``) reads a sparse 4D-STEM dataset as
one CSR matrix: row ``p`` is scan position ``p`` (row-major over the scan),
column ``i`` the flat detector pixel ``row * W + col``. The export writes::

    NAME.toml           [params] filetype = "raw_csr", nav_shape, sig_shape
                        [raw_csr] the three file names and their dtypes
    NAME.indptr.raw     int64, n_positions + 1 (row pointers)
    NAME.indices.raw    int32 (int64 above 2**31 pixels), sorted within a row
    NAME.data.raw       counts: uint8 (uint16 / uint32 for many frames per position)

Each position's frames are added (``frames_per_position > 1`` gives counts above
1), flyback frames are left out, and a position short of frames (lost ones)
has what arrived: the same rule as :meth:`streamstore.Store.virtual_image`. A
store without a scan exports as ``nav_shape = (1, n_frames)``. Open it with
``libertem.api.Context().load("raw_csr", path="NAME.toml")``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["export_raw_csr"]

# stored frames per read: bounds the memory of the export
_BLOCK_FRAMES = 8192


def _create(path: Path) -> Any:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.fdopen(os.open(path, flags, 0o644), "wb")
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; export never overwrites a file") from None


def export_raw_csr(store_or_path: Any, out_path: str | os.PathLike) -> Path:
    """Write a store (a scan, or a movie as one scan row) as a LiberTEM ``raw_csr`` dataset.

    Parameters
    ----------
    store_or_path : Store or str or Path
        An open store or the path of a streamstore file.
    out_path : str or Path
        The TOML descriptor to create (``.toml`` is added if missing); the
        raw files go beside it as ``<stem>.indptr.raw``, ``<stem>.indices.raw``
        and ``<stem>.data.raw``. None of them may exist.

    Returns
    -------
    Path
        The descriptor.

    Raises
    ------
    FileExistsError
        If one of the output files exists.
    """
    import streamstore
    from streamstore.analysis.stem import _selection

    toml = Path(out_path)
    if toml.suffix != ".toml":
        toml = toml.with_name(toml.name + ".toml")
    own = isinstance(store_or_path, str | os.PathLike)
    store = streamstore.open(store_or_path) if own else store_or_path
    try:
        h, w = store.frame_shape
        npix = h * w
        if store.scan is not None:
            sel, local, nav = _selection(store, None, None, None)
            fpp = store.scan.frames_per_position
        else:
            sel = np.arange(store.n_frames, dtype=np.int64)
            local, nav, fpp = sel.copy(), (1, store.n_frames), 1
        n_pos = nav[0] * nav[1]
        idx_dt = np.dtype("<i4") if npix < 2**31 else np.dtype("<i8")
        data_dt = np.dtype("<u1") if fpp < 256 else np.dtype("<u2" if fpp < 65536 else "<u4")
        names = {k: f"{toml.stem}.{k}.raw" for k in ("indptr", "indices", "data")}
        paths = [toml.parent / n for n in names.values()]
        for p in [toml, *paths]:
            if p.exists() or p.is_symlink():
                raise FileExistsError(f"{p} already exists; export never overwrites a file")
        per_pos = np.zeros(n_pos, np.int64)
        with _create(paths[1]) as f_idx, _create(paths[2]) as f_dat:
            i = 0
            while i < sel.size:
                j = min(i + _BLOCK_FRAMES, sel.size)
                # end blocks at a position boundary so a position's frames merge once
                while j < sel.size and local[j] == local[j - 1]:
                    j += 1
                a, b = int(sel[i]), int(sel[j - 1]) + 1
                batch = store.events(a, b)
                rel = sel[i:j] - a
                counts = batch.counts[rel]
                starts = batch.offsets[:-1][rel]
                take = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(
                    int(counts.sum())
                )
                pos = np.repeat(local[i:j], counts)
                keys, n = np.unique(pos * npix + batch.indices[take], return_counts=True)
                np.add.at(per_pos, keys // npix, 1)
                f_idx.write((keys % npix).astype(idx_dt).tobytes())
                f_dat.write(n.astype(data_dt).tobytes())
                i = j
        indptr = np.zeros(n_pos + 1, np.int64)
        np.cumsum(per_pos, out=indptr[1:])
        with _create(paths[0]) as f_ptr:
            f_ptr.write(indptr.astype("<i8").tobytes())
        # the events are counts; what dose they stand for is a comment for people
        dose = float(np.sum(store.dose("events")[sel])) if sel.size else 0.0
        text = (
            f"# {getattr(store, 'dose_label', 'dose: counted events')}; "
            f"{dose:.6g} electrons in the exported frames\n"
            "[params]\n"
            'filetype = "raw_csr"\n'
            f"nav_shape = [{nav[0]}, {nav[1]}]\n"
            f"sig_shape = [{h}, {w}]\n\n"
            "[raw_csr]\n"
            f'indptr_file = "{names["indptr"]}"\n'
            'indptr_dtype = "<i8"\n'
            f'indices_file = "{names["indices"]}"\n'
            f'indices_dtype = "{idx_dt.str}"\n'
            f'data_file = "{names["data"]}"\n'
            f'data_dtype = "{data_dt.str}"\n'
        )
        with _create(toml) as f:
            f.write(text.encode())
    finally:
        if own:
            store.close()
    return toml
