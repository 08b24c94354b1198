"""X-ray hits and the calibration the ingest daemon builds from a dark series.

A real ``streamstore emulate`` sends a dark series and a data series with
X-ray hits to a real ``streamstore ingest``; the stored events are checked
against the emulator's ground truth (``truth.xray_positions``).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import streamstore
from streamstore.camera.emulator import CameraEmulator
from streamstore.camera.truth import Truth
from streamstore.counting.calibration import Calibration

SHAPE = (64, 96)
N_FRAMES = 40


def _near_xray(indices: np.ndarray, xrays: np.ndarray, radius: int) -> int:
    """Events within ``radius`` (Chebyshev) of any X-ray hit of the frame."""
    if xrays.size == 0 or indices.size == 0:
        return 0
    rows, cols = np.divmod(indices.astype(np.int64), SHAPE[1])
    d = np.maximum(
        np.abs(rows[:, None] - xrays[None, :, 0]), np.abs(cols[:, None] - xrays[None, :, 1])
    )
    return int(np.count_nonzero(d.min(axis=1) <= radius))


@pytest.mark.parametrize("xray", ["auto", "1500", "none"])
def test_dark_series_calibration_excludes_xray_hits(tmp_path, xray, start_daemon):
    out = tmp_path / "out"
    truth_path = tmp_path / "truth.h5"
    d = start_daemon(out, args=("--xray-threshold", xray, "--exit-after-series", "2"))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamstore",
            "emulate",
            "--connect",
            d.listen,
            "--shape",
            f"{SHAPE[0]}x{SHAPE[1]}",
            "--dark-frames",
            "16",
            "--frames",
            str(N_FRAMES),
            "--pool",
            str(N_FRAMES),
            "--seed",
            "11",
            "--series-id",
            "xr",
            "--truth",
            str(truth_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert d.wait_exit(120) == 0, d.log()
    log = d.log()
    truth = Truth.load(truth_path)
    n_xrays = sum(len(x) for x in truth.xray_positions)
    assert n_xrays >= 8  # about 0.5 per frame: the test needs some
    with streamstore.open(out / "xr.h5") as store:
        cal = store.calibration_summary
        assert cal["source"] == "dark_frames"
        assert store.n_frames == N_FRAMES
        batch = store.events(0, N_FRAMES)
        tid = {int(f): k for k, f in enumerate(truth.frame_ids)}
        near = at = 0
        for k, fid in enumerate(store.frame_ids.tolist()):
            xr = truth.xray_positions[tid[fid]]
            idx = batch.frame(k).indices
            near += _near_xray(idx, xr, cal["xray_radius"])
            at += _near_xray(idx, xr, 0)
        n_electrons = sum(len(p) for p in truth.positions)
    if xray == "none":
        # saturation only: the 3000 ADU hits (16-bit) pass as events - the old behaviour
        assert cal["xray_threshold"] is None
        assert at >= n_xrays // 2
    else:
        assert near == 0, f"{near} events within the X-ray radius of {n_xrays} hits"
        if xray == "auto":
            # 10 x the median electron peak: far above an electron, below a 3000 ADU hit
            assert 300 < cal["xray_threshold"] < 2500, cal
            assert "X-ray threshold" in log
        else:
            assert cal["xray_threshold"] == 1500.0
    # the electrons are still counted (the threshold does not eat the data)
    assert batch.n_events > 0.5 * n_electrons


def test_electron_peak_signal_is_the_estimates_rule():
    emu = CameraEmulator(SHAPE, seed=3, dose_rate_e_per_px_s=30.0, frame_time_s=1e-3)
    dark, _ = emu.dark_frames(16)
    frames, truth = emu.generate(8)
    cal = Calibration.from_dark_frames(dark)
    peak = cal.electron_peak_signal(frames)
    assert peak is not None and 0 < peak < truth.electron_adu_mean
    assert cal.with_xray_threshold(10 * peak).xray_threshold == 10 * peak
    assert cal.with_xray_threshold(10 * peak).source == "dark_frames"
    # the estimate (uniform dark) finds about the same electron scale
    est = Calibration.estimate(frames)
    assert est.xray_threshold == pytest.approx(10 * peak, rel=0.25)
    assert cal.electron_peak_signal(dark) is None  # no electrons, no scale
    with pytest.raises(ValueError, match="calibration is"):
        cal.electron_peak_signal(frames[:, :32])


def test_bad_xray_threshold_is_refused(tmp_path):
    for bad in ("-3", "0", "hot"):
        r = subprocess.run(
            [sys.executable, "-m", "streamstore", "ingest", "--out", str(tmp_path)]
            + ["--listen", "tcp://127.0.0.1:5999", "--xray-threshold", bad],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2 and "--xray-threshold" in r.stderr, r.stderr
