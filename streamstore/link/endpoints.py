"""ZeroMQ endpoints chosen on this host."""

from __future__ import annotations

__all__ = ["free_tcp_endpoint"]


def free_tcp_endpoint() -> str:
    """``tcp://127.0.0.1:<port>`` on a loopback port that is free right now.

    For the demo, benchmarks and tests that start a daemon and a sender on one
    host (another process may take the port before it is bound: fine for those).

    Returns
    -------
    str
        The endpoint.
    """
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"
