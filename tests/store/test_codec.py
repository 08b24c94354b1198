"""Gap encoding (numpy reference == numba kernel) and the Blosc2 chunk codec."""

from __future__ import annotations

import h5py
import hdf5plugin  # noqa: F401
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamstore.store.codec import (
    BLOSC2_FILTER_ID,
    Blosc2ChunkCodec,
    gap_decode,
    gap_decode_numpy,
    gap_encode,
    gap_encode_numpy,
    hdf5_filter,
)


@st.composite
def csr_frames(draw):
    """Sorted, unique indices per frame in [0, npix), CSR offsets."""
    npix = draw(st.sampled_from([1, 2, 7, 100, 2**32]))
    n = draw(st.integers(0, 6))
    frames = []
    for _ in range(n):
        if npix <= 100:
            sub = draw(st.sets(st.integers(0, npix - 1), max_size=npix))
        else:
            sub = draw(st.sets(st.integers(0, npix - 1), max_size=30))
            if draw(st.booleans()):
                sub |= {0, npix - 1}
        frames.append(np.array(sorted(sub), dtype=np.uint32))
    counts = np.array([f.size for f in frames], np.int64)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    idx = np.concatenate(frames) if frames else np.zeros(0, np.uint32)
    return idx.astype(np.uint32), offsets


@settings(max_examples=200, deadline=None)
@given(csr_frames())
def test_gap_kernel_equals_numpy_reference_and_inverts(data):
    idx, offsets = data
    g_ref = gap_encode_numpy(idx, offsets)
    g = gap_encode(idx, offsets)
    np.testing.assert_array_equal(g, g_ref)
    assert g.dtype == np.uint32
    np.testing.assert_array_equal(gap_decode_numpy(g, offsets), idx)
    np.testing.assert_array_equal(gap_decode(g, offsets), idx)
    # the first gap of each non-empty frame is absolute, later gaps are >= 1
    for a, b in zip(offsets[:-1], offsets[1:], strict=True):
        if b > a:
            assert g[a] == idx[a]
            assert np.all(g[a + 1 : b] >= 1)


def test_gap_encode_rejects_what_it_cannot_decode():
    with pytest.raises(ValueError, match=r"strictly .* event 2 \(frame 0\) has index 5 after 9"):
        gap_encode(np.array([3, 9, 5], np.uint32), np.array([0, 3]))
    with pytest.raises(ValueError, match=r"event 1 \(frame 1\) has index 4 after 4"):
        gap_encode(np.array([4, 4], np.uint32), np.array([0, 0, 2]))
    with pytest.raises(ValueError, match=r"index 12, not below H \* W = 12"):
        gap_encode(np.array([1, 12], np.uint32), np.array([0, 1, 2]), npix=12)


def test_gap_encode_small_example():
    idx = np.array([3, 5, 9, 0, 7], np.uint32)
    offsets = np.array([0, 3, 3, 5])
    np.testing.assert_array_equal(gap_encode(idx, offsets), [3, 2, 4, 0, 7])


@pytest.mark.parametrize("dtype", [np.uint32, np.uint8, np.int64])
@pytest.mark.parametrize(
    "codec",
    [Blosc2ChunkCodec(), Blosc2ChunkCodec("LZ4", 5, "BITSHUFFLE"), Blosc2ChunkCodec(clevel=0)],
)
def test_codec_round_trip_and_config(dtype, codec, rng):
    block = rng.integers(0, 200, 5000).astype(dtype)
    buf = codec.encode(block)
    np.testing.assert_array_equal(codec.decode(buf, (5000,), dtype), block)
    cfg = codec.get_config()
    assert cfg["hdf5_filter_id"] == BLOSC2_FILTER_ID == 32026
    again = Blosc2ChunkCodec.from_config(cfg)
    assert again.get_config() == cfg
    np.testing.assert_array_equal(again.decode(buf, (5000,), dtype), block)


def test_codec_shape_mismatch_and_bad_params():
    codec = Blosc2ChunkCodec()
    buf = codec.encode(np.zeros(10, np.uint32))
    with pytest.raises(ValueError, match="shape"):
        codec.decode(buf, (20,), np.uint32)
    with pytest.raises(ValueError, match="codec"):
        Blosc2ChunkCodec(codec="ZIP")
    with pytest.raises(ValueError, match="clevel"):
        Blosc2ChunkCodec(clevel=12)
    with pytest.raises(ValueError, match="filter"):
        Blosc2ChunkCodec(filter="DELTA")
    with pytest.raises(ValueError, match="1-d"):
        codec.encode(np.zeros((2, 2), np.uint32))
    with pytest.raises(ValueError, match="not a Blosc2ChunkCodec config"):
        Blosc2ChunkCodec.from_config({"id": "zstd"})


def test_direct_chunks_decode_through_the_hdf5_filter(tmp_path, rng):
    """Chunks we compress ourselves read back through plain h5py + hdf5plugin."""
    codec = Blosc2ChunkCodec()
    data = np.sort(rng.integers(0, 2**31, 2500)).astype(np.uint32)
    path = tmp_path / "direct.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset(
            "x", shape=(2500,), chunks=(1000,), dtype=np.uint32, **hdf5_filter(codec)
        )
        for start in range(0, 2500, 1000):
            block = np.zeros(1000, np.uint32)
            part = data[start : start + 1000]
            block[: part.size] = part
            ds.id.write_direct_chunk((start,), codec.encode(block), filter_mask=0)
    with h5py.File(path, "r") as f:
        ds = f["x"]
        assert BLOSC2_FILTER_ID in ds._filters or str(BLOSC2_FILTER_ID) in ds._filters
        np.testing.assert_array_equal(ds[:], data)
        np.testing.assert_array_equal(ds[1234:2100], data[1234:2100])


def test_codec_satisfies_the_chunk_codec_contract():
    from streamstore.abc import ChunkCodec

    assert isinstance(Blosc2ChunkCodec(), ChunkCodec)
