"""Shared fixtures: small frames, seeded randomness, ZeroMQ endpoints."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

# small frames: the suite runs on 2 cores in minutes
SMALL_SHAPE = (256, 384)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261125)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tcp_endpoint() -> str:
    """A tcp loopback endpoint on a currently free port."""
    return f"tcp://127.0.0.1:{_free_port()}"


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
