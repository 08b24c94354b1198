"""Shared fixtures: small frames, seeded randomness, ZeroMQ endpoints."""

from __future__ import annotations

import os

import numpy as np
import pytest

from streamstore.cli import free_tcp_endpoint

# small frames: the suite runs on 2 cores in minutes
SMALL_SHAPE = (256, 384)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261125)


@pytest.fixture
def tcp_endpoint() -> str:
    """A tcp loopback endpoint on a currently free port."""
    return free_tcp_endpoint()


@pytest.fixture
def ipc_endpoint(tmp_path) -> str:
    """An ipc endpoint in the test's temporary directory."""
    return f"ipc://{tmp_path / f'sock-{os.getpid()}'}"


@pytest.fixture
def zmq_ctx():
    """A ZeroMQ context whose sockets never linger at teardown."""
    import zmq

    ctx = zmq.Context()
    ctx.setsockopt(zmq.LINGER, 0)
    yield ctx
    ctx.destroy(linger=0)
