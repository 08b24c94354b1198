"""End to end: a real ingest daemon subprocess, real tcp loopback sockets, real HDF5 files.

One daemon serves several checks (each with its own series ids) because every
daemon start costs seconds of imports and numba cache loading; the fault
tests (bad input + SIGTERM, SIGKILL, slowed writer) start their own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import streamstore
from streamstore.camera.emulator import CameraEmulator
from streamstore.counting import Counter
from streamstore.counting.dark_estimate import DarkEstimator
from streamstore.ingest.status import format_status
from streamstore.link.protocol import Start
from streamstore.link.sockets import Sender
from tests._ingest_harness import Daemon as HarnessDaemon
from tests._ingest_harness import free_endpoint

SHAPE = (64, 96)
FRAME_TIME = 1e-3


class Daemon(HarnessDaemon):
    """The shared harness daemon (``tests/_ingest_harness.py``), listening, with the
    default counting threads and the short names these tests use."""

    def __init__(self, out: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        super().__init__(
            out, args=extra, env=env, threads=None, log_path=out.parent / f"{out.name}-daemon.log"
        )
        self.out = out
        self.endpoint = self.listen
        self.wait_ready()  # kernels ready, listening

    def status(self, timeout: float = 30.0) -> dict:
        """The newest status message (waits for a new one)."""
        return self.wait_until(lambda st: True, timeout, "a status")

    def wait_for(self, pred, timeout: float = 60.0) -> dict:
        return self.wait_until(pred, timeout)

    def wait_closed(self, n: int, timeout: float = 60.0) -> dict:
        return self.wait_until(lambda st: st["series_closed"] >= n, timeout, f"{n} closed series")

    def sender(self) -> Sender:
        return Sender(self.endpoint, bind=False, linger_s=5.0)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        return super().stop(timeout, sig)


@pytest.fixture(scope="module")
def emulator() -> CameraEmulator:
    return CameraEmulator(SHAPE, frame_time_s=FRAME_TIME, dose_rate_e_per_px_s=20.0, seed=7)


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory, emulator) -> Path:
    dark, _ = emulator.dark_frames(24)
    cal = streamstore.Calibration.from_dark_frames(dark)
    path = tmp_path_factory.mktemp("cal") / "cal.h5"
    cal.save(path)
    return path


@pytest.fixture(scope="module")
def frames(emulator) -> np.ndarray:
    f, _ = emulator.generate(48)
    return f


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, calibration_file):
    out = tmp_path_factory.mktemp("ingest") / "out"
    d = Daemon(
        out,
        "--calibration",
        str(calibration_file),
        "--idle-timeout",
        "2",
        "--reorder-window",
        "8",
        "--max-frame-bytes",
        str(256 * 384 * 2),
        "--threads",
        "1",
    )
    try:
        yield d
    finally:
        rc = d.stop()
        assert rc == 0, d.log()


def start_msg(series_id: str, n: int | None = None, **kw) -> Start:
    return Start(series_id, SHAPE, "uint16", FRAME_TIME, n_frames=n, **kw)


def send_series(
    sender: Sender, sid: str, frames: np.ndarray, ids, *, end: bool = True, announce=None
) -> None:
    """Start (announcing ids 0..max by default), the images in the order given, end."""
    ids = list(ids)
    sender.send_start(start_msg(sid, announce or max(ids) + 1))
    for i in ids:
        sender.send_image(sid, int(i), frames[i], timestamp_ns=1_000_000 * int(i) + 17)
    if end:
        sender.send_end(sid, len(ids))


def expected_events(frames: np.ndarray, ids, calibration_file: Path):
    cal = streamstore.Calibration.load(calibration_file)
    return streamstore.count(frames[np.asarray(ids)], cal)


def closed_info(st: dict, sid: str) -> dict:
    return next(c for c in st["closed_series"] if c["series_id"] == sid)


# -- one daemon, several series ------------------------------------------------------
def test_events_in_file_equal_count_and_two_consecutive_series(daemon, frames, calibration_file):
    n0 = daemon.status()["series_closed"]
    with daemon.sender() as s:
        send_series(s, "first", frames, range(30))
        send_series(s, "second", frames[::-1].copy(), range(20))
    daemon.wait_closed(n0 + 2)
    for sid, fr, n in (("first", frames, 30), ("second", frames[::-1].copy(), 20)):
        store = streamstore.open(daemon.out / f"{sid}.h5")
        assert store.n_frames == n
        assert list(store.frame_ids) == list(range(n))
        assert list(store.timestamps_ns) == [1_000_000 * i + 17 for i in range(n)]
        got = store.events(0, n)
        want = expected_events(fr, range(n), calibration_file)
        assert want.n_events > 0
        assert got == want
        acc = store.accounting
        assert acc["received"] == n and acc["stored"] == n
        assert acc["missing"] == 0 and acc["duplicate"] == 0 and acc["rejected"] == 0
        assert acc["complete"] is True
        assert store.attrs["calibration_source"] == "file"


def test_dropped_duplicated_reordered_ids_are_accounted(daemon, frames, calibration_file):
    n0 = daemon.status()["series_closed"]
    ids = list(range(40))
    for dropped in (7, 8, 25, 39):
        ids.remove(dropped)
    ids[2], ids[5] = ids[5], ids[2]  # reordered within the window
    ids[20], ids[23] = ids[23], ids[20]
    ids.insert(10, 3)  # duplicate of a stored frame
    ids.insert(30, 31)  # duplicate of a frame that may still be held in the window
    with daemon.sender() as s:
        send_series(s, "gappy", frames, ids, announce=40)
    daemon.wait_closed(n0 + 1)
    store = streamstore.open(daemon.out / "gappy.h5")
    kept = sorted(set(ids))
    assert list(store.frame_ids) == kept
    assert sorted(store.missing_frame_ids) == [7, 8, 25, 39]
    acc = store.accounting
    assert acc == {
        **acc,
        "received": len(ids),
        "stored": len(kept),
        "missing": 4,
        "duplicate": 2,
        "rejected": 0,
        "complete": True,
    }
    assert store.events(0, store.n_frames) == expected_events(frames, kept, calibration_file)


def test_idle_series_is_closed_incomplete_and_stale_images_are_rejected(
    daemon, frames, calibration_file
):
    st0 = daemon.status()
    with daemon.sender() as s:
        send_series(s, "abandoned", frames, range(12), end=False)
        st = daemon.wait_closed(st0["series_closed"] + 1)  # idle timeout: 2 s
        # a series left open while the next one starts: both stay open, each with its
        # own idle timer; the first series' late image is still stored
        send_series(s, "paused", frames, range(5), end=False)
        send_series(s, "after", frames, range(6))
        s.send_image("paused", 5, frames[5])
        st = daemon.wait_closed(st0["series_closed"] + 3)  # "paused" by its idle timeout
        s.send_image("paused", 6, frames[6])  # now it is closed: stale
    st = daemon.wait_for(
        lambda st: (
            st["rejected_by_reason"].get("stale", 0) > st0["rejected_by_reason"].get("stale", 0)
        )
    )
    assert closed_info(st, "abandoned")["complete"] is False
    assert closed_info(st, "paused")["complete"] is False
    assert closed_info(st, "after")["complete"] is True
    for sid, n in (("abandoned", 12), ("paused", 6), ("after", 6)):
        store = streamstore.open(daemon.out / f"{sid}.h5")
        assert store.n_frames == n
        assert store.accounting["complete"] is (sid == "after")
        assert store.events(0, n) == expected_events(frames, range(n), calibration_file)
    assert "no message for 2 s" in daemon.log()


def test_existing_file_is_never_clobbered(daemon, frames):
    n0 = daemon.status()["series_closed"]
    (daemon.out / "taken.h5").write_bytes(b"precious")
    os.symlink(daemon.out / "elsewhere.h5", daemon.out / "taken-1.h5")
    with daemon.sender() as s:
        send_series(s, "taken", frames, range(4))
    daemon.wait_closed(n0 + 1)
    assert (daemon.out / "taken.h5").read_bytes() == b"precious"
    assert not (daemon.out / "elsewhere.h5").exists()  # the symlink was not followed
    assert streamstore.open(daemon.out / "taken-2.h5").n_frames == 4
    assert "taken.h5 exists already; writing to" in daemon.log()


# -- bad input, then SIGTERM ------------------------------------------------------------
def test_bad_input_is_rejected_and_sigterm_finalises(tmp_path, frames, calibration_file):
    d = Daemon(
        tmp_path / "out",
        "--calibration",
        str(calibration_file),
        "--max-frame-bytes",
        str(256 * 384 * 2),
        "--threads",
        "1",
    )
    try:
        with d.sender() as s:
            raw = s.socket
            raw.send_multipart(
                [
                    json.dumps(
                        {"htype": "image", "series_id": "good", "frame_id": 0, "timestamp_ns": 0}
                    ).encode(),
                    frames[0],
                ]
            )  # image before any start
            send_series(s, "good", frames, range(10), end=False)
            raw.send_multipart([b"{not json"])  # malformed header
            raw.send_multipart(
                [
                    json.dumps(
                        {"htype": "image", "series_id": "good", "frame_id": 10, "timestamp_ns": 0}
                    ).encode(),
                    frames[10][:, :50].copy(),
                ]
            )  # payload of the wrong size
            raw.send_multipart(
                [
                    json.dumps(
                        {"htype": "image", "series_id": "nobody", "frame_id": 10, "timestamp_ns": 0}
                    ).encode(),
                    frames[10],
                ]
            )  # unknown series
            raw.send_multipart([json.dumps({"htype": "flush", "series_id": "good"}).encode()])
            s.send_start(start_msg("good", 20))  # second start for the open series
            raw.send_multipart(
                [
                    json.dumps(
                        {
                            "htype": "start",
                            "series_id": "../escape",
                            "frame_shape": [64, 96],
                            "dtype": "uint16",
                            "frame_time_s": 0.001,
                        }
                    ).encode()
                ]
            )
            raw.send_multipart(
                [
                    json.dumps(
                        {
                            "htype": "start",
                            "series_id": "huge",
                            "frame_shape": [40000, 40000],
                            "dtype": "uint16",
                            "frame_time_s": 0.001,
                        }
                    ).encode()
                ]
            )
            for i in range(10, 20):
                s.send_image("good", i, frames[i], timestamp_ns=1_000_000 * i + 17)
            s.send_end("good", 20)
            send_series(s, "open-at-term", frames, range(8), end=False)
        st = d.wait_for(lambda st: st["series_closed"] >= 1 and st["frames_received"] >= 28)
        reasons = st["rejected_by_reason"]
        assert reasons.get("before_start") == 1
        assert reasons.get("unknown_series") == 1
        assert reasons.get("payload_size") == 1
        assert reasons.get("second_start") == 1
        assert sum(v for k, v in reasons.items() if k.startswith("malformed")) == 4
        assert st["rejected"] == 8
        rc = d.stop(signal.SIGTERM)
    finally:
        d.kill()
    log = d.log()
    assert rc == 0, log
    for phrase in (
        "before any start",
        "not valid JSON",
        "expected 12288",
        "unknown series",
        "htype",
        "is open already",
        "series_id",
        "max_frame_bytes",
    ):
        assert phrase in log, phrase
    good = streamstore.open(tmp_path / "out" / "good.h5")
    assert good.n_frames == 20
    assert good.events(0, 20) == expected_events(frames, range(20), calibration_file)
    acc = good.accounting
    assert acc["complete"] is True and acc["stored"] == 20 and acc["missing"] == 0
    assert acc["rejected"] == 2  # the wrong-size payload and the second start
    # SIGTERM: the open series was drained, closed and marked incomplete
    term = streamstore.open(tmp_path / "out" / "open-at-term.h5")
    assert term.n_frames == 8 and term.accounting["complete"] is False
    assert term.events(0, 8) == expected_events(frames, range(8), calibration_file)
    assert not any(p.name.startswith(".") or "escape" in p.name for p in tmp_path.rglob("*"))


# -- SIGKILL ------------------------------------------------------------------------------
def test_sigkill_leaves_a_readable_file_with_every_flushed_frame(
    tmp_path, frames, calibration_file
):
    import h5py

    d = Daemon(tmp_path / "out", "--calibration", str(calibration_file), "--threads", "1")
    path = tmp_path / "out" / "killed.h5"
    try:
        with d.sender() as s:
            s.send_start(start_msg("killed"))
            for i in range(30):
                s.send_image("killed", i, frames[i], timestamp_ns=i)
            d.wait_for(lambda st: st["frames_stored"] >= 30)
            # what a SWMR reader sees is what was flushed
            deadline = time.monotonic() + 30
            seen = 0
            while seen < 30 and time.monotonic() < deadline:
                if path.exists():
                    with h5py.File(path, "r", swmr=True) as f:
                        seen = int(f["frames/frame_id"].shape[0])
                time.sleep(0.2)
            assert seen == 30
            d.proc.kill()
            d.proc.wait()
    finally:
        d.kill()
        d.stop()
    store = streamstore.open(path)
    assert store.n_frames >= seen
    assert store.events(0, 30) == expected_events(frames, range(30), calibration_file)


# -- slowed writer: memory stays bounded, nothing is lost --------------------------------
def test_memory_stays_bounded_while_the_writer_is_slow(tmp_path):
    import psutil

    shape = (256, 384)
    emu = CameraEmulator(
        shape, frame_time_s=FRAME_TIME, dose_rate_e_per_px_s=60.0, seed=3, pool_size=4
    )
    pool, _ = emu.generate(4)
    dark, _ = emu.dark_frames(8)
    cal = tmp_path / "cal.h5"
    streamstore.Calibration.from_dark_frames(dark).save(cal)
    frame_bytes = pool[0].nbytes
    budget_mb = 1.0
    n = 1000
    d = Daemon(
        tmp_path / "out",
        "--calibration",
        str(cal),
        "--max-buffer-mb",
        str(budget_mb),
        "--max-frame-bytes",
        str(frame_bytes),
        "--threads",
        "1",
        env={"STREAMSTORE_TEST_WRITE_DELAY_S": "0.01"},
    )
    try:
        proc = psutil.Process(d.proc.pid)
        with d.sender() as s:  # a warm-up series: imports, kernels, first file
            s.send_start(Start("warm", shape, "uint16", FRAME_TIME))
            for i in range(8):
                s.send_image("warm", i, pool[i % 4])
            s.send_end("warm", 8)
            d.wait_closed(1)
            base_rss = proc.memory_info().rss
            sent = [0]

            def stream() -> None:
                s.send_start(Start("slow", shape, "uint16", FRAME_TIME, n_frames=n))
                for i in range(n):
                    s.send_image("slow", i, pool[i % 4])  # blocks when the daemon pushes back
                    sent[0] = i + 1
                s.send_end("slow", n)

            sender = threading.Thread(target=stream)
            sender.start()
            peak_rss, lag = base_rss, 0
            st = d.status()
            while st["series_closed"] < 2:
                st = d.status(timeout=60)
                lag = max(lag, sent[0] - (st["frames_stored"] - 8))
                peak_rss = max(peak_rss, proc.memory_info().rss)
            sender.join()
        rc = d.stop()
    finally:
        d.kill()
    assert rc == 0, d.log()
    events_bytes = (st["events_stored"] - 0) * 4 * 1.0
    # the receiver reads while usage is below the budget: at most one frame (and its
    # events) over it
    assert st["budget_peak"] <= budget_mb * 2**20 + 2 * frame_bytes
    # the budget did fill: back-pressure, not an idle pipeline
    assert st["budget_peak"] >= budget_mb * 2**20
    assert lag > 50  # the writer really was behind the sender
    # Unbounded, the backlog of counted events alone would exceed the bound below; the
    # bound is the budget plus the socket's HWM and kernel buffers (a few frames) plus
    # the writer's own chunk buffers (StoreWriter keeps up to one 1 Mi-event chunk, 4 MB).
    bound = 2 * budget_mb * 2**20 + 8 * frame_bytes + 6 * 2**20
    assert events_bytes > 1.5 * bound
    assert peak_rss - base_rss < bound
    print(
        f"RSS growth {(peak_rss - base_rss) / 1e6:.1f} MB, lag {lag} frames, {st['budget_peak']=}"
    )
    store = streamstore.open(tmp_path / "out" / "slow.h5")
    assert store.n_frames == n and store.accounting["missing"] == 0


# -- no calibration given: estimated from the first frames; SIGINT ----------------------
def test_a_budget_of_fewer_frames_than_the_estimate_waits_for_stalls_nothing(tmp_path, frames):
    """No dark series, no calibration file, and a memory budget that holds 4 frames:
    the estimate, which waits for 8, and its refinement batches start from the
    frames the budget holds; before, the held frames kept the receiver waiting
    for room for good (the camera blocked, the series never closed)."""
    frame_mb = frames[0].nbytes / 2**20
    d = Daemon(tmp_path / "out", "--threads", "1", "--max-buffer-mb", f"{4.5 * frame_mb:.6f}")
    try:
        with d.sender() as s:
            send_series(s, "tight", frames, range(40))
            st = d.wait_closed(1, timeout=60)
        rc = d.stop()
    finally:
        d.kill()
    assert rc == 0, d.log()
    assert st["frames_stored"] == 40 and st["missing"] == 0, st
    store = streamstore.open(tmp_path / "out" / "tight.h5")
    assert store.frame_ids.tolist() == list(range(40))
    # the estimate started from the frames that fit the budget (4 or 5), not 8
    assert re.search(r"estimate:first [45] frames of tight", json.dumps(store.meta)), store.meta
    assert "estimated the calibration from its first" in d.log()


@pytest.mark.parametrize("cut", ["wrapped", "clipped"])
def test_wrapped_frames_are_detected_and_counted_by_the_daemon(tmp_path, frames, cut):
    """Pedestal-subtracted frames whose negatives wrapped (as the 4D Camera sends
    them), or were cut at 0, no calibration: the estimate reads them as signed (or
    fits the cut noise peak), and the daemon's counting (the unsigned kernels, the
    sign bit flipped as frames are read) stores the events the numpy reference
    finds with that calibration."""
    pedestal = int(np.median(frames[:8]))
    signed = frames[:12].astype(np.int32) - pedestal
    if cut == "wrapped":
        wrapped = signed.astype(np.int16).view(np.uint16)
        assert (wrapped > 60000).mean() > 0.2  # many values did wrap
    else:
        wrapped = np.maximum(signed, 0).astype(np.uint16)
        assert (wrapped == 0).mean() > 0.2  # many values were cut
    d = Daemon(tmp_path / "out", "--threads", "2")
    try:
        with d.sender() as s:
            send_series(s, "wrapped", wrapped, range(12))
            st = d.wait_closed(1)
        rc = d.stop()
    finally:
        d.kill()
    assert rc == 0, d.log()
    assert st["frames_stored"] == 12, st
    store = streamstore.open(tmp_path / "out" / "wrapped.h5")
    cal = streamstore.Calibration.estimate(wrapped[:8])
    assert cal.wrapped is (cut == "wrapped")
    want = Counter(cal, np.uint16, implementation="reference", dose=False)(wrapped)
    got = store.events(0, 12)
    # (the clipped frames keep the dark pattern a constant pedestal leaves, which
    # one dark level reads as noise: a higher threshold, a few % fewer events)
    assert got.n_events > 900 and np.array_equal(got.indices, want.indices)
    assert np.array_equal(got.offsets, want.offsets)


def test_dark_subtracted_frames_under_a_raw_calibration_are_reported(
    tmp_path, frames, calibration_file
):
    """Frames the camera dark-subtracted, sent to a daemon whose calibration is of raw
    frames, give almost no events; the series' file and the log say why. Raw frames
    under the same calibration: no such warning."""
    cal = streamstore.Calibration.load(calibration_file)
    subtracted = np.maximum(frames[:6].astype(np.int32) - np.rint(cal.dark).astype(np.int32), 0)
    d = Daemon(tmp_path / "out", "--calibration", str(calibration_file))
    try:
        with d.sender() as s:
            send_series(s, "subtracted", subtracted.astype(np.uint16), range(6))
            send_series(s, "raw", frames, range(6))
            d.wait_closed(2)
        rc = d.stop()
    finally:
        d.kill()
    assert rc == 0, d.log()
    sub = streamstore.open(tmp_path / "out" / "subtracted.h5")
    raw = streamstore.open(tmp_path / "out" / "raw.h5")
    assert "below the dark level of the calibration in use" in sub.calibration_warning
    assert sub.events(0, 6).n_events < 0.05 * raw.events(0, 6).n_events  # what it explains
    assert not raw.calibration_warning
    assert "frames the camera dark-subtracted?" in d.log()


def test_estimated_calibration_and_sigint(tmp_path, frames):
    d = Daemon(tmp_path / "out", "--threads", "1", "--idle-timeout", "300")
    flat = np.full((10, *SHAPE), 100, np.uint16)  # nothing to estimate a noise from
    long_run = frames[np.arange(70) % len(frames)]  # past the 64 frames of refinement
    try:
        with d.sender() as s:
            send_series(s, "flat", flat, range(10))
            send_series(s, "est", frames, range(12), end=False, announce=20)
            # raw frames with a fixed dark pattern: a per-pixel estimate, provisional
            # while it refines, and the status says so
            st = d.wait_for(lambda st: st["frames_received"] >= 22 and st["calibration_warning"])
            assert "WARNING: provisional calibration" in format_status(st)
            for i in range(12, 20):
                s.send_image("est", i, frames[i], timestamp_ns=1_000_000 * i + 17)
            s.send_end("est", 20)
            send_series(s, "refined", long_run, range(70))
            d.wait_closed(3)
            send_series(s, "interrupted", frames, range(6), end=False)
            # 6 frames: fewer than the 8 the estimate waits for, so they are still held
            d.wait_for(lambda st: st["frames_received"] >= 36)
        rc = d.stop(signal.SIGINT)
    finally:
        d.kill()
    assert rc == 0, d.log()
    lost = streamstore.open(tmp_path / "out" / "flat.h5")  # the daemon carried on
    assert lost.n_frames == 0 and sorted(lost.missing_frame_ids) == list(range(10))
    assert "cannot estimate a calibration" in d.log()
    store = streamstore.open(tmp_path / "out" / "est.h5")
    assert store.attrs["calibration_source"] == "estimate"
    assert "estimate:first 8 frames of est" in json.dumps(store.meta)
    # the count stage's policy: estimate on 8 frames, then count each frame and add it to
    # the estimate (in batches), rebuilt at 16 frames: frame 15, the 16th, is counted
    # with the calibration before it
    est = DarkEstimator(frames[:8])
    cal = streamstore.Calibration.from_estimator(est, frames=frames[:8])
    assert np.array_equal(cal.dark, streamstore.Calibration.estimate(frames[:8]).dark)
    for i in range(8, 16):
        est.update(frames[i])
    cal16 = streamstore.Calibration.from_estimator(
        est, xray_threshold=cal.xray_threshold, xray_radius=cal.xray_radius
    )
    assert store.events(0, 16) == streamstore.count(frames[:16], cal)
    assert store.events(16, 20) == streamstore.count(frames[16:20], cal16)
    # the series ended before the estimate was refined: the file and info say so
    assert "provisional calibration" in store.calibration_warning
    info = subprocess.run(
        [sys.executable, "-m", "streamstore", "info", str(tmp_path / "out" / "est.h5")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert info.returncode == 0 and "WARNING: provisional calibration" in info.stdout
    # a series past 64 frames: rebuilt at 16, 32 and 64 frames, then final; the file
    # still says which frames were counted while it was provisional
    est = DarkEstimator(long_run[:8])
    cals = [streamstore.Calibration.from_estimator(est, frames=long_run[:8])]
    for i in range(8, 70):
        est.update(long_run[i])
        if est.n_frames in (16, 32, 64):
            cals.append(
                streamstore.Calibration.from_estimator(
                    est, xray_threshold=cals[0].xray_threshold, xray_radius=2
                )
            )
    refined = streamstore.open(tmp_path / "out" / "refined.h5")
    for cal, (a, b) in zip(cals, [(0, 16), (16, 32), (32, 64), (64, 70)], strict=True):
        assert refined.events(a, b) == streamstore.count(long_run[a:b], cal), (a, b)
    assert "frames before 64 of the series were counted while it was provisional" in (
        refined.calibration_warning
    )
    # the next series has no calibration of its own either: estimated again, then SIGINT
    cut = streamstore.open(tmp_path / "out" / "interrupted.h5")
    assert cut.n_frames == 6 and cut.accounting["complete"] is False
    assert cut.accounting.get("reason") == "shutdown"
    assert cut.events(0, 6) == streamstore.count(
        frames[:6], streamstore.Calibration.estimate(frames[:6])
    )


def test_status_command_prints_the_published_status(daemon):
    proc = subprocess.run(
        [sys.executable, "-m", "streamstore", "status", daemon.status_endpoint, "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    for key in ("fps", "gb_per_s_in", "events_per_s", "queue_fill", "frames_received",
                "frames_stored", "missing", "duplicate", "rejected"):  # fmt: skip
        assert key in st
    human = subprocess.run(
        [sys.executable, "-m", "streamstore", "status", daemon.status_endpoint],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert human.returncode == 0 and "frames/s" in human.stdout and "rejected" in human.stdout


def test_cli_refuses_remote_bind_without_allow_remote(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "streamstore", "ingest", "--out", str(tmp_path / "o"),
         "--listen", "tcp://0.0.0.0:5599"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--allow-remote" in proc.stderr
    assert not (tmp_path / "o").exists()


# -- --connect to a camera that binds (streamstore emulate's default) --------------------
def test_connect_to_a_binding_emulator_with_a_dark_series(tmp_path):
    endpoint = free_endpoint()
    emu = subprocess.Popen(
        [sys.executable, "-m", "streamstore", "emulate", "--endpoint", endpoint,
         "--shape", "64x96", "--frames", "30", "--dark-frames", "6", "--series-id", "cam",
         "--seed", "5", "--pool", "30", "--timeout", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out = tmp_path / "out"
    try:
        ingest = subprocess.run(
            [sys.executable, "-m", "streamstore", "ingest", "--out", str(out), "--connect",
             endpoint, "--exit-after-series", "2", "--threads", "1"],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        emu.wait(60)
    finally:
        if emu.poll() is None:
            emu.kill()
            emu.wait()
    assert ingest.returncode == 0, ingest.stderr
    assert emu.returncode == 0, emu.stderr
    # the dark series became the calibration of the data series, and is on disk
    cal = streamstore.Calibration.load(out / "cam_dark.calibration.h5")
    store = streamstore.open(out / "cam.h5")
    assert store.attrs["calibration_source"] == "dark_frames"
    assert store.n_frames == 30 and store.accounting["complete"] is True
    e = CameraEmulator((64, 96), seed=5, pool_size=30)
    e.dark_frames(6)  # the emulator makes the dark frames first, then its pool
    pool, _ = e.pool()
    # --xray-threshold auto: the data series' first frames set the dark calibration's
    # X-ray threshold (the saved dark calibration predates them)
    xt = store.calibration_summary["xray_threshold"]
    assert cal.xray_threshold is None and xt is not None
    assert store.events(0, 30) == streamstore.count(pool, cal.with_xray_threshold(xt))
