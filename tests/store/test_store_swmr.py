"""Streaming: a reader in another process sees frames arrive; SIGKILL keeps flushed frames."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

import streamstore
from streamstore import EventBatch

SHAPE = (32, 48)

# shared by the writer subprocess and the test: deterministic batches
GENERATOR = textwrap.dedent(
    """
    import numpy as np
    from streamstore import EventBatch

    def make_batch(k, shape=(32, 48), n=6):
        rng = np.random.default_rng(1000 + k)
        hit = rng.random((n, shape[0] * shape[1])) < 0.04
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(hit.sum(1), out=offsets[1:])
        return EventBatch(offsets, np.nonzero(hit)[1], None, shape)
    """
)

WRITER = GENERATOR + textwrap.dedent(
    """
    import sys, time
    from streamstore import StoreWriter

    path, mode = sys.argv[1], sys.argv[2]
    w = StoreWriter(path, (32, 48), frame_time_s=1e-3, chunk_events=200, chunk_frames=8,
                    flush_interval_s=1e9)
    nxt = 0
    for k in range(int(sys.argv[3])):
        b = make_batch(k)
        w.append(b, np.arange(nxt, nxt + b.n_frames), np.arange(nxt, nxt + b.n_frames) * 10)
        nxt += b.n_frames
        w.flush()
        print("flushed", w.n_flushed, flush=True)
        if mode == "step":
            sys.stdin.readline()  # wait until the reader looked
    if mode == "kill":
        b = make_batch(99)
        w.append(b, np.arange(nxt, nxt + b.n_frames), np.arange(nxt, nxt + b.n_frames) * 10)
        print("appended unflushed", flush=True)
        time.sleep(600)  # the test kills us here
    w.close()
    print("closed", flush=True)
    """
)


def expected(n_batches: int) -> EventBatch:
    ns: dict = {}
    exec(GENERATOR, ns)
    return EventBatch.concatenate([ns["make_batch"](k) for k in range(n_batches)])


def start_writer(tmp_path: Path, path: Path, mode: str, n: int) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return subprocess.Popen(
        [sys.executable, str(script), str(path), mode, str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_line(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    assert line, f"writer died: {proc.stderr.read()}"
    return line.strip()


def test_swmr_reader_sees_frames_grow_while_writer_appends(tmp_path):
    path = tmp_path / "live.h5"
    proc = start_writer(tmp_path, path, "step", 4)
    try:
        assert read_line(proc) == "flushed 6"
        s = streamstore.open(path)
        assert s.swmr  # the file is open for writing elsewhere
        seen = [s.n_frames]
        for k in range(1, 4):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert read_line(proc) == f"flushed {6 * (k + 1)}"
            seen.append(s.refresh())
            truth = expected(k + 1)
            assert s.events(0, s.n_frames) == truth
            np.testing.assert_array_equal(s.sum(), truth.to_dense().sum(0))
        assert seen == [6, 12, 18, 24]
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert read_line(proc) == "closed"
        s.close()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
    with streamstore.open(path) as s:  # closed cleanly: a normal open works
        assert not s.swmr and s.n_frames == 24
        assert s.attrs["frames_stored"] == 24


def test_sigkilled_writer_leaves_every_flushed_frame(tmp_path):
    path = tmp_path / "killed.h5"
    proc = start_writer(tmp_path, path, "kill", 5)
    try:
        lines = [read_line(proc) for _ in range(6)]
        assert lines[-2:] == ["flushed 30", "appended unflushed"]
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
    with streamstore.open(path) as s:
        assert s.swmr  # the killed writer left the file marked open for writing
        assert s.n_frames >= 30
        truth = expected(5)
        assert s.events(0, 30) == truth
        np.testing.assert_array_equal(s.frame_ids[:30], np.arange(30))
        np.testing.assert_array_equal(s.sum(0, 30), truth.to_dense().sum(0))
        assert s.attrs["frames_stored"] == 30  # as of the last flush
