"""StoreWriter + Store: round trips, API errors, doses, selections, accounting."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streamstore
from streamstore import EventBatch, StoreWriter
from streamstore.errors import FormatError, UserError

SHAPE = (24, 40)  # non-square


def random_batch(rng, n, shape=SHAPE, p=0.05, subpixel=False):
    npix = shape[0] * shape[1]
    hit = rng.random((n, npix)) < p
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(hit.sum(1), out=offsets[1:])
    idx = np.nonzero(hit)[1].astype(np.uint32)
    sub = rng.integers(0, 16, idx.size).astype(np.uint8) if subpixel else None
    return EventBatch(offsets, idx, sub, shape)


def write(path, batches, *, ids=None, flush_after=(), **kw):
    kw.setdefault("frame_time_s", 1e-3)
    shape = batches[0].frame_shape
    nxt = 0
    with StoreWriter(path, shape, **kw) as w:
        for k, b in enumerate(batches):
            fid = np.arange(nxt, nxt + b.n_frames) if ids is None else ids[k]
            w.append(b, fid, np.asarray(fid) * 1_000_000)
            nxt += b.n_frames
            if k in flush_after:
                w.flush()
    return path


# ---------------------------------------------------------------- hypothesis --
@st.composite
def event_batches(draw):
    h = draw(st.integers(1, 9))
    w = draw(st.integers(1, 13))
    npix = h * w
    sub = draw(st.booleans())
    n = draw(st.integers(0, 9))
    frames = []
    for _ in range(n):
        kind = draw(st.sampled_from(["empty", "full", "ends", "random"]))
        if kind == "empty":
            f = set()
        elif kind == "full":
            f = set(range(npix))
        elif kind == "ends":
            f = {0, npix - 1}
        else:
            f = draw(st.sets(st.integers(0, npix - 1), max_size=npix))
        frames.append(sorted(f))
    counts = [len(f) for f in frames]
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    idx = np.array([i for f in frames for i in f], np.uint32)
    spx = None
    if sub:
        spx = np.array(draw(st.lists(st.integers(0, 15), min_size=idx.size, max_size=idx.size)))
    batch = EventBatch(offsets, idx, spx, (h, w))
    # split points and which appends are followed by a flush
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
    flushes = draw(st.sets(st.integers(0, 5)))
    chunk_events = draw(st.sampled_from([1, 3, 16, 1 << 20]))
    chunk_frames = draw(st.sampled_from([1, 2, 5, 4096]))
    r0 = draw(st.integers(0, h - 1))
    c0 = draw(st.integers(0, w - 1))
    roi = (r0, draw(st.integers(r0 + 1, h)), c0, draw(st.integers(c0 + 1, w)))
    return batch, cuts, flushes, chunk_events, chunk_frames, roi


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event_batches())
def test_any_batch_in_any_split_reads_back_identically(case):
    batch, cuts, flushes, chunk_events, chunk_frames, roi = case
    bounds = [0, *cuts, batch.n_frames]
    parts = [batch.slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    n = batch.n_frames
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "h.h5"
        with StoreWriter(
            path,
            batch.frame_shape,
            frame_time_s=0.01,
            subpixel=batch.subpixel is not None,
            chunk_events=chunk_events,
            chunk_frames=chunk_frames,
            flush_interval_s=1e9,
        ) as w:
            nxt = 0
            for k, part in enumerate(parts):
                ids = np.arange(nxt, nxt + part.n_frames) * 3 + 7
                w.append(part, ids, ids * 10)
                nxt += part.n_frames
                if k in flushes:
                    w.flush()
                    assert w.n_flushed == nxt
            assert w.n_frames_written == n
        with streamstore.open(path) as s:
            assert s.n_frames == n
            assert s.frame_shape == batch.frame_shape
            np.testing.assert_array_equal(s.frame_ids, np.arange(n) * 3 + 7)
            np.testing.assert_array_equal(s.timestamps_ns, (np.arange(n) * 3 + 7) * 10)
            np.testing.assert_array_equal(s.event_counts, batch.counts)
            assert s.events(0, n) == batch
            dense = batch.to_dense()
            r0, r1, c0, c1 = roi
            if n:
                np.testing.assert_array_equal(s.frames(0, n), dense)
                np.testing.assert_array_equal(s.frames(0, n, roi=roi), dense[:, r0:r1, c0:c1])
            else:  # an explicit empty window is refused, as on the command line
                with pytest.raises(UserError, match="empty"):
                    s.frames(0, n)
            np.testing.assert_array_equal(s.sum(), dense.sum(0))
            np.testing.assert_array_equal(s.sum(roi=roi), dense[:, r0:r1, c0:c1].sum(0))
            if n >= 2:
                np.testing.assert_array_equal(s.sum(1, n), dense[1:].sum(0))
                assert s.events(1, n - 1) == batch.slice(1, n - 1)
                np.testing.assert_array_equal(s.sum(select=[0, n - 1]), dense[[0, -1]].sum(0))


# ------------------------------------------------------------ round trips --
def test_round_trip_windows_roi_and_dtype(tmp_path, rng):
    batches = [random_batch(rng, k, subpixel=True) for k in (5, 0, 17, 1, 30)]
    path = write(
        tmp_path / "a.h5",
        batches,
        flush_after={0, 2},
        subpixel=True,
        chunk_events=50,
        chunk_frames=8,
    )
    full = EventBatch.concatenate(batches)
    dense = full.to_dense()
    with streamstore.open(path, nthreads=2) as s:
        assert s.n_frames == 53 and s.n_events == full.n_events and s.subpixel
        assert s.events(0, 53) == full
        assert s.events(10, 31) == full.slice(10, 31)
        assert s.events(7, 7).n_frames == 0
        roi = (3, 20, 5, 37)
        np.testing.assert_array_equal(s.frames(4, 40, roi=roi), dense[4:40, 3:20, 5:37])
        out = s.frames(0, 3, dtype=np.float32)
        assert out.dtype == np.float32 and out.shape == (3, *SHAPE)
        np.testing.assert_array_equal(s.sum(roi=roi), dense[:, 3:20, 5:37].sum(0))
        sel = np.array([0, 2, 3, 9, 40, 41, 52])
        np.testing.assert_array_equal(s.sum(select=sel), dense[sel].sum(0))
        np.testing.assert_array_equal(s.sum(select=[]), np.zeros(SHAPE))
        assert s.sum().dtype == np.uint32


def test_sum_parallel_jobs_equal_serial(tmp_path, rng, monkeypatch):
    """Several worker threads over many small jobs give the serial result."""
    import streamstore.store.reader as reader

    batches = [random_batch(rng, 40, p=0.2) for _ in range(3)]
    path = write(tmp_path / "p.h5", batches, flush_after={0}, chunk_events=300)
    monkeypatch.setattr(reader, "_JOB_EVENTS", 500)
    monkeypatch.setattr(reader, "_JOB_EVENTS_MAX", 500)
    monkeypatch.setattr(reader, "_SUM_BAND", 1000)  # several bands per frame
    dense = EventBatch.concatenate(batches).to_dense()
    for mode in ("bands", "serial"):
        monkeypatch.setattr(reader, "_SUM_MODE", mode)
        with streamstore.open(path, nthreads=3) as s:
            assert len(s._jobs(np.arange(s.n_frames), 500)) > 10
            np.testing.assert_array_equal(s.sum(), dense.sum(0))
            np.testing.assert_array_equal(s.sum(5, 111), dense[5:111].sum(0))
            roi = (2, 21, 3, 30)
            np.testing.assert_array_equal(s.sum(roi=roi), dense[:, 2:21, 3:30].sum(0))
            # selections with holes: short gaps stay inside a job, long ones split it
            monkeypatch.setattr(reader, "_GAP_SPLIT", 400)  # frames hold ~190 events
            every_other = np.arange(0, 120, 2)
            assert len(s._jobs(every_other, 10**6)) == 1  # skipped frames stay inside
            assert len(s._jobs(np.r_[0:10, 50:52, 90:120], 10**6)) == 3  # long gaps split
            for sel in (every_other, np.r_[0:10, 50:52, 90:120], np.array([3, 117])):
                jobs = s._jobs(sel, 500)
                assert sum(len(j[2]) for j in jobs) == sel.size
                np.testing.assert_array_equal(s.sum(select=sel), dense[sel].sum(0))
                np.testing.assert_array_equal(
                    s.sum(select=sel, roi=roi), dense[sel][:, 2:21, 3:30].sum(0)
                )
    with streamstore.open(path, nthreads=1) as s:
        np.testing.assert_array_equal(s.sum(), dense.sum(0))


def test_flushes_leave_holes_but_no_bloat(tmp_path, rng):
    """Flushing after every append does not grow the file much (write-once chunks)."""
    batches = [random_batch(rng, 2, shape=(128, 128), p=0.05) for _ in range(60)]
    a = write(tmp_path / "every.h5", batches, flush_after=set(range(60)), chunk_events=1 << 16)
    b = write(tmp_path / "once.h5", batches, chunk_events=1 << 16)
    assert os.path.getsize(a) < 1.5 * os.path.getsize(b)
    with streamstore.open(a) as sa, streamstore.open(b) as sb:
        assert sa.events(0, 120) == sb.events(0, 120) == EventBatch.concatenate(batches)


# ----------------------------------------------------------- metadata ------
def test_attributes_calibration_meta_and_accounting(tmp_path, rng):
    from streamstore import Calibration

    cal = Calibration(np.full(SHAPE, 100.5), np.full(SHAPE, 2.0), n_sigma=4.5, source="dark_frames")
    path = tmp_path / "m.h5"
    with StoreWriter(
        path,
        SHAPE,
        frame_time_s=2e-3,
        pixel_size_A=0.8,
        calibration=cal,
        meta={"sample": "apoferritin", "kV": 300},
        raw_dtype="uint16",
    ) as w:
        w.append(random_batch(rng, 4), [0, 1, 2, 5], [0, 1, 2, 5])
        w.mark_missing([3, 4])
        w.mark_missing([4])  # twice is fine
        w.update_accounting(received=6, duplicate=1, rejected=0, complete=False, reason="idle")
        w.append(random_batch(rng, 1), [6], [6])
    with streamstore.open(path) as s:
        a = s.attrs
        assert a["format"] == "streamstore.events" and a["format_version"] == 3
        assert a["frame_shape"] == [24, 40] and a["raw_dtype"] == "uint16"
        assert s.frame_time_s == 2e-3 and s.pixel_size_A == 0.8 and s.raw_dtype == "uint16"
        summary = s.calibration_summary
        assert summary == json.loads(json.dumps(cal.summary()))  # as JSON stores it
        assert summary["n_sigma"] == 4.5 and summary["frame_shape"] == [24, 40]
        assert summary["median_dark_adu"] == 100.5
        assert a["calibration_source"] == "dark_frames"
        assert a["meta"] == {"sample": "apoferritin", "kV": 300}
        assert a["writer"].startswith("streamstore ")
        np.testing.assert_array_equal(s.missing_frame_ids, [3, 4])
        assert s.accounting == {
            "received": 6,
            "duplicate": 1,
            "rejected": 0,
            "complete": False,
            "reason": "idle",
            "stored": 5,
            "missing": 2,
        }
        assert a["frames_stored"] == 5 and a["frames_missing"] == 2
        assert a["series_complete"] == 0
        assert 0 < s.bits_per_event < 64


def test_plain_dict_calibration(tmp_path, rng):
    path = tmp_path / "d.h5"
    with StoreWriter(
        path, SHAPE, frame_time_s=1e-3, calibration={"source": "manual", "threshold": 7}
    ) as w:
        w.append(random_batch(rng, 1), [0], [0])
    with streamstore.open(path) as s:
        assert s.calibration_summary == {"source": "manual", "threshold": 7}
        assert s.attrs["calibration_source"] == "manual"


def test_accounting_unknowns_are_left_out(tmp_path, rng):
    path = write(tmp_path / "u.h5", [random_batch(rng, 3)])
    with streamstore.open(path) as s:
        assert s.accounting == {"stored": 3, "missing": 0}
        assert s.pixel_size_A is None and s.calibration_summary is None


# ------------------------------------------------------------ writer errors --
def test_writer_never_clobbers_and_refuses_symlinks(tmp_path, rng):
    path = write(tmp_path / "x.h5", [random_batch(rng, 2)])
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        StoreWriter(path, SHAPE, frame_time_s=1e-3)
    assert path.read_bytes() == before
    target = tmp_path / "target.h5"
    link = tmp_path / "link.h5"
    link.symlink_to(target)  # dangling: following it would create target
    with pytest.raises(FileExistsError):
        StoreWriter(link, SHAPE, frame_time_s=1e-3)
    assert not target.exists()


def test_append_validation_messages(tmp_path, rng):
    with StoreWriter(tmp_path / "v.h5", SHAPE, frame_time_s=1e-3) as w:
        b = random_batch(rng, 3)
        w.append(b, [10, 11, 12], [0, 1, 2])
        with pytest.raises(ValueError, match="increase across appends: got 12 after 12"):
            w.append(b, [12, 13, 14], [0, 1, 2])
        with pytest.raises(ValueError, match="strictly increasing"):
            w.append(b, [20, 22, 21], [0, 1, 2])
        with pytest.raises(ValueError, match="one value per frame"):
            w.append(b, [20, 21], [0, 1])
        with pytest.raises(ValueError, match="frame_shape"):
            w.append(random_batch(rng, 1, shape=(40, 24)), [30], [0])
        with pytest.raises(ValueError, match="subpixel=False"):
            w.append(random_batch(rng, 1, subpixel=True), [30], [0])
        unsorted = EventBatch([0, 2], np.array([7, 3], np.uint32), None, SHAPE, validate=False)
        with pytest.raises(ValueError, match="ascend strictly"):
            w.append(unsorted, [30], [0])
        too_big = EventBatch([0, 1], np.array([24 * 40], np.uint32), None, SHAPE, validate=False)
        with pytest.raises(ValueError, match="not below H \\* W = 960"):
            w.append(too_big, [30], [0])
        with pytest.raises(ValueError, match="EventBatch"):
            w.append(np.zeros(3), [30], [0])
        with pytest.raises(ValueError, match=r"stored, not missing"):
            w.mark_missing([11])
        w.mark_missing([40])
        with pytest.raises(ValueError, match="marked missing"):
            w.append(random_batch(rng, 1), [40], [0])
        with pytest.raises(ValueError, match="received must be >= 0"):
            w.update_accounting(received=-1)
        assert w.n_frames_written == 3
    with pytest.raises(ValueError, match="closed"):
        w.append(b, [50, 51, 52], [0, 1, 2])


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"frame_time_s": 0}, "frame_time_s"),
        ({"frame_time_s": 1e-3, "pixel_size_A": -1.0}, "pixel_size_A"),
        ({"frame_time_s": 1e-3, "raw_dtype": "nope"}, "raw_dtype"),
        ({"frame_time_s": 1e-3, "chunk_events": 0}, "chunk_events"),
        ({"frame_time_s": 1e-3, "calibration": 5}, "calibration"),
        ({"frame_time_s": 1e-3, "nthreads": 0}, "nthreads"),
    ],
)
def test_writer_parameter_errors(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        StoreWriter(tmp_path / "e.h5", SHAPE, **kw)
    assert not (tmp_path / "e.h5").exists()  # validated before the file is created


def test_time_based_flush(tmp_path, rng):
    """append flushes once flush_interval_s of data time has been appended."""
    with StoreWriter(tmp_path / "t.h5", SHAPE, frame_time_s=0.1, flush_interval_s=1.0) as w:
        w.append(random_batch(rng, 5), np.arange(5), np.arange(5))
        assert w.n_flushed == 0
        w.append(random_batch(rng, 5), np.arange(5, 10), np.arange(5, 10))
        assert w.n_flushed == 10


# ------------------------------------------------------------ reader errors --
def test_open_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        streamstore.open(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(FormatError, match="not a readable HDF5"):
        streamstore.open(junk)
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["format"] = "something.else"
    with pytest.raises(FormatError, match="not a streamstore.events file"):
        streamstore.open(tmp_path / "other.h5")
    with pytest.raises(UserError, match="directory"):
        streamstore.open(tmp_path)


def test_window_and_roi_errors_name_the_range(tmp_path, rng):
    path = write(tmp_path / "w.h5", [random_batch(rng, 10)])
    with streamstore.open(path) as s:
        with pytest.raises(UserError, match=r"frame window 5:20 .* 0:10 \(10 frames\)"):
            s.frames(5, 20)
        with pytest.raises(UserError, match="frame window -1:3"):
            s.events(-1, 3)
        with pytest.raises(UserError, match="frame window 4:2"):
            s.sum(4, 2)
        with pytest.raises(UserError, match="outside 0..9"):
            s.sum(select=[3, 10])
        with pytest.raises(UserError, match="not both"):
            s.sum(0, 3, select=[1])
        with pytest.raises(UserError, match=r"roi .* 0 <= row0 < row1 <= 24"):
            s.frames(0, 1, roi=(0, 30, 0, 5))
        with pytest.raises(UserError, match="roi must be"):
            s.sum(roi=(1, 2))


# --------------------------------------------------------- dose / select --
@pytest.fixture
def dosed(tmp_path):
    """A store with known, irregular per-frame event counts."""
    rng = np.random.default_rng(7)
    counts = rng.integers(0, 60, 200)
    counts[[5, 50]] = 0
    npix = SHAPE[0] * SHAPE[1]
    frames = [np.sort(rng.choice(npix, c, replace=False)) for c in counts]
    offsets = np.zeros(201, np.int64)
    np.cumsum(counts, out=offsets[1:])
    batch = EventBatch(offsets, np.concatenate(frames), None, SHAPE)
    ts = np.cumsum(rng.integers(900_000, 1_100_000, 200))  # jittered ~1 ms
    path = tmp_path / "dose.h5"
    with StoreWriter(path, SHAPE, frame_time_s=1e-3, pixel_size_A=0.5) as w:
        w.append(batch, np.arange(200), ts)
    s = streamstore.open(path)
    yield s, counts.astype(np.int64), ts
    s.close()


UNIT_SCALE = {"events": 1.0, "e/px": 1 / (24 * 40), "e/A2": 1 / (24 * 40 * 0.25)}


@pytest.mark.parametrize("unit", ["events", "e/px", "e/A2"])
def test_dose_units(dosed, unit):
    s, counts, _ = dosed
    np.testing.assert_allclose(s.dose(unit), counts * UNIT_SCALE[unit])
    assert s.dose("events").dtype == np.int64


def brute_select(counts, ts, scale, dose=None, cum=None, time_s=None):
    keep = []
    running = 0.0
    for i, c in enumerate(counts):
        running += c * scale
        ok = True
        if dose is not None:
            ok &= dose[0] <= c * scale <= dose[1]
        if cum is not None:
            ok &= cum[0] <= running <= cum[1]
        if time_s is not None:
            t = (ts[i] - ts[0]) / 1e9
            ok &= time_s[0] <= t <= time_s[1]
        if ok:
            keep.append(i)
    return np.array(keep, dtype=np.int64)


@pytest.mark.parametrize("unit", ["events", "e/px", "e/A2"])
def test_select_matches_brute_force(dosed, unit):
    s, counts, ts = dosed
    k = UNIT_SCALE[unit]
    rng = np.random.default_rng(11)
    for _ in range(25):
        lo = rng.uniform(0, 40) * k
        dose = (lo, lo + rng.uniform(0, 30) * k)
        clo = rng.uniform(0, 3000) * k
        cum = (clo, clo + rng.uniform(0, 4000) * k)
        t0 = rng.uniform(0, 0.1)
        time_s = (t0, t0 + rng.uniform(0, 0.1))
        for crit in (
            {"dose": dose},
            {"cumulative_dose": cum},
            {"time_s": time_s},
            {"dose": dose, "cumulative_dose": cum, "time_s": time_s},
        ):
            got = s.select(unit=unit, **crit)
            want = brute_select(
                counts, ts, k, crit.get("dose"), crit.get("cumulative_dose"), crit.get("time_s")
            )
            np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(s.select(), np.arange(200))


def brute_fractions(counts, scale, target):
    groups, cur, before = [], [], 0.0
    k_cur = None
    for i, c in enumerate(counts):
        k = int(np.floor(before / target + 1e-12))
        if k_cur is not None and k != k_cur:
            groups.append(cur)
            cur = []
        cur.append(i)
        k_cur = k
        before += c * scale
    if cur:
        groups.append(cur)
    return groups


@pytest.mark.parametrize("unit", ["events", "e/px", "e/A2"])
def test_fractions_match_brute_force_and_keep_the_remainder(dosed, unit):
    s, counts, _ = dosed
    k = UNIT_SCALE[unit]
    for target_events in (1, 37, 100, 555.5, 3000, 10**6):
        got = s.fractions(target_events * k, unit=unit)
        want = brute_fractions(counts, k, target_events * k)
        assert [list(range(sl.start, sl.stop)) for sl in got] == want
        # consecutive, complete, nothing dropped
        assert got[0].start == 0 and got[-1].stop == 200
        assert all(a.stop == b.start for a, b in zip(got[:-1], got[1:], strict=True))
        assert sum(int(counts[sl].sum()) for sl in got) == counts.sum()


def test_dose_errors(dosed, tmp_path, rng):
    s, _, _ = dosed
    with pytest.raises(UserError, match="unit must be one of"):
        s.dose("e/nm2")
    with pytest.raises(UserError, match="unit must be one of"):
        s.select(time_s=(0, 1), unit="bad")
    with pytest.raises(UserError, match=r"dose range is empty: lo 5 > hi 1"):
        s.select(dose=(5, 1))
    with pytest.raises(UserError, match="cumulative_dose must be a pair"):
        s.select(cumulative_dose=3)
    with pytest.raises(UserError, match="NaN"):
        s.select(time_s=(float("nan"), 1))
    with pytest.raises(UserError, match="dose_per_fraction must be a positive number"):
        s.fractions(0)
    with pytest.raises(UserError, match="dose_per_fraction must be a positive number"):
        s.fractions("x")
    path = write(tmp_path / "nopx.h5", [random_batch(rng, 3)])
    with streamstore.open(path) as t:
        for call in (
            lambda: t.dose("e/A2"),
            lambda: t.select(dose=(0, 1), unit="e/A2"),
            lambda: t.fractions(1.0, unit="e/A2"),
        ):
            with pytest.raises(UserError, match=r"e/A2 needs the pixel size.*has none"):
                call()
        np.testing.assert_allclose(t.dose(), t.event_counts / (24 * 40))


def test_empty_store(tmp_path):
    path = tmp_path / "empty.h5"
    StoreWriter(path, SHAPE, frame_time_s=1e-3).close()
    with streamstore.open(path) as s:
        assert s.n_frames == 0 and s.n_events == 0
        assert s.sum().shape == SHAPE and not s.sum().any()
        assert s.fractions(1.0) == [] and s.select().size == 0
        assert s.events(0, 0).n_frames == 0
        assert np.isnan(s.bits_per_event)
