"""ShardedStore and the series manifest on hand-written shard files; shard bookkeeping units."""

from __future__ import annotations

import json

import numpy as np
import pytest

import streamstore
from streamstore.errors import FormatError, UserError
from streamstore.events import EventBatch
from streamstore.scaleout.deal import offset_endpoint, worker_of
from streamstore.scaleout.shard_writer import ShardTracker
from streamstore.store.shards import MANIFEST_FORMAT, ShardedStore, is_series, read_manifest

SHAPE = (24, 40)  # non-square
N = 50


def _frames(rng, n=N):
    return (rng.random((n, *SHAPE)) < 0.03).astype(np.uint16)


def _batch(frames) -> EventBatch:
    offs, idx = [0], []
    for f in frames:
        nz = np.flatnonzero(f.ravel())
        idx.append(nz)
        offs.append(offs[-1] + nz.size)
    flat = np.concatenate(idx) if idx else np.zeros(0)
    return EventBatch(np.array(offs, np.int64), flat.astype(np.uint32), None, SHAPE)


def _write(path, frames, ids, *, announced=N, complete=True, pixel_size_A=None):
    ids = np.asarray(ids, np.int64)
    meta = {"ingest": {"n_frames_announced": announced}}
    with streamstore.StoreWriter(
        path, SHAPE, frame_time_s=1e-3, meta=meta, pixel_size_A=pixel_size_A
    ) as w:
        if ids.size:
            w.append(_batch(frames[ids]), ids, ids * 1000)
        w.update_accounting(received=int(ids.size), duplicate=0, rejected=0, complete=complete)


def _manifest(d, shards, n_workers=None, announced=N):
    data = {
        "format": MANIFEST_FORMAT,
        "format_version": 1,
        "series_id": d.name,
        "frames_announced": announced,
        "shards": [
            {"worker_id": k, "file": f"shard-{k}.h5", "complete": True, "frames_expected": N}
            for k in shards
        ],
    }
    if n_workers is not None:
        data["n_workers"] = n_workers
    (d / "manifest.json").write_text(json.dumps(data))


@pytest.fixture
def series(tmp_path, rng):
    """Three shards dealt round-robin, frames 10..12 lost, plus the single-file reference."""
    frames = _frames(rng)
    lost = {10, 11, 12}
    d = tmp_path / "ser"
    d.mkdir()
    for k in range(3):
        _write(d / f"shard-{k}.h5", frames, [i for i in range(N) if i % 3 == k and i not in lost])
    _manifest(d, range(3), n_workers=3)
    kept = np.array([i for i in range(N) if i not in lost])
    ref = tmp_path / "ref.h5"
    _write(ref, frames, kept)
    return d, ref, frames, kept, lost


def test_sharded_store_equals_the_single_file_of_the_same_frames(series):
    d, ref, frames, kept, lost = series
    with streamstore.open(d) as s, streamstore.open(ref) as r:
        assert isinstance(s, ShardedStore) and isinstance(s, streamstore.Store)
        np.testing.assert_array_equal(s.frame_ids, kept)
        np.testing.assert_array_equal(s.missing_frame_ids, sorted(lost))
        assert s.events(0, s.n_frames) == r.events(0, r.n_frames)
        assert s.events(4, 9) == r.events(4, 9)
        assert s.events(3, 3).n_frames == 0
        np.testing.assert_array_equal(s.frames(2, 17), r.frames(2, 17))
        roi = (3, 20, 5, 33)
        np.testing.assert_array_equal(s.frames(0, 9, roi=roi), r.frames(0, 9, roi=roi))
        np.testing.assert_array_equal(s.sum(), frames[kept].sum(0))
        np.testing.assert_array_equal(s.sum(5, 30, roi=roi), r.sum(5, 30, roi=roi))
        sel = [0, 7, 8, 40, 41]
        np.testing.assert_array_equal(s.sum(select=sel), r.sum(select=sel))
        np.testing.assert_array_equal(s.dose("events"), r.dose("events"))
        np.testing.assert_array_equal(s.select(dose=(0.02, 1.0)), r.select(dose=(0.02, 1.0)))
        assert s.fractions(0.2) == r.fractions(0.2)
        acc = s.accounting
        assert acc["stored"] == kept.size and acc["missing"] == len(lost)
        assert acc["received"] == kept.size and acc["complete"] is True
        assert acc["shards"] == 3 and acc["shards_absent"] == 0
        assert "ShardedStore" in repr(s)
        assert s.attrs["shard_files"] == ["shard-0.h5", "shard-1.h5", "shard-2.h5"]


def test_manifest_file_and_directory_open_the_same_series(series):
    d = series[0]
    assert is_series(d) and is_series(d / "manifest.json")
    with streamstore.open(d / "manifest.json") as a, streamstore.open(d) as b:
        np.testing.assert_array_equal(a.frame_ids, b.frame_ids)


