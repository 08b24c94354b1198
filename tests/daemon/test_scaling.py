"""Scale-out ingest end to end with cameras that know nothing of streamstore.

Real processes throughout: the camera is a plain pyzmq script (it imports
nothing of streamstore) or ``streamstore emulate``; the broker is
``streamstore ingest --workers N`` or ``streamstore fanout``; the workers are
real ingest daemons writing real HDF5 shards (ingest and fanout run their command
line in processes forked from the tests' warm forkserver,
:mod:`tests._daemon_forkserver`). Frames and the events they must give come from
the ingest tests' harness (emulated 64 x 96 frames).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import streamstore
from tests._daemon_forkserver import fork_daemon
from tests._ingest_harness import Series, free_endpoint

N_FRAMES = 48

# A camera as a facility would write it: one PUSH socket, docs/protocol.md, nothing else.
CAMERA = r"""
import json, os, sys, time
import numpy as np
import zmq

endpoint, frames_file, plan, wait_file, pause_at = sys.argv[1:6]
frames = np.load(frames_file)
ctx = zmq.Context()
s = ctx.socket(zmq.PUSH)
s.setsockopt(zmq.SNDHWM, 2)
s.setsockopt(zmq.SNDTIMEO, 120000)
s.setsockopt(zmq.LINGER, 120000)
s.bind(endpoint)
h, w = frames.shape[1:]
for sid, n, orphans, *after in json.loads(plan):
    for i in range(orphans):  # images of a series that never starts
        hdr = {"htype": "image", "series_id": sid + "_nostart", "frame_id": i, "timestamp_ns": i}
        s.send_multipart([json.dumps(hdr).encode(), frames[i % len(frames)]], copy=False)
    start = {"htype": "start", "series_id": sid, "frame_shape": [h, w], "dtype": "uint16",
             "frame_time_s": 1e-3, "n_frames": n}
    s.send(json.dumps(start).encode())
    for i in range(n):
        if i == int(pause_at) and wait_file != "-":
            while not os.path.exists(wait_file):
                time.sleep(0.05)
        hdr = {"htype": "image", "series_id": sid, "frame_id": i, "timestamp_ns": 1000000 * i}
        s.send_multipart([json.dumps(hdr).encode(), frames[i % len(frames)]], copy=False)
    s.send(json.dumps({"htype": "end", "series_id": sid, "n_frames": n}).encode())
    for i in range(after[0] if after else 0):  # images after the series ended
        hdr = {"htype": "image", "series_id": sid + "_after", "frame_id": i, "timestamp_ns": i}
        s.send_multipart([json.dumps(hdr).encode(), frames[i % len(frames)]], copy=False)
s.close()
ctx.term()
"""


def _camera(tmp: Path, series: Series, endpoint: str, plan, wait_file="-", pause_at=-1):
    frames = tmp / "frames.npy"
    np.save(frames, series.frames)
    script = tmp / "camera.py"
    script.write_text(CAMERA)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no streamstore there
    return subprocess.Popen(
        [sys.executable, str(script), endpoint, str(frames), json.dumps(plan), str(wait_file),
         str(pause_at)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp,
    )  # fmt: skip


def _streamstore(log: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    """``streamstore <args>`` forked from the tests' warm forkserver
    (:mod:`tests._daemon_forkserver`), its stderr in ``log``."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    log.write_bytes(b"")
    return fork_daemon(list(args), full_env, str(log))


def _ingest(log: Path, out: Path, *args: str, env=None) -> Any:
    return _streamstore(log, "ingest", "--out", str(out), "--threads", "1", *args, env=env)


def _worker(tmp: Path, out: Path, series: Series, base: str, k: int, n: int, series_n: int,
            env=None) -> Any:  # fmt: skip
    """Worker ``k`` of ``n``, started on its own as on another host."""
    return _ingest(tmp / f"w{k}.log", out, "--connect", base, "--worker-id", str(k),
                   "--workers", str(n), "--calibration", str(series.calibration_path),
                   "--exit-after-series", str(series_n), env=env)  # fmt: skip


