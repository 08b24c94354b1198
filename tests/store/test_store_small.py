"""A short series pays no fixed cost: whole-file size against the entropy bound."""

from __future__ import annotations

import math

import numpy as np
import pytest

import streamstore
from streamstore import EventBatch, StoreWriter

SHAPE = (1024, 1536)
N_FRAMES = 40
P = 0.01


def _bound_bits(p: float) -> float:
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) / p


def _batch(seed: int) -> EventBatch:
    rng = np.random.default_rng(seed)
    npix = SHAPE[0] * SHAPE[1]
    frames = [np.flatnonzero(rng.random(npix) < P).astype(np.uint32) for _ in range(N_FRAMES)]
    offsets = np.zeros(N_FRAMES + 1, np.int64)
    np.cumsum([f.size for f in frames], out=offsets[1:])
    return EventBatch(offsets, np.concatenate(frames), None, SHAPE)


def _write(path, batch, flush_every: int, **kw) -> None:
    with StoreWriter(path, SHAPE, frame_time_s=1e-3, flush_interval_s=1e9, **kw) as w:
        for a in range(0, N_FRAMES, 5):
            w.append(batch.slice(a, a + 5), np.arange(a, a + 5), np.arange(a, a + 5) * 10**6)
            if flush_every and (a // 5 + 1) % flush_every == 0:
                w.flush()


@pytest.mark.parametrize("flush_every", [0, 1], ids=["closed-once", "flushed-every-append"])
def test_small_series_file_within_bound(tmp_path, flush_every):
    batch = _batch(7)
    path = tmp_path / "small.h5"
    _write(path, batch, flush_every)
    bound_bytes = _bound_bits(P) * batch.n_events / 8
    size = path.stat().st_size
    assert size <= 1.10 * bound_bytes + 48 * 1024, (size, bound_bytes)
    with streamstore.open(path) as s:
        assert s.n_frames == N_FRAMES
        assert np.array_equal(s.events(0, N_FRAMES).indices, batch.indices)
        if not flush_every:  # written once: the event data alone is near the bound
            assert s.bits_per_event <= 1.07 * _bound_bits(P)


def test_large_per_frame_chunks_still_read(tmp_path):
    # files written with 4096-frame chunks (the former default) read the same
    batch = _batch(8)
    path = tmp_path / "old-chunks.h5"
    _write(path, batch, 1, chunk_frames=4096)
    with streamstore.open(path) as s:
        assert s.n_frames == N_FRAMES
        assert np.array_equal(s.events(0, N_FRAMES).indices, batch.indices)
        assert np.array_equal(s.frame_ids, np.arange(N_FRAMES))
