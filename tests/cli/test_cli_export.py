"""``streamstore export``: TIFF dose fractions with dose files, npy windows, stempy."""

from __future__ import annotations

import json

import numpy as np
import pytest

import streamstore
from tests._cli_data import SHAPE, cli, cli_here, make_store

tifffile = pytest.importorskip("tifffile")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    return {
        "run": make_store(d / "run1.h5", 300),
        "nopx": make_store(d / "nopx.h5", 120, pixel_size_A=None),
        "dense": make_store(d / "dense.h5", 300, p=0.3, shape=(16, 24), missing=()),
    }


def _dose_table(path):
    """(header lines, column names, rows as float array) of a *_dose.txt file."""
    lines = path.read_text().splitlines()
    header = [ln for ln in lines if ln.startswith("#")]
    names = header[-1].lstrip("# ").split("\t")
    rows = np.array([[float(v) for v in ln.split("\t")] for ln in lines if not ln.startswith("#")])
    return header, names, rows


def _check_pages_equal_sums(st, tif_path, fractions):
    with tifffile.TiffFile(tif_path) as tif:
        pages = tif.asarray()
        assert len(tif.pages) == len(fractions)
    pages = pages.reshape(len(fractions), *st.frame_shape)
    for k, f in enumerate(fractions):
        np.testing.assert_array_equal(pages[k], st.sum(f.start, f.stop), err_msg=f"page {k}")
    return pages


def test_tiff_fractions_drop_remainder(stores, tmp_path):
    x = 0.1  # e/A^2 per fraction; the series holds about 1.6 e/A^2
    out = tmp_path / "movie.tif"
    res = cli(
        "export", stores["run"], out, "--format", "tiff", "--dose-per-fraction", x, "--unit", "e/A2"
    )
    assert res.returncode == 0, res.stderr
    with streamstore.open(stores["run"]) as st:
        dose = st.dose(unit="e/A2")
        total = float(dose.sum())
        all_fracs = st.fractions(x, unit="e/A2")
        header, names, rows = _dose_table(tmp_path / "movie_dose.txt")
        n_pages = rows.shape[0]
        first = rows[:, names.index("first_frame")].astype(int)
        count = rows[:, names.index("n_frames")].astype(int)
        fracs = [slice(a, a + n) for a, n in zip(first, count, strict=True)]
        # pages are Store.fractions in order, contiguous from frame 0, remainder left out
        assert fracs == all_fracs[:n_pages]
        assert n_pages == len(all_fracs) - 1
        rem = all_fracs[-1]
        assert float(dose[rem].sum()) < x
        pages = _check_pages_equal_sums(st, out, fracs)
        assert pages.dtype == np.uint8
        # the dose file sums to the exported total: whole series minus the remainder
        exported = total - float(dose[rem].sum())
        assert rows[:, names.index("e_per_A2")].sum() == pytest.approx(exported, rel=1e-7)
        assert rows[:, names.index("cumulative_e_per_A2")][-1] == pytest.approx(exported, rel=1e-7)
        assert rows[:, names.index("events")].sum() == pages.sum()
        ids = st.frame_ids
        assert list(rows[:, names.index("first_frame_id")].astype(int)) == [
            int(ids[f.start]) for f in fracs
        ]
    # each page within one frame's dose of the target
    assert np.all(np.abs(rows[:, names.index("e_per_A2")] - x) < 2 * dose.max())
    text = "\n".join(header)
    relion = [h for h in header if h.startswith("# RELION")]
    assert len(relion) == 1 and '"Dose per frame (e/A^2)"' in relion[0]
    # RELION's value is the mean dose of a page (a fraction), not of a raw frame
    assert float(relion[0].rsplit(":", 1)[1]) == pytest.approx(
        rows[:, names.index("e_per_A2")].mean(), rel=1e-5
    )
    assert "one page of this TIFF = one dose fraction" in text
    assert f"# cryoSPARC: {n_pages} fractions (pages), total exposure dose" in text
    assert f"remainder: frames {rem.start}:{rem.stop}" in text and "NOT in the TIFF" in text
    assert f"remainder: {rem.stop - rem.start} frames" in res.stdout
    # MotionCor2 -FmIntFile: one '1 1 <dose>' line per page, in e/A^2
    fm = np.loadtxt(tmp_path / "movie_fmint.txt", ndmin=2)
    assert fm.shape == (n_pages, 3)
    assert np.all(fm[:, :2] == 1)
    np.testing.assert_allclose(fm[:, 2], rows[:, names.index("e_per_A2")], rtol=1e-5)
    # the TIFF says where it came from
    with tifffile.TiffFile(out) as tif:
        desc = json.loads(tif.pages[0].description)
    assert desc["fractions"] == [[f.start, f.stop] for f in fracs]
    assert desc["pixel_size_A"] == pytest.approx(0.83)


