"""The ingest daemon: a PULL socket in, counted and compressed HDF5 files out.

:class:`IngestDaemon` owns the sockets, the per-series state machine and the
signals; the stages after the socket live in :mod:`streamstore.ingest.pipeline`.
It is a plain class configured by a picklable :class:`IngestConfig`, so a
worker process (``spawn`` start method) can build and run one.

Series state machine (one open series at a time, as camera stacks do)::

    (none) --start--> open --end----------> closed, complete
                      open --idle timeout-> closed, incomplete
                      open --start (other id)--> closed, incomplete ("aborted"),
                                                 the new series opens
                      open --SIGINT/SIGTERM--> closed, incomplete ("shutdown")

Every message that does not fit is rejected with one log line naming the
reason, and counted; nothing a sender does stops the daemon.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamstore.errors import UserError
from streamstore.ingest.pipeline import (
    STOP,
    ByteBudget,
    CloseItem,
    CountStage,
    FrameItem,
    MissingItem,
    OpenItem,
    SeriesInfo,
    WriteStage,
)
from streamstore.ingest.safety import check_bind_endpoint
from streamstore.ingest.series import FrameTracker, missing_ranges
from streamstore.ingest.status import Counters, StatusReporter

__all__ = ["IngestConfig", "IngestDaemon", "K3_FRAME_BYTES"]

log = logging.getLogger("streamstore.ingest")

#: Bytes of one 4092 x 5760 uint16 frame: the default largest accepted frame.
K3_FRAME_BYTES = 4092 * 5760 * 2

#: GIL switch interval while a daemon runs (CPython's default is 5 ms).
SWITCH_INTERVAL_S = 0.0002

# log the first few rejections of each reason in full, then one line in 1000
_LOG_FIRST = 20

#: (helper G) Most frame ids one message may declare missing. Without a cap, one
#: hostile image (frame_id 10**12) or end (n_frames 10**12) of the open series made
#: the tracker list every id before it: MemoryError, the daemon died.
MAX_ID_JUMP = 1 << 20


@dataclass
class IngestConfig:
    """Everything an :class:`IngestDaemon` needs (picklable, for worker processes).

    Parameters
    ----------
    out_dir : str
        Directory of the output files (created if missing).
    listen, connect : str, optional
        Exactly one: bind a PULL socket for senders that connect, or connect
        to a sender that binds its PUSH socket.
    calibration : str, optional
        A file written by ``Calibration.save``.
    max_buffer_mb : float, default 1024.0
        Memory the pipeline may hold (raw frames waiting, counted events
        waiting for the disk). When it is full the daemon stops reading and
        ZeroMQ's high-water mark pushes back on the sender.
    status_endpoint : str, optional
        Bind a PUB socket here and publish the status as JSON twice a second.
    status_endpoint_optional : bool, default False
        The status endpoint is the default one: if it cannot be bound (another
        daemon holds it), log a warning and run without publishing.
    idle_timeout_s : float, default 30.0
        A series with no message for this long is closed and marked incomplete.
    reorder_window : int, default 64
        Frames held back to restore frame-id order.
    subpixel : bool, default False
        Store sub-pixel positions.
    threads : int, optional
        Threads of the counting kernel (None: all cores).
    encode_threads : int, optional
        Threads blosc2 uses to compress (None: all cores).
    max_frame_bytes : int, default 4092 * 5760 * 2
        Largest frame accepted (the image payload alone, its header not included).
    max_header_bytes : int, default 65536
        Largest JSON header accepted, bounded separately from the frame.
        ZeroMQ's maximum message size (which it applies to each part) is the
        larger of the two.
    allow_remote : bool, default False
        Allow binding to non-loopback addresses.
    exit_after_series : int, optional
        Exit (status 0) once this many series (dark ones included) are closed.
    status_interval_s : float, default 5.0
        Seconds between status log lines when not on a terminal.
    flush_interval_s : float, default 1.0
        Longest time counted frames stay unflushed (what SIGKILL can lose).
    estimate_frames : int, default 8
        Frames used to estimate a calibration when nothing else is known.
    max_dark_frames : int, optional
        Most dark frames of a dark series used for its calibration (None: all;
        they are summed as they come, so their number costs no memory).
    rcvhwm : int, optional
        Receive high-water mark in messages; None derives it from the budget
        and ``max_frame_bytes`` (at least 2).
    curve_keys : str, optional
        Key directory from ``streamstore keys``: the socket becomes a CURVE
        server (encrypted) admitting only ``DIR/authorized_clients/*.key``
        (see :mod:`streamstore.security`).
    max_missing_ids : int, default 4194304
        Most frame ids one series may record as missing; an image that would
        make more missing is rejected (``frame_id_range``), so a sender
        walking frame ids upwards cannot exhaust memory.
    worker_id : int, optional
        Run as worker K of a stream dealt over several workers (scale-out,
        :mod:`streamstore.fanout`): the series goes to the shard
        ``DIR/<series_id>/shard-K.h5``, listed in the series' ``manifest.json``;
        gaps in the frame ids are the other workers' frames, not missing.
    n_workers : int, optional
        Number of workers the stream is dealt over, when known (manifest).
    control : str, optional
        The sender's control channel (XPUB) where start and end arrive; default
        for a worker: the ``connect`` endpoint's port + 1. Setting it without
        ``worker_id`` keeps the single-file output.
    end_grace_s : float, default 0.5
        After an end on the control channel, the data socket must be quiet for
        this long (while reading) before the series closes.
    control_wait_s : float, default 5.0
        Images of a series whose start has not arrived are kept this long.
    xray_threshold : float, "auto" or None, default "auto"
        X-ray threshold (dark-subtracted signal, ADU) of the calibrations the
        daemon makes from a dark series or estimates; "auto" derives it from
        the electron peaks of the data (see ``docs/ingest.md``); None:
        saturated pixels only.
    keep_large_buffers : bool, default True
        Make ``malloc`` reuse freed frame buffers instead of unmapping them
        (:mod:`streamstore.ingest.allocator`; saves the kernel page faults and
        zeroing of every received frame; the process keeps its peak heap).
    """

    out_dir: str
    listen: str | None = None
    connect: str | None = None
    calibration: str | None = None
    max_buffer_mb: float = 1024.0
    status_endpoint: str | None = None
    # the default status endpoint: when another daemon holds it, go on without it
    status_endpoint_optional: bool = False
    idle_timeout_s: float = 30.0
    reorder_window: int = 64
    subpixel: bool = False
    threads: int | None = None
    encode_threads: int | None = None
    max_frame_bytes: int = K3_FRAME_BYTES
    max_header_bytes: int = 1 << 16
    allow_remote: bool = False
    exit_after_series: int | None = None
    status_interval_s: float = 5.0
    flush_interval_s: float = 1.0
    estimate_frames: int = 8
    max_dark_frames: int | None = None
    rcvhwm: int | None = None
    curve_keys: str | None = None
    max_missing_ids: int = 1 << 22
    worker_id: int | None = None
    n_workers: int | None = None
    control: str | None = None
    end_grace_s: float = 0.5
    control_wait_s: float = 5.0
    xray_threshold: float | str | None = "auto"
    keep_large_buffers: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Raise :class:`UserError` naming the first bad option."""
        if (self.listen is None) == (self.connect is None):
            raise UserError("give exactly one of --listen ENDPOINT or --connect ENDPOINT")
        if self.listen is not None:
            check_bind_endpoint(self.listen, self.allow_remote, "--listen")
        elif "://" not in self.connect:  # type: ignore[operator]
            raise UserError(f"--connect: {self.connect!r} is not a ZeroMQ endpoint")
        if self.status_endpoint is not None:
            check_bind_endpoint(self.status_endpoint, self.allow_remote, "--status-endpoint")
        if not self.max_buffer_mb > 0:
            raise UserError(f"--max-buffer-mb must be > 0, got {self.max_buffer_mb}")
        if not self.idle_timeout_s > 0:
            raise UserError(f"--idle-timeout must be > 0 s, got {self.idle_timeout_s}")
        if self.reorder_window < 0:
            raise UserError(f"--reorder-window must be >= 0 frames, got {self.reorder_window}")
        if self.max_frame_bytes <= 0:
            raise UserError(f"--max-frame-bytes must be > 0, got {self.max_frame_bytes}")
        if self.max_header_bytes < 256:
            raise UserError(f"--max-header-bytes must be >= 256, got {self.max_header_bytes}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be >= 1, got {self.threads}")
        if self.encode_threads is not None and self.encode_threads < 1:
            raise UserError(f"--encode-threads must be >= 1, got {self.encode_threads}")
        if self.max_missing_ids < 0:
            raise UserError(f"--max-missing-ids must be >= 0, got {self.max_missing_ids}")
        if self.exit_after_series is not None and self.exit_after_series < 1:
            raise UserError(f"--exit-after-series must be >= 1, got {self.exit_after_series}")
        if self.curve_keys is not None:
            from streamstore.security import check_keys_dir

            check_keys_dir(self.curve_keys)
        out = Path(self.out_dir)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} exists and is not a directory")
        if self.worker_id is not None and self.worker_id < 0:
            raise UserError(f"--worker-id must be >= 0, got {self.worker_id}")
        if self.worker_id is not None and self.control is None and self.connect is None:
            raise UserError("--worker-id with --listen needs --control ENDPOINT (start/end route)")
        xt = self.xray_threshold
        if isinstance(xt, str) and xt != "auto":
            raise UserError(f"--xray-threshold must be ADU > 0, 'auto' or 'none', got {xt!r}")
        if xt is not None and not isinstance(xt, str) and not (math.isfinite(xt) and xt > 0):
            raise UserError(f"--xray-threshold must be > 0 ADU, got {xt}")
        if not self.end_grace_s > 0 or not self.control_wait_s > 0:
            raise UserError("--end-grace and the control wait must be > 0 s")

    def control_endpoint(self) -> str | None:
        """Where start and end arrive for a scaled-out worker (None: in the data stream)."""
        if self.control is not None:
            return self.control
        if self.worker_id is None:
            return None
        from streamstore.fanout import control_endpoint_for

        return control_endpoint_for(self.connect)  # type: ignore[arg-type]

    @property
    def budget_bytes(self) -> int:
        return int(self.max_buffer_mb * 1024 * 1024)

    @property
    def max_part_bytes(self) -> int:
        """ZeroMQ's ``MAXMSGSIZE`` (per part): room for the largest frame and the largest header."""
        return int(max(self.max_frame_bytes, self.max_header_bytes))

    def derived_rcvhwm(self) -> int:
        """Receive high-water mark: a quarter of the budget in largest frames, 2..1000."""
        if self.rcvhwm is not None:
            return max(1, int(self.rcvhwm))
        return int(min(1000, max(2, self.budget_bytes // 4 // self.max_frame_bytes)))


class _OpenSeries:
    """Receiver-side state of the open series."""

    def __init__(self, info: SeriesInfo, window: int) -> None:
        self.info = info
        self.tracker = FrameTracker(window)
        self.held_bytes = 0
        self.rejected = 0
        self.last_activity = time.monotonic()
        self.first_frame_t: float | None = None
        self.last_frame_t: float | None = None


class IngestDaemon:
    """Receive, count and store series until stopped.

    Parameters
    ----------
    config : IngestConfig

    Examples
    --------
    >>> d = IngestDaemon(IngestConfig(out_dir="data", listen="tcp://127.0.0.1:5555"))
    >>> d.run()  # doctest: +SKIP
    0
    """

    def __init__(self, config: IngestConfig) -> None:
        config.check()
        self.config = config
        self.counters = Counters()
        self.budget = ByteBudget(config.budget_bytes)
        self._stop = threading.Event()
        self._series: _OpenSeries | None = None
        self._ever_started = False
        self._recent_closed: deque[str] = deque(maxlen=64)
        self.closed: list[SeriesInfo] = []
        self._closed_lock = threading.Lock()
        self._count_q: queue.SimpleQueue = queue.SimpleQueue()
        self._write_q: queue.SimpleQueue = queue.SimpleQueue()
        self._recv_cpu_s = 0.0
        self.reporter: StatusReporter | None = None
        self._auth: Any = None  # ZAP authenticator with --curve-keys (helper G)
        self._ctl_sock: Any = None  # scale-out: SUB socket of the sender's control channel
        self._control: Any = None
        if config.control_endpoint() is not None:
            from streamstore.fanout import ControlState

            self._control = ControlState(
                self,
                end_grace_s=config.end_grace_s,
                wait_s=config.control_wait_s,
                max_pending_bytes=config.budget_bytes // 4,
            )

    # -- control ------------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        """Ask the daemon to drain and exit (safe from a signal handler or thread)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _on_closed(self, series: SeriesInfo) -> None:  # write thread
        series.cpu_at_close = self.cpu_seconds()
        if self.config.worker_id is not None and series.kind == "data":
            from streamstore.fanout import record_shard

            cfg = self.config
            try:
                record_shard(series, worker_id=cfg.worker_id, n_workers=cfg.n_workers)
            except OSError as exc:
                log.error("series %s: cannot update the manifest: %s", series.series_id, exc)
        with self._closed_lock:
            self.closed.append(series)
            n = len(self.closed)
        limit = self.config.exit_after_series
        if limit is not None and n >= limit:
            log.info("%d series closed (--exit-after-series %d): stopping", n, limit)
            self._stop.set()

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds spent so far by each stage's own thread, and the whole process."""
        return {
            "receive": round(self._recv_cpu_s, 4),
            "count": round(self._count.cpu_s, 4),
            "write": round(self._write.cpu_s, 4),
            "process": round(time.process_time(), 4),
        }

    def _status_extra(self) -> dict[str, Any]:
        import resource

        with self._closed_lock:
            closed = [
                {
                    "series_id": s.series_id,
                    "kind": s.kind,
                    "path": None if s.path is None else str(s.path),
                    "complete": s.complete,
                    "stored": s.stored,
                    "missing": len(set(s.missing_ids)),
                    "events": s.events,
                }
                for s in self.closed[-8:]
            ]
        return {
            "budget_bytes": self.budget.capacity,
            "budget_used": self.budget.used,
            "budget_peak": self.budget.peak,
            "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "cpu_s": self.cpu_seconds(),
            "closed_series": closed,
            # (helper G) CURVE clients refused for an unknown key (None: no --curve-keys)
            "curve_refused": None if self._auth is None else self._auth.key_check.refused,
        }

    # -- main loop ------------------------------------------------------------------
    def run(self, *, install_signals: bool = True) -> int:
        """Run until SIGINT/SIGTERM, :meth:`request_stop` or ``exit_after_series``.

        Returns
        -------
        int
            0 after a clean drain, 1 if a pipeline stage failed.
        """
        import zmq

        cfg = self.config
        if cfg.keep_large_buffers:
            from streamstore.ingest.allocator import keep_large_buffers

            keep_large_buffers()
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        calibration, label = None, ""
        if cfg.calibration is not None:
            from streamstore.calibration import Calibration

            calibration = Calibration.load(cfg.calibration)
            label = f"file:{cfg.calibration}"
        self._count = CountStage(
            self._count_q,
            self._write_q,
            self.budget,
            self.counters,
            calibration=calibration,
            calibration_label=label,
            subpixel=cfg.subpixel,
            threads=cfg.threads,
            estimate_frames=cfg.estimate_frames,
            max_dark_frames=cfg.max_dark_frames,
            xray_threshold=cfg.xray_threshold,
        )
        self._write = WriteStage(
            self._write_q,
            self.budget,
            self.counters,
            cfg.out_dir,
            subpixel=cfg.subpixel,
            flush_interval_s=cfg.flush_interval_s,
            encode_threads=cfg.encode_threads,
            on_closed=self._on_closed,
            paths=_shard_paths(cfg.worker_id),
        )
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, cfg.derived_rcvhwm())
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_part_bytes)
        pub = None
        auth = None
        try:
            if cfg.curve_keys is not None:
                from streamstore.security import curve_server

                auth = curve_server(ctx, sock, cfg.curve_keys)
                self._auth = auth
            if cfg.listen is not None:
                sock.bind(cfg.listen)
                where = f"listening on {cfg.listen}"
            else:
                sock.connect(cfg.connect)
                where = f"connected to {cfg.connect}"
            ctl_ep = cfg.control_endpoint()
            if ctl_ep is not None:  # scale-out: start/end arrive on the sender's control PUB
                self._ctl_sock = ctx.socket(zmq.SUB)
                self._ctl_sock.setsockopt(zmq.LINGER, 0)
                self._ctl_sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
                self._ctl_sock.setsockopt(zmq.SUBSCRIBE, b"")
                self._ctl_sock.connect(ctl_ep)
                where += f", worker {cfg.worker_id}, start/end from {ctl_ep}"
            if cfg.status_endpoint is not None:
                pub = ctx.socket(zmq.PUB)
                pub.setsockopt(zmq.LINGER, 0)
                pub.setsockopt(zmq.SNDHWM, 10)
                try:
                    pub.bind(cfg.status_endpoint)
                except zmq.ZMQError as exc:
                    if not cfg.status_endpoint_optional:
                        raise
                    pub.close(0)
                    pub = None
                    log.warning(
                        "status not published: cannot bind %s (%s); give --status-endpoint",
                        cfg.status_endpoint,
                        exc,
                    )
        except (zmq.ZMQError, UserError) as exc:
            self._close_sockets(ctx, sock, pub, auth)
            if isinstance(exc, UserError):
                raise
            raise UserError(f"cannot open the socket: {exc}") from exc
        self.reporter = StatusReporter(
            self.counters,
            lambda: self.budget.fill,
            lambda: self._series.info.series_id if self._series else None,
            interval_s=cfg.status_interval_s,
            publisher=pub,
            extra=self._status_extra,
        )
        old_handlers = {}
        if install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old_handlers[sig] = signal.signal(sig, self.request_stop)
        self._count.start()
        self._write.start()
        if auth is not None:
            where += f" (CURVE: encrypted, clients authenticated from {cfg.curve_keys})"
        log.info(
            "ingest %s, writing to %s (memory budget %.0f MB, receive HWM %d, "
            "largest frame %d bytes)",
            where,
            cfg.out_dir,
            cfg.max_buffer_mb,
            cfg.derived_rcvhwm(),
            cfg.max_frame_bytes,
        )
        # Stages hand the GIL back and forth (kernels and compression release it); with
        # CPython's default 5 ms switch interval a stage returning from a kernel can
        # wait that long for the receive thread, which caps the frame rate.
        old_switch = sys.getswitchinterval()
        sys.setswitchinterval(min(old_switch, SWITCH_INTERVAL_S))
        t_cpu0 = time.thread_time()
        status = 0
        try:
            self._loop(sock, zmq)
            self._drain_socket(sock, zmq)
        finally:
            if self._control is not None:
                self._drain_control(zmq)
                self._control.finish()  # an end already received closes its series complete
            if self._series is not None:
                self._close_series("shutdown", complete=False)
            self._count_q.put(STOP)
            deadline = time.monotonic() + 8.0
            self._count.join(max(0.1, deadline - time.monotonic()))
            self._write.join(max(0.1, deadline - time.monotonic()))
            if self._count.is_alive() or self._write.is_alive():
                log.error("pipeline did not drain within 8 s; exiting anyway")
                status = 1
            if self._count.error is not None or self._write.error is not None:
                status = 1
            self._recv_cpu_s = time.thread_time() - t_cpu0
            self.reporter.tick(force=True)
            self.reporter.end_line()
            self._close_sockets(ctx, sock, pub, auth)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            sys.setswitchinterval(old_switch)
        c = self.counters
        log.info(
            "stopped: %d series, %d frames received, %d stored, %d missing, %d duplicate, "
            "%d rejected %s; peak buffer %.1f MB; CPU s %s",
            c.series_closed,
            c.frames_received,
            c.frames_stored,
            c.missing,
            c.duplicate,
            c.rejected,
            dict(c.rejected_by_reason),
            self.budget.peak / 1e6,
            self.cpu_seconds(),
        )
        return status

    def _close_sockets(self, ctx: Any, sock: Any, pub: Any, auth: Any) -> None:
        """Close the data, control and status sockets, stop CURVE auth, end the context."""
        sock.close(0)
        if self._ctl_sock is not None:
            self._ctl_sock.close(0)
        if pub is not None:
            pub.close(0)
        if auth is not None:
            auth.stop()
        ctx.term()

    def _loop(self, sock: Any, zmq: Any) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if self._ctl_sock is not None:
            poller.register(self._ctl_sock, zmq.POLLIN)
        t_cpu0 = time.thread_time()
        while not self._stop.is_set():
            if self._count.error is not None or self._write.error is not None:
                log.error("a pipeline stage failed: stopping")
                break
            if self._ctl_sock is not None:
                self._drain_control(zmq)
            if self.budget.used >= self.budget.capacity:
                # full: do not read; ZeroMQ's HWM now pushes back on the sender
                self.budget.wait_room(0.1)
            elif poller.poll(100):
                for _ in range(256):  # a burst, then housekeeping
                    t0 = time.thread_time()
                    try:
                        parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(parts)
                    if self._series is not None:
                        self._series.info.cpu_s["receive"] += time.thread_time() - t0
                    if self.budget.used >= self.budget.capacity or self._stop.is_set():
                        break
            self._housekeeping()
            self._recv_cpu_s = time.thread_time() - t_cpu0
            self.reporter.tick()  # type: ignore[union-attr]

    def _drain_socket(self, sock: Any, zmq: Any) -> None:
        """Take what ZeroMQ already holds (at most 1 s), so a stop loses nothing queued."""
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and self.budget.used < self.budget.capacity:
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._handle(parts)

    def _drain_control(self, zmq: Any) -> None:
        """Handle what arrived on the control channel (scale-out start/end)."""
        for _ in range(64):
            try:
                parts = self._ctl_sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._control.on_control(parts)

    def _housekeeping(self) -> None:
        if self._control is not None:
            self._control.tick(reading=self.budget.used < self.budget.capacity)
        s = self._series
        if s is not None and time.monotonic() - s.last_activity > self.config.idle_timeout_s:
            log.warning(
                "series %s: no message for %.0f s: closing it as incomplete",
                s.info.series_id,
                self.config.idle_timeout_s,
            )
            self._close_series("idle timeout", complete=False)

    # -- messages -----------------------------------------------------------------------
    def _reject(self, reason: str, detail: str) -> None:
        self.counters.reject(reason)
        n = self.counters.rejected_by_reason[reason]
        if n <= _LOG_FIRST or n % 1000 == 0:
            more = f" ({n} so far)" if n > 1 else ""
            log.warning("rejected message: %s: %s%s", reason, detail, more)

    def _handle(self, parts: list[Any]) -> None:
        from streamstore import protocol

        self.counters.messages += 1
        if len(parts) > protocol.MAX_PARTS:
            self._refuse_parts(parts)
            return
        try:
            msg = protocol.parse(
                parts,
                max_frame_bytes=self.config.max_frame_bytes,
                max_header_bytes=self.config.max_header_bytes,
            )
        except protocol.ProtocolError as exc:
            # the message starts with the field at fault: "header: ...", "payload: ..."
            field_name = str(exc).split(":", 1)[0].strip().split(" ")[0][:24] or "message"
            self._reject(f"malformed {field_name}", str(exc))
            return
        except Exception as exc:  # a parser bug must not kill the daemon either
            self._reject("malformed", f"unparseable message ({type(exc).__name__}: {exc})")
            return
        if isinstance(msg, protocol.Image):
            self._on_image(msg)
        elif isinstance(msg, protocol.Start):
            self._on_start(msg)
        elif isinstance(msg, protocol.End):
            self._on_end(msg)
        else:  # pragma: no cover - parse returns only these
            self._reject("malformed", f"unknown message type {type(msg).__name__}")

    def _refuse_parts(self, parts: list[Any]) -> None:
        """Drop a message with too many parts at once, and give its memory back.

        ZeroMQ's high-water mark counts whole messages and ``MAXMSGSIZE`` each
        part, so one message of many parts can be far larger than the budget; it
        is never held. When it was larger than any valid message, the freed heap
        is returned to the system (the daemon otherwise keeps its peak heap to
        reuse frame buffers).
        """
        from streamstore import protocol

        n = len(parts)
        total = sum(_nbytes(p) for p in parts)
        parts.clear()  # the caller's list: the zmq buffers go now
        self._reject(
            "too_many_parts",
            f"a message of {n} parts ({total} bytes); at most {protocol.MAX_PARTS} "
            "(header and frame)",
        )
        if total > self.config.max_frame_bytes + self.config.max_header_bytes:
            from streamstore.ingest.allocator import release_free_memory

            release_free_memory()

    def _on_start(self, msg: Any) -> None:
        from streamstore import protocol

        sid = msg.series_id
        try:
            protocol.validate_series_id(sid)
        except (protocol.ProtocolError, ValueError, TypeError) as exc:
            self._reject("bad_series_id", str(exc))
            return
        nbytes = int(msg.frame_nbytes)
        if nbytes > self.config.max_frame_bytes:
            self._reject(
                "frame_too_large",
                f"series {sid}: frames of {nbytes} bytes exceed the largest accepted "
                f"({self.config.max_frame_bytes}, --max-frame-bytes)",
            )
            return
        if self._series is not None:
            if self._series.info.series_id == sid:
                self._series.rejected += 1
                self._reject("second_start", f"series {sid} is open already")
                return
            log.warning(
                "series %s starts while %s is open: closing %s as aborted (incomplete)",
                sid,
                self._series.info.series_id,
                self._series.info.series_id,
            )
            self._close_series(f"aborted by the start of {sid}", complete=False)
        meta = msg.meta if isinstance(getattr(msg, "meta", None), dict) else {}
        kind = "dark" if meta.get("kind") == "dark" else "data"
        info = SeriesInfo(sid, msg, kind=kind)
        self._series = _OpenSeries(info, self.config.reorder_window)
        if self.config.worker_id is not None:  # a shard: the other ids are other workers'
            from streamstore.fanout import ShardTracker

            self._series.tracker = ShardTracker(self.config.reorder_window)
        self._ever_started = True
        self.counters.series_started += 1
        log.info(
            "series %s: start (%s, %s x %s %s, frame time %g s%s)",
            sid,
            kind,
            msg.frame_shape[0],
            msg.frame_shape[1],
            msg.dtype,
            msg.frame_time_s,
            f", {msg.n_frames} frames announced" if getattr(msg, "n_frames", None) else "",
        )
        self._count_q.put(OpenItem(info))

    def _on_image(self, msg: Any) -> None:
        if self._control is not None:
            self._control.before_image(msg.series_id)
        s = self._series
        sid = msg.series_id
        if s is None or s.info.series_id != sid:
            if self._control is not None and self._control.buffer(msg, _nbytes(msg.payload)):
                return  # its start may still be on the way over the control channel
            if sid in self._recent_closed:
                self._reject("stale", f"image {msg.frame_id} of series {sid}, which is closed")
            elif not self._ever_started:
                self._reject("before_start", f"image {msg.frame_id} of {sid} before any start")
            else:
                self._reject("unknown_series", f"image {msg.frame_id} of unknown series {sid}")
            return
        s.last_activity = time.monotonic()
        start = s.info.start
        expected = int(start.frame_nbytes)
        got = _nbytes(msg.payload)
        if got != expected:
            s.rejected += 1
            self._reject(
                "payload_size",
                f"series {sid} image {msg.frame_id}: payload of {got} bytes, expected "
                f"{expected} ({start.frame_shape[0]} x {start.frame_shape[1]} {start.dtype})",
            )
            return
        try:
            array = msg.as_array(start)
        except Exception as exc:  # ProtocolError or a buffer problem
            s.rejected += 1
            self._reject("payload_size", f"series {sid} image {msg.frame_id}: {exc}")
            return
        ahead = int(msg.frame_id) - s.tracker.next_id
        room = self.config.max_missing_ids - s.tracker.n_missing
        if ahead > MAX_ID_JUMP or ahead > room:
            s.rejected += 1
            self._reject(
                "frame_id_range",
                f"series {sid} image {msg.frame_id}: {ahead} ids ahead of the next expected "
                f"frame {s.tracker.next_id}; at most {min(MAX_ID_JUMP, max(room, 0))} may "
                f"become missing (--max-missing-ids {self.config.max_missing_ids})",
            )
            return
        self.counters.frames_received += 1
        self.counters.bytes_received += expected
        now = time.monotonic()
        if s.first_frame_t is None:
            s.first_frame_t = s.info.first_frame_t = now
            s.info.process_cpu_first = time.process_time()
        s.last_frame_t = now
        item = FrameItem(s.info, int(msg.frame_id), int(msg.timestamp_ns), array, expected)
        self.budget.add(expected)
        offer = s.tracker.offer(item.frame_id, item)
        if offer.verdict == "duplicate":
            self.budget.release(expected)
            self.counters.duplicate += 1
            n = s.tracker.duplicate
            if n <= _LOG_FIRST:
                log.warning("series %s: duplicate frame %d dropped", sid, item.frame_id)
            return
        if offer.verdict == "late":
            self.budget.release(expected)
            s.rejected += 1
            self._reject(
                "late",
                f"series {sid} frame {item.frame_id} arrived after the reorder window "
                f"({self.config.reorder_window} frames) had passed it; it stays missing",
            )
            return
        s.held_bytes += expected  # counted as held until released below
        self._forward(s, offer)
        # the window may hold at most half the budget, so the pipeline never starves
        while s.held_bytes > self.budget.capacity // 2 and s.tracker.n_held:
            self._forward(s, s.tracker.release_lowest())

    def _forward(self, s: _OpenSeries, offer: Any) -> None:
        if offer.missing:
            if len(offer.missing) <= 64:
                log.warning(
                    "series %s: frame(s) %s missing (not received within the reorder window)",
                    s.info.series_id,
                    missing_ranges(offer.missing),
                )
            self._count_q.put(MissingItem(s.info, list(offer.missing)))
        for fid, item in offer.ready:
            if fid != item.frame_id:  # pragma: no cover - tracker invariant
                raise RuntimeError("reorder window released a frame under the wrong id")
        held_released = sum(it.nbytes for _, it in offer.ready)
        s.held_bytes = max(0, s.held_bytes - held_released)
        for _, item in offer.ready:
            self._count_q.put(item)

    def _on_end(self, msg: Any) -> None:
        s = self._series
        sid = msg.series_id
        if s is None or s.info.series_id != sid:
            reason = "stale" if sid in self._recent_closed else "unknown_series"
            self._reject(reason, f"end of series {sid}, which is not open")
            return
        self._close_series("end", complete=True, n_sent=int(msg.n_frames))

    def _close_series(self, reason: str, *, complete: bool, n_sent: int | None = None) -> None:
        s = self._series
        if s is None:
            return
        announced = getattr(s.info.start, "n_frames", None) or 0
        expected = max(int(n_sent or 0), int(announced))
        if not complete:
            # without an end we know only the ids up to the highest one seen
            expected = max(int(n_sent or 0), s.tracker.max_id + 1)
        room = max(0, self.config.max_missing_ids - s.tracker.n_missing)
        cap = max(s.tracker.next_id, s.tracker.max_id + 1) + min(MAX_ID_JUMP, room)
        if expected > cap:
            log.warning(
                "series %s: the sender claims %d frames; recording at most %d ids as missing",
                s.info.series_id,
                expected,
                cap - s.tracker.next_id,
            )
            expected = cap
        s.info.n_expected = expected
        offer = s.tracker.finish(expected)
        self._forward(s, offer)
        s.held_bytes = 0
        t = s.tracker
        self._count_q.put(
            CloseItem(
                s.info,
                received=t.received,
                duplicate=t.duplicate,
                rejected=s.rejected,
                complete=complete,
                reason=reason,
                receive_s=(s.last_frame_t - s.first_frame_t) if s.first_frame_t else 0.0,
            )
        )
        self._recent_closed.append(s.info.series_id)
        self._series = None


def _nbytes(payload: Any) -> int:
    nb = getattr(payload, "nbytes", None)
    if nb is not None:
        return int(nb)
    buf = getattr(payload, "buffer", None)
    if buf is not None:
        return int(memoryview(buf).nbytes)
    return len(payload)


def _shard_paths(worker_id: int | None) -> Any:
    if worker_id is None:
        return None
    from streamstore.fanout import shard_paths

    return shard_paths(worker_id)


def run_daemon(config: IngestConfig) -> int:
    """Build and run one daemon (the target of a worker process)."""
    return IngestDaemon(config).run()


def default_log_format() -> str:
    return "%(asctime)s " + f"[{os.getpid()}] " + "%(levelname)s %(message)s"
