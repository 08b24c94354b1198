"""``streamstore emulate`` in a real subprocess, received by a real PULL socket."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import zmq

from streamstore.camera.emulator import CameraEmulator
from streamstore.camera.truth import Truth
from streamstore.link.protocol import End, Image, Start, parse

SHAPE = (64, 96)  # small and non-square: every byte is compared


def _emulate(*args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "streamstore", "emulate", "--shape", "64x96", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _receive_all(sock, n_messages: int) -> list:
    out = []
    for _ in range(n_messages):
        assert sock.poll(60_000), f"nothing received after {len(out)} messages"
        out.append(parse(sock.recv_multipart(copy=False)))
    return out


def _finish(proc: subprocess.Popen) -> str:
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    return out


def _check_series(msgs, series_id, frames, meta_kind):
    start, *images, end = msgs
    assert isinstance(start, Start) and start.series_id == series_id
    assert start.frame_shape == SHAPE and start.dtype == frames.dtype.name
    assert start.n_frames == len(frames) and start.detector == "streamstore-emulator"
    assert start.meta["kind"] == meta_kind
    assert [type(m) for m in images] == [Image] * len(frames)
    assert [m.frame_id for m in images] == list(range(len(frames)))
    ts = [m.timestamp_ns for m in images]
    assert ts == sorted(ts)
    for img, expected in zip(images, frames, strict=True):
        np.testing.assert_array_equal(img.as_array(start), expected)
    assert end == End(series_id, len(frames))
    return start


def test_emulate_delivers_start_images_in_order_and_end(tcp_endpoint, zmq_ctx, tmp_path):
    truth_path = tmp_path / "truth.h5"
    proc = _emulate(
        "--endpoint", tcp_endpoint, "--frames", "7", "--pool", "3", "--seed", "5",
        "--series-id", "run_7", "--dark-frames", "2", "--pixel-size", "0.9",
        "--truth", str(truth_path), "--timeout", "60",
    )  # fmt: skip
    try:
        sock = zmq_ctx.socket(zmq.PULL)
        sock.connect(tcp_endpoint)
        msgs = _receive_all(sock, (2 + 2) + (7 + 2))
        out = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    emu = CameraEmulator(SHAPE, seed=5, pool_size=3)
    dark, _ = emu.dark_frames(2)
    pool, pool_truth = emu.generate(3)
    _check_series(msgs[:4], "run_7_dark", dark, "dark")
    start = _check_series(msgs[4:], "run_7", pool[np.arange(7) % 3], "data")
    assert start.pixel_size_A == 0.9
    assert start.meta["dose_per_frame"] == pytest.approx(0.01)
    assert "fps" in out and "GB/s" in out
    truth = Truth.load(truth_path)
    assert list(truth.frame_ids) == list(range(7))
    for i in range(7):
        np.testing.assert_array_equal(truth.positions[i], pool_truth.positions[i % 3])
    np.testing.assert_array_equal(truth.dark, emu.dark)


def test_emulate_connects_uint8_rate_controlled_json(ipc_endpoint, zmq_ctx):
    sock = zmq_ctx.socket(zmq.PULL)
    sock.bind(ipc_endpoint)
    proc = _emulate(
        "--connect", ipc_endpoint, "--frames", "4", "--dtype", "uint8", "--fps", "200",
        "--pattern", "disk", "--dose-rate", "150", "--seed", "9", "--json",
    )  # fmt: skip
    try:
        msgs = _receive_all(sock, 4 + 2)
        out = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    emu = CameraEmulator(SHAPE, dtype="uint8", pattern="disk", dose_rate_e_per_px_s=150, seed=9,
                         pool_size=4)  # fmt: skip
    frames, _ = emu.generate(4)
    _check_series(msgs, "emulated", frames, "data")
    summary = json.loads(out)
    assert summary["frames"] == 4 and summary["dtype"] == "uint8"
    assert summary["bytes"] == 4 * SHAPE[0] * SHAPE[1]
    assert summary["fps"] > 0


def test_emulate_without_receiver_times_out_with_a_clear_message(tcp_endpoint):
    proc = _emulate("--endpoint", tcp_endpoint, "--frames", "2", "--timeout", "0.5")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "no receiver" in err and tcp_endpoint in err
    assert "Traceback" not in err


def test_emulate_connect_without_receiver_times_out(ipc_endpoint):
    # fewer frames than the high-water mark: nothing may sit in a queue nobody reads
    proc = _emulate("--connect", ipc_endpoint, "--frames", "1", "--timeout", "0.5")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "no receiver" in err and ipc_endpoint in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--series-id", "../x"], "series-id"),
        (["--shape", "12"], "HxW"),
        (["--pool", "0"], "pool"),
    ],
)
def test_emulate_rejects_bad_options(args, message):
    proc = _emulate("--endpoint", "tcp://127.0.0.1:1", "--timeout", "0.1", *args)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert message in err
