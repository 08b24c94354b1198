"""Scale-out ingest end to end: worker processes over tcp loopback, shards, a killed worker.

Real ``streamstore ingest`` subprocesses, real ZeroMQ sockets, real HDF5
files; the camera side is :class:`streamstore.fanout.FanoutSender` in the test
process. Frames and the events they must give come from the ingest tests'
harness (:class:`_ingest_harness.Series`: emulated 64 x 96 frames, a
calibration file, ``streamstore.count`` of every frame).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _ingest_harness import Series, free_endpoint

import streamstore
from streamstore.fanout import FanoutSender
from streamstore.protocol import Sender, Start

N_FRAMES = 60


def _ingest(out: Path, *args: str, log: Path, env: dict[str, str] | None = None):
    cmd = [sys.executable, "-m", "streamstore", "ingest", "--out", str(out), "--threads", "1"]
    full_env = dict(os.environ)
    full_env.update(env or {})
    with open(log, "wb") as fh:
        return subprocess.Popen(
            [*cmd, *args],
            stdout=subprocess.DEVNULL,
            stderr=fh,
            stdin=subprocess.DEVNULL,
            env=full_env,
        )


def _wait(proc: subprocess.Popen, log: Path, timeout_s: float = 90.0) -> int:
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"ingest did not exit:\n{log.read_text()[-3000:]}") from None


def _start(series: Series, sid: str, n: int) -> Start:
    return Start(sid, series.shape, "uint16", 1e-3, n_frames=n)


def _send(sender: Sender, series: Series, sid: str, ids: range) -> None:
    for i in ids:
        sender.send_image(sid, i, series.frame(i), timestamp_ns=1_000_000 * i)


def _single_worker_run(tmp: Path, series: Series, sid: str) -> Path:
    """The reference: one plain daemon, start/end in the data stream."""
    ep = free_endpoint()
    out, log = tmp / "single", tmp / "single.log"
    cal = str(series.calibration_path)
    proc = _ingest(out, "--connect", ep, "--calibration", cal, "--exit-after-series", "1", log=log)
    try:
        with Sender(ep, send_timeout_s=60) as tx:
            tx.send_start(_start(series, sid, N_FRAMES))
            _send(tx, series, sid, range(N_FRAMES))
            tx.send_end(sid, N_FRAMES)
        assert _wait(proc, log) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return out / f"{sid}.h5"


def test_two_worker_processes_store_every_frame_once_and_equal_a_single_worker(tmp_path):
    series = Series(tmp_path)
    sid = "run_a"
    reference = _single_worker_run(tmp_path, series, sid)

    out, log = tmp_path / "multi", tmp_path / "multi.log"
    cal = str(series.calibration_path)
    proc = None
    try:
        # both ports chosen by bind (no race with other processes for "port + 1")
        with FanoutSender("tcp://127.0.0.1:*", send_timeout_s=60) as tx:
            proc = _ingest(
                out, "--connect", tx.endpoint, "--control", tx.control_endpoint, "--workers", "2",
                "--calibration", cal, "--exit-after-series", "1", log=log,
            )  # fmt: skip
            assert tx.wait_workers(2, timeout_s=90) == 2
            tx.send_start(_start(series, sid, N_FRAMES))
            _send(tx, series, sid, range(N_FRAMES))
            tx.send_end(sid, N_FRAMES)
        assert _wait(proc, log) == 0, log.read_text()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    shard_files = sorted((out / sid).glob("shard-*.h5"))
    assert [f.name for f in shard_files] == ["shard-0.h5", "shard-1.h5"]
    shard_ids = []
    for f in shard_files:
        with streamstore.open(f) as shard:
            assert shard.n_frames > 0, f"{f.name} got no frames: the stream was not dealt"
            assert shard.missing_frame_ids.size == 0  # a shard never claims others' frames
            shard_ids.append(set(shard.frame_ids.tolist()))
    assert not shard_ids[0] & shard_ids[1]  # every frame id in exactly one shard
    assert shard_ids[0] | shard_ids[1] == set(range(N_FRAMES))

    with streamstore.open(reference) as single, streamstore.open(out / sid) as multi:
        assert type(multi).__name__ == "ShardedStore"
        np.testing.assert_array_equal(multi.frame_ids, single.frame_ids)
        np.testing.assert_array_equal(multi.timestamps_ns, single.timestamps_ns)
        np.testing.assert_array_equal(multi.dose("events"), single.dose("events"))
        assert multi.events(0, N_FRAMES) == single.events(0, N_FRAMES)
        assert multi.events(7, 31) == single.events(7, 31)
        np.testing.assert_array_equal(multi.sum(), single.sum())
        np.testing.assert_array_equal(multi.frames(5, 12), single.frames(5, 12))
        assert series.check_store(multi) == N_FRAMES
        acc = multi.accounting
        assert acc["complete"] is True and single.accounting["complete"] is True
        assert (acc["stored"], acc["missing"], acc["received"]) == (N_FRAMES, 0, N_FRAMES)
        assert acc["shards"] == 2 and acc["shards_expected"] == 2
    # the manifest file itself opens the same series
    with streamstore.open(out / sid / "manifest.json") as via_manifest:
        assert via_manifest.n_frames == N_FRAMES


def test_a_killed_worker_leaves_a_readable_series_with_its_frames_missing(tmp_path):
    series = Series(tmp_path)
    sid = "run_k"
    out = tmp_path / "out"
    cal = str(series.calibration_path)
    log0, log1 = tmp_path / "w0.log", tmp_path / "w1.log"
    w0 = w1 = None
    try:
        with FanoutSender("tcp://127.0.0.1:*", send_timeout_s=60) as tx:
            common = ("--connect", tx.endpoint, "--control", tx.control_endpoint)
            common += ("--calibration", cal, "--exit-after-series", "1")
            w0 = _ingest(out, *common, "--worker-id", "0", log=log0)
            # worker 1 writes slowly (test hook), so it holds unwritten frames when killed
            slow = {"STREAMSTORE_TEST_WRITE_DELAY_S": "0.5"}
            w1 = _ingest(out, *common, "--worker-id", "1", log=log1, env=slow)
            assert tx.wait_workers(2, timeout_s=90) == 2
            tx.send_start(_start(series, sid, N_FRAMES))
            _send(tx, series, sid, range(N_FRAMES // 2))
            shard1 = out / sid / "shard-1.h5"
            deadline = time.monotonic() + 60
            while not shard1.exists() and time.monotonic() < deadline:
                time.sleep(0.05)  # worker 1 is writing its first frame (slowly)
            assert shard1.exists(), log1.read_text()
            time.sleep(0.2)
            w1.kill()  # SIGKILL mid-series
            w1.wait(30)
            _send(tx, series, sid, range(N_FRAMES // 2, N_FRAMES))
            tx.send_end(sid, N_FRAMES)
        assert _wait(w0, log0) == 0, log0.read_text()
    finally:
        for p in (w0, w1):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
    assert w1.returncode < 0  # it really died

    with streamstore.open(out / sid) as s:
        stored = set(s.frame_ids.tolist())
        missing = set(s.missing_frame_ids.tolist())
        assert stored | missing == set(range(N_FRAMES))
        assert not stored & missing
        assert missing, "frames held by the killed worker must be reported missing"
        assert series.check_store(s) == len(stored)  # what is stored is right
        acc = s.accounting
        assert acc["complete"] is False  # one shard never closed
        assert acc["missing"] == len(missing) and acc["frames_expected"] == N_FRAMES
        assert acc["shards_expected"] == 2  # the sender told the workers how many they are
        assert "shard-1.h5" in acc["shards_unclosed"] + acc["shards_unreadable"]
        np.testing.assert_array_equal(s.sum(), s.frames(0, s.n_frames, dtype=np.uint32).sum(0))


def _run_inprocess_worker(cfg):
    from streamstore.ingest.daemon import IngestDaemon

    daemon = IngestDaemon(cfg)
    result: dict[str, int] = {}

    def target() -> None:
        result["rc"] = daemon.run(install_signals=False)

    thread = threading.Thread(target=target)
    thread.start()
    return daemon, thread, result


def test_worker_buffers_images_before_their_start_and_waits_for_late_ones_after_end(
    tmp_path, zmq_ctx
):
    """The control channel races the data channel both ways; nothing is lost."""
    import zmq

    from streamstore import protocol
    from streamstore.ingest.daemon import IngestConfig

    series = Series(tmp_path)
    sid = "race"
    data = zmq_ctx.socket(zmq.PUSH)
    data.bind("tcp://127.0.0.1:*")
    ctl = zmq_ctx.socket(zmq.XPUB)
    ctl.bind("tcp://127.0.0.1:*")
    cfg = IngestConfig(
        out_dir=str(tmp_path / "out"),
        connect=data.getsockopt_string(zmq.LAST_ENDPOINT),
        control=ctl.getsockopt_string(zmq.LAST_ENDPOINT),
        worker_id=0,
        calibration=str(series.calibration_path),
        threads=1,
        end_grace_s=1.5,
        exit_after_series=1,
        status_interval_s=60,
    )
    daemon, thread, result = _run_inprocess_worker(cfg)
    try:
        assert ctl.poll(60_000), "the worker never subscribed"
        assert ctl.recv()[:1] == b"\x01"

        def image(i):
            data.send_multipart(protocol.encode_image(sid, i, i, series.frame(i)), copy=False)

        for i in range(5):  # images before the start is published
            image(i)
        time.sleep(0.3)
        ctl.send_multipart(protocol.encode_start(_start(series, sid, 15)))
        for i in range(5, 10):
            image(i)
        ctl.send_multipart(protocol.encode_end(sid, 15))  # end overtakes the last images
        time.sleep(0.3)
        for i in range(10, 15):
            image(i)
        thread.join(60)
        assert not thread.is_alive()
    finally:
        daemon.request_stop()
        thread.join(30)
    assert result["rc"] == 0
    assert daemon.counters.rejected == 0, dict(daemon.counters.rejected_by_reason)
    with streamstore.open(tmp_path / "out" / sid) as s:
        np.testing.assert_array_equal(s.frame_ids, np.arange(15))
        assert s.accounting["complete"] is True and s.accounting["missing"] == 0
        assert series.check_store(s) == 15


def test_workers_option_needs_connect(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "streamstore", "ingest", "--out", str(tmp_path), "--listen",
         free_endpoint(), "--workers", "2"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--workers needs --connect" in proc.stderr


@pytest.mark.parametrize("bad", ["0", "-1"])
def test_workers_count_must_be_positive(tmp_path, bad):
    proc = subprocess.run(
        [sys.executable, "-m", "streamstore", "ingest", "--out", str(tmp_path), "--connect",
         free_endpoint(), "--workers", bad],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--workers must be >= 1" in proc.stderr


def test_emulate_workers_feeds_ingest_workers_from_the_command_line(tmp_path):
    """The user-facing path: `emulate --workers 2` -> `ingest --workers 2` -> open(DIR/<id>)."""
    ep, ctl = free_endpoint(), free_endpoint()
    out, log = tmp_path / "out", tmp_path / "ingest.log"
    proc = _ingest(
        out, "--connect", ep, "--control", ctl, "--workers", "2", "--exit-after-series", "2",
        log=log,
    )  # fmt: skip
    try:
        emu = subprocess.run(
            [sys.executable, "-m", "streamstore", "emulate", "--endpoint", ep, "--control", ctl,
             "--workers", "2", "--shape", "48x80", "--frames", "40", "--dark-frames", "8",
             "--series-id", "cli", "--timeout", "90", "--json"],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert emu.returncode == 0, emu.stderr
        summary = json.loads(emu.stdout)
        assert summary["workers"] == 2 and summary["control_endpoint"] == ctl
        assert _wait(proc, log) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    with streamstore.open(out / "cli") as s:
        np.testing.assert_array_equal(s.frame_ids, np.arange(40))
        assert s.accounting["complete"] is True and s.accounting["shards"] == 2
    manifest = json.loads((out / "cli" / "manifest.json").read_text())
    # each worker calibrated from its own share of the dark series
    assert all("dark_frames:cli_dark" in e["calibration_source"] for e in manifest["shards"])


def test_sigterm_to_the_ingest_parent_stops_every_worker(tmp_path):
    import psutil

    ep = free_endpoint()
    out, log = tmp_path / "out", tmp_path / "ingest.log"
    proc = _ingest(out, "--connect", ep, "--workers", "2", log=log)
    try:
        deadline = time.monotonic() + 90
        while log.read_text().count("start/end from") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # both workers are up
        children = psutil.Process(proc.pid).children()
        assert len(children) >= 2, log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert log.read_text().count("stopped:") == 2


def test_emulate_workers_refuses_connect_mode():
    proc = subprocess.run(
        [sys.executable, "-m", "streamstore", "emulate", "--connect", free_endpoint(),
         "--workers", "2", "--shape", "8x8", "--frames", "1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "drop --connect" in proc.stderr
