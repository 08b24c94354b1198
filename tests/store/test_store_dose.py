"""The corrected dose in the store (format 3): written, read, selected on, merged."""

from __future__ import annotations

import numpy as np
import pytest

import streamstore
from streamstore import EventBatch, StoreWriter
from streamstore.errors import UserError

SHAPE = (16, 24)
MODEL = {"name": "tile-coincidence", "version": 1, "hard_area": 9.0, "soft_area": 1.5}


def _batch(rng, n, electrons=True):
    npix = SHAPE[0] * SHAPE[1]
    hit = rng.random((n, npix)) < 0.05
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(hit.sum(1), out=offsets[1:])
    idx = np.nonzero(hit)[1].astype(np.uint32)
    # a made-up correction that differs from the counts frame by frame
    el = np.diff(offsets) * 1.5 + rng.random(n) if electrons else None
    return EventBatch(offsets, idx, frame_shape=SHAPE, electrons=el)


def _write(path, batches, ids=None, model=MODEL, **kw):
    ids = ids if ids is not None else np.arange(sum(b.n_frames for b in batches))
    with StoreWriter(path, SHAPE, frame_time_s=1e-3, pixel_size_A=2.0, **kw) as w:
        if model is not None:
            w.set_dose_model(model)
        k = 0
        for b in batches:
            w.append(b, ids[k : k + b.n_frames], ids[k : k + b.n_frames] * 1000)
            k += b.n_frames
            w.flush()
    return path


def test_round_trip_and_dose_both_ways(tmp_path, rng):
    batches = [_batch(rng, 7), _batch(rng, 0), _batch(rng, 300)]  # 300: several frame chunks
    full = EventBatch.concatenate(batches)
    path = _write(tmp_path / "d.h5", batches)
    with streamstore.open(path) as s:
        assert s.format_version == 3
        assert s.dose_corrected and s.dose_model == MODEL
        np.testing.assert_array_equal(s.dose("events"), full.electrons)
        np.testing.assert_array_equal(s.dose("events", corrected=False), full.counts)
        assert s.dose("events", corrected=False).dtype == np.int64
        np.testing.assert_allclose(s.dose("e/px"), full.electrons / (16 * 24), rtol=1e-15)
        np.testing.assert_allclose(s.dose("e/A2"), full.electrons / (16 * 24 * 4.0), rtol=1e-15)
        part = s.events(5, 12)
        assert part == full.slice(5, 12)
        np.testing.assert_array_equal(part.electrons, full.electrons[5:12])
        assert s.dose_label == "dose: electrons, coincidence-corrected (model tile-coincidence)"
        attrs = s._f["frames/electrons"].attrs
        assert attrs["dose_model"].strip() == b"tile-coincidence"


def test_select_and_fractions_use_the_corrected_dose(tmp_path, rng):
    b = _batch(rng, 40)
    path = _write(tmp_path / "d.h5", [b])
    with streamstore.open(path) as s:
        cum = np.cumsum(b.electrons)
        cum_counts = np.cumsum(b.counts)
        lo, hi = float(cum[9]), float(cum[25])
        sel = s.select(cumulative_dose=(lo, hi), unit="events")
        np.testing.assert_array_equal(sel, np.arange(9, 26))
        # the counted events reach that range later: the two selections differ
        sel_counts = s.select(cumulative_dose=(lo, hi), unit="events", corrected=False)
        np.testing.assert_array_equal(
            sel_counts, np.flatnonzero((cum_counts >= lo) & (cum_counts <= hi))
        )
        assert not np.array_equal(sel, sel_counts)
        per = float(cum[-1]) / 4
        fr = s.fractions(per, unit="events")
        before = cum - b.electrons
        k = np.floor(before / per + 1e-12).astype(int)
        assert [f.start for f in fr] == [0] + (np.flatnonzero(np.diff(k)) + 1).tolist()
        fr_counts = s.fractions(per, unit="events", corrected=False)
        assert len(fr_counts) < len(fr)  # fewer counts than electrons: fewer fractions
        d = s.dose("events")
        assert s.select(dose=(float(d[3]), float(d[3])), unit="events").tolist() == [3]


