"""The ingest daemon stores the corrected dose: a real daemon process, real sockets and files."""

from __future__ import annotations

import numpy as np
import pytest

import streamstore
from streamstore.counting import count
from streamstore.counting.dose import DOSE_MODEL_NAME, DoseCorrector
from tests._ingest_harness import send_series

N_FRAMES = 24


def test_daemon_writes_the_corrected_dose_in_frame_order(tmp_path, series, start_daemon, pusher):
    out = tmp_path / "out"
    d = start_daemon(out, calibration=series.calibration_path)
    s = pusher(d.listen)
    # frames arrive out of order within small blocks: the daemon counts them in id order
    rng = np.random.default_rng(5)
    ids = np.concatenate([rng.permutation(np.arange(k, k + 4)) for k in range(0, N_FRAMES, 4)])
    send_series(s, series, "dose", ids.tolist(), start=N_FRAMES, end=N_FRAMES)
    d.wait_until(lambda st: st["series_closed"] >= 1, 120, "the series closed")
    s.close(0)
    assert d.stop() == 0, d.log()
    with streamstore.open(out / "dose.h5") as store:
        assert store.format_version == 3 and store.n_frames == N_FRAMES
        assert series.check_store(store) == N_FRAMES
        assert store.dose_corrected
        model = store.dose_model
        assert model["name"] == DOSE_MODEL_NAME and model["frames_seen"] == N_FRAMES
        electrons = store.dose("events")
        counts = store.dose("events", corrected=False)
    # the daemon's electrons are those of one corrector fed the frames in id order,
    # one frame at a time: how the frames were batched does not change them
    frames = np.stack([series.frame(i) for i in range(N_FRAMES)])
    events = count(frames, series.calibration)
    corrector = DoseCorrector(series.shape, calibration=series.calibration)
    parts = ((0, 5), (5, 1), (6, 18))
    expected = np.concatenate(
        [corrector(events.slice(k, k + n), frames[k : k + n]).electrons for k, n in parts]
    )
    np.testing.assert_array_equal(electrons, expected)
    np.testing.assert_array_equal(counts, events.counts)
    # about 0.03 e/px/frame: coincidence loss is real here, the correction adds electrons
    assert electrons.sum() > 1.02 * counts.sum()


def test_daemon_estimates_a_bright_disk_from_its_charge(tmp_path, start_daemon, pusher):
    from streamstore import Calibration
    from streamstore.camera.emulator import CameraEmulator
    from streamstore.link import protocol

    shape, n = (96, 128), 40
    emu = CameraEmulator(shape, pattern="disk", dose_rate_e_per_px_s=45.0, seed=9)  # 0.03
    dark, _ = emu.dark_frames(24)
    cal = Calibration.from_dark_frames(dark, xray_threshold=1000.0)
    cal.save(tmp_path / "cal.h5")
    frames, truth = emu.generate(n)
    out = tmp_path / "out"
    d = start_daemon(out, calibration=tmp_path / "cal.h5")
    s = pusher(d.listen)
    start = protocol.Start(series_id="disk", frame_shape=shape, dtype="uint16",
                           frame_time_s=emu.frame_time_s, n_frames=n)  # fmt: skip
    s.send_multipart(protocol.encode_start(start))
    for i in range(n):
        s.send_multipart(protocol.encode_image("disk", i, 1000 * i, frames[i]), copy=False)
    s.send_multipart(protocol.encode_end("disk", n))
    d.wait_until(lambda st: st["series_closed"] >= 1, 120, "the series closed")
    s.close(0)
    assert d.stop() == 0, d.log()
    with streamstore.open(out / "disk.h5") as store:
        electrons = store.dose("events")
        model = store.dose_model
    assert model["charge"] and model["charge_tiles"] > 0 and model["windows"] >= 300
    expected = DoseCorrector(shape, calibration=cal)(count(frames, cal), frames).electrons
    np.testing.assert_array_equal(electrons, expected)
    # the frames after the charge of one electron is known: the bright disk is dosed
    late = slice(n // 2, n)
    assert electrons[late].sum() == pytest.approx(truth.counts()[late].sum(), rel=0.04)