def test_unreadable_shard_is_reported_and_its_frames_missing(series):
    d, _ref, _frames, kept, lost = series
    (d / "shard-1.h5").write_bytes(b"not hdf5 at all")
    with streamstore.open(d) as s:
        assert "shard-1.h5" in s.shard_errors
        gone = {int(i) for i in kept if i % 3 == 1}
        assert set(s.missing_frame_ids.tolist()) == lost | gone
        assert set(s.frame_ids.tolist()) == {int(i) for i in kept} - gone
        acc = s.accounting
        assert acc["complete"] is False and acc["shards_unreadable"] == ["shard-1.h5"]


def test_shard_without_manifest_entry_counts_as_unclosed(series):
    d = series[0]
    _manifest(d, [0, 1], n_workers=3)
    with streamstore.open(d) as s:
        assert s.n_frames == series[3].size
        assert s.accounting["shards_unclosed"] == ["shard-2.h5"]
        assert s.accounting["complete"] is False


def test_absent_worker_is_counted_and_missing_frames_reach_the_announced_count(tmp_path, rng):
    frames = _frames(rng)
    d = tmp_path / "ser"
    d.mkdir()
    _write(d / "shard-0.h5", frames, range(0, 30, 2))
    _manifest(d, [0], n_workers=2)
    with streamstore.open(d) as s:
        assert s.accounting["shards_absent"] == 1 and s.accounting["complete"] is False
        # ids up to the announced N that no shard holds are missing, past the last stored id too
        assert set(s.missing_frame_ids.tolist()) == set(range(N)) - set(range(0, 30, 2))


def test_an_id_stored_in_two_shards_is_kept_once_and_counted_duplicate(tmp_path, rng):
    frames = _frames(rng)
    d = tmp_path / "ser"
    d.mkdir()
    _write(d / "shard-0.h5", frames, [0, 2, 4, 5])
    _write(d / "shard-1.h5", frames, [1, 3, 5, 6])
    with streamstore.open(d) as s:
        np.testing.assert_array_equal(s.frame_ids, [0, 1, 2, 3, 4, 5, 6])
        assert s.accounting["duplicate"] == 1
        np.testing.assert_array_equal(s.sum(), frames[:7].sum(0))
        assert s.events(0, 7) == _batch(frames[:7])
        np.testing.assert_array_equal(s.shard_of_frame, [0, 1, 0, 1, 0, 0, 1])


def test_shards_that_disagree_on_the_pixel_size_are_refused(tmp_path, rng):
    frames = _frames(rng)
    d = tmp_path / "ser"
    d.mkdir()
    _write(d / "shard-0.h5", frames, [0, 2])
    _write(d / "shard-1.h5", frames, [1, 3], pixel_size_A=1.5)
    with pytest.raises(FormatError, match="pixel_size_A"):
        streamstore.open(d)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{", "not a JSON series manifest"),
        ('{"format": "other"}', "not a streamstore.series manifest"),
        ('{"format": "streamstore.series", "format_version": 9}', "manifest version 9"),
        ('{"format": "streamstore.series", "format_version": 1, "shards": 3}', "'shards'"),
        (
            '{"format": "streamstore.series", "format_version": 1, '
            '"shards": [{"file": "../x.h5"}]}',
            "plain name",
        ),
    ],
)
def test_bad_manifests_are_refused_naming_the_problem(tmp_path, content, match):
    p = tmp_path / "manifest.json"
    p.write_text(content)
    with pytest.raises(FormatError, match=match):
        read_manifest(p)


def test_open_of_a_plain_directory_says_what_it_expects(tmp_path):
    with pytest.raises(UserError, match="not a series"):
        streamstore.open(tmp_path)


def test_series_directory_without_readable_shard_is_a_format_error(tmp_path):
    (tmp_path / "shard-0.h5").write_bytes(b"junk")
    with pytest.raises(FormatError, match="no readable shard"):
        streamstore.open(tmp_path)


def test_shard_tracker_never_declares_missing_and_keeps_order():
    t = ShardTracker(window=4)
    out = []
    for fid in [1, 3, 7, 5, 9, 3, 11, 13, 15, 17]:
        off = t.offer(fid, fid)
        assert off.missing == []
        out += [i for i, _ in off.ready]
    out += [i for i, _ in t.finish(20).ready]
    assert out == [1, 3, 5, 7, 9, 11, 13, 15, 17]
    assert t.duplicate == 1
    late = t.offer(2, 2)  # below what was released already: cannot be stored in order
    assert late.verdict == "late" and t.late == 1


