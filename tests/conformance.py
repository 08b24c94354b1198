"""Conformance tests for the contracts of :mod:`streamstore.abc`.

Any implementation must pass them: subclass the matching ``...Tests`` class
in a ``test_*.py`` module and provide its fixture (as zarr's ``StoreTests``
and numcodecs' ``tests/common.py`` do). ``tests/test_contracts.py`` runs them
on the implementations shipped in the package.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamstore.abc import ChunkCodec, FrameCounter
from streamstore.counting.calibration import Calibration
from streamstore.events import EventBatch


class ChunkCodecTests:
    """Provide a ``codec`` fixture returning the implementation under test."""

    @pytest.fixture
    def codec(self) -> ChunkCodec:  # pragma: no cover - subclasses provide it
        raise NotImplementedError

    def test_is_a_chunk_codec(self, codec):
        assert isinstance(codec, ChunkCodec)

    @pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.int64])
    def test_round_trip(self, codec, dtype):
        rng = np.random.default_rng(7)
        block = rng.integers(0, np.iinfo(dtype).max // 2, 5000, dtype=dtype)
        out = codec.decode(codec.encode(block), block.shape, block.dtype)
        np.testing.assert_array_equal(out, block)
        assert out.dtype == block.dtype

    def test_decodes_into_a_given_buffer(self, codec):
        block = np.arange(1000, dtype=np.uint32)
        out = np.empty_like(block)
        got = codec.decode(codec.encode(block), block.shape, block.dtype, out=out)
        np.testing.assert_array_equal(out, block)
        np.testing.assert_array_equal(got, block)

    def test_zeros_compress(self, codec):
        block = np.zeros(1 << 16, dtype=np.uint32)
        assert len(codec.encode(block)) < block.nbytes // 10

    def test_config_is_json(self, codec):
        cfg = codec.get_config()
        assert json.loads(json.dumps(cfg)) == cfg


class FrameCounterTests:
    """Provide a ``make_counter(calibration, dtype)`` fixture returning the implementation."""

    SHAPE = (24, 40)  # non-square: rows and columns must not be swapped

    @pytest.fixture
    def make_counter(self):  # pragma: no cover - subclasses provide it
        raise NotImplementedError

    @pytest.fixture
    def calibration(self) -> Calibration:
        return Calibration(np.full(self.SHAPE, 10.0), np.full(self.SHAPE, 2.0))

    def test_is_a_frame_counter(self, make_counter, calibration):
        assert isinstance(make_counter(calibration, np.uint16), FrameCounter)

    def test_one_event_per_isolated_hit(self, make_counter, calibration):
        frames = np.full((2, *self.SHAPE), 10, dtype=np.uint16)
        hits = [(3, 5), (20, 37), (11, 2)]
        for r, c in hits:
            frames[0, r, c] = 200
        batch = make_counter(calibration, np.uint16)(frames)
        assert isinstance(batch, EventBatch)
        assert batch.n_frames == 2
        w = self.SHAPE[1]
        assert sorted(batch.frame(0).indices.tolist()) == sorted(r * w + c for r, c in hits)
        assert batch.frame(1).indices.size == 0

    def test_a_single_frame_is_one_batch_entry(self, make_counter, calibration):
        frame = np.full(self.SHAPE, 10, dtype=np.uint8)
        frame[7, 9] = 120
        batch = make_counter(calibration, np.uint8)(frame)
        assert batch.n_frames == 1
        assert batch.frame(0).indices.tolist() == [7 * self.SHAPE[1] + 9]
