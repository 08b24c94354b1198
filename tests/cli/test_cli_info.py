"""``streamstore info``: the summary matches the store, as text and as JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

import streamstore
from tests._cli_data import (
    CALIBRATION,
    COUNTING,
    FRAME_TIME_S,
    MISSING,
    SHAPE,
    cli,
    cli_here,
    make_store,
)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("info") / "run1.h5")


@pytest.fixture(scope="module")
def nopx_path(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("info") / "nopx.h5", 80, pixel_size_A=None)


def test_info_json_matches_store(store_path):
    # the real command, in its own interpreter; the other tests call it in this process
    out = cli("info", store_path, "--json")
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    with streamstore.open(store_path) as st:
        assert s["frames_stored"] == st.n_frames == 300
        assert s["frames_missing"] == len(MISSING)
        assert s["frames_duplicate"] == 2 and s["frames_received"] == 300
        assert s["complete"] is True
        assert s["frame_shape"] == list(SHAPE)
        assert s["first_frame_id"] == int(st.frame_ids[0])
        assert s["last_frame_id"] == int(st.frame_ids[-1])
        assert s["n_events"] == int(st.event_counts.sum())
        assert s["frame_time_s"] == FRAME_TIME_S
        assert s["frame_rate_hz"] == pytest.approx(1 / FRAME_TIME_S)
        # timestamps were written exactly one frame time apart per frame id
        assert s["measured_frame_rate_hz"] == pytest.approx(1 / FRAME_TIME_S, rel=1e-9)
        span_ns = int(st.timestamps_ns[-1] - st.timestamps_ns[0])
        assert s["timestamps_span_s"] == pytest.approx(span_ns / 1e9)
        span = int(st.frame_ids[-1] - st.frame_ids[0] + 1)
        assert s["duration_s"] == pytest.approx(span * FRAME_TIME_S)
        assert s["pixel_size_A"] == st.pixel_size_A
        for unit in ("events", "e/px", "e/A2"):
            d = st.dose(unit=unit)
            assert s["dose_total"][unit] == pytest.approx(float(d.sum()), rel=1e-12)
            assert s["dose_per_frame"][unit]["mean"] == pytest.approx(float(d.mean()), rel=1e-12)
            assert s["dose_per_frame"][unit]["min"] == pytest.approx(float(d.min()))
            assert s["dose_per_frame"][unit]["max"] == pytest.approx(float(d.max()))
        assert s["bits_per_event"] == pytest.approx(st.bits_per_event)
        assert s["raw_dtype"] == st.raw_dtype
    assert s["counting"] == COUNTING
    assert s["calibration_source"] == CALIBRATION["source"]
    assert s["calibration"]["dark_mean"] == CALIBRATION["dark_mean"]
    assert s["meta"] == {"series": "cli-test"}
    assert s["file_size_bytes"] == store_path.stat().st_size


def test_info_text_is_readable(store_path):
    out = cli_here("info", store_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    with streamstore.open(store_path) as st:
        total_a2 = float(st.dose(unit="e/A2").sum())
        n_events = int(st.event_counts.sum())
    assert text.startswith("run1.h5: streamstore.events v3")
    assert "300 stored, 3 missing, 2 duplicate" in text
    assert "256 x 384 px (rows x cols)" in text
    assert f"{n_events:,} events" in text
    assert f"{total_a2:.6g} e/A^2" in text
    assert "bits/event" in text
    assert "method=local maximum 3x3" in text
    assert CALIBRATION["source"] in text
    assert "Traceback" not in out.stderr


def test_info_without_pixel_size(nopx_path):
    s = json.loads(cli_here("info", nopx_path, "--json").stdout)
    assert s["pixel_size_A"] is None
    assert set(s["dose_total"]) == {"events", "e/px"}
    with streamstore.open(nopx_path) as st:
        assert s["dose_total"]["e/px"] == pytest.approx(float(st.dose(unit="e/px").sum()))
    text = cli_here("info", nopx_path).stdout
    assert "e/A^2 needs the pixel size" in text
    assert "pixel size    not recorded" in text


def test_summary_function_is_json_clean(nopx_path):
    from streamstore.cli.info import summary

    with streamstore.open(nopx_path) as st:
        s = summary(st, nopx_path)
    text = json.dumps(s, allow_nan=False)  # no NaN/inf, no numpy scalars
    assert json.loads(text)["frames_stored"] == 80
    assert isinstance(s["dose_per_frame"]["events"]["max"], float)
    assert np.isfinite(s["bits_per_event"])


def test_info_reports_a_real_calibration(tmp_path, rng):
    from streamstore import Calibration, EventBatch, StoreWriter

    dark = rng.normal(100, 3, (16, 32, 48)).astype(np.uint16)
    cal = Calibration.from_dark_frames(dark, n_sigma=4.5)
    path = tmp_path / "cal.h5"
    meta = {"series_id": "run7", "calibration_source": "series run7_dark"}
    with StoreWriter(path, (32, 48), frame_time_s=0.01, calibration=cal, meta=meta) as w:
        w.append(EventBatch([0, 2, 3], [3, 9, 40], frame_shape=(32, 48)), [0, 1], [0, 10**7])
    s = json.loads(cli_here("info", path, "--json").stdout)
    assert s["calibration"]["n_sigma"] == 4.5
    assert s["calibration_source"] == "dark_frames, series run7_dark"
    text = cli_here("info", path).stdout
    assert "n_sigma=4.5" in text  # counting thresholds come from the calibration
    assert "series        series_id=run7" in text
    assert "calibration   dark_frames, series run7_dark" in text


def test_info_on_a_file_being_written(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "live.h5"
    writer = (
        "import sys, numpy as np, streamstore\n"
        f"w = streamstore.StoreWriter({str(path)!r}, (16, 24), frame_time_s=0.01)\n"
        "ev = streamstore.EventBatch(np.arange(11) * 2, np.tile([3, 40], 10),"
        " frame_shape=(16, 24))\n"
        "w.append(ev, np.arange(10), np.arange(10) * 10**7)\n"
        "w.flush()\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"  # hold the file open until the test closes stdin
        "w.close()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", writer], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        out = cli_here("info", path, "--json")
        assert out.returncode == 0, out.stderr
        s = json.loads(out.stdout)
        assert s["open_for_writing"] is True
        assert s["frames_stored"] == 10 and s["n_events"] == 20
        assert "still being written" in cli_here("info", path).stdout
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert proc.returncode == 0
    s = json.loads(cli_here("info", path, "--json").stdout)
    assert s["open_for_writing"] is False and s["frames_stored"] == 10


def test_info_on_a_sharded_series(tmp_path):
    from tests._cli_data import make_sharded

    d = make_sharded(tmp_path / "series")
    out = cli_here("info", d, "--json")
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    with streamstore.open(d) as st:
        assert s["frames_stored"] == st.n_frames == 118
        assert s["n_events"] == int(st.event_counts.sum())
    assert s["shards"] == ["shard-0.h5", "shard-1.h5"]
    assert s["file_size_bytes"] == sum(f.stat().st_size for f in d.glob("shard-*.h5"))
    assert "shards        2 files (shard-0.h5, shard-1.h5)" in cli_here("info", d).stdout


def test_info_says_which_dose(tmp_path):
    """The corrected dose where the file has it, said so; the counted events elsewhere."""
    from pathlib import Path

    golden = Path(__file__).resolve().parents[1] / "data"
    out = cli_here("info", golden / "golden_v2.h5")
    assert out.returncode == 0, out.stderr
    assert "  dose: counted events, no coincidence correction recorded (format 2)\n" in out.stdout
    assert "299 events = " in out.stdout
    s = json.loads(cli_here("info", golden / "golden_v2.h5", "--json").stdout)
    assert s["dose_corrected"] is False and s["dose_model"] is None
    assert s["dose_total"]["events"] == 299

    out = cli_here("info", golden / "golden_v3.h5")
    assert out.returncode == 0, out.stderr
    exp = json.loads((golden / "golden_v3_expected.json").read_text())
    total = sum(exp["electrons"])
    assert "  dose: electrons, coincidence-corrected (model tile-coincidence): hard_area 9" in (
        out.stdout
    )
    assert f"{total:,.1f} electrons (299 events counted) = {total / 240:.6g} e/px" in out.stdout
    s = json.loads(cli_here("info", golden / "golden_v3.h5", "--json").stdout)
    assert s["dose_corrected"] is True and s["dose_model"] == exp["dose_model"]
    assert s["dose_total"]["events"] == pytest.approx(total)
    assert s["n_events"] == 299
    # a version-3 file written without a correction says so with its own version
    out = cli_here("info", make_store(tmp_path / "plain.h5", 20))
    assert "dose: counted events, no coincidence correction recorded (format 3)" in out.stdout