def test_shard_tracker_releases_frames_held_too_long():
    t = ShardTracker(window=64)
    assert t.offer(4, "a").ready == []
    assert [i for i, _ in t.release_older(0.0).ready] == [4]
    assert t.n_held == 0


def test_endpoints_are_derived_by_port_offset():
    assert offset_endpoint("tcp://10.0.0.2:7000", 3) == "tcp://10.0.0.2:7003"
    assert offset_endpoint("ipc:///tmp/cam", 2) == "ipc:///tmp/cam-2"
    assert offset_endpoint("tcp://host", 0) == "tcp://host"
    with pytest.raises(UserError, match="cannot derive"):
        offset_endpoint("tcp://host", 1)
    with pytest.raises(UserError, match="above 65535"):
        offset_endpoint("tcp://h:65535", 1)


def test_frames_are_dealt_in_blocks():
    got = [worker_of(f, 3, 4) for f in range(26)]
    assert got == [0] * 4 + [1] * 4 + [2] * 4 + [0] * 4 + [1] * 4 + [2] * 4 + [0] * 2
    assert [worker_of(f, 2, 1) for f in range(4)] == [0, 1, 0, 1]


_WRITER = """
import sys
import numpy as np
import streamstore
from streamstore.events import EventBatch

d, shape = sys.argv[1], (24, 40)
frames = np.load(d + "/frames.npy")


def batch(ids):
    offs, idx = [0], []
    for f in frames[ids]:
        nz = np.flatnonzero(f.ravel())
        idx.append(nz)
        offs.append(offs[-1] + nz.size)
    return EventBatch(np.array(offs, np.int64), np.concatenate(idx).astype(np.uint32), None, shape)


ws = [streamstore.StoreWriter(f"{d}/shard-{k}.h5", shape, frame_time_s=1e-3) for k in range(2)]
for lo in (0, 10):
    for k, w in enumerate(ws):
        ids = np.arange(lo + k, lo + 10, 2)
        w.append(batch(ids), ids, ids)
        w.flush()
    print("flushed", flush=True)
    sys.stdin.readline()
for w in ws:
    w.close()
"""


def test_refresh_picks_up_frames_the_shards_flushed_since_opening(tmp_path, rng):
    """Shards being written by another process (SWMR): refresh() sees the new frames."""
    import subprocess
    import sys

    frames = _frames(rng)
    d = tmp_path / "ser"
    d.mkdir()
    np.save(d / "frames.npy", frames)
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(d)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "flushed"
        with streamstore.open(d) as s:
            assert s.swmr and s.n_frames == 10
            writer.stdin.write("go\n")
            writer.stdin.flush()
            assert writer.stdout.readline().strip() == "flushed"
            assert s.refresh() == 20
            np.testing.assert_array_equal(s.frame_ids, np.arange(20))
            np.testing.assert_array_equal(s.sum(), frames[:20].sum(0))
        writer.stdin.write("go\n")
        writer.stdin.flush()
        assert writer.wait(60) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(10)
        writer.stdin.close()
        writer.stdout.close()


def test_an_absurd_frame_count_in_the_manifest_is_a_format_error(tmp_path, rng):
    frames = _frames(rng)
    d = tmp_path / "ser"
    d.mkdir()
    _write(d / "shard-0.h5", frames, [0, 1, 2])
    _manifest(d, [0], announced=10**15)
    with pytest.raises(FormatError, match="claims 1000000000000000 frames"):
        streamstore.open(d)


def test_orphan_records_of_several_processes_share_one_file(tmp_path):
    from streamstore.scaleout.shard_writer import ORPHANS_FORMAT, OrphanRecord

    a = OrphanRecord(tmp_path, "worker", 0)
    b = OrphanRecord(tmp_path, "broker")
    assert a.write() is None and not (tmp_path / "orphans.json").exists()  # nothing counted
    a.add("before_start", "ghost", 2)
    b.add("after_last_series", "late")
    for i in range(70):  # more distinct ids than a record names
        b.add("unknown_series", f"s{i}")
    assert a.pending and a.write() == b.write() == tmp_path / "orphans.json"
    a.add("stale", "ghost")
    a.write()  # replaces its own record, keeps the other's
    data = json.loads((tmp_path / "orphans.json").read_text())
    assert data["format"] == ORPHANS_FORMAT and data["rejected"] == 3 + 71
    by_role = {r["role"]: r for r in data["records"]}
    assert by_role["worker"]["worker_id"] == 0
    assert by_role["worker"]["rejected_by_reason"] == {"before_start": 2, "stale": 1}
    assert by_role["worker"]["series_ids"] == {"ghost": 3}
    named = by_role["broker"]["series_ids"]
    assert len(named) == 65 and named["(other series)"] == 71 - 64 and sum(named.values()) == 71
    assert not a.pending and a.write_if_due(0.0) is None
