"""`streamstore demo`: daemon and emulator processes, then a summary read back from the file."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

import streamstore


def test_demo_runs_end_to_end_and_reports_what_it_stored(tmp_path):
    out = tmp_path / "demo"
    cmd = [
        sys.executable, "-m", "streamstore", "demo", "--out", str(out), "--shape", "64x96",
        "--frames", "80", "--fps", "0", "--dark-frames", "12", "--pool", "16",
        "--score-frames", "40", "--timeout", "240",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "frames sent 80, received 80, stored 80, missing 0, duplicate 0, rejected 0" in text
    assert "calibration from dark_frames" in text
    m = re.search(r"recall ([0-9.]+), precision ([0-9.]+)", text)
    assert m, text
    recall, precision = float(m.group(1)), float(m.group(2))
    assert 0.5 < recall <= 1.0 and 0.9 < precision <= 1.0
    (h5,) = [p for p in out.glob("demo-*.h5") if p.name.count(".") == 1]
    assert f"file: {h5.resolve()}" in text
    store = streamstore.open(h5)
    assert store.n_frames == 80 and store.frame_shape == (64, 96)
    m = re.search(r"events: (\d+) ", text)
    assert int(m.group(1)) == store.n_events > 0
    # the dark series became a saved calibration and the calibration of the data
    (cal,) = out.glob("*_dark.calibration.h5")
    assert streamstore.Calibration.load(cal).frame_shape == (64, 96)
    png = out / h5.name.replace(".h5", ".png")
    assert f"summed image (and dose per frame): {png.resolve()}" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the pixel size (--pixel-size, default 1.0 A) is in the file: dose in e/A^2
    assert store.pixel_size_A == 1.0
    num = r"([0-9.e+-]+)"
    m = re.search(rf"counted dose: {num} e/A\^2 in 80 frames, {num} e/A\^2/frame", text)
    assert m, text
    total = store.n_events / (64 * 96 * 1.0**2)
    assert float(m.group(1)) == pytest.approx(total, rel=1e-3)
    assert float(m.group(2)) == pytest.approx(total / 80, rel=1e-3)
    # and the corrected dose the store gives by default, said so
    m = re.search(
        rf"corrected dose: {num} e/A\^2 in 80 frames \(dose: electrons, coincidence", text
    )
    assert m, text
    assert float(m.group(1)) == pytest.approx(float(store.dose(unit="e/A2").sum()), rel=1e-3)
    assert float(m.group(1)) > total  # the check can fail: the correction adds electrons
    assert np.array_equal(store.sum(), store.events(0, 80).to_dense().sum(axis=0))
    # ground truth only when asked (--truth): scored, then deleted
    assert not list(out.glob("*truth*"))
    # the demo and `info` print the same two rates, each named
    m = re.search(r"frame time ([0-9.]+) ms \(([0-9.,]+) frames/s while exposing\); "
                  r"sent at ([0-9.,]+) frames/s", text)  # fmt: skip
    assert m, text
    info = subprocess.run([sys.executable, "-m", "streamstore", "info", str(h5)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert info.returncode == 0, info.stderr
    assert f"frame time {m.group(1)} ms ({m.group(2)} frames/s while exposing)" in info.stdout
    assert f"sent at {m.group(3)} frames/s" in info.stdout


def test_demo_keeps_the_truth_when_asked(tmp_path):
    out = tmp_path / "demo"
    cmd = [
        sys.executable, "-m", "streamstore", "demo", "--out", str(out), "--shape", "32x48",
        "--frames", "20", "--fps", "0", "--dark-frames", "4", "--pool", "4",
        "--score-frames", "10", "--timeout", "240", "--truth",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (truth,) = out.glob("*.truth.h5")
    assert f"ground truth: {truth.resolve()}" in proc.stdout


def test_demo_refuses_a_bad_pixel_size(tmp_path):
    cmd = [sys.executable, "-m", "streamstore", "demo", "--out", str(tmp_path / "d"),
           "--pixel-size", "0"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--pixel-size" in proc.stderr
    assert not list((tmp_path / "d").glob("*.h5"))
