"""stempy sparse HDF5 (version 3): export, stempy's own loader, import back."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

import streamstore
from streamstore import EventBatch, StoreWriter
from streamstore.errors import FormatError, UserError

SHAPE = (24, 56)  # non-square on purpose (stempy's (W, H) trap)


@pytest.fixture
def store_path(tmp_path, rng):
    n = 9
    npix = SHAPE[0] * SHAPE[1]
    hit = rng.random((n, npix)) < 0.03
    hit[0, 0] = hit[1, npix - 1] = True
    hit[2] = False  # an empty frame
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(hit.sum(1), out=offsets[1:])
    batch = EventBatch(offsets, np.nonzero(hit)[1], None, SHAPE)
    path = tmp_path / "s.h5"
    with StoreWriter(path, SHAPE, frame_time_s=1e-3, pixel_size_A=1.1) as w:
        w.append(batch, np.arange(100, 100 + n), np.arange(n) * 1000)
    return path, batch


def test_round_trip_through_stempy(store_path, tmp_path):
    stempy_io = pytest.importorskip("stempy.io", reason="stempy is not installed")
    path, batch = store_path
    out = streamstore.export_stempy(path, tmp_path / "stempy.h5")
    sa = stempy_io.SparseArray.from_hdf5(str(out))
    assert tuple(int(v) for v in sa.frame_shape) == SHAPE
    assert tuple(int(v) for v in sa.scan_shape) == (1, 9)
    dense = sa.to_dense().reshape(9, *SHAPE)
    np.testing.assert_array_equal(dense, batch.to_dense())
    # per frame, the same flat indices
    for i in range(9):
        np.testing.assert_array_equal(np.sort(sa.data[i, 0]), batch.frame(i).indices)
    back = streamstore.import_stempy(out)
    assert back.events == batch
    assert back.scan_shape == (1, 9) and back.frames_per_scan == 1 and back.version == 3
    assert back.metadata["first_frame_id"] == 100 and back.metadata["pixel_size_A"] == 1.1


def test_export_window_scan_shape_and_stempy_written_file(store_path, tmp_path):
    stempy_io = pytest.importorskip("stempy.io", reason="stempy is not installed")
    path, batch = store_path
    with streamstore.open(path) as s:
        out = streamstore.export_stempy(s, tmp_path / "w.h5", start=1, stop=7, scan_shape=(2, 3))
    sa = stempy_io.SparseArray.from_hdf5(str(out))
    assert tuple(int(v) for v in sa.scan_shape) == (2, 3)
    np.testing.assert_array_equal(sa.to_dense().reshape(6, *SHAPE), batch.slice(1, 7).to_dense())
    # a file written by stempy itself imports with the same events
    sa2 = stempy_io.SparseArray(
        sa.data, scan_shape=tuple(sa.scan_shape), frame_shape=tuple(sa.frame_shape)
    )
    sa2.write_to_hdf5(str(tmp_path / "by_stempy.h5"))
    assert streamstore.import_stempy(tmp_path / "by_stempy.h5").events == batch.slice(1, 7)


def test_export_errors(store_path, tmp_path):
    path, _ = store_path
    target = tmp_path / "exists.h5"
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="never overwrites"):
        streamstore.export_stempy(path, target)
    assert target.read_bytes() == b"keep me"
    with pytest.raises(UserError, match=r"scan_shape \(2, 2\) does not divide the 9"):
        streamstore.export_stempy(path, tmp_path / "x.h5", scan_shape=(2, 2))
    with pytest.raises(UserError, match="frame window"):
        streamstore.export_stempy(path, tmp_path / "y.h5", start=3, stop=50)
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "y.h5").exists()


def test_import_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        streamstore.import_stempy(tmp_path / "nope.h5")
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f.create_group("electron_events")
    with pytest.raises(FormatError, match="not a stempy sparse file"):
        streamstore.import_stempy(tmp_path / "bad.h5")
