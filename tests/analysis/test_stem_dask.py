"""Scan analyses on a dask LocalCluster (workers open the file) equal the local ones."""

from __future__ import annotations

import numpy as np
import pytest

import streamstore
from streamstore.analysis.stem_dask import map_scan, scan_to_dask
from tests.analysis.test_stem import FRAME, SCAN, make_scan_store

pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("stemdask")
    scan, _d, _i = make_scan_store(d / "scan.h5", fpp=2, flyback=1, seed=11, drop=(9,))
    movie, _d, _i = make_scan_store(d / "movie.h5", fpp=1, flyback=0, seed=12, scan_in_file=False)
    return scan, movie


#: The scheduler's HTTP server on a free loopback port: None means port 8787, and
#: where another cluster holds it (the other test worker's, another run's) the
#: warning that it moved on fails the fixture (warnings are errors here).
_ANY_PORT = "127.0.0.1:0"


@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=_ANY_PORT,
            silence_logs=50,
        ) as cluster,
        distributed.Client(cluster) as c,
    ):  # fmt: skip
        yield c


def test_map_scan_on_the_cluster_equals_the_local_api(files, client):
    m = np.random.default_rng(0).random(FRAME) < 0.4
    with streamstore.open(files[0]) as st:
        np.testing.assert_array_equal(
            map_scan(st, "virtual_image", 7, client, inner_radius=1, outer_radius=4),
            st.virtual_image(1, 4),
        )
        np.testing.assert_array_equal(
            map_scan(st, "virtual_image", 7, client, mask=m, scan_roi=(1, 3, 2, 7)),
            st.virtual_image(mask=m, scan_roi=(1, 3, 2, 7)),
        )
        np.testing.assert_allclose(map_scan(st, "center_of_mass", 9, client), st.center_of_mass())
        np.testing.assert_array_equal(
            map_scan(st, "diffraction_sum", 9, client, scan_roi=(0, 2, 0, 3)),
            st.diffraction_sum((0, 2, 0, 3)),
        )
        prof, edges = map_scan(st, "radial_profile", 9, client, bins=5)
        want, want_edges = st.radial_profile(bins=5)
        np.testing.assert_array_equal(prof, want)
        np.testing.assert_array_equal(edges, want_edges)


def test_map_scan_takes_a_scan_given_on_the_client(files, client):
    with streamstore.open(files[1]) as movie:
        st = movie.with_scan(SCAN, 1, 0)  # the file itself has no scan
        np.testing.assert_array_equal(
            map_scan(st, "virtual_image", 10, client, inner_radius=0, outer_radius=5),
            st.virtual_image(0, 5),
        )


def test_scan_to_dask_reductions_equal_the_analyses(files, client):
    m = np.random.default_rng(1).random(FRAME) < 0.5
    with streamstore.open(files[0]) as st:
        arr = scan_to_dask(st, chunk_rows=2)
        assert arr.shape == (*SCAN, *FRAME) and arr.chunks[0][0] == 2
        vi, total = client.compute([(arr * m).sum(axis=(2, 3)), arr.sum(axis=(0, 1))], sync=True)
        np.testing.assert_array_equal(vi, st.virtual_image(mask=m))
        np.testing.assert_array_equal(total, st.diffraction_sum())
