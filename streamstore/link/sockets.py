"""The sockets that speak the protocol: :class:`Sender` (camera side, PUSH) and
:class:`Receiver` (daemon side, PULL).

The messages themselves (fields, limits, encoding, parsing) are in
:mod:`streamstore.link.protocol`. This module imports ``zmq`` only inside
:class:`Sender` and :class:`Receiver`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from streamstore.link.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    MAX_HEADER_BYTES,
    Message,
    Start,
    encode_end,
    encode_image,
    encode_start,
    parse,
)

__all__ = ["Receiver", "Sender"]


class Sender:
    """A PUSH socket that speaks the protocol (the camera side).

    Parameters
    ----------
    endpoint : str
        ZeroMQ endpoint, e.g. ``"tcp://127.0.0.1:5555"`` or ``"ipc:///tmp/cam"``.
    bind : bool, default True
        Bind ``endpoint`` (a camera usually binds); False connects to it.
    sndhwm : int, default 4
        Send high-water mark in messages; a whole frame is buffered per
        message, so memory is about ``sndhwm x frame size``.
    send_timeout_s : float or None, default None
        Give up a send after this long without a peer taking it
        (:class:`TimeoutError`); None waits forever.
    linger_s : float or None, default 10.0
        On :meth:`close`, how long queued messages may still be delivered
        (None: until they are).
    context : zmq.Context, optional
        Defaults to a context of the sender's own, which :meth:`close`
        terminates: close then waits (up to ``linger_s``) until the queued
        messages are delivered. Frames go out zero-copy, so their arrays must
        outlive the delivery; a process that returned right after closing a
        socket of a shared context could free them while ZeroMQ still sends
        from them (libzmq aborts with "Bad address").
    setup_socket : callable, optional
        Called with the PUSH socket before it binds or connects, to set
        options such as CURVE keys (e.g. ``lambda s:
        streamstore.link.security.curve_client(s, DIR, NAME)``).

    Notes
    -----
    PUSH deals messages round-robin to the connected PULL peers, so with
    several peers start and end reach only one of them; for several ingest
    workers put a broker in between (``streamstore ingest --workers N`` or
    ``streamstore fanout``, :mod:`streamstore.scaleout.broker`), which sends
    start and end to every worker.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        bind: bool = True,
        sndhwm: int = 4,
        send_timeout_s: float | None = None,
        linger_s: float | None = 10.0,
        context: Any = None,
        setup_socket: Callable[[Any], None] | None = None,
    ) -> None:
        import zmq

        self._zmq = zmq
        self.endpoint = endpoint
        self._own_context = context is None
        ctx = zmq.Context() if context is None else context
        self._context = ctx
        self.socket = ctx.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, int(sndhwm))
        self.socket.setsockopt(zmq.LINGER, -1 if linger_s is None else int(linger_s * 1000))
        self.send_timeout_s = send_timeout_s
        if send_timeout_s is not None:
            self.socket.setsockopt(zmq.SNDTIMEO, max(1, int(send_timeout_s * 1000)))
        if setup_socket is not None:
            try:
                setup_socket(self.socket)
            except BaseException:
                self._abandon()
                raise
        try:
            if bind:
                self.socket.bind(endpoint)
                self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                # queue only on completed connections: with no peer, sends
                # block (and time out) instead of filling a queue nobody reads
                self.socket.setsockopt(zmq.IMMEDIATE, 1)
                self.socket.connect(endpoint)
        except zmq.ZMQError as exc:
            self._abandon()
            verb = "bind" if bind else "connect"
            raise OSError(f"cannot {verb} {endpoint}: {exc}") from None

    def _send(self, parts: list[Any], what: str) -> None:
        try:
            self.socket.send_multipart(parts, copy=False)
        except self._zmq.Again:
            raise TimeoutError(
                f"{what}: no receiver took it within {self.send_timeout_s} s "
                f"(is a PULL socket connected to {self.endpoint}?)"
            ) from None

    def send_start(self, start: Start) -> None:
        """Send the start of a series."""
        self._send(encode_start(start), "start")

    def send_image(
        self,
        series_id: str,
        frame_id: int,
        frame: np.ndarray,
        timestamp_ns: int | None = None,
    ) -> None:
        """Send one frame (zero-copy); ``timestamp_ns`` defaults to now."""
        ts = time.time_ns() if timestamp_ns is None else timestamp_ns
        self._send(encode_image(series_id, frame_id, ts, frame), f"image {frame_id}")

    def send_end(self, series_id: str, n_frames: int) -> None:
        """Send the end of a series."""
        self._send(encode_end(series_id, n_frames), "end")

    def _abandon(self) -> None:
        """Close at once, nothing sent yet (a failed set-up)."""
        self.socket.close(linger=0)
        if self._own_context:
            self._context.term()

    def close(self, linger_s: float | None = None) -> None:
        """Close the socket, letting queued messages go for up to the linger time.

        With the sender's own context this returns once they are delivered (or
        the linger time is over), so the frames they point at may be freed.
        """
        if self.socket.closed:
            return
        if linger_s is None:
            self.socket.close()
        else:
            self.socket.close(linger=int(linger_s * 1000))
        if self._own_context:
            self._context.term()

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Receiver:
    """A PULL socket that parses what it receives (the ingest side).

    Parameters
    ----------
    endpoint : str
        ZeroMQ endpoint.
    bind : bool, default False
        Connect by default (the camera binds).
    rcvhwm : int, default 4
        Receive high-water mark in messages.
    max_frame_bytes : int, default DEFAULT_MAX_FRAME_BYTES
        Largest frame accepted.
    max_header_bytes : int, default MAX_HEADER_BYTES
        Largest header accepted. The larger of the two is ``zmq.MAXMSGSIZE``
        (which ZeroMQ applies to each part): what a peer can make this process
        allocate per part.
    context : zmq.Context, optional
        Defaults to the process-wide instance.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        bind: bool = False,
        rcvhwm: int = 4,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_header_bytes: int = MAX_HEADER_BYTES,
        context: Any = None,
    ) -> None:
        import zmq

        self._zmq = zmq
        self.max_frame_bytes = int(max_frame_bytes)
        self.max_header_bytes = int(max_header_bytes)
        ctx = context if context is not None else zmq.Context.instance()
        self.socket = ctx.socket(zmq.PULL)
        self.socket.setsockopt(zmq.RCVHWM, int(rcvhwm))
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max(self.max_frame_bytes, self.max_header_bytes))
        try:
            if bind:
                self.socket.bind(endpoint)
            else:
                self.socket.connect(endpoint)
        except zmq.ZMQError as exc:
            self.socket.close(linger=0)
            raise OSError(f"cannot {'bind' if bind else 'connect'} {endpoint}: {exc}") from None
        self.endpoint = endpoint

    def recv(self, timeout_s: float | None = None) -> Message:
        """Receive and parse one message (zero-copy).

        Raises
        ------
        TimeoutError
            Nothing arrived within ``timeout_s``.
        ProtocolError
            The message is malformed.
        """
        if timeout_s is not None and not self.socket.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"nothing received on {self.endpoint} within {timeout_s} s")
        parts = self.socket.recv_multipart(copy=False)
        return parse(
            parts, max_frame_bytes=self.max_frame_bytes, max_header_bytes=self.max_header_bytes
        )

    def close(self) -> None:
        """Close the socket."""
        self.socket.close(linger=0)

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
