"""The exports' dose outputs are the corrected dose, and say so."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

import streamstore
from streamstore import EventBatch, StoreWriter
from streamstore.exports.eer import export_eer
from streamstore.exports.images import export_tiff
from streamstore.exports.libertem_io import export_raw_csr
from streamstore.exports.stempy_io import export_stempy

SHAPE = (16, 24)
LABEL = "dose: electrons, coincidence-corrected (model tile-coincidence)"


@pytest.fixture
def store_path(tmp_path, rng):
    n = 12
    hit = rng.random((n, SHAPE[0] * SHAPE[1])) < 0.05
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(hit.sum(1), out=offsets[1:])
    electrons = np.diff(offsets) * 1.25 + 0.5
    b = EventBatch(offsets, np.nonzero(hit)[1].astype(np.uint32), frame_shape=SHAPE,
                   electrons=electrons)  # fmt: skip
    path = tmp_path / "d.h5"
    with StoreWriter(path, SHAPE, frame_time_s=1e-3, pixel_size_A=2.0) as w:
        w.set_dose_model({"name": "tile-coincidence", "hard_area": 9.0})
        w.append(b, np.arange(n), np.arange(n) * 1000)
    return path


def _table(path):
    lines = path.read_text().splitlines()
    rows = np.array([[float(v) for v in ln.split("\t")] for ln in lines if not ln.startswith("#")])
    return lines, rows


def test_eer_dose_sidecar(tmp_path, store_path):
    with streamstore.open(store_path) as s:
        r = export_eer(s, tmp_path / "m.eer")
        el, counts = s.dose("events"), s.event_counts
    lines, rows = _table(r.dose_path)
    assert f"# {LABEL} (the e_per_* columns)" in lines
    # columns: page, frame_id, stored, events, e_per_px, e_per_A2, cumulative_e_per_A2
    np.testing.assert_array_equal(rows[:, 3], counts)
    np.testing.assert_allclose(rows[:, 4], el / (16 * 24), rtol=1e-8)
    np.testing.assert_allclose(rows[:, 6], np.cumsum(el) / (16 * 24 * 4.0), rtol=1e-8)


def test_tiff_dose_table_and_description(tmp_path, store_path):
    import json

    import tifffile

    with streamstore.open(store_path) as s:
        el = s.dose("events")
        r = export_tiff(s, tmp_path / "m.tif", float(el[:3].sum()) / (16 * 24), unit="e/px")
    lines, rows = _table(r.dose_path)
    assert f"# {LABEL}" in lines
    pages = [float(el[f].sum()) for f in r.fractions]
    # columns: page, first_frame, n_frames, first_id, last_id, events, e_per_px, ...
    np.testing.assert_allclose(rows[:, 6], np.array(pages) / (16 * 24), rtol=1e-8)
    with tifffile.TiffFile(r.path) as t:
        assert json.loads(t.pages[0].description)["dose"] == LABEL


def test_stempy_and_libertem_metadata(tmp_path, store_path):
    with streamstore.open(store_path) as s:
        total = float(s.dose("events").sum())
        out = export_stempy(s, tmp_path / "m.h5")
        toml = export_raw_csr(s, tmp_path / "m.toml")
    with h5py.File(out) as f:
        assert f["metadata"].attrs["dose"] == LABEL
        assert f["metadata"].attrs["dose_electrons"] == pytest.approx(total)
    assert toml.read_text().startswith(f"# {LABEL}; {total:.6g} electrons")
