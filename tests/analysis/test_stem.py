"""4D-STEM analysis on events: every result against brute force on the dense 4-D array."""

from __future__ import annotations

import numpy as np
import pytest

import streamstore
from streamstore.analysis import _stem_kernels, _stem_reference
from streamstore.errors import UserError
from streamstore.events import EventBatch
from streamstore.scan import ScanGeometry
from streamstore.store.codec import gap_encode

FRAME = (11, 14)  # non-square on purpose: rows != cols
SCAN = (5, 7)


def dense_to_batch(dense: np.ndarray) -> EventBatch:
    """Binary frames ``(n, H, W)`` -> EventBatch."""
    n, h, w = dense.shape
    flat = dense.reshape(n, h * w)
    counts = np.count_nonzero(flat, axis=1)
    offs = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=offs[1:])
    idx = np.nonzero(flat)[1].astype(np.uint32)
    return EventBatch(offs, idx, None, (h, w))


def make_scan_store(
    path, *, frame=FRAME, scan=SCAN, fpp=2, flyback=1, seed=0, drop=(), scan_in_file=True
):
    """A scan with a drifting bright disk; returns (path, dense frames by frame id, ids)."""
    rng = np.random.default_rng(seed)
    rows, cols = scan
    n = rows * (cols + flyback) * fpp
    h, w = frame
    rr, cc = np.mgrid[:h, :w]
    dense = np.zeros((n, h, w), np.uint8)
    for i in range(n):
        p = i // fpp
        cr, cc0 = 5.0 + 0.3 * (p % (cols + flyback)), 6.0 + 0.2 * (p // (cols + flyback))
        disk = (rr - cr) ** 2 + (cc - cc0) ** 2 < 9
        prob = np.where(disk, 0.5, 0.05)
        dense[i] = rng.random((h, w)) < prob
    ids = np.array([i for i in range(n) if i not in drop], np.int64)
    geom = ScanGeometry(scan, fpp, flyback) if scan_in_file else None
    with streamstore.StoreWriter(path, frame, frame_time_s=1e-3, scan=geom) as wr:
        wr.append(dense_to_batch(dense[ids]), ids, ids * 1000)
        if drop:
            wr.mark_missing(list(drop))
    return path, dense, ids


def brute_4d(dense, ids, scan, fpp, flyback):
    """Dense (rows, cols, H, W) counts from the stored frames."""
    rows, cols = scan
    out = np.zeros((rows, cols) + dense.shape[1:], np.int64)
    for i in ids:
        p = i // fpp
        r, c = divmod(p, cols + flyback)
        if c < cols and r < rows:
            out[r, c] += dense[i]
    return out


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("stem") / "scan.h5"
    return make_scan_store(path, drop=(3, 17))


def test_scan_geometry_round_trip_and_old_files(scan_file, tmp_path):
    path, _dense, _ids = scan_file
    with streamstore.open(path) as st:
        assert st.scan == ScanGeometry(SCAN, 2, 1, 0)
        cov = st.scan_coverage()
        assert cov.shape == SCAN and cov.sum() == SCAN[0] * SCAN[1] * 2 - 2
        assert (cov == 1).sum() == 2  # the two lost frames leave their positions short
    plain, _, _ = make_scan_store(tmp_path / "movie.h5", scan_in_file=False)
    with streamstore.open(plain) as st:
        assert st.scan is None
        with pytest.raises(UserError, match="no scan geometry"):
            st.virtual_image(0, 3)
        view = st.with_scan(SCAN, frames_per_position=2, flyback=1)
        assert view.scan == ScanGeometry(SCAN, 2, 1, 0)
        assert st.scan is None  # the view leaves the store alone


def test_virtual_images_match_brute_force(scan_file):
    path, dense, ids = scan_file
    d4 = brute_4d(dense, ids, SCAN, 2, 1)
    with streamstore.open(path, nthreads=2) as st:
        summed = d4.sum(axis=(0, 1)).astype(np.float64)
        h, w = FRAME
        com0 = (
            summed.sum(axis=1) @ np.arange(h) / summed.sum(),
            summed.sum(axis=0) @ np.arange(w) / summed.sum(),
        )
        rr, cc = np.mgrid[:h, :w]
        for inner, outer, center in [(0, 3, (5.0, 7.0)), (2, 6.5, None), (4, 20, (4.5, 8.25))]:
            c = com0 if center is None else center
            d2 = (rr - c[0]) ** 2 + (cc - c[1]) ** 2
            m = (d2 >= inner**2) & (d2 < outer**2)
            want = (d4 * m).sum(axis=(2, 3))
            got = st.virtual_image(inner, outer, center)
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, want)
        m = np.random.default_rng(1).random(FRAME) < 0.3
        np.testing.assert_array_equal(st.virtual_image(mask=m), (d4 * m).sum(axis=(2, 3)))
        wts = np.random.default_rng(2).random(FRAME)
        np.testing.assert_allclose(
            st.virtual_image(mask=wts), (d4 * wts).sum(axis=(2, 3)), rtol=1e-12
        )
        roi = (1, 4, 2, 6)
        np.testing.assert_array_equal(
            st.virtual_image(mask=m, scan_roi=roi), (d4 * m).sum(axis=(2, 3))[1:4, 2:6]
        )


