"""``streamstore ingest --gain-reference FILE``: a real daemon whose every calibration
(an estimate from the data, a dark series', a ``--calibration`` file's) takes the
gain map, a series of another shape counted without it, and bad maps refused
with one sentence and exit 2 before anything listens."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import streamstore
from streamstore.camera.emulator import CameraEmulator
from streamstore.link.protocol import Start
from streamstore.link.sockets import Sender
from tests._ingest_harness import Daemon

SHAPE = (64, 96)
FRAME_TIME = 1e-3
XRAY = 1000.0


@pytest.fixture(scope="module")
def sensor():
    emu = CameraEmulator(
        SHAPE, frame_time_s=FRAME_TIME, dose_rate_e_per_px_s=20.0, seed=41, gain_sigma=0.1
    )
    dark, _ = emu.dark_frames(12)
    frames, _ = emu.generate(24)
    return emu, dark, frames


@pytest.fixture(scope="module")
def gain_file(tmp_path_factory, sensor) -> Path:
    emu = sensor[0]
    path = tmp_path_factory.mktemp("gain") / "gain.npy"
    np.save(path, (1 / emu.gain).astype(np.float32))  # the sensor's own gain
    return path


def _send(sender: Sender, sid: str, frames: np.ndarray, **meta) -> None:
    shape = frames.shape[1:]
    sender.send_start(Start(sid, shape, "uint16", FRAME_TIME, n_frames=len(frames), meta=meta))
    for i, frame in enumerate(frames):
        sender.send_image(sid, i, frame, timestamp_ns=i)
    sender.send_end(sid, len(frames))


def test_every_calibration_the_daemon_makes_takes_the_gain(tmp_path, sensor, gain_file):
    emu, dark, frames = sensor
    gain = np.load(gain_file)
    out = tmp_path / "out"
    d = Daemon(out, args=("--gain-reference", str(gain_file), "--xray-threshold", str(XRAY)))
    other = CameraEmulator((32, 48), frame_time_s=FRAME_TIME, dose_rate_e_per_px_s=20.0, seed=3)
    other_frames, _ = other.generate(10)
    try:
        d.wait_ready()
        with Sender(d.listen, bind=False, linger_s=5.0) as s:
            _send(s, "estimated", frames)  # nothing known yet: an estimate from the data
            _send(s, "small", other_frames)  # another shape: no gain for it
            _send(s, "darks", dark, kind="dark")
            _send(s, "counted", frames)  # the dark series' calibration
        d.wait_until(lambda st: st["series_closed"] >= 4, 120, "4 closed series")
    finally:
        assert d.stop(30) == 0, d.log()
    with streamstore.open(out / "estimated.h5") as store:
        assert store.calibration_summary["has_gain"] is True
        assert store.meta["calibration_source"].endswith(f"with gain reference {gain_file}")
    with streamstore.open(out / "small.h5") as store:
        assert store.calibration_summary["has_gain"] is False
    assert "the gain reference is 64 x 96, its frames 32 x 48" in d.log()
    with streamstore.open(out / "counted.h5") as store:
        assert store.calibration_summary["has_gain"] is True
        source = store.meta["calibration_source"]
        assert source.startswith("dark_frames:darks") and source.endswith(str(gain_file))
        expected = streamstore.Calibration.from_dark_frames(dark, xray_threshold=XRAY, gain=gain)
        got = store.events(0, len(frames))
    assert got == streamstore.count(frames, expected)
    # the gain changed what was counted (the check can fail: a map of ones would not)
    assert got != streamstore.count(
        frames, streamstore.Calibration.from_dark_frames(dark, xray_threshold=XRAY)
    )


def _ingest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    link = () if "--connect" in args else ("--listen", "tcp://127.0.0.1:0")
    return subprocess.run(
        [sys.executable, "-m", "streamstore", "ingest", "--out", str(tmp_path / "o"),
         *link, "--status-endpoint", "none", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_bad_gain_references_exit_2_with_one_sentence(tmp_path, sensor, gain_file):
    emu, dark, _ = sensor
    with_gain = tmp_path / "with_gain.h5"
    streamstore.Calibration.from_dark_frames(dark, gain=np.ones(SHAPE)).save(with_gain)
    plain = tmp_path / "plain.h5"
    streamstore.Calibration.from_dark_frames(dark[:, :32, :48]).save(plain)
    text = tmp_path / "gain.txt"
    text.write_text("not a map")
    cases = [
        (("--gain-reference", str(tmp_path / "missing.npy")), "no such file"),
        (("--gain-reference", str(text)), "not a .npy array, a TIFF or a calibration file"),
        (("--gain-reference", str(plain)), "holds no gain map"),
        (
            ("--gain-reference", str(gain_file), "--calibration", str(with_gain)),
            "has a gain map of its own",
        ),
        (
            ("--gain-reference", str(gain_file), "--calibration", str(plain)),
            "the map is 64 x 96, the --calibration file's frames 32 x 48",
        ),
    ]
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros(SHAPE, np.float32))
    cases.append((("--gain-reference", str(bad)), "every value must be finite and > 0"))
    for args, message in cases:
        proc = _ingest(tmp_path, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, proc.stderr)


def test_a_bad_gain_reference_stops_a_broker_before_its_workers(tmp_path):
    proc = _ingest(
        tmp_path, "--gain-reference", str(tmp_path / "missing.npy"), "--workers", "2",
        "--connect", "tcp://127.0.0.1:1",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--gain-reference" in lines[0] and "no such file" in lines[0]
    assert "started" not in proc.stderr and not list((tmp_path / "o").glob("*.h5"))