def _wait(proc: Any, log: Path | None = None, timeout_s: float = 120.0) -> int:
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        text = log.read_text()[-3000:] if log is not None else ""
        raise AssertionError(f"process did not exit:\n{text}") from None


def _kill_all(*procs) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(10)


def _consecutive_ports(n: int) -> str:
    """A base tcp endpoint whose next ``n - 1`` ports are free right now too."""
    import socket

    for _ in range(50):
        base = int(free_endpoint().rsplit(":", 1)[1])
        socks = []
        try:
            for k in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + k))
            return f"tcp://127.0.0.1:{base}"
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


def _check_series(series: Series, path: Path, n: int, shards: int) -> None:
    with streamstore.open(path) as s:
        np.testing.assert_array_equal(s.frame_ids, np.arange(n))  # every frame once, in order
        acc = s.accounting
        assert acc["complete"] is True, acc
        assert (acc["stored"], acc["missing"], acc["received"]) == (n, 0, n)
        assert acc["duplicate"] == 0 and acc["shards"] == shards
        assert series.check_store(s) == n


def test_plain_camera_three_local_workers_two_series_camera_first(tmp_path):
    """The camera binds and sends before the workers exist; two series back to back."""
    series = Series(tmp_path)
    ep = free_endpoint()
    out, log = tmp_path / "out", tmp_path / "ingest.log"
    cam = _camera(tmp_path, series, ep, [["first", N_FRAMES, 0], ["second", 20, 0]])
    time.sleep(0.5)  # the camera is up and blocked on its first send
    proc = _ingest(log, out, "--connect", ep, "--workers", "3", "--calibration",
                   str(series.calibration_path), "--exit-after-series", "2")  # fmt: skip
    try:
        assert _wait(cam, log) == 0, cam.stderr.read().decode()
        assert _wait(proc, log) == 0, log.read_text()
    finally:
        _kill_all(cam, proc)
    _check_series(series, out / "first", N_FRAMES, 3)
    _check_series(series, out / "second", 20, 3)
    manifest = json.loads((out / "first" / "manifest.json").read_text())
    assert manifest["n_workers"] == 3 and manifest["block_frames"] == 8
    assert manifest["broker"]["rejected"] == 0 and manifest["broker"]["workers_lost"] == []
    with streamstore.open(out / "first" / "shard-1.h5") as shard:  # blocks of 8: 8-15, 32-39
        np.testing.assert_array_equal(shard.frame_ids, np.r_[8:16, 32:40])
    text = log.read_text()
    assert " ERROR " not in text and "rejected message" not in text, text


def test_images_without_a_start_are_rejected_counted_and_logged_as_errors(tmp_path):
    series = Series(tmp_path)
    ep = free_endpoint()
    out, log = tmp_path / "out", tmp_path / "ingest.log"
    proc = _ingest(log, out, "--connect", ep, "--workers", "2", "--calibration",
                   str(series.calibration_path), "--exit-after-series", "1")  # fmt: skip
    cam = _camera(tmp_path, series, ep, [["after", 16, 5]])
    try:
        assert _wait(cam, log) == 0, cam.stderr.read().decode()
        assert _wait(proc, log) == 0, log.read_text()
    finally:
        _kill_all(cam, proc)
    _check_series(series, out / "after", 16, 2)
    manifest = json.loads((out / "after" / "manifest.json").read_text())
    assert manifest["broker"]["rejected"] == 5
    assert manifest["broker"]["rejected_by_reason"] == {"before_start": 5}
    with streamstore.open(out / "after") as s:
        assert s.accounting["rejected"] == 5
    errors = [ln for ln in log.read_text().splitlines() if " ERROR " in ln and "no start" in ln]
    assert len(errors) == 5, log.read_text()