def test_several_detectors_in_one_call_match_brute_force(scan_file):
    path, dense, ids = scan_file
    d4 = brute_4d(dense, ids, SCAN, 2, 1)
    h, w = FRAME
    rr, cc = np.mgrid[:h, :w]
    center = (5.5, 7.25)
    d2 = (rr - center[0]) ** 2 + (cc - center[1]) ** 2
    with streamstore.open(path, nthreads=2) as st:
        # disjoint (one pass, labelled pixels) and overlapping (a pass each) detectors
        for radii in ([(0, 3), (4, 9), (9, 30)], [(0, 5), (2, 8)]):
            got = st.virtual_images(radii, center)
            assert got.shape == (len(radii), *SCAN) and got.dtype == np.int64
            for k, (inner, outer) in enumerate(radii):
                m = (d2 >= inner**2) & (d2 < outer**2)
                np.testing.assert_array_equal(got[k], (d4 * m).sum(axis=(2, 3)))
                np.testing.assert_array_equal(got[k], st.virtual_image(inner, outer, center))
        roi = (1, 4, 2, 6)
        np.testing.assert_array_equal(
            st.virtual_images([(0, 3), (4, 9)], center, scan_roi=roi)[1],
            st.virtual_image(4, 9, center, scan_roi=roi),
        )
        np.testing.assert_array_equal(st.virtual_images([(0, 4)])[0], st.virtual_image(0, 4))
        for radii, center in (([(0, 3), (4, 9)], (5.5, 7.25)), ([(0, 5), (2, 8)], None)):
            images, com = st.virtual_images_and_com(radii, center, scan_roi=roi)
            assert images.dtype == np.int64
            np.testing.assert_array_equal(images, st.virtual_images(radii, center, scan_roi=roi))
            np.testing.assert_array_equal(com, st.center_of_mass(scan_roi=roi))
        with pytest.raises(UserError, match="at least one"):
            st.virtual_images([])
        with pytest.raises(UserError, match="pairs"):
            st.virtual_images([3])


def test_center_of_mass_diffraction_sum_radial_profile(scan_file):
    path, dense, ids = scan_file
    d4 = brute_4d(dense, ids, SCAN, 2, 1).astype(np.float64)
    h, w = FRAME
    rr, cc = np.mgrid[:h, :w]
    with streamstore.open(path, nthreads=2) as st:
        n = d4.sum(axis=(2, 3))
        want = np.stack([(d4 * rr).sum(axis=(2, 3)) / n, (d4 * cc).sum(axis=(2, 3)) / n])
        com = st.center_of_mass()
        assert com.shape == (2,) + SCAN
        np.testing.assert_allclose(com, want, rtol=1e-12)
        m = (rr - 5) ** 2 + (cc - 7) ** 2 < 16
        dm = d4 * m
        nm = dm.sum(axis=(2, 3))
        want_m = np.stack([(dm * rr).sum(axis=(2, 3)) / nm, (dm * cc).sum(axis=(2, 3)) / nm])
        np.testing.assert_allclose(st.center_of_mass(m, scan_roi=(0, 2, 0, 3)), want_m[:, :2, :3])

        roi = (2, 5, 1, 4)
        np.testing.assert_array_equal(
            st.diffraction_sum(scan_roi=roi), d4[2:5, 1:4].sum(axis=(0, 1)).astype(np.uint32)
        )
        center = (5.5, 6.0)
        r = np.hypot(rr - center[0], cc - center[1])
        for bins in (None, 4, [0.0, 1.5, 3.0, 7.0]):
            prof, edges = st.radial_profile(center, bins)
            ring = np.stack(
                [np.histogram(r.ravel(), edges, weights=d4[i, j].ravel())[0]
                 for i in range(SCAN[0]) for j in range(SCAN[1])]
            )  # fmt: skip
            np.testing.assert_array_equal(prof, ring.T.reshape(-1, *SCAN))
        prof, _ = st.radial_profile(center)
        assert prof.sum() == d4.sum()  # default rings cover the whole frame


