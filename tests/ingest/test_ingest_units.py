"""Unit tests of the ingest daemon's pure parts: reorder window, accounting, safety, budget."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamstore.errors import UserError
from streamstore.ingest.config import IngestConfig
from streamstore.ingest.pipeline import ByteBudget
from streamstore.ingest.safety import (
    candidate_paths,
    check_bind_endpoint,
    is_free,
    is_loopback_endpoint,
)
from streamstore.ingest.series import FrameTracker, missing_ranges


def _ids(ranges: list[tuple[int, int]]) -> list[int]:
    return [i for a, b in ranges for i in range(a, b)]


def _drive(tracker: FrameTracker, ids: list[int], n_expected: int):
    stored, missing, verdicts = [], [], []
    for fid in ids:
        off = tracker.offer(fid, f"item{fid}")
        verdicts.append(off.verdict)
        stored += [i for i, _ in off.ready]
        missing += _ids(off.missing)
        for i, item in off.ready:
            assert item == f"item{i}"
    off = tracker.finish(n_expected)
    stored += [i for i, _ in off.ready]
    missing += _ids(off.missing)
    return stored, missing, verdicts


def test_in_order_frames_are_released_at_once():
    t = FrameTracker(window=4)
    for i in range(10):
        off = t.offer(i, i)
        assert [fid for fid, _ in off.ready] == [i]
        assert off.missing == []
    assert t.n_held == 0 and t.released == 10


def test_reordered_frames_within_window_come_out_in_order():
    stored, missing, verdicts = _drive(FrameTracker(4), [0, 2, 1, 4, 3, 6, 5, 7], 8)
    assert stored == list(range(8))
    assert missing == []
    assert set(verdicts) == {"accepted"}


def test_gap_is_declared_missing_when_the_window_overflows():
    t = FrameTracker(window=2)
    ids = [0, 2, 3, 4, 5]
    stored, missing, _ = _drive(t, ids, 6)
    assert stored == [0, 2, 3, 4, 5]
    assert missing == [1]
    # the late frame 1 can no longer be stored in order
    t2 = FrameTracker(window=2)
    for i in ids:
        t2.offer(i, i)
    off = t2.offer(1, 1)
    assert off.verdict == "late" and off.ready == []
    assert t2.late == 1


def test_duplicates_of_released_and_held_frames_are_dropped():
    t = FrameTracker(window=8)
    stored, missing, verdicts = _drive(t, [0, 1, 1, 3, 3, 2, 0], 4)
    assert stored == [0, 1, 2, 3]
    assert missing == []
    assert verdicts.count("duplicate") == 3
    assert t.duplicate == 3 and t.received == 7


def test_finish_declares_the_tail_missing():
    t = FrameTracker(window=8)
    stored, missing, _ = _drive(t, [0, 1, 4], 7)
    assert stored == [0, 1, 4]
    assert missing == [2, 3, 5, 6]
    assert t.missing_ids == [2, 3, 5, 6]


def test_window_zero_stores_in_arrival_order():
    stored, missing, verdicts = _drive(FrameTracker(0), [0, 2, 1, 3], 4)
    assert stored == [0, 2, 3]
    assert missing == [1]
    assert verdicts[2] == "late"


def test_tracker_rejects_bad_arguments():
    with pytest.raises(ValueError, match="window"):
        FrameTracker(-1)
    with pytest.raises(ValueError, match="frame_id"):
        FrameTracker(4).offer(-3, None)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 60),
    window=st.integers(0, 10),
    data=st.data(),
)
def test_every_id_is_stored_once_or_missing(n, window, data):
    """Any arrival order with drops and duplicates: stored ascending, stored + missing = all."""
    keep = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    ids = [i for i in range(n) if keep[i]]
    ids += data.draw(st.lists(st.sampled_from(ids), max_size=10)) if ids else []
    ids = data.draw(st.permutations(ids))
    t = FrameTracker(window)
    stored, missing, verdicts = _drive(t, ids, n)
    assert stored == sorted(stored)
    assert len(set(stored)) == len(stored)
    assert sorted(stored + missing) == list(range(n))
    assert t.received == len(ids)
    assert t.duplicate + t.late + len(stored) == len(ids)
    assert set(missing).isdisjoint(stored)


def test_missing_ranges_text():
    assert missing_ranges([]) == "none"
    assert missing_ranges([(3, 4), (7, 10), (12, 13)]) == "3, 7-9, 12"


def test_a_jump_of_ten_million_ids_is_one_missing_range():
    t = FrameTracker(window=0)
    assert t.offer(0, 0).missing == []
    off = t.offer(10_000_000, 1)
    assert [fid for fid, _ in off.ready] == [10_000_000]
    assert off.missing == [(1, 10_000_000)]
    assert t.n_missing == 9_999_999 and len(t.missing) == 1
    assert t.offer(5, 2).verdict == "late"


# -- safety -------------------------------------------------------------------
@pytest.mark.parametrize(
    "ep",
    ["tcp://127.0.0.1:5555", "tcp://localhost:1", "tcp://[::1]:5555", "ipc:///tmp/x", "inproc://a"],
)
def test_loopback_endpoints_bind_without_a_flag(ep):
    assert is_loopback_endpoint(ep)
    check_bind_endpoint(ep, allow_remote=False)


@pytest.mark.parametrize(
    "ep", ["tcp://*:5555", "tcp://0.0.0.0:5555", "tcp://192.168.1.4:5555", "tcp://eth0:5555"]
)
def test_remote_binds_need_allow_remote(ep):
    assert not is_loopback_endpoint(ep)
    with pytest.raises(UserError, match="--allow-remote"):
        check_bind_endpoint(ep, allow_remote=False)
    check_bind_endpoint(ep, allow_remote=True)


def test_config_refuses_remote_listen_and_status(tmp_path):
    with pytest.raises(UserError, match="--listen"):
        IngestConfig(out_dir=str(tmp_path), listen="tcp://*:5555").check()
    with pytest.raises(UserError, match="--status-endpoint"):
        IngestConfig(
            out_dir=str(tmp_path), listen="tcp://127.0.0.1:1", status_endpoint="tcp://*:2"
        ).check()
    with pytest.raises(UserError, match="exactly one"):
        IngestConfig(out_dir=str(tmp_path)).check()
    with pytest.raises(UserError, match="max-buffer-mb"):
        IngestConfig(out_dir=str(tmp_path), connect="tcp://h:1", max_buffer_mb=0).check()


@pytest.mark.parametrize("sid", ["../x", "/etc/passwd", "a/b", ".hidden", "a\x00b", "", "x" * 65])
def test_escaping_series_ids_name_no_path(tmp_path, sid):
    with pytest.raises(ValueError, match="series_id"):
        next(candidate_paths(tmp_path, sid))


def test_candidate_paths_add_numbered_suffixes(tmp_path):
    gen = candidate_paths(tmp_path, "run-1.a")
    assert [next(gen).name for _ in range(3)] == ["run-1.a.h5", "run-1.a-1.h5", "run-1.a-2.h5"]
    assert all(p.parent == tmp_path for p in itertools.islice(candidate_paths(tmp_path, "x"), 50))


def test_dangling_symlink_is_not_free(tmp_path):
    link = tmp_path / "s.h5"
    os.symlink(tmp_path / "nowhere", link)
    assert not is_free(link)
    assert is_free(tmp_path / "other.h5")


# -- budget --------------------------------------------------------------------
def test_byte_budget_blocks_until_released():
    b = ByteBudget(100)
    b.add(60)
    assert b.wait_room(0.01)
    b.add(60)
    assert b.used == 120 and b.peak == 120 and b.fill == pytest.approx(1.2)
    assert not b.wait_room(0.01)
    t = threading.Timer(0.05, b.release, args=(60,))
    t.start()
    assert b.wait_room(5.0)
    t.join()
    assert b.used == 60
    with pytest.raises(ValueError, match="budget"):
        ByteBudget(0)


def test_budget_hwm_derivation():
    cfg = IngestConfig(out_dir="x", listen="tcp://127.0.0.1:1", max_buffer_mb=1024)
    assert cfg.derived_rcvhwm() == 5  # a quarter of 1 GiB in 47 MB frames
    small = IngestConfig(out_dir="x", listen="tcp://127.0.0.1:1", max_frame_bytes=64 * 96 * 2)
    assert small.derived_rcvhwm() == 1000
    assert np.isclose(small.budget_bytes, 1024 * 2**20)


# -- status ------------------------------------------------------------------------
def test_status_snapshot_rates_and_line():
    import io
    import json
    import time

    from streamstore.ingest.status import Counters, StatusReporter, format_status

    c = Counters()
    rep = StatusReporter(c, lambda: 0.25, lambda: "run7", stream=io.StringIO(), interval_s=1.0)
    assert not rep.tty
    time.sleep(0.05)
    c.frames_received, c.bytes_received, c.events = 100, 10**8, 5000
    c.frames_stored, c.events_stored, c.bytes_written = 90, 4000, 4000
    c.reject("payload_size")
    c.reject("payload_size")
    c.reject("stale")
    st = rep.snapshot()
    assert st["fps"] > 0 and st["gb_per_s_in"] > 0 and st["events_per_s"] > 0
    assert st["bits_per_event"] == pytest.approx(8.0)
    assert st["rejected"] == 3 and st["rejected_by_reason"] == {"payload_size": 2, "stale": 1}
    assert st["series"] == "run7" and st["queue_fill"] == 0.25
    json.dumps(st)  # what the PUB socket sends
    line = format_status(st)
    for part in ("run7:", "frames/s", "GB/s in", "bits/event", "queue  25%", "rejected 3"):
        assert part in line
    # a second snapshot without new frames reports zero rates, same totals
    st2 = rep.snapshot()
    assert st2["fps"] == 0 and st2["frames_received"] == 100
    empty = format_status({**st2, "bits_per_event": None, "series": None})
    assert "- bits/event" in empty and empty.startswith("-:")


_FAULTS_SCRIPT = """
import ctypes, ctypes.util, resource, sys
from streamstore.ingest.allocator import keep_large_buffers
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
applied = keep_large_buffers() if sys.argv[1] == "keep" else False
n = 48 * 2**20  # a frame-sized buffer, as ZeroMQ allocates one per message
def frame():
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
frame()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
frame()  # the next one
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc behaviour")
def test_keep_large_buffers_reuses_a_freed_frame_buffer_without_page_faults():
    """By default glibc unmaps a freed 48 MB block, so the next one faults in
    every page again; with keep_large_buffers it reuses the mapped heap."""
    out = {}
    for mode in ("default", "keep"):
        proc = subprocess.run(
            [sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True
        )
        applied, faults = proc.stdout.split()
        out[mode] = (applied == "True", int(faults))
    pages = 48 * 2**20 // 4096
    assert out["default"][1] > pages // 2  # faulted in again
    assert out["keep"][0] and out["keep"][1] < pages // 20
