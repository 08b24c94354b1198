"""Live counters of the ingest daemon and how they are shown.

:class:`Counters` holds running totals; each field is written by exactly one
pipeline thread (noted beside it), so no lock is needed to update them.
:class:`StatusReporter` turns two successive snapshots into rates and shows
them: a live line on a terminal, a log line every few seconds otherwise, and
(optionally) one JSON message per tick on a ZeroMQ PUB socket, which
``streamstore status ENDPOINT`` prints.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter as _Tally
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

__all__ = ["Counters", "StatusReporter", "format_status"]

log = logging.getLogger("streamstore.ingest")


@dataclass
class Counters:
    """Running totals of one daemon (all series)."""

    # receive thread
    messages: int = 0
    frames_received: int = 0
    bytes_received: int = 0
    duplicate: int = 0
    rejected: int = 0
    rejected_by_reason: _Tally = field(default_factory=_Tally)
    series_started: int = 0
    # count thread
    frames_counted: int = 0
    events: int = 0
    # write thread
    frames_stored: int = 0
    events_stored: int = 0
    bytes_written: int = 0
    missing: int = 0
    series_closed: int = 0
    write_errors: int = 0
    # count thread: set while a series is counted with a provisional calibration
    calibration_warning: str = ""

    def reject(self, reason: str) -> None:
        """Count one rejected message under a short reason key."""
        self.rejected += 1
        self.rejected_by_reason[reason] += 1


def _rate(new: float, old: float, dt: float) -> float:
    return (new - old) / dt if dt > 0 else 0.0


@dataclass
class _Snap:
    t: float
    frames: int
    bytes_in: int
    events: int


def format_status(st: dict[str, Any]) -> str:
    """One human line from a status dict (as published on the PUB socket)."""
    bpe = st.get("bits_per_event")
    bpe_txt = f"{bpe:.2f}" if bpe else "-"
    series = st.get("series") or "-"
    if st.get("ready") is False:  # starting up: say what it is doing, not zero rates
        return f"not listening yet: {st.get('state')}"
    return (
        f"{series}: {st['fps']:7.1f} frames/s {st['gb_per_s_in']:6.3f} GB/s in "
        f"{st['events_per_s'] / 1e6:7.2f} M events/s {bpe_txt} bits/event "
        f"queue {100 * st['queue_fill']:3.0f}% | received {st['frames_received']} "
        f"stored {st['frames_stored']} missing {st['missing']} duplicate {st['duplicate']} "
        f"rejected {st['rejected']}"
    ) + (f" | WARNING: {st['calibration_warning']}" if st.get("calibration_warning") else "")


class StatusReporter:
    """Compute rates from :class:`Counters` and show / publish them.

    Parameters
    ----------
    counters : Counters
    queue_fill : callable
        Returns the fraction (0..1) of the memory budget in use.
    current_series : callable
        Returns the id of the open series, or None.
    stream : text stream, optional
        Where the live line goes (default stderr); a live line is drawn only
        when it is a terminal.
    interval_s : float, default 5.0
        Seconds between log lines when not on a terminal.
    publisher : zmq.Socket, optional
        A PUB socket; every tick sends one JSON status message.
    extra : callable, optional
        Returns a dict of further JSON-able items for the status.
    """

    def __init__(
        self,
        counters: Counters,
        queue_fill,
        current_series,
        *,
        stream: TextIO | None = None,
        interval_s: float = 5.0,
        publisher: Any = None,
        extra: Any = None,
    ) -> None:
        self.counters = counters
        self._queue_fill = queue_fill
        self._current_series = current_series
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = float(interval_s)
        self.publisher = publisher
        self._extra = extra
        self.t0 = time.monotonic()
        self._last = _Snap(self.t0, 0, 0, 0)
        self._last_log = self.t0
        self._last_pub = 0.0
        self._line_len = 0
        self.last_status: dict[str, Any] | None = None
        #: What the daemon is doing: "ready" once it listens, else a phrase
        #: ("compiling counting kernels, ..."); published as ``state`` and ``ready``.
        self.state = "ready"

    def snapshot(self) -> dict[str, Any]:
        """Status now, with rates since the previous snapshot."""
        c = self.counters
        now = time.monotonic()
        dt = now - self._last.t
        st: dict[str, Any] = {
            "time": time.time(),
            "uptime_s": round(now - self.t0, 3),
            "series": self._current_series(),
            "fps": _rate(c.frames_received, self._last.frames, dt),
            "gb_per_s_in": _rate(c.bytes_received, self._last.bytes_in, dt) / 1e9,
            "events_per_s": _rate(c.events, self._last.events, dt),
            "bits_per_event": (8.0 * c.bytes_written / c.events_stored)
            if c.events_stored
            else None,
            "queue_fill": float(self._queue_fill()),
            "state": self.state,
            "ready": self.state == "ready",
        }
        d = asdict(c)
        d["rejected_by_reason"] = dict(c.rejected_by_reason)
        st.update(d)
        if self._extra is not None:
            st.update(self._extra())
        self._last = _Snap(now, c.frames_received, c.bytes_received, c.events)
        self.last_status = st
        return st

    def publish_soon(self) -> None:
        """Make the next :meth:`tick` publish, however recent the last status: a
        change a client waits for (ready, a series closed) is seen at once, not up
        to 0.5 s later. Safe from any thread."""
        self._last_pub = float("-inf")

    def tick(self, force: bool = False) -> None:
        """Publish / draw / log if it is time (call often; it is cheap)."""
        now = time.monotonic()
        due_pub = self.publisher is not None and now - self._last_pub >= 0.5
        due_tty = self.tty and now - self._last.t >= 0.5
        due_log = (not self.tty) and now - self._last_log >= self.interval_s
        if not (force or due_pub or due_tty or due_log):
            return
        st = self.snapshot()
        if self.publisher is not None:
            self._last_pub = now
            try:
                import zmq

                self.publisher.send(json.dumps(st).encode(), zmq.NOBLOCK)
            except Exception as exc:  # a dashboard must never stop ingest
                log.debug("status publish failed: %s", exc)
        line = format_status(st)
        if self.tty:
            pad = max(0, self._line_len - len(line))
            self.stream.write("\r" + line + " " * pad)
            self.stream.flush()
            self._line_len = len(line)
        elif due_log or force:
            self._last_log = now
            log.info("%s", line)

    def end_line(self) -> None:
        """Finish the live line so later log lines start on a fresh line."""
        if self.tty and self._line_len:
            self.stream.write("\n")
            self.stream.flush()
            self._line_len = 0