def test_bad_arguments_raise_clear_errors(scan_file):
    path, _dense, _ids = scan_file
    with streamstore.open(path) as st:
        for call, msg in [
            (lambda: st.virtual_image(3, 2, (5, 5)), "inner_radius < outer_radius"),
            (lambda: st.virtual_image(mask=np.ones((3, 3), bool)), "mask has shape"),
            (lambda: st.virtual_image(0, 2, mask=np.ones(FRAME, bool)), "not both"),
            (lambda: st.center_of_mass(scan_roi=(0, 9, 0, 1)), "outside the scan"),
            (lambda: st.radial_profile((5, 5), bins=[3, 1]), "ascending"),
            (lambda: st.with_scan((0, 3)), "scan rows"),
            (lambda: st.with_scan((2, 3), frames_per_position=0), "frames_per_position"),
        ]:
            with pytest.raises(UserError, match=msg):
                call()


def _random_gaps(rng, n_frames, npix):
    frames = [
        np.sort(rng.choice(npix, rng.integers(0, 40), replace=False)) for _ in range(n_frames)
    ]
    counts = np.array([f.size for f in frames], np.int64)
    offs = np.zeros(n_frames + 1, np.int64)
    np.cumsum(counts, out=offs[1:])
    idx = np.concatenate(frames).astype(np.uint32)
    gaps = gap_encode(idx, offs, npix)
    # frames in a job are addressed by (start, count); leave holes between some
    pad = rng.integers(0, 3, n_frames)
    starts = offs[:-1] + np.cumsum(pad)
    spread = np.zeros(int(starts[-1] + counts[-1]) if n_frames else 0, np.uint32)
    for f in range(n_frames):
        spread[starts[f] : starts[f] + counts[f]] = gaps[offs[f] : offs[f + 1]]
    return spread, starts, counts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kernel_parity_numba_vs_numpy(seed):
    rng = np.random.default_rng(seed)
    h, w = 9, 13
    npix = h * w
    gaps, starts, counts = _random_gaps(rng, int(rng.integers(1, 30)), npix)
    n = starts.size
    labels = rng.integers(-1, 4, npix).astype(np.int32)
    weights = rng.random(npix)
    for mask in (np.zeros(0, np.uint8), (rng.random(npix) < 0.5).astype(np.uint8)):
        a = _stem_kernels.frame_moments(gaps, starts, counts, w, mask, np.zeros((n, 3)))
        b = _stem_reference.frame_moments(gaps, starts, counts, w, mask, np.zeros((n, 3)))
        np.testing.assert_array_equal(a, b)
    a = _stem_kernels.frame_label_counts(gaps, starts, counts, labels, np.zeros((n, 4), np.int64))
    b = _stem_reference.frame_label_counts(gaps, starts, counts, labels, np.zeros((n, 4), np.int64))
    np.testing.assert_array_equal(a, b)
    a = _stem_kernels.frame_weighted_sums(gaps, starts, counts, weights, np.zeros(n))
    b = _stem_reference.frame_weighted_sums(gaps, starts, counts, weights, np.zeros(n))
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_sharded_series_gives_the_single_file_results(scan_file, tmp_path, monkeypatch):
    """A series split over two shards (read through events, not chunks) gives the same images."""
    import streamstore.analysis.stem as stem

    monkeypatch.setattr(stem, "_FALLBACK_FRAMES", 5)  # many reads, on two threads
    path, dense, ids = scan_file
    series = tmp_path / "series"
    series.mkdir()
    geom = ScanGeometry(SCAN, 2, 1)
    for k in range(2):
        mine = ids[ids % 2 == k]
        with streamstore.StoreWriter(
            series / f"shard-{k}.h5", FRAME, frame_time_s=1e-3, scan=geom
        ) as wr:
            wr.append(dense_to_batch(dense[mine]), mine, mine * 1000)
    m = np.random.default_rng(3).random(FRAME) < 0.5
    with streamstore.open(series, nthreads=2) as sh, streamstore.open(path) as st:
        assert sh.scan == st.scan
        np.testing.assert_array_equal(sh.virtual_image(1, 5), st.virtual_image(1, 5))
        np.testing.assert_array_equal(sh.virtual_image(mask=m), st.virtual_image(mask=m))
        np.testing.assert_allclose(sh.center_of_mass(), st.center_of_mass(), rtol=1e-12)
        np.testing.assert_array_equal(
            sh.diffraction_sum((1, 3, 0, 4)), st.diffraction_sum((1, 3, 0, 4))
        )


