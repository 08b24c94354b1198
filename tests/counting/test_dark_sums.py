"""Dark-frame calibrations from running sums: iterators equal arrays, memory flat in n.

The daemon test sends a dark series of 100 frames to a real ``streamstore ingest``
with a budget that holds about 10 of them, and checks that the calibration it
saves is the one ``Calibration.from_dark_frames`` makes from all 100.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import zmq

from streamstore import Calibration
from streamstore.camera.emulator import CameraEmulator
from streamstore.counting.dark_sums import DarkSums
from streamstore.link import protocol
from tests._ingest_harness import Daemon, Series, pusher

SHAPE = (64, 96)


def _same(a: Calibration, b: Calibration) -> None:
    assert np.array_equal(a.dark, b.dark)
    assert np.array_equal(a.noise, b.noise)
    assert np.array_equal(a.mask, b.mask)
    assert {**a.summary(), "source": ""} == {**b.summary(), "source": ""}  # a loaded one: "file"


def test_an_iterator_of_frames_gives_the_array_calibration():
    dark, _ = CameraEmulator(SHAPE, seed=11).dark_frames(40)
    ref = Calibration.from_dark_frames(dark)
    _same(Calibration.from_dark_frames(f for f in dark), ref)  # a generator
    _same(Calibration.from_dark_frames(list(dark)), ref)  # a list is stacked, as before
    # blocks of frames, in any grouping, sum to the same
    sums = DarkSums()
    for block in (dark[:3], dark[3], dark[4:29], dark[29:]):
        sums.add(block)
    _same(Calibration.from_dark_frames(sums, xray_threshold=400.0), ref.with_xray_threshold(400.0))
    # float frames: equal up to the float64 rounding of the sums
    rng = np.random.default_rng(5)
    fl = dark.astype(np.float32) + rng.random(dark.shape, dtype=np.float32)
    a, b = Calibration.from_dark_frames(fl), Calibration.from_dark_frames(iter(fl))
    np.testing.assert_allclose(a.dark, b.dark, rtol=1e-6)
    np.testing.assert_allclose(a.noise, b.noise, rtol=1e-5)


def test_iterator_errors_name_the_frame():
    frames = [np.zeros(SHAPE, np.uint16), np.zeros((64, 95), np.uint16)]
    with pytest.raises(ValueError, match=r"dark_frames\[1\] has shape \(64, 95\)"):
        Calibration.from_dark_frames(iter(frames))
    with pytest.raises(ValueError, match="at least 2 frames, got 1"):
        Calibration.from_dark_frames(iter(frames[:1]))
    with pytest.raises(ValueError, match="at least 2 frames, got 0"):
        Calibration.from_dark_frames(iter([]))
    with pytest.raises(ValueError, match=r"dark_frames\[0\] must be numeric"):
        Calibration.from_dark_frames(iter([np.array([["a"]])]))


def _peak_bytes(n_frames: int, shape=(256, 384)) -> int:
    def frames():
        rng = np.random.default_rng(3)
        for _ in range(n_frames):
            yield rng.integers(90, 110, size=shape, dtype=np.uint16)

    tracemalloc.start()
    try:
        Calibration.from_dark_frames(frames())
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_dark_frames():
    frame_bytes = 256 * 384 * 2
    few, many = _peak_bytes(8), _peak_bytes(96)
    # 96 frames stacked would be 18.9 MB; the running sums take 16 bytes per pixel
    assert many <= few + frame_bytes, (few, many)
    assert many < 96 * frame_bytes / 2, (few, many)


def test_the_daemon_calibrates_from_every_frame_of_a_long_dark_series(tmp_path):
    series = Series(tmp_path)
    dark, _ = CameraEmulator(SHAPE, seed=21).dark_frames(100)
    out = tmp_path / "out"
    # a 0.5 MB budget holds about 40 of these 12 KB frames, a quarter of it 10
    args = ("--max-buffer-mb", "0.5", "--xray-threshold", "none")
    with Daemon(out, args=args) as d:
        d.wait_ready()
        ctx = zmq.Context()
        push = pusher(ctx, d.listen)
        try:
            push.send_multipart(series.start("dk", n_frames=100, meta={"kind": "dark"}))
            for i, frame in enumerate(dark):
                push.send_multipart(protocol.encode_image("dk", i, i, frame), copy=False)
            push.send_multipart(series.end("dk", 100))
            push.send_multipart(series.start("data", n_frames=4))
            for i in range(4):
                push.send_multipart(series.image("data", i), copy=False)
            push.send_multipart(series.end("data", 4))
            d.wait_until(
                lambda st: any(c["series_id"] == "data" for c in st.get("closed_series", [])),
                90,
                "the data series closed",
            )
        finally:
            push.close(0)
            ctx.term()
        assert d.stop() == 0
    ref = Calibration.from_dark_frames(dark)
    _same(Calibration.load(out / "dk.calibration.h5"), ref)
    import streamstore

    with streamstore.open(out / "data.h5") as store:
        assert "(100 frames)" in store.attrs["meta"]["calibration_source"]
        assert store.events(0, 4) == streamstore.count(series.frames[:4], ref)
