"""Fixtures of the daemon tests: real `streamstore ingest` processes and the sockets feeding them.

``start_daemon`` starts daemons (:class:`tests._ingest_harness.Daemon`) and stops
every one it started when the test ends, passed or failed, so a failing test
leaves no process behind; ``pusher`` connects PUSH sockets that are closed then
too; ``series`` is the pool of frames, calibration and expected events a module's
tests share.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import _ingest_harness as harness
from tests._ingest_harness import Daemon, Series


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Series:
    """Small emulated frames, their calibration file and the events ``count`` finds in them."""
    return Series(tmp_path_factory.mktemp("series"))


@pytest.fixture
def start_daemon() -> Iterator[Callable[..., Daemon]]:
    """A factory: ``start_daemon(out, **kw)`` starts ``streamstore ingest`` writing to ``out``.

    The keywords are :class:`~tests._ingest_harness.Daemon`'s (``calibration``,
    ``args``, ``env``, ``prefix``, ...); with ``ready=True`` (the default) it
    returns once the daemon's status says it listens. At teardown every daemon
    it started is closed, killed if it still runs.
    """
    started: list[Daemon] = []

    def start(out: Path, *, ready: bool = True, **kw: Any) -> Daemon:
        d = Daemon(out, **kw)
        started.append(d)
        if ready:
            d.wait_ready()
        return d

    yield start
    for d in started:
        d.close()


@pytest.fixture
def pusher(zmq_ctx) -> Callable[..., Any]:
    """A factory: ``pusher(endpoint, sndhwm=1000, curve=None)`` is a connected PUSH socket.

    The sockets share the test's ZeroMQ context, destroyed without linger at teardown.
    """

    def connect(endpoint: str, *, sndhwm: int = 1000, curve: Any = None) -> Any:
        return harness.pusher(zmq_ctx, endpoint, sndhwm=sndhwm, curve=curve)

    return connect
