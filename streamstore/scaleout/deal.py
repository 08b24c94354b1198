"""Stream endpoints and the dealing rule shared by the broker and multi-stream cameras.

A stream dealt over ``N`` workers uses ``N`` consecutive endpoints: stream
``k`` of base ``tcp://host:P`` is ``tcp://host:P+k`` (``ipc://path`` ->
``ipc://path-k``). Images go to a worker by blocks of frames, as Diamond's
eigerfan deals them::

    worker(frame_id) = (frame_id // block_frames) % N

so the same frame always lands on the same worker (and shard) for a given
``N`` and ``block_frames``, whoever deals it.
"""

from __future__ import annotations

from streamstore.errors import UserError

__all__ = ["offset_endpoint", "stream_endpoints", "worker_of", "DEFAULT_BLOCK_FRAMES"]

#: Consecutive frames dealt to one worker before the next takes over.
DEFAULT_BLOCK_FRAMES = 8


def offset_endpoint(endpoint: str, k: int) -> str:
    """``endpoint`` with its tcp port raised by ``k`` (ipc: ``-k`` appended to the path).

    Raises
    ------
    UserError
        If the endpoint has no numeric port to offset.
    """
    if k == 0:
        return endpoint
    scheme, sep, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc") and sep:
        return f"{endpoint}-{k}"
    host, _, port = rest.rpartition(":")
    if scheme != "tcp" or not host or not port.isdigit():
        raise UserError(f"{endpoint!r}: cannot derive another endpoint (need tcp://host:PORT)")
    if int(port) + k > 65535:
        raise UserError(f"{endpoint!r}: port {int(port) + k} of stream {k} is above 65535")
    return f"tcp://{host}:{int(port) + k}"


def stream_endpoints(base: str, n: int) -> list[str]:
    """The ``n`` consecutive endpoints of streams ``0 .. n-1`` (see :func:`offset_endpoint`)."""
    if n < 1:
        raise UserError(f"the number of streams must be >= 1, got {n}")
    return [offset_endpoint(base, k) for k in range(n)]


def worker_of(frame_id: int, n_workers: int, block_frames: int = DEFAULT_BLOCK_FRAMES) -> int:
    """The worker (stream) that frame ``frame_id`` is dealt to."""
    return (int(frame_id) // int(block_frames)) % int(n_workers)
