"""``streamstore show --virtual``: PNGs of virtual detectors with the scan axes labelled."""

from __future__ import annotations

import numpy as np
import pytest

import streamstore
from streamstore.analysis.stem_plot import find_disk, virtual_figure
from tests._cli_data import cli, cli_here
from tests.analysis.test_stem import SCAN, make_scan_store

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vshow")
    scan, _d, _i = make_scan_store(d / "scan.h5", frame=(24, 24), fpp=1, flyback=1, seed=2)
    movie, _d, _i = make_scan_store(
        d / "movie.h5", frame=(24, 24), fpp=1, flyback=0, seed=3, scan_in_file=False
    )
    return scan, movie


@pytest.mark.parametrize("kind", ["bf", "adf", "com"])
def test_show_virtual_writes_png(files, tmp_path, kind):
    from matplotlib.image import imread

    out = tmp_path / f"{kind}.png"
    run = cli if kind == "bf" else cli_here  # one in its own interpreter
    res = run("show", files[0], "--virtual", kind, "--out", out)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"wrote {out}"
    png = imread(out)
    assert png.shape[0] > 100 and png[..., :3].std() > 0.05


def test_figure_shows_the_virtual_image_on_labelled_scan_axes(files):
    with streamstore.open(files[0]) as st:
        (cr, cc), radius = find_disk(st.diffraction_sum())
        fig = virtual_figure(st, "bf")
        ax = fig.axes[1]
        assert ax.get_xlabel().startswith("scan column") and ax.get_ylabel().startswith("scan row")
        np.testing.assert_array_equal(
            np.asarray(ax.images[0].get_array()), st.virtual_image(0, radius, (cr, cc))
        )
        com = virtual_figure(st, "com")
        assert [a.get_ylabel() for a in com.axes[1:3]] == ["scan row (0-4)"] * 2
    assert 2 <= radius <= 5  # the test pattern's disk has radius 3


def test_show_virtual_needs_a_scan(files, tmp_path):
    res = cli_here("show", files[1], "--virtual", "bf", "--out", tmp_path / "x.png")
    assert res.returncode == 2 and "no scan geometry" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    rows, cols = SCAN
    res = cli_here(
        "show", files[1], "--virtual", "adf", "--scan", f"{rows},{cols},1,1", "--out",
        tmp_path / "x.png",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    res = cli_here(
        "show", files[1], "--virtual", "bf", "--scan", "3,x", "--out", tmp_path / "y.png"
    )
    assert res.returncode == 2 and "--scan must be" in res.stderr