def test_a_series_without_electrons_records_the_counts_and_says_so(tmp_path, rng):
    batches = [_batch(rng, 5, electrons=False), _batch(rng, 3, electrons=False)]
    path = _write(tmp_path / "n.h5", batches, model=None)
    full = EventBatch.concatenate(batches)
    with streamstore.open(path) as s:
        assert s.format_version == 3
        assert not s.dose_corrected and s.dose_model is None
        np.testing.assert_array_equal(s.dose("events"), full.counts)
        assert s.events(0, 8).electrons is None
        assert s.dose_label == (
            "dose: counted events, no coincidence correction recorded (format 3)"
        )
        np.testing.assert_array_equal(s._f["frames/electrons"][:], full.counts)
        assert s._f["frames/electrons"].attrs["dose_model"].strip() == b"none"


def test_writer_refuses_mixed_batches_and_bad_models(tmp_path, rng):
    with StoreWriter(tmp_path / "m.h5", SHAPE, frame_time_s=1e-3) as w:
        w.append(_batch(rng, 2), [0, 1], [0, 1])
        with pytest.raises(ValueError, match="no electrons"):
            w.append(_batch(rng, 2, electrons=False), [2, 3], [2, 3])
        with pytest.raises(ValueError, match="name"):
            w.set_dose_model({"tile": 8})
        with pytest.raises(ValueError, match="2048"):
            w.set_dose_model({"name": "x", "blob": "y" * 3000})
        bad = _batch(rng, 1)
        bad.electrons[0] = np.nan
        with pytest.raises(ValueError, match="finite"):
            w.append(bad, [4], [4])
    with StoreWriter(tmp_path / "m2.h5", SHAPE, frame_time_s=1e-3) as w:
        w.append(_batch(rng, 2, electrons=False), [0, 1], [0, 1])
        with pytest.raises(ValueError, match="carry electrons"):
            w.append(_batch(rng, 2), [2, 3], [2, 3])
    # electrons without a model: kept, and the file says the model is not recorded
    with streamstore.open(tmp_path / "m.h5") as s:
        assert s.dose_corrected and s.dose_model == {"name": "unrecorded"}


def test_model_parameters_follow_the_series(tmp_path, rng):
    path = tmp_path / "p.h5"
    with StoreWriter(path, SHAPE, frame_time_s=1e-3) as w:
        w.set_dose_model(dict(MODEL, frames_seen=2))
        w.append(_batch(rng, 2), [0, 1], [0, 1])
        w.flush()
        assert (
            w._file["frames/electrons"].attrs["dose_model_parameters"].find(b'"frames_seen": 2') > 0
        )
        w.set_dose_model(dict(MODEL, frames_seen=5))
        w.append(_batch(rng, 3), [2, 3, 4], [2, 3, 4])
    with streamstore.open(path) as s:
        assert s.dose_model["frames_seen"] == 5 and s.n_frames == 5


def test_shards_merge_the_corrected_dose_by_frame_id(tmp_path, rng):
    series = tmp_path / "series"
    series.mkdir()
    b0, b1 = _batch(rng, 6), _batch(rng, 5)
    _write(series / "shard-0.h5", [b0], ids=np.array([0, 2, 4, 6, 8, 10]))
    _write(series / "shard-1.h5", [b1], ids=np.array([1, 3, 5, 7, 9]))
    with streamstore.open(series) as s:
        assert s.n_frames == 11 and s.dose_corrected
        want = np.empty(11)
        want[0::2], want[1::2] = b0.electrons, b1.electrons
        np.testing.assert_array_equal(s.dose("events"), want)
        np.testing.assert_array_equal(s.events(2, 7).electrons, want[2:7])
        assert s.dose_model["name"] == MODEL["name"] and len(s.dose_model["shards"]) == 2
        assert s.select(cumulative_dose=(0, float(want[:3].sum())), unit="events").tolist() == [
            0,
            1,
            2,
        ]
    # a shard without a correction: the merged series falls back to the counts, and says so
    (series / "shard-1.h5").unlink()
    _write(series / "shard-1.h5", [_batch(rng, 5, electrons=False)], ids=np.arange(1, 10, 2),
           model=None)  # fmt: skip
    with streamstore.open(series) as s:
        assert not s.dose_corrected and s.dose_model is None
        assert "counted events" in s.dose_label


def test_old_files_have_no_correction():
    from pathlib import Path

    data = Path(__file__).resolve().parents[1] / "data"
    for v in (1, 2):
        with streamstore.open(data / f"golden_v{v}.h5") as s:
            assert not s.dose_corrected and s.dose_model is None
            np.testing.assert_array_equal(s.dose("events"), s.event_counts)
            assert f"(format {v})" in s.dose_label
            with pytest.raises(UserError):
                s.fractions(0)
