"""The package's own implementations pass the conformance tests of tests/conformance.py."""

from __future__ import annotations

import pytest

from streamstore.counting import Counter
from streamstore.store.codec import Blosc2ChunkCodec
from tests.conformance import ChunkCodecTests, FrameCounterTests


class TestBlosc2ChunkCodec(ChunkCodecTests):
    @pytest.fixture(params=[{}, {"codec": "LZ4", "filter": "BITSHUFFLE"}])
    def codec(self, request):
        return Blosc2ChunkCodec(nthreads=1, **request.param)


class TestCounter(FrameCounterTests):
    @pytest.fixture(params=["numba", "reference"])
    def make_counter(self, request):
        def make(calibration, dtype):
            return Counter(calibration, dtype, threads=1, implementation=request.param)

        return make
