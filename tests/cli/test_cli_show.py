"""``streamstore show``: a PNG of the expected size whose summed-image panel shows the data."""

from __future__ import annotations

import numpy as np
import pytest

import streamstore
from streamstore.analysis.plotting import DEFAULT_DPI, FIGSIZE_IN, summary_figure
from tests._cli_data import SHAPE, cli, cli_here, make_store

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("show")
    return {
        "run": make_store(d / "run1.h5", 200),
        "empty": make_store(d / "empty.h5", 20, p=0.0, missing=()),
        "dir": d,
    }


def _png(path):
    from matplotlib.image import imread

    img = imread(path)  # float RGBA in [0, 1], rows from the top
    return img[..., :3]


def _image_panel(store_path, png, **kw):
    """Crop the summed-image axes out of ``png`` (positions from the same figure drawn here)."""
    with streamstore.open(store_path) as st:
        fig = summary_figure(st, progress=False, **kw)
    fig.canvas.draw()
    bbox = fig.axes[0].get_window_extent()  # display pixels, origin bottom-left
    h = png.shape[0]
    r0, r1 = int(np.ceil(h - bbox.y1)) + 2, int(np.floor(h - bbox.y0)) - 2
    c0, c1 = int(np.ceil(bbox.x0)) + 2, int(np.floor(bbox.x1)) - 2
    return png[r0:r1, c0:c1]


def test_show_png_size_and_content(stores, tmp_path):
    out = tmp_path / "view.png"
    res = cli("show", stores["run"], "--out", out)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"wrote {out}"
    png = _png(out)
    assert png.shape[:2] == (round(FIGSIZE_IN[1] * DEFAULT_DPI), round(FIGSIZE_IN[0] * DEFAULT_DPI))
    panel = _image_panel(stores["run"], png)
    gray = panel.mean(axis=2)
    assert gray.std() > 0.05, "summed-image panel is blank"
    # the bright disk of the test pattern sits in the middle of the frame
    ph, pw = gray.shape
    centre = gray[ph * 2 // 5 : ph * 3 // 5, pw * 2 // 5 : pw * 3 // 5].mean()
    corner = gray[: ph // 8, : pw // 8].mean()
    assert centre > corner + 0.2


def test_blank_store_gives_blank_panel(stores, tmp_path):
    # the non-blank check above can fail: a store without events draws a uniform panel
    out = tmp_path / "empty.png"
    res = cli_here("show", stores["empty"], "--out", out)
    assert res.returncode == 0, res.stderr
    gray = _image_panel(stores["empty"], _png(out)).mean(axis=2)
    assert gray.std() < 0.01


def test_show_dpi_log_window_and_roi(stores, tmp_path):
    out = tmp_path / "roi.png"
    roi = "20,120,30,200"
    res = cli_here(
        "show",
        stores["run"],
        "--out",
        out,
        "--dpi",
        "60",
        "--log",
        "--start",
        "10",
        "--stop",
        "90",
        "--roi",
        roi,
    )
    assert res.returncode == 0, res.stderr
    png = _png(out)
    assert png.shape[:2] == (round(FIGSIZE_IN[1] * 60), round(FIGSIZE_IN[0] * 60))
    panel = _image_panel(stores["run"], png, start=10, stop=90, roi=roi, log=True, dpi=60)
    assert panel.mean(axis=2).std() > 0.05
    # the ROI box is drawn in cyan: strong green and blue, little red
    cyan = (panel[..., 0] < 0.3) & (panel[..., 1] > 0.7) & (panel[..., 2] > 0.7)
    assert cyan.sum() > 50


def test_default_output_name_in_cwd(stores, tmp_path):
    res = cli_here("show", stores["run"], "--stop", "20", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "run1.png").is_file()


def test_figure_reports_window_and_missing(stores):
    with streamstore.open(stores["run"]) as st:
        fig = summary_figure(st, start=5, stop=50, progress=False)
        n_events = int(st.event_counts[5:50].sum())
        total_a2 = float(st.dose(unit="e/A2").sum())
    ax_img, ax_dose = fig.axes[0], fig.axes[1]
    assert f"frames 5:50 (45 frames, {n_events:,} events)" in ax_img.get_title()
    labels = [t.get_text() for t in ax_dose.get_legend().get_texts()]
    assert "missing frames (3)" in labels and "summed window" in labels
    assert ax_img.get_images()[0].get_array().shape == SHAPE
    # the dose line is broken where frames are missing (ids 5-6 and 100: two gaps)
    line = ax_dose.get_lines()[0]
    assert np.isnan(line.get_ydata()).sum() == 2
    assert np.nansum(line.get_ydata()) == pytest.approx(total_a2)
