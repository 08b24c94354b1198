"""Readers during ingest: 8 reader processes, random windows and sums, never a torn frame.

The daemon writes one series as fast as it can (blocking sends, small frames)
while 8 reader processes open the growing file (SWMR), refresh it, and read
random windows of frames and their summed image. Every frame a reader sees
must carry exactly the events ``streamstore.count`` finds in it, and every sum
must equal the sum of those events: a torn frame (ids published before its
events, or events of a half-written chunk) would show as a mismatch.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from streamstore.link import protocol
from tests._daemon_forkserver import fork_python
from tests._ingest_harness import Series

N_READERS = 8
#: frames and frame shape; the environment may raise them for the full-frame figure,
#: e.g. STREAMSTORE_TEST_READERS_SHAPE=4092x5760 STREAMSTORE_TEST_READERS_FRAMES=300
N_FRAMES = int(os.environ.get("STREAMSTORE_TEST_READERS_FRAMES", "5000"))
SHAPE = tuple(int(v) for v in os.environ.get("STREAMSTORE_TEST_READERS_SHAPE", "64x96").split("x"))
#: the series' frame time. The writer flushes (publishes frames to the readers) after
#: 1 s of frame time or of wall time, whichever comes first: every 50 frames here, a
#: partly filled chunk each time, about 100 publications over 5,000 frames, as many as
#: 20,000 frames of 1 ms gave in about 90 s of ingest, at a quarter of the frames (the
#: test's CPU time, the readers polling while the daemon writes, follows the frames)
FRAME_TIME_S = 0.02

_READER = """
import sys, time
import numpy as np
import streamstore
path, truth, seed, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
from pathlib import Path
Path(f"{stop}.ready{seed}").touch()  # imported: the test starts sending once all are
z = np.load(truth)
pool = [z[f"f{i}"] for i in range(int(z["n"]))]
h, w = (int(v) for v in z["shape"])
rng = np.random.default_rng(seed)
windows = frames_seen = sums = 0
store = None
while True:
    done = Path(stop).exists()
    try:
        if store is None:
            store = streamstore.open(path)
        n = store.refresh()
    except Exception:  # the file is not there or not in SWMR mode yet
        store = None
        if done:
            break
        time.sleep(0.01)
        continue
    if n:
        a = int(rng.integers(0, n))
        b = int(min(n, a + rng.integers(1, 64)))
        ids = store.frame_ids[a:b]
        batch = store.events(a, b)
        expect = np.zeros(h * w, np.uint32)
        for k, fid in enumerate(ids.tolist()):
            want = pool[fid % len(pool)]
            got = batch.frame(k).indices
            if not np.array_equal(got, want):
                print(f"TORN frame {fid}: {got.size} events, expected {want.size}")
                sys.exit(1)
            expect[want] += 1
        image = store.sum(a, b)
        if not np.array_equal(image.ravel(), expect):
            print(f"WRONG sum of frames {a}:{b}")
            sys.exit(1)
        windows += 1
        frames_seen += b - a
        sums += 1
    if done:
        break
print(windows, frames_seen, sums)
"""


def test_eight_readers_see_only_whole_frames_while_the_daemon_writes(
    tmp_path, start_daemon, pusher
):
    series = Series(tmp_path, shape=SHAPE, pool=16, seed=5)
    truth = tmp_path / "truth.npz"
    np.savez(
        truth,
        n=len(series.expected),
        shape=np.array(series.shape),
        **{f"f{i}": e for i, e in enumerate(series.expected)},
    )
    out = tmp_path / "out"
    out.mkdir()
    stop = tmp_path / "stop"
    path = out / "live.h5"
    # processes of their own, forked warm (tests/_daemon_forkserver.py)
    readers = [
        fork_python(
            _READER, [str(path), str(truth), str(seed), str(stop)], tmp_path / f"reader{seed}.out"
        )
        for seed in range(N_READERS)
    ]
    deadline = time.monotonic() + 120
    while not all(Path(f"{stop}.ready{k}").exists() for k in range(N_READERS)):
        assert time.monotonic() < deadline, "the readers did not start"
        time.sleep(0.1)
    try:
        d = start_daemon(out, calibration=series.calibration_path)
        s = pusher(d.listen, sndhwm=64)
        start = protocol.Start("live", series.shape, "uint16", FRAME_TIME_S, n_frames=N_FRAMES)
        s.send_multipart(protocol.encode_start(start))
        for i in range(N_FRAMES):
            s.send_multipart(series.image("live", i), copy=False)
        s.send_multipart(series.end("live", N_FRAMES))
        st = d.wait_until(lambda st: st["series_closed"] >= 1, 300, "the series")
        s.close(0)
        assert d.stop() == 0
    finally:
        time.sleep(0.5)
        stop.touch()
        results = [r.communicate(timeout=120)[0].strip() for r in readers]
    assert st["frames_stored"] == N_FRAMES
    for r, text in zip(readers, results, strict=True):
        assert r.returncode == 0, text
    seen = [tuple(int(v) for v in t.split()) for t in results]
    assert all(w > 0 for w, _, _ in seen), "a reader never saw a frame during ingest"
    print(
        f"\n{N_READERS} readers during ingest of {N_FRAMES} frames of {SHAPE}: windows read "
        f"{[w for w, _, _ in seen]}, frames checked {sum(f for _, f, _ in seen)}, "
        "0 torn, 0 wrong sums"
    )