def test_tiff_keep_remainder_sums_to_total(stores, tmp_path):
    out = tmp_path / "all.tif"
    res = cli_here(
        "export",
        stores["run"],
        out,
        "-f",
        "tiff",
        "--dose-per-fraction",
        "0.07",
        "--remainder",
        "keep",
        "--dtype",
        "uint16",
    )
    assert res.returncode == 0, res.stderr
    assert "written as the last page" in res.stdout
    with streamstore.open(stores["run"]) as st:
        fracs = st.fractions(0.07, unit="e/px")
        _, names, rows = _dose_table(tmp_path / "all_dose.txt")
        assert rows.shape[0] == len(fracs)
        pages = _check_pages_equal_sums(st, out, fracs)
        assert pages.dtype == np.uint16
        assert pages.sum() == st.event_counts.sum()
        assert rows[:, names.index("e_per_px")].sum() == pytest.approx(
            float(st.dose(unit="e/px").sum()), rel=1e-7
        )
        assert rows[:, names.index("e_per_A2")].sum() == pytest.approx(
            float(st.dose(unit="e/A2").sum()), rel=1e-7
        )


def test_tiff_without_pixel_size(stores, tmp_path):
    out = tmp_path / "np.tif"
    res = cli_here(
        "export",
        stores["nopx"],
        out,
        "-f",
        "tiff",
        "--dose-per-fraction",
        "120",
        "--unit",
        "events",
        "--remainder",
        "keep",
    )
    assert res.returncode == 0, res.stderr
    assert "MotionCor2 -FmIntFile not written" in res.stdout
    assert not (tmp_path / "np_fmint.txt").exists()
    header, names, rows = _dose_table(tmp_path / "np_dose.txt")
    assert "e_per_A2" not in names
    assert any("No pixel size recorded" in h for h in header)
    with streamstore.open(stores["nopx"]) as st:
        assert rows[:, names.index("events")].sum() == st.event_counts.sum()
        assert rows[:, names.index("e_per_px")].sum() == pytest.approx(
            float(st.dose(unit="e/px").sum()), rel=1e-7
        )
        _check_pages_equal_sums(st, out, st.fractions(120, unit="events"))


def test_tiff_dtype_follows_frames_per_page(stores, tmp_path):
    # 16 x 24 frames, a pixel hit in ~90 % of 300 frames: one page holds > 255 counts
    dense = stores["dense"]
    with streamstore.open(dense) as st:
        total = int(st.event_counts.sum())
        assert int(st.sum().max()) > 255
    res = cli_here(
        "export",
        dense,
        tmp_path / "one.tif",
        "-f",
        "tiff",
        "--dose-per-fraction",
        total,
        "--unit",
        "events",
    )
    assert res.returncode == 0, res.stderr
    with streamstore.open(dense) as st:
        pages = _check_pages_equal_sums(st, tmp_path / "one.tif", [slice(0, 300)])
    assert pages.dtype == np.uint16  # 300 frames per page cannot fit uint8 in the worst case
    res = cli_here(
        "export",
        dense,
        tmp_path / "bad.tif",
        "-f",
        "tiff",
        "--dose-per-fraction",
        total,
        "--unit",
        "events",
        "--dtype",
        "uint8",
    )
    assert res.returncode == 2
    assert "more than uint8 holds" in res.stderr
    assert not (tmp_path / "bad.tif").exists()


