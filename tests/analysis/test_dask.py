"""Dask: lazy dense frames and windowed reductions on a LocalCluster of 2 processes.

The workers open the files themselves (``streamstore.analysis.distributed.open_cached``);
the results must equal the local API's on a single file and on a sharded
series.
"""

from __future__ import annotations

import operator

import numpy as np
import pytest

import streamstore
from streamstore.analysis.distributed import window_dose, window_sum

pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

SHAPE = (48, 80)
N = 120


def _batch(frames):
    offs, idx = [0], []
    for f in frames:
        nz = np.flatnonzero(f.ravel())
        idx.append(nz)
        offs.append(offs[-1] + nz.size)
    return streamstore.EventBatch(
        np.array(offs, np.int64), np.concatenate(idx).astype(np.uint32), None, SHAPE
    )


def _no_default_client() -> bool:
    try:
        distributed.default_client()
    except ValueError:
        return True
    return False


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A single file and a two-shard series of the same frames (frame 17 lost)."""
    rng = np.random.default_rng(606)
    tmp = tmp_path_factory.mktemp("dask")
    frames = (rng.random((N, *SHAPE)) < 0.02).astype(np.uint16)
    ids = np.array([i for i in range(N) if i != 17])
    single = tmp / "single.h5"
    with streamstore.StoreWriter(single, SHAPE, frame_time_s=1e-3, pixel_size_A=1.0) as w:
        w.append(_batch(frames[ids]), ids, ids)
    series = tmp / "series"
    series.mkdir()
    for k in range(2):
        mine = ids[ids % 2 == k]
        with streamstore.StoreWriter(
            series / f"shard-{k}.h5", SHAPE, frame_time_s=1e-3, pixel_size_A=1.0
        ) as w:
            w.append(_batch(frames[mine]), mine, mine)
    return single, series, frames[ids]


def test_map_windows_without_a_client_runs_locally(stores):
    # runs before the module's cluster exists, so there is no default client
    assert _no_default_client()
    with streamstore.open(stores[1]) as s:
        parts = s.map_windows(window_dose, 40)
        np.testing.assert_array_equal(np.concatenate(parts), s.dose("events"))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_window_and_chunk_sizes_are_refused(stores, bad):
    with streamstore.open(stores[0]) as s:
        with pytest.raises(ValueError, match="window"):
            s.map_windows(window_sum, bad)
        with pytest.raises(ValueError, match="chunk_frames"):
            s.to_dask(chunk_frames=bad)


#: The scheduler's HTTP server on a free loopback port: None means port 8787, and
#: where another cluster holds it (the other test worker's, another run's) the
#: warning that it moved on fails the fixture (warnings are errors here).
_ANY_PORT = "127.0.0.1:0"


@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(
            n_workers=2,
            processes=True,
            threads_per_worker=1,
            dashboard_address=_ANY_PORT,
            silence_logs=50,
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


@pytest.mark.parametrize("which", ["single", "series"])
def test_to_dask_sum_and_dose_on_the_cluster_equal_the_local_api(stores, client, which):
    path = stores[0] if which == "single" else stores[1]
    with streamstore.open(path) as s:
        arr = s.to_dask(chunk_frames=16)
        assert arr.shape == (s.n_frames, *SHAPE) and arr.dtype == np.uint16
        assert arr.chunks[0][0] == 16
        image, dose = client.compute([arr.sum(axis=0), arr.sum(axis=(1, 2))], sync=True)
        np.testing.assert_array_equal(image, s.sum())
        np.testing.assert_array_equal(image, stores[2].sum(0))
        np.testing.assert_array_equal(dose, s.dose("events"))
        np.testing.assert_allclose(dose / (SHAPE[0] * SHAPE[1]), s.dose("e/px"))
        roi = (5, 40, 10, 70)
        part = s.to_dask(chunk_frames=50, roi=roi)[10:60].sum(axis=0)
        np.testing.assert_array_equal(client.compute(part, sync=True), s.sum(10, 60, roi=roi))


@pytest.mark.parametrize("which", ["single", "series"])
def test_map_windows_on_the_cluster_equals_the_local_api(stores, client, which):
    path = stores[0] if which == "single" else stores[1]
    with streamstore.open(path) as s:
        image = s.map_windows(window_sum, 25, client, combine=operator.add)
        np.testing.assert_array_equal(image, s.sum())
        parts = s.map_windows(window_dose, 25, client)
        assert len(parts) == -(-s.n_frames // 25)
        np.testing.assert_array_equal(np.concatenate(parts), s.dose("events"))
        sub = s.map_windows(window_sum, 7, client, start=30, stop=71, combine=operator.add)
        np.testing.assert_array_equal(sub, s.sum(30, 71))


def test_map_windows_runs_in_the_worker_processes(stores, client):
    import os

    with streamstore.open(stores[0]) as s:
        pids = set(s.map_windows(lambda st, a, b: os.getpid(), 10, client))
    assert pids and os.getpid() not in pids