def test_start_message_scan_fields_round_trip():
    from streamstore.link.protocol import ProtocolError, Start, encode_start, parse

    start = Start(
        "s1", (8, 9), "uint16", 1e-3, scan_shape=(4, 5), frames_per_position=2, scan_flyback=1
    )
    back = parse(encode_start(start))
    assert (back.scan_shape, back.frames_per_position, back.scan_flyback) == ((4, 5), 2, 1)
    assert not back.extra
    plain = parse(encode_start(Start("s2", (8, 9), "uint16", 1e-3)))
    assert plain.scan_shape is None and plain.frames_per_position is None
    with pytest.raises(ProtocolError, match="scan_shape"):
        Start("s3", (8, 9), "uint16", 1e-3, scan_shape=(0, 5))
    with pytest.raises(ProtocolError, match="without scan_shape"):
        Start("s4", (8, 9), "uint16", 1e-3, frames_per_position=2)


def test_many_small_jobs_on_threads_give_the_same_images(scan_file, monkeypatch):
    """Jobs split inside a position's frames, run on threads, add up to the one-job result."""
    import streamstore.analysis.stem as stem

    path, _dense, _ids = scan_file
    m = np.random.default_rng(4).random(FRAME) < 0.5
    with streamstore.open(path, nthreads=1) as st:
        want = (st.virtual_image(mask=m), st.center_of_mass(), st.radial_profile((5, 6))[0])
    monkeypatch.setattr(stem, "_JOB_EVENTS_MIN", 37)
    monkeypatch.setattr(stem, "_JOB_EVENTS", 37)
    monkeypatch.setattr(stem, "_FALLBACK_FRAMES", 3)
    with streamstore.open(path, nthreads=2) as st:
        assert len(st._jobs(np.arange(st.n_frames), 37)) > 20
        np.testing.assert_array_equal(st.virtual_image(mask=m), want[0])
        np.testing.assert_allclose(st.center_of_mass(), want[1], rtol=1e-12)
        np.testing.assert_array_equal(st.radial_profile((5, 6))[0], want[2])


def test_damaged_event_chunk_raises_naming_frames(tmp_path):
    """With chunk checksums in the format, a damaged chunk stops a scan analysis."""
    import h5py

    corrupt = getattr(streamstore.errors, "CorruptDataError", None)
    if corrupt is None:
        pytest.skip("this reader has no chunk checksums")
    path, _d, _i = make_scan_store(tmp_path / "bad.h5", fpp=1, flyback=0, seed=13)
    with h5py.File(path, "r") as f:
        info = f["events/gaps"].id.get_chunk_info_by_coord((0,))
    raw = bytearray(path.read_bytes())
    raw[info.byte_offset + info.size // 2] ^= 0x04
    path.write_bytes(bytes(raw))
    with streamstore.open(path) as st:
        for call in (lambda: st.virtual_image(0, 4), st.center_of_mass, st.radial_profile):
            with pytest.raises(corrupt, match="frames"):
                call()