def test_fanout_broker_with_separately_started_workers(tmp_path):
    series = Series(tmp_path)
    cam_ep, base = free_endpoint(), _consecutive_ports(2)
    out = tmp_path / "out"
    blog = tmp_path / "fanout.log"
    broker = _streamstore(blog, "fanout", "--connect", cam_ep, "--listen", base, "--workers", "2",
                          "--block-frames", "4", "--exit-after-series", "1")  # fmt: skip
    workers = []
    try:
        workers = [_worker(tmp_path, out, series, base, k, 2, 1) for k in range(2)]
        cam = _camera(tmp_path, series, cam_ep, [["hosts", N_FRAMES, 0]])
        assert _wait(cam, blog) == 0, cam.stderr.read().decode()
        assert _wait(broker, blog) == 0, blog.read_text()
        for k, w in enumerate(workers):
            assert _wait(w, tmp_path / f"w{k}.log") == 0, (tmp_path / f"w{k}.log").read_text()
    finally:
        _kill_all(broker, *workers)
    _check_series(series, out / "hosts", N_FRAMES, 2)
    with streamstore.open(out / "hosts" / "shard-0.h5") as shard:
        assert shard.frame_ids.tolist() == [f for f in range(N_FRAMES) if (f // 4) % 2 == 0]


def test_a_killed_worker_loses_only_its_frames_and_the_rest_goes_on(tmp_path):
    series = Series(tmp_path)
    cam_ep, base = free_endpoint(), _consecutive_ports(3)
    out, go = tmp_path / "out", tmp_path / "go"
    blog = tmp_path / "fanout.log"
    broker = _streamstore(blog, "fanout", "--connect", cam_ep, "--listen", base, "--workers", "3",
                          "--exit-after-series", "2")  # fmt: skip
    workers = []
    try:
        for k in range(3):
            # worker 1 writes slowly (test hook), so it holds unwritten frames when killed
            env = {"STREAMSTORE_TEST_WRITE_DELAY_S": "0.5"} if k == 1 else None
            workers.append(_worker(tmp_path, out, series, base, k, 3, 2, env=env))
        cam = _camera(tmp_path, series, cam_ep, [["kill", N_FRAMES, 0], ["after", 24, 0]],
                      wait_file=go, pause_at=N_FRAMES // 2)  # fmt: skip
        shard1 = out / "kill" / "shard-1.h5"
        deadline = time.monotonic() + 90
        while not shard1.exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # worker 1 is writing its first frame (slowly)
        assert shard1.exists(), (tmp_path / "w1.log").read_text()
        workers[1].kill()  # SIGKILL mid-series
        workers[1].wait(30)
        go.touch()
        assert _wait(cam, blog) == 0, cam.stderr.read().decode()
        assert _wait(broker, blog) == 0, blog.read_text()
        for k in (0, 2):
            assert _wait(workers[k], tmp_path / f"w{k}.log") == 0
    finally:
        _kill_all(broker, *workers)
    with streamstore.open(out / "kill") as s:
        stored = set(s.frame_ids.tolist())
        missing = set(s.missing_frame_ids.tolist())
        assert stored | missing == set(range(N_FRAMES)) and not stored & missing
        assert missing, "frames held by the killed worker must be reported missing"
        assert missing <= {f for f in range(N_FRAMES) if (f // 8) % 3 == 1}  # only its blocks
        assert series.check_store(s) == len(stored)
        acc = s.accounting
        assert acc["complete"] is False and acc["missing"] == len(missing)
        assert acc["workers_lost"] == [1] or "shard-1.h5" in acc["shards_unclosed"], acc
    assert "worker 1 is lost" in blog.read_text() or "disconnected" in blog.read_text()
    _check_series(series, out / "after", 24, 2)  # the broker and the others went on


def test_multi_stream_camera_two_streams_one_series(tmp_path):
    series = Series(tmp_path)
    base = _consecutive_ports(2)
    out = tmp_path / "out"
    workers = []
    try:
        workers = [_worker(tmp_path, out, series, base, k, 2, 1) for k in range(2)]
        emu = subprocess.run(
            [sys.executable, "-m", "streamstore", "emulate", "--endpoint", base, "--streams", "2",
             "--shape", "64x96", "--frames", "40", "--series-id", "multi", "--timeout", "120",
             "--json"],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert emu.returncode == 0, emu.stderr
        assert len(json.loads(emu.stdout)["streams"]) == 2
        for k, w in enumerate(workers):
            assert _wait(w, tmp_path / f"w{k}.log") == 0, (tmp_path / f"w{k}.log").read_text()
    finally:
        _kill_all(*workers)
    with streamstore.open(out / "multi") as s:
        np.testing.assert_array_equal(s.frame_ids, np.arange(40))
        acc = s.accounting
        assert acc["complete"] is True and acc["shards"] == 2 and acc["shards_expected"] == 2


def test_sigterm_to_the_ingest_parent_stops_the_broker_and_every_worker(tmp_path):
    import signal

    import psutil

    out, log = tmp_path / "out", tmp_path / "ingest.log"
    proc = _ingest(log, out, "--connect", free_endpoint(), "--workers", "2")
    try:
        deadline = time.monotonic() + 120
        while log.read_text().count("connected on") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # both workers are up and connected to the broker
        assert log.read_text().count("connected on") == 2, log.read_text()
        children = psutil.Process(proc.pid).children()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
        _, alive = psutil.wait_procs(children, timeout=20)
        assert not alive
    finally:
        _kill_all(proc)
    assert log.read_text().count("INFO stopped:") == 2  # each worker drained and said so
    assert "broker stopped:" in log.read_text()


def test_curve_on_the_camera_and_the_worker_links(tmp_path):
    """emulate (CURVE client) -> fanout (server to the camera, client to the worker) -> worker."""
    series = Series(tmp_path)
    keys = tmp_path / "keys"
    made = subprocess.run(
        [sys.executable, "-m", "streamstore", "keys", str(keys), "--client", "camera",
         "--client", "broker"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    cam_ep, base = free_endpoint(), _consecutive_ports(1)
    out, blog = tmp_path / "out", tmp_path / "fanout.log"
    broker = _streamstore(blog, "fanout", "--connect", cam_ep, "--listen", base, "--workers", "1",
                          "--curve-keys", str(keys), "--curve-client", "broker",
                          "--exit-after-series", "1")  # fmt: skip
    worker = _ingest(tmp_path / "w0.log", out, "--connect", base, "--worker-id", "0",
                     "--workers", "1", "--curve-keys", str(keys), "--calibration",
                     str(series.calibration_path), "--exit-after-series", "1")  # fmt: skip
    try:
        emu = subprocess.run(
            [sys.executable, "-m", "streamstore", "emulate", "--endpoint", cam_ep, "--shape",
             "64x96", "--frames", "12", "--series-id", "secret", "--timeout", "120",
             "--curve-keys", str(keys), "--curve-client", "camera", "--json"],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert emu.returncode == 0, emu.stderr
        assert json.loads(emu.stdout)["curve"] is True
        assert _wait(broker, blog) == 0, blog.read_text()
        assert _wait(worker, tmp_path / "w0.log") == 0
    finally:
        _kill_all(broker, worker)
    assert "(CURVE)" in blog.read_text()
    assert "CURVE: encrypted" in (tmp_path / "w0.log").read_text()
    with streamstore.open(out / "secret") as s:
        np.testing.assert_array_equal(s.frame_ids, np.arange(12))
        assert s.accounting["complete"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--listen", "tcp://127.0.0.1:1", "--workers", "2"), "--workers needs --connect"),
        (("--connect", "tcp://127.0.0.1:1", "--workers", "0"), "--workers must be >= 1"),
        (("--connect", "tcp://127.0.0.1:1", "--workers", "2", "--worker-id", "2"), "below"),
        (("--connect", "tcp://127.0.0.1:1", "--block-frames", "4"), "--block-frames goes"),
    ],
)
def test_scale_out_options_are_checked(tmp_path, args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "streamstore", "ingest", "--out", str(tmp_path), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert message in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--listen", "tcp://0.0.0.0:7000", "--workers", "2"), "--allow-remote"),
        (("--listen", "tcp://127.0.0.1:7000", "--workers", "0"), "--workers must be >= 1"),
        (("--listen", "tcp://127.0.0.1:7000", "--workers", "2", "--curve-client", "b"),
         "--curve-client needs --curve-keys"),
    ],
)  # fmt: skip
def test_fanout_options_are_checked(args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "streamstore", "fanout", "--connect", "tcp://127.0.0.1:1", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert message in proc.stderr


# A camera with one PUSH socket per worker (as PSI's Jungfraujoch), plain pyzmq: each stream
# carries images of a series that never starts, its own start, its blocks of the series, its
# end, then images of the ended series.
MULTI_CAMERA = r"""
import json, sys
import numpy as np
import zmq

base, frames_file, sid, n, block, before, after = sys.argv[1:8]
n, block, before, after = int(n), int(block), int(before), int(after)
frames = np.load(frames_file)
host, port = base.rsplit(":", 1)
ctx = zmq.Context()
socks = []
for k in range(2):
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, 2)
    s.setsockopt(zmq.SNDTIMEO, 120000)
    s.setsockopt(zmq.LINGER, 120000)
    s.bind(f"{host}:{int(port) + k}")
    socks.append(s)
h, w = frames.shape[1:]
def image(s, series, i):
    hdr = {"htype": "image", "series_id": series, "frame_id": i, "timestamp_ns": i}
    s.send_multipart([json.dumps(hdr).encode(), frames[i % len(frames)]], copy=False)
for k, s in enumerate(socks):
    for i in range(before):
        image(s, sid + "_nostart", i)
    start = {"htype": "start", "series_id": sid, "frame_shape": [h, w], "dtype": "uint16",
             "frame_time_s": 1e-3, "n_frames": n}
    s.send(json.dumps(start).encode())
for i in range(n):
    image(socks[(i // block) % 2], sid, i)
for s in socks:
    s.send(json.dumps({"htype": "end", "series_id": sid, "n_frames": n}).encode())
    for i in range(after):
        image(s, sid, n + i)  # its series has ended
for s in socks:
    s.close()
ctx.term()
"""


def _orphans(out: Path) -> dict:
    return json.loads((out / "orphans.json").read_text())


def _wait_for(cond, what: str, log: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen:\n{log.read_text()[-3000:]}")


def test_images_after_the_last_series_reach_orphans_json_of_the_local_broker(tmp_path):
    """Before the start: the series manifest; after the end: DIR/orphans.json, at the stop."""
    import signal

    series = Series(tmp_path)
    ep = free_endpoint()
    out, log = tmp_path / "out", tmp_path / "ingest.log"
    proc = _ingest(log, out, "--connect", ep, "--workers", "2", "--calibration",
                   str(series.calibration_path))  # fmt: skip
    cam = _camera(tmp_path, series, ep, [["tail", 16, 2, 3]])
    try:
        assert _wait(cam, log) == 0, cam.stderr.read().decode()
        _wait_for(lambda: log.read_text().count("of series tail_after, which has no start") == 3,
                  "three rejections after the end", log)  # fmt: skip
        assert not (out / "orphans.json").exists()  # written when the broker stops
        proc.send_signal(signal.SIGTERM)
        assert _wait(proc, log) == 0, log.read_text()
    finally:
        _kill_all(cam, proc)
    _check_series(series, out / "tail", 16, 2)
    manifest = json.loads((out / "tail" / "manifest.json").read_text())
    assert manifest["broker"]["rejected_by_reason"] == {"before_start": 2}
    rec = _orphans(out)
    assert rec["format"] == "streamstore.orphans" and rec["rejected"] == 3, rec
    (entry,) = rec["records"]
    assert entry["role"] == "broker" and entry["rejected"] == 3
    assert entry["series_ids"] == {"tail_after": 3}
    assert "recorded in" in log.read_text()


def test_fanout_exit_after_series_reads_and_records_what_follows_the_last_end(tmp_path):
    """The camera's images after the last end are taken while the workers finish, not dropped."""
    series = Series(tmp_path)
    cam_ep, base = free_endpoint(), _consecutive_ports(2)
    out, blog = tmp_path / "out", tmp_path / "fanout.log"
    broker = _streamstore(blog, "fanout", "--connect", cam_ep, "--listen", base, "--workers", "2",
                          "--exit-after-series", "1", "--out", str(out))  # fmt: skip
    workers = []
    try:
        # the workers write slowly (test hook): they are still connected when the
        # camera's last images reach the broker
        env = {"STREAMSTORE_TEST_WRITE_DELAY_S": "0.3"}
        workers = [_worker(tmp_path, out, series, base, k, 2, 1, env=env) for k in range(2)]
        cam = _camera(tmp_path, series, cam_ep, [["last", 16, 0, 4]])
        assert _wait(cam, blog) == 0, cam.stderr.read().decode()
        assert _wait(broker, blog) == 0, blog.read_text()
        for k, w in enumerate(workers):
            assert _wait(w, tmp_path / f"w{k}.log") == 0, (tmp_path / f"w{k}.log").read_text()
    finally:
        _kill_all(broker, *workers)
    _check_series(series, out / "last", 16, 2)
    (entry,) = _orphans(out)["records"]
    assert entry["role"] == "broker", entry
    assert entry["rejected_by_reason"] == {"after_last_series": 4}
    assert entry["series_ids"] == {"last_after": 4}
    lines = blog.read_text().splitlines()
    assert sum(" ERROR " in ln and "after the last series" in ln for ln in lines) >= 4, lines


def test_multi_stream_workers_record_images_of_no_series_in_orphans_json(tmp_path):
    import signal

    series = Series(tmp_path)
    base = _consecutive_ports(2)
    out = tmp_path / "out"
    frames = tmp_path / "frames.npy"
    np.save(frames, series.frames)
    script = tmp_path / "multi_camera.py"
    script.write_text(MULTI_CAMERA)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no streamstore there
    workers = []
    cam = None
    try:
        # no --exit-after-series: the workers run until stopped, as on a beamline
        workers = [
            _ingest(tmp_path / f"w{k}.log", out, "--connect", base, "--worker-id", str(k),
                    "--workers", "2", "--calibration", str(series.calibration_path))
            for k in range(2)
        ]  # fmt: skip
        cam = subprocess.Popen(
            [sys.executable, str(script), base, str(frames), "multi", "24", "4", "2", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path,
        )  # fmt: skip
        assert _wait(cam, tmp_path / "w0.log") == 0, cam.stderr.read().decode()

        def recorded() -> bool:
            try:
                return _orphans(out)["rejected"] == 6
            except (FileNotFoundError, ValueError):
                return False

        _wait_for(recorded, "orphans.json with 6 images", tmp_path / "w0.log")
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for k, w in enumerate(workers):
            assert _wait(w, tmp_path / f"w{k}.log") == 0, (tmp_path / f"w{k}.log").read_text()
    finally:
        _kill_all(cam, *workers)
    with streamstore.open(out / "multi") as s:
        np.testing.assert_array_equal(s.frame_ids, np.arange(24))
        assert s.accounting["complete"] is True
    rec = _orphans(out)
    assert rec["rejected"] == 6
    by_worker = {r["worker_id"]: r for r in rec["records"]}
    assert sorted(by_worker) == [0, 1] and {r["role"] for r in rec["records"]} == {"worker"}
    for r in by_worker.values():
        assert r["rejected_by_reason"] == {"before_start": 2, "stale": 1}, r
        assert r["series_ids"] == {"multi_nostart": 2, "multi": 1}
    for k in range(2):
        text = (tmp_path / f"w{k}.log").read_text()
        assert "images of no series" in text and "orphans.json" in text
