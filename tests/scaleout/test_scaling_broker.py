"""The broker on real ZeroMQ sockets, with plain PULL sockets as its workers.

No counting here (no numba): what the broker sends to each stream, its
status, its back-pressure.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time

import numpy as np
import pytest

from streamstore.link.protocol import Start, parse
from streamstore.link.sockets import Sender
from streamstore.scaleout.broker import Broker, BrokerConfig, format_broker_status
from streamstore.scaleout.deal import stream_endpoints, worker_of


@pytest.fixture
def broker_and_sinks(zmq_ctx):
    """A broker dealing over two ipc streams, each read by a plain PULL socket."""
    import zmq

    from streamstore.link.endpoints import free_tcp_endpoint

    d = tempfile.mkdtemp(prefix="streamstore-test-")
    eps = stream_endpoints(f"ipc://{d}/w", 2)
    cam, status = free_tcp_endpoint(), f"ipc://{d}/status"
    broker = Broker(BrokerConfig(camera=cam, workers=eps, block_frames=4, max_frame_bytes=1 << 22,
                                 status_endpoint=status, drain_s=5))  # fmt: skip
    thread = threading.Thread(target=broker.run)
    thread.start()
    sinks = []
    for ep in eps:
        s = zmq_ctx.socket(zmq.PULL)
        s.setsockopt(zmq.RCVHWM, 2)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(ep)
        sinks.append(s)
    assert broker.ready.wait(30), "the broker never saw both workers"
    yield broker, sinks, cam, status
    broker.request_stop()
    thread.join(30)
    for s in sinks:
        s.close(0)


def _read_series(sock, timeout_ms: int = 20000) -> list:
    """Every message of one stream up to and including its end."""
    got = []
    while True:
        assert sock.poll(timeout_ms), f"stream stalled after {len(got)} messages"
        msg = parse(sock.recv_multipart())
        got.append(msg)
        if type(msg).__name__ == "End":
            return got


def test_start_and_end_reach_every_stream_images_in_blocks_orphans_counted(
    broker_and_sinks, zmq_ctx
):
    import zmq

    broker, sinks, cam, status_ep = broker_and_sinks
    sub = zmq_ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(status_ep)
    frame = np.zeros((8, 12), np.uint16)
    with Sender(cam, sndhwm=2, send_timeout_s=30) as tx:
        for i in range(3):
            tx.send_image("ghost", i, frame)  # no start: rejected, counted
        tx.send_start(Start("s", (8, 12), "uint16", 1e-3, n_frames=20))
        for i in range(20):
            tx.send_image("s", i, frame)
        tx.send_end("s", 20)
        streams = [_read_series(s) for s in sinks]
    for k, msgs in enumerate(streams):
        start, images, end = msgs[0], msgs[1:-1], msgs[-1]
        assert start.series_id == "s" and start.extra["workers"] == 2
        assert start.extra["block_frames"] == 4
        assert [m.frame_id for m in images] == [i for i in range(20) if worker_of(i, 2, 4) == k]
        assert end.n_frames == 20
        assert end.extra["broker"]["rejected_by_reason"] == {"before_start": 3}
        assert end.extra["broker"]["workers_lost"] == []
    st = broker.status()
    assert st["rejected"] == 3 and st["forwarded"] == 20 and st["forwarded_to"] == [12, 8]
    assert "rejected 3" in format_broker_status(st)
    assert sub.poll(10000)
    published = json.loads(sub.recv())
    assert published["role"] == "broker" and published["workers"] == 2
    sub.close(0)


def test_a_worker_that_does_not_read_holds_the_camera_and_nothing_is_dropped(broker_and_sinks):
    broker, sinks, cam, _ = broker_and_sinks
    frames = np.arange(40 * 512 * 1024, dtype=np.uint16).reshape(40, 512, 1024)  # 1 MiB each
    done = threading.Event()

    def camera() -> None:
        with Sender(cam, sndhwm=2, send_timeout_s=60) as tx:
            tx.send_start(Start("bp", (512, 1024), "uint16", 1e-3, n_frames=40))
            for i in range(40):
                tx.send_image("bp", i, frames[i])
            tx.send_end("bp", 40)
        done.set()

    t = threading.Thread(target=camera)
    t.start()
    try:
        # stream 1 is not read: the broker waits on it, so the camera cannot finish
        got0 = []
        while sinks[0].poll(1000):
            got0.append(parse(sinks[0].recv_multipart()))
        assert not done.is_set(), "the camera finished although a worker took nothing"
        assert len(got0) < 21
        rest0 = _read_series_after(sinks[0], got0, sinks[1])
    finally:
        t.join(60)
    assert done.is_set()
    ids = sorted(m.frame_id for m in rest0 if type(m).__name__ == "Image")
    assert ids == list(range(40)), "every frame exactly once"
    assert broker.status()["undelivered"] == 0


def _read_series_after(sink0, got0: list, sink1) -> list:
    """Read both streams to their ends (alternating), after ``got0`` from stream 0."""
    out = list(got0)
    ends = sum(type(m).__name__ == "End" for m in out)
    socks = [sink1] + ([sink0] if ends == 0 else [])
    while socks:
        for s in list(socks):
            if s.poll(20):
                m = parse(s.recv_multipart())
                out.append(m)
                if type(m).__name__ == "End":
                    socks.remove(s)
        time.sleep(0)
    return out
