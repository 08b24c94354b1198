"""Bit rot is found and confined: chunk checksums, CorruptDataError, streamstore verify.

Each test writes a real store, flips one byte of the file on disk at an
offset h5py's ``get_chunk_info_by_coord`` gives, and checks that
``streamstore verify`` names the right frames, that reads elsewhere still
return the true events and that reads touching the damage raise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401
import numpy as np
import pytest

import streamstore
from streamstore import EventBatch, StoreWriter
from streamstore.store.checksum import fletcher32, fletcher32_reference, seal, unseal
from tests._cli_data import cli_here

SHAPE = (48, 64)
N_FRAMES = 600
CHUNK_EVENTS = 2048
CHUNK_FRAMES = 128


def _batch(rng: np.random.Generator, n: int) -> EventBatch:
    h, w = SHAPE
    frames = [
        np.sort(rng.choice(h * w, int(rng.integers(20, 60)), replace=False)).astype(np.uint32)
        for _ in range(n)
    ]
    offs = np.zeros(n + 1, np.int64)
    np.cumsum([f.size for f in frames], out=offs[1:])
    return EventBatch(offs, np.concatenate(frames), None, SHAPE)


def _write(path: Path, batch: EventBatch, ids: np.ndarray, checksums: bool = True) -> None:
    with StoreWriter(
        path,
        SHAPE,
        frame_time_s=1e-3,
        chunk_events=CHUNK_EVENTS,
        chunk_frames=CHUNK_FRAMES,
        checksums=checksums,
    ) as w:
        for a in range(0, batch.n_frames, 100):
            b = min(a + 100, batch.n_frames)
            w.append(batch.slice(a, b), ids[a:b], ids[a:b] * 1000)
            w.flush()  # holes between flushes: damage must still map to the right frames


@pytest.fixture
def store(tmp_path, rng) -> tuple[Path, EventBatch]:
    batch = _batch(rng, N_FRAMES)
    path = tmp_path / "run.h5"
    _write(path, batch, np.arange(N_FRAMES))
    return path, batch


def _flip(path: Path, dataset: str, chunk: int, where: str = "middle") -> tuple[int, int]:
    """Flip one bit of chunk ``chunk`` of ``dataset``; return the chunk's (lo, hi) positions."""
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        c = int(ds.chunks[0])
        info = ds.id.get_chunk_info_by_coord((chunk * c,))
    at = info.byte_offset + (info.size // 2 if where == "middle" else 8)
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x04
    path.write_bytes(bytes(raw))
    return chunk * c, (chunk + 1) * c


def _frames_in_slots(path: Path, lo: int, hi: int) -> tuple[int, int]:
    """The frames whose events lie in slots lo:hi (read from the intact per-frame data)."""
    with h5py.File(path, "r") as f:
        offs = f["frames/event_offset"][:]
        counts = f["frames/event_count"][:]
    hit = np.flatnonzero((counts > 0) & (offs < hi) & (offs + counts > lo))
    assert hit.size and np.all(np.diff(hit) == 1)
    return int(hit[0]), int(hit[-1]) + 1


def _verify(path: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python -m streamstore verify`` in its own interpreter (the exit-status contract)."""
    return subprocess.run(
        [sys.executable, "-m", "streamstore", "verify", str(path), *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _verify_here(path: Path, *extra: str) -> subprocess.CompletedProcess:
    """``streamstore verify`` called in this process, its output captured (the report)."""
    return cli_here("verify", path, *extra)


def _check_confined(path: Path, batch: EventBatch, bad: tuple[int, int]) -> None:
    """Reads avoiding ``bad`` frames are exact; reads touching them raise naming them."""
    a, b = bad
    with streamstore.open(path) as s:
        before = s.events(0, a)
        assert np.array_equal(before.indices, batch.slice(0, a).indices)
        after = s.frames(b, N_FRAMES)
        assert np.array_equal(after, batch.slice(b, N_FRAMES).to_dense())
        keep = np.r_[0:a, b:N_FRAMES]
        truth = np.bincount(batch.slice(0, a).indices, minlength=SHAPE[0] * SHAPE[1])
        truth += np.bincount(batch.slice(b, N_FRAMES).indices, minlength=SHAPE[0] * SHAPE[1])
        assert np.array_equal(s.sum(select=keep).ravel(), truth)
        for read in (
            lambda: s.events(a - 1, a + 1),
            lambda: s.frames(b - 1, b + 3),
            lambda: s.sum(),
            lambda: s.sum(select=[b - 1]),
        ):
            with pytest.raises(streamstore.CorruptDataError) as err:
                read()
            (lo, hi), *_ = err.value.frames
            assert a <= lo < hi <= b
            assert f"{lo}:" in str(err.value)


# ------------------------------------------------------------- checksum --
@pytest.mark.parametrize("size", [0, 1, 2, 7, 720, 721, 5000])
def test_fletcher32_matches_hdf5s_own_filter(tmp_path, rng, size):
    """The numba kernel, the Python reference and HDF5's C filter agree byte for byte."""
    data = rng.integers(0, 256, size, dtype=np.uint8)
    assert fletcher32(data.tobytes()) == fletcher32_reference(data.tobytes())
    if size:
        with h5py.File(tmp_path / "f.h5", "w") as f:
            ds = f.create_dataset("x", data=data, chunks=(size,), fletcher32=True)
            _, raw = ds.id.read_direct_chunk((0,))
        assert raw[:-4] == data.tobytes()
        assert raw == seal(data.tobytes())
        assert bytes(unseal(raw)) == data.tobytes()


def test_every_dataset_carries_the_checksum(store):
    path, _ = store
    with h5py.File(path, "r") as f:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        assert names and all(f[n].fletcher32 for n in names)


# --------------------------------------------------------------- damage --
def test_flip_in_event_chunk_is_found_and_confined(store):
    path, batch = store
    assert _verify(path).returncode == 0
    with h5py.File(path, "r") as f:
        n_chunks = -(-f["events/gaps"].shape[0] // CHUNK_EVENTS)
    lo, hi = _flip(path, "events/gaps", n_chunks // 2)
    bad = _frames_in_slots(path, lo, hi)
    r = _verify(path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"DAMAGED frames {bad[0]}:{bad[1]}:" in r.stdout
    assert "checksum mismatch" in r.stdout
    _check_confined(path, batch, bad)


def test_flip_in_chunk_header_is_found_and_confined(store):
    path, batch = store
    lo, hi = _flip(path, "events/gaps", 3, where="header")
    bad = _frames_in_slots(path, lo, hi)
    r = _verify_here(path)
    assert r.returncode == 1
    assert f"DAMAGED frames {bad[0]}:{bad[1]}:" in r.stdout
    _check_confined(path, batch, bad)


def test_flip_in_per_frame_dataset_is_found_and_confined(store):
    path, batch = store
    _flip(path, "frames/event_count", 2)  # frames 256:384
    bad = (2 * CHUNK_FRAMES, 3 * CHUNK_FRAMES)
    r = _verify_here(path)
    assert r.returncode == 1
    assert f"DAMAGED frames {bad[0]}:{bad[1]}: /frames/event_count chunk 2" in r.stdout
    with streamstore.open(path) as s:
        assert s.damaged_frames == [bad]
    _check_confined(path, batch, bad)


def test_plain_h5py_reader_gets_an_error_not_wrong_events(store):
    path, _ = store
    lo, hi = _flip(path, "events/gaps", 4)
    with h5py.File(path, "r") as f:
        assert np.array_equal(f["events/gaps"][: lo - 1], f["events/gaps"][: lo - 1])
        with pytest.raises(OSError):
            f["events/gaps"][lo:hi]


def test_exports_go_through_the_check(store, tmp_path):
    path, _ = store
    _flip(path, "events/gaps", 5)
    with pytest.raises(streamstore.CorruptDataError):
        streamstore.export_stempy(path, tmp_path / "out.h5")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamstore",
            "export",
            str(path),
            str(tmp_path / "o.npy"),
            "-f",
            "npy",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and "damaged" in r.stderr and r.stderr.count("\n") == 1


# ----------------------------------------------------- old files, series --
def test_file_without_checksums_is_still_checked(tmp_path, rng):
    batch = _batch(rng, 200)
    path = tmp_path / "old.h5"
    _write(path, batch, np.arange(200), checksums=False)
    r = _verify_here(path)
    assert r.returncode == 0, r.stdout
    assert "checksums absent" in r.stdout
    with streamstore.open(path) as s:
        assert np.array_equal(s.events(0, 200).indices, batch.indices)
    # no checksum to catch it: an event count that shrank leaves its last event
    # in no frame's slots, and the totals check finds it
    with h5py.File(path, "r+") as f:
        assert not f["frames/event_count"].fletcher32
        f["frames/event_count"][150] -= 1
    r = _verify_here(path)
    assert r.returncode == 1
    assert "DAMAGED frames 150:152: stray events in padding" in r.stdout


def test_damaged_shard_of_a_series(tmp_path, rng):
    n = 400
    batch = _batch(rng, n)
    series = tmp_path / "series"
    series.mkdir()
    ids = np.arange(n)
    for k in (0, 1):  # round-robin shards, as two ingest workers write them
        part = np.flatnonzero(ids % 2 == k)
        sub = EventBatch(
            np.r_[0, np.cumsum(batch.counts[part])],
            np.concatenate([batch.slice(int(i), int(i) + 1).indices for i in part]),
            None,
            SHAPE,
        )
        _write(series / f"shard-{k}.h5", sub, ids[part])
    assert _verify_here(series).returncode == 0
    lo, hi = _flip(series / "shard-1.h5", "events/gaps", 2)
    la, lb = _frames_in_slots(series / "shard-1.h5", lo, hi)
    r = _verify_here(series)
    assert r.returncode == 1
    assert f"shard-1.h5: {n // 2} frames" in r.stdout
    assert f"DAMAGED frames {la}:{lb}:" in r.stdout
    # series frame i is id i; shard-1 local frame j is id 2j + 1
    rep = json.loads(_verify_here(series, "--json").stdout)
    assert not rep["sound"]
    hit = [i for a, b in rep["series_damaged"] for i in range(a, b)]
    assert hit == [2 * j + 1 for j in range(la, lb)]
    with streamstore.open(series) as s:
        assert np.array_equal(s.events(0, 2 * la).indices, batch.slice(0, 2 * la).indices)
        with pytest.raises(streamstore.CorruptDataError) as err:
            s.frames(2 * la, 2 * la + 4)
        assert err.value.frames[0][0] == 2 * la + 1


def test_verify_bad_input_is_one_sentence_and_exit_2(tmp_path):
    r = _verify(tmp_path / "nope.h5")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "error" in r.stderr
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not an HDF5 file at all")
    r = _verify(junk)
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_dask_reads_go_through_the_check(store):
    pytest.importorskip("dask")
    path, batch = store
    lo, hi = _flip(path, "events/gaps", 4)
    a, b = _frames_in_slots(path, lo, hi)
    with streamstore.open(path) as s:
        arr = s.to_dask(chunk_frames=50)
        first = arr[: a - a % 50].sum(axis=0).compute(scheduler="sync")
        truth = batch.slice(0, a - a % 50).to_dense().sum(axis=0)
        assert np.array_equal(first, truth)
        with pytest.raises(streamstore.CorruptDataError):
            arr[a:b].sum().compute(scheduler="sync")


def test_damaged_subpixel_chunk_is_found_and_confined(tmp_path, rng):
    batch = _batch(rng, 300)
    sub = rng.integers(0, 16, batch.n_events, dtype=np.uint8)
    batch = EventBatch(batch.offsets, batch.indices, sub, SHAPE)
    path = tmp_path / "sub.h5"
    with StoreWriter(path, SHAPE, frame_time_s=1e-3, chunk_events=CHUNK_EVENTS, subpixel=True) as w:
        w.append(batch, np.arange(300), np.arange(300))
    lo, hi = _flip(path, "events/subpixel", 2)
    a, b = _frames_in_slots(path, lo, hi)
    r = _verify_here(path)
    assert r.returncode == 1
    assert f"DAMAGED frames {a}:{b}: /events/subpixel chunk 2" in r.stdout
    with streamstore.open(path) as s:
        assert np.array_equal(s.events(0, a).subpixel, batch.slice(0, a).subpixel)
        assert np.array_equal(s.frames(a, b), batch.slice(a, b).to_dense())  # gaps intact
        with pytest.raises(streamstore.CorruptDataError):
            s.events(a, b)
