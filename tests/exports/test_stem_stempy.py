"""Scan analyses against stempy's own functions on the stempy export of the same scan."""

from __future__ import annotations

import numpy as np
import pytest

import streamstore
from tests.analysis.test_stem import make_scan_store

stempy_image = pytest.importorskip("stempy.image")
stempy_io = pytest.importorskip("stempy.io")

# stempy's create_stem_images adds the mask value 0xFFFF per event in the detector
STEMPY_MASK_VALUE = 0xFFFF


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stempy")
    path, _dense, _ids = make_scan_store(
        tmp / "scan.h5", frame=(14, 14), scan=(4, 6), fpp=2, flyback=1, seed=3, drop=(5,)
    )
    out = streamstore.export_stempy(path, tmp / "scan_stempy.h5")
    return path, out


def test_export_carries_the_scan(exported):
    path, out = exported
    sa = stempy_io.SparseArray.from_hdf5(str(out))
    assert tuple(sa.scan_shape) == (4, 6)
    assert sa.data.shape == (24, 2)  # frames_per_position entries per position
    data = streamstore.import_stempy(out)
    assert data.metadata["empty_entries"] == 1  # the lost frame, not silently dropped
    with streamstore.open(path) as st:
        assert data.events.n_events == int(st.virtual_image(mask=np.ones((14, 14), bool)).sum())


def test_virtual_images_equal_stempy_create_stem_images(exported):
    path, out = exported
    sa = stempy_io.SparseArray.from_hdf5(str(out))
    with streamstore.open(path) as st:
        for inner, outer, center in [(0, 4, (6.0, 7.0)), (3, 7, (7.5, 6.25)), (5, 12, (6.0, 6.0))]:
            ours = st.virtual_image(inner, outer, center)
            # stempy takes the centre as (x, y) = (col, row)
            theirs = stempy_image.create_stem_images(sa, inner, outer, center=center[::-1])[0]
            assert theirs.shape == ours.shape
            assert np.all(theirs % STEMPY_MASK_VALUE == 0)
            np.testing.assert_array_equal(ours, theirs // STEMPY_MASK_VALUE)
            assert ours.sum() > 0


def test_center_of_mass_equals_stempy_com_sparse(exported):
    path, out = exported
    sa = stempy_io.SparseArray.from_hdf5(str(out))
    theirs = stempy_image.com_sparse(sa, replace_nans=False)
    with streamstore.open(path) as st:
        ours = st.center_of_mass()
    # stempy: index 0 is the column (x), index 1 the row (y); ours: 0 = row, 1 = col
    np.testing.assert_allclose(ours[0], theirs[1], rtol=1e-6)
    np.testing.assert_allclose(ours[1], theirs[0], rtol=1e-6)


def test_radial_profile_equals_stempy_radial_sum_sparse(exported):
    path, out = exported
    sa = stempy_io.SparseArray.from_hdf5(str(out))
    center = (6.5, 7.0)  # stempy unravels to (row, col) here: center[0] is the row
    theirs = stempy_image.radial_sum_sparse(sa, center)
    n_bins = theirs.shape[-1]
    with streamstore.open(path) as st:
        ours, _edges = st.radial_profile(center, bins=np.arange(n_bins + 1))
    np.testing.assert_array_equal(np.moveaxis(ours, 0, -1), theirs)


def test_non_square_frames_with_stempy_core(tmp_path):
    """stempy's Python wrapper passes (H, W) where its C++ wants (width, height); call the core."""
    from stempy import _image

    path, _d, _i = make_scan_store(tmp_path / "ns.h5", scan=(3, 5), fpp=1, flyback=0, seed=5)
    out = streamstore.export_stempy(path, tmp_path / "ns_stempy.h5")
    sa = stempy_io.SparseArray.from_hdf5(str(out))
    h, w = sa.frame_shape
    assert (h, w) == (11, 14)
    imgs = _image.create_stem_images(
        sa.data, [2], [6], tuple(sa.scan_shape[::-1]), (w, h), (7.0, 5.0)
    )
    theirs = np.array(imgs[0], copy=False)
    with streamstore.open(path) as st:
        np.testing.assert_array_equal(
            st.virtual_image(2, 6, (5.0, 7.0)), theirs // STEMPY_MASK_VALUE
        )
        theirs_com = stempy_image.com_sparse(sa, replace_nans=False)
        ours = st.center_of_mass()
        np.testing.assert_allclose(ours[::-1], theirs_com, rtol=1e-6)