def test_npy_window_with_roi(stores, tmp_path):
    out = tmp_path / "win.npy"
    res = cli_here(
        "export",
        stores["run"],
        out,
        "-f",
        "npy",
        "--start",
        "7",
        "--stop",
        "61",
        "--roi",
        "10,200,33,300",
        "--dtype",
        "uint8",
    )
    assert res.returncode == 0, res.stderr
    arr = np.load(out)
    meta = json.loads((tmp_path / "win.json").read_text())
    with streamstore.open(stores["run"]) as st:
        np.testing.assert_array_equal(arr, st.frames(7, 61, roi=(10, 200, 33, 300)))
        assert meta["frame_ids"] == st.frame_ids[7:61].tolist()
        assert meta["timestamps_ns"] == st.timestamps_ns[7:61].tolist()
    assert arr.dtype == np.uint8 and arr.shape == (54, 190, 267)
    assert meta["roi"] == [10, 200, 33, 300] and meta["shape"] == [54, 190, 267]


def test_npy_whole_series_in_small_chunks(stores, tmp_path):
    from streamstore.exports.images import export_npy

    with streamstore.open(stores["nopx"]) as st:
        # chunks of 3 frames: the chunked writer must stitch windows exactly
        r = export_npy(
            st, tmp_path / "all.npy", chunk_bytes=3 * SHAPE[0] * SHAPE[1] * 2, progress=False
        )
        np.testing.assert_array_equal(np.load(r.path), st.frames(0, st.n_frames))
    assert r.shape == (120, *SHAPE)


def test_stempy_export_via_cli(stores, tmp_path):
    out = tmp_path / "run1_stempy.h5"
    res = cli(
        "export",
        stores["run"],
        out,
        "--format",
        "stempy",
        "--start",
        "20",
        "--stop",
        "260",
        "--scan-shape",
        "12x20",
    )
    assert res.returncode == 0, res.stderr
    assert "frames 20:260, scan 12x20" in res.stdout
    back = streamstore.import_stempy(out)
    with streamstore.open(stores["run"]) as st:
        assert back.events == st.events(20, 260)
    assert back.scan_shape == (12, 20)
    # a scan shape that does not divide the frames is a person's mistake: exit 2, no file
    bad = tmp_path / "bad_stempy.h5"
    res = cli_here("export", stores["run"], bad, "-f", "stempy", "--scan-shape", "7x7")
    assert res.returncode == 2 and "scan_shape" in res.stderr
    assert not bad.exists()


def test_tiff_from_a_sharded_series(tmp_path):
    from tests._cli_data import make_sharded

    d = make_sharded(tmp_path / "series")
    res = cli_here(
        "export",
        d,
        tmp_path / "s.tif",
        "-f",
        "tiff",
        "--dose-per-fraction",
        "0.05",
        "--remainder",
        "keep",
    )
    assert res.returncode == 0, res.stderr
    with streamstore.open(d) as st:
        pages = _check_pages_equal_sums(st, tmp_path / "s.tif", st.fractions(0.05))
        assert pages.sum() == st.event_counts.sum()


def test_remainder_rule_against_brute_force(stores, tmp_path):
    from streamstore.exports.images import export_tiff

    with streamstore.open(stores["run"]) as st:
        dose = st.dose(unit="e/px")
        total = float(dose.sum())
        for i, x in enumerate(np.linspace(3 * dose.max(), total / 2, 9)):
            r = export_tiff(st, tmp_path / f"t{i}.tif", x, progress=False)
            # with fractions much larger than one frame no fraction is skipped, so the
            # full fractions are exactly floor(total / x)
            assert r.n_pages == int(np.floor(total / x)), x
            assert r.fractions[0].start == 0
            pairs = zip(r.fractions, r.fractions[1:], strict=False)
            assert all(a.stop == b.start for a, b in pairs)
            end = r.fractions[-1].stop
            if r.remainder is None:
                assert end == st.n_frames
            else:  # the frames after the last full fraction, with less than x
                assert r.remainder == slice(end, st.n_frames)
                assert r.remainder_dose == pytest.approx(float(dose[end:].sum()))
                assert r.remainder_dose < x
            # every full fraction reaches its share of the running dose
            cum = np.cumsum(dose)
            for k, f in enumerate(r.fractions):
                assert cum[f.stop - 1] >= (k + 1) * x * (1 - 1e-12)
