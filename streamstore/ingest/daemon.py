"""The ingest daemon: a PULL socket in, counted and compressed HDF5 files out.

:class:`IngestDaemon` owns the sockets, the per-series state machine and the
signals; the stages after the socket live in :mod:`streamstore.ingest.pipeline`.
It is a plain class configured by a picklable :class:`IngestConfig`, so a
worker process (``spawn`` start method) can build and run one.

The per-series state machine (several series open at once, keyed by
``series_id``) is :mod:`streamstore.ingest.machine`.

A stop signal (SIGINT/SIGTERM) closes the open series as incomplete and
drains everything already received, however long the disk takes; a second
signal cuts the drain short, and then what was not yet stored is recorded
missing in each file.

Every message that does not fit is rejected with one log line naming the
reason, and counted; nothing a sender does stops the daemon.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from streamstore.errors import UserError
from streamstore.ingest.config import IngestConfig
from streamstore.ingest.machine import MAX_ID_JUMP, SeriesMachine, _nbytes
from streamstore.ingest.pipeline import STOP, ByteBudget, CountStage, SeriesInfo, WriteStage
from streamstore.ingest.startup import warm_kernels_reporting
from streamstore.ingest.status import Counters, StatusReporter

__all__ = ["IngestDaemon", "MAX_ID_JUMP"]

log = logging.getLogger("streamstore.ingest")

#: GIL switch interval while a daemon runs (CPython's default is 5 ms).
SWITCH_INTERVAL_S = 0.0002

# log the first few rejections of each reason in full, then one line in 1000
_LOG_FIRST = 20

#: Gaps in the receive loop longer than this are the daemon's own stall (SIGSTOP, a
#: paused VM, a starved thread), credited back to every series' idle timer.
STALL_S = 0.5

#: Closed series whose summary the daemon keeps (status, benchmarks).
KEEP_CLOSED = 256

#: Longest time a worker's shard holds a frame back waiting for a lower frame id, s.
SHARD_MAX_HOLD_S = 0.5

#: Shortest time between two updates of a worker's entry in ``orphans.json``, s.
ORPHANS_WRITE_S = 1.0


class IngestDaemon(SeriesMachine):
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
        self._abort = threading.Event()  # a second stop signal: cut the drain short
        self._init_series_state()
        #: summaries of the last closed series (calibrations freed), oldest first
        self.closed: deque[SeriesInfo] = deque(maxlen=KEEP_CLOSED)
        self._n_closed = 0
        self._closed_lock = threading.Lock()
        self._count_q: queue.SimpleQueue = queue.SimpleQueue()
        self._write_q: queue.SimpleQueue = queue.SimpleQueue()
        self._recv_cpu_s = 0.0
        self.reporter: StatusReporter | None = None
        self._auth: Any = None  # ZAP authenticator with --curve-keys

    # -- control ------------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        """Ask the daemon to drain and exit (safe from a signal handler or thread).

        The first call drains everything received, however long it takes; a
        second one cuts the drain short (what is not stored is recorded missing).
        """
        if self._stop.is_set():
            self._abort.set()
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _on_closed(self, series: SeriesInfo) -> None:  # write thread
        series.cpu_at_close = self.cpu_seconds()
        if self.config.worker_id is not None and series.kind == "data":
            from streamstore.scaleout.shard_writer import record_shard

            cfg = self.config
            try:
                record_shard(series, worker_id=cfg.worker_id, n_workers=cfg.n_workers)
            except OSError as exc:
                log.error("series %s: cannot update the manifest: %s", series.series_id, exc)
        with self._closed_lock:
            self.closed.append(series)
            self._n_closed += 1
            n = self._n_closed
        if self.reporter is not None:
            self.reporter.publish_soon()
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
                    "missing": s.missing.n_ids,
                    "events": s.events,
                }
                for s in list(self.closed)[-8:]
            ]
        return {
            "budget_bytes": self.budget.capacity,
            "budget_used": self.budget.used,
            "budget_peak": self.budget.peak,
            "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "cpu_s": self.cpu_seconds(),
            "closed_series": closed,
            "open_series": self.open_series_ids(),
            # CURVE clients refused for an unknown key (None: no --curve-keys)
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
        # the signal handlers and the collector's settings are the process's own
        owns_process = install_signals and threading.current_thread() is threading.main_thread()
        if cfg.keep_large_buffers:
            from streamstore.ingest.allocator import keep_large_buffers

            keep_large_buffers()
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        if cfg.worker_id is not None:
            from streamstore.scaleout.shard_writer import OrphanRecord

            self._orphan_record = OrphanRecord(cfg.out_dir, "worker", cfg.worker_id)
        calibration, label = None, ""
        if cfg.calibration is not None:
            from streamstore.counting.calibration import Calibration

            calibration = Calibration.load(cfg.calibration)
            label = f"file:{cfg.calibration}"
        gain = None
        if cfg.gain_reference is not None:
            gain, calibration, label = _gain_reference(cfg.gain_reference, calibration, label)
        self._count = CountStage(
            self._count_q,
            self._write_q,
            self.budget,
            self.counters,
            calibration=calibration,
            calibration_label=label,
            gain_reference=gain,
            gain_label=cfg.gain_reference or "",
            subpixel=cfg.subpixel,
            threads=cfg.threads,
            estimate_frames=cfg.estimate_frames,
            max_dark_frames=cfg.max_dark_frames,
            xray_threshold=cfg.xray_threshold,
            calibration_from_dark_series=cfg.calibration_from_dark_series,
            abort=self._abort,
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
            abort=self._abort,
        )
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, cfg.derived_rcvhwm())
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_part_bytes)
        pub = None
        auth = None
        try:
            if cfg.status_endpoint is not None:  # first: it tells what start-up is doing
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
        except zmq.ZMQError as exc:
            self._close_sockets(ctx, sock, pub, auth)
            raise UserError(f"cannot open the socket: {exc}") from exc
        self.reporter = StatusReporter(
            self.counters,
            lambda: self.budget.fill,
            lambda: ", ".join(self._open) or None,
            interval_s=cfg.status_interval_s,
            publisher=pub,
            extra=self._status_extra,
        )
        try:
            # every kernel variant is ready before the data socket exists: a camera
            # waits for the bind (or its connection), not inside its first series
            warm_kernels_reporting(self.reporter, calibration, self._stop, gain=gain is not None)
            if owns_process:
                _freeze_startup_heap()
            if cfg.curve_keys is not None:
                from streamstore.link.security import curve_server

                auth = curve_server(ctx, sock, cfg.curve_keys)
                self._auth = auth
            if cfg.listen is not None:
                sock.bind(cfg.listen)
                where = f"listening on {cfg.listen}"
            else:
                sock.connect(cfg.connect)
                where = f"connected to {cfg.connect}"
            if cfg.worker_id is not None:
                where += f", as worker {cfg.worker_id} of a scaled-out stream"
        except BaseException as exc:  # a failed warm-up or ^C too: close what is open
            self._close_sockets(ctx, sock, pub, auth)
            if not isinstance(exc, zmq.ZMQError):
                raise
            raise UserError(f"cannot open the socket: {exc}") from exc
        old_handlers = {}
        if owns_process:
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
        self.reporter.state = "ready"
        self.reporter.publish_soon()  # by the loop's first turn: clients wait for it
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
            self._close_all("shutdown")
            self._count_q.put(STOP)
            status = self._wait_drained()
            self._recv_cpu_s = time.thread_time() - t_cpu0
            self._write_orphans(0.0)  # the images the drain rejected too
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

    def _wait_drained(self) -> int:
        """Wait for the stages to store everything queued; 1 if one failed or was cut off."""
        told = False
        abort_t: float | None = None

        def say_abort() -> None:
            log.warning(
                "second stop signal: cutting the drain short; what is not stored yet "
                "is recorded missing in its file"
            )

        while self._count.is_alive() or self._write.is_alive():
            if self._abort.is_set():
                if abort_t is None:
                    abort_t = time.monotonic()
                    say_abort()
                elif time.monotonic() - abort_t > 30.0:
                    log.error("pipeline did not stop within 30 s of the second signal; exiting")
                    return 1
            elif not told and self.budget.used:
                told = True
                log.info(
                    "stopping: storing the %.1f MB already received first (a second signal "
                    "cuts this short)",
                    self.budget.used / 1e6,
                )
            self._count.join(0.2)
            self._write.join(0.2)
            self.reporter.tick()  # type: ignore[union-attr]
        if abort_t is None and self._abort.is_set():
            say_abort()  # the stages stopped before this loop saw the signal
        if self._count.error is not None or self._write.error is not None:
            return 1
        return 0

    def _close_sockets(self, ctx: Any, sock: Any, pub: Any, auth: Any) -> None:
        """Close the data and status sockets, stop CURVE auth, end the context."""
        sock.close(0)
        if pub is not None:
            pub.close(0)
        if auth is not None:
            auth.stop()
        ctx.term()

    def _loop(self, sock: Any, zmq: Any) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        t_cpu0 = time.thread_time()
        last = time.monotonic()
        while not self._stop.is_set():
            if self._count.error is not None or self._write.error is not None:
                log.error("a pipeline stage failed: stopping")
                break
            reading = self.budget.used < self.budget.capacity
            if not reading:
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
                    s = self._series
                    if s is not None:
                        s.info.cpu_s["receive"] += time.thread_time() - t0
                    if self.budget.used >= self.budget.capacity or self._stop.is_set():
                        break
            now = time.monotonic()
            gap = now - last
            last = now
            # not reading, or a gap the loop never makes itself: the daemon's own pause
            self._credit_stall(gap if not reading else gap - STALL_S)
            self._housekeeping(lambda: bool(sock.poll(0, zmq.POLLIN)))
            self._recv_cpu_s = time.thread_time() - t_cpu0
            self.reporter.tick()  # type: ignore[union-attr]

    def _drain_socket(self, sock: Any, zmq: Any) -> None:
        """Take what ZeroMQ already holds, waiting for room as long as the disk needs.

        Reading itself stops after 1 s (waits for room not counted), so a sender
        that keeps sending cannot hold the stop off; a second signal stops at once.
        """
        reading_s = 0.0
        while not self._abort.is_set() and reading_s < 1.0:
            if self.budget.used >= self.budget.capacity:
                self.budget.wait_room(0.1)
                self.reporter.tick()  # type: ignore[union-attr]
                continue
            t0 = time.monotonic()
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._handle(parts)
            reading_s += time.monotonic() - t0

    def _housekeeping(self, waiting: Any) -> None:
        if self.config.worker_id is not None:
            # a shard holds a frame back at most this long waiting for lower ids
            for s in list(self._open.values()):
                offer = s.tracker.release_older(SHARD_MAX_HOLD_S)
                if offer.ready:
                    self._forward(s, offer)
            self._write_orphans(ORPHANS_WRITE_S)
        self._close_idle(waiting)

    def _write_orphans(self, interval_s: float) -> None:
        """Bring this worker's entry of ``orphans.json`` up to date (at most every ``interval_s``).

        ``interval_s == 0`` is the last call, at the stop: it also says where they are.
        """
        rec = self._orphan_record
        if rec is None or not rec.total:
            return
        try:
            rec.write_if_due(interval_s)
        except OSError as exc:  # retried after the interval
            log.error("cannot record %d images of no series in %s: %s", rec.total, rec.path, exc)
            return
        if interval_s == 0.0:
            log.error("%d images of no series %s: recorded in %s", rec.total, dict(rec.by_reason),
                      rec.path)  # fmt: skip

    # -- messages -----------------------------------------------------------------------
    def _reject(self, reason: str, detail: str, level: int = logging.WARNING) -> None:
        self.counters.reject(reason)
        n = self.counters.rejected_by_reason[reason]
        if n <= _LOG_FIRST or n % 1000 == 0:
            more = f" ({n} so far)" if n > 1 else ""
            log.log(level, "rejected message: %s: %s%s", reason, detail, more)

    def _handle(self, parts: list[Any]) -> None:
        from streamstore.link import protocol

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
        from streamstore.link import protocol

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


def _gain_reference(path: str, calibration: Any, label: str) -> tuple[Any, Any, str]:
    """``--gain-reference``: the map, and the ``--calibration`` file's calibration
    (if any) and label with it. Raises UserError for a map that cannot serve."""
    from streamstore.counting.gain_reference import load_gain

    try:
        gain = load_gain(path)
    except ValueError as exc:
        raise UserError(f"--gain-reference: {exc}") from None
    if calibration is not None:
        if calibration.gain is not None:
            raise UserError(
                "--gain-reference: the --calibration file has a gain map of its own; "
                "give the gain once"
            )
        if gain.shape != calibration.frame_shape:
            raise UserError(
                f"--gain-reference: the map is {gain.shape[0]} x {gain.shape[1]}, the "
                f"--calibration file's frames {calibration.frame_shape[0]} x "
                f"{calibration.frame_shape[1]}"
            )
        try:
            calibration = calibration.with_gain(gain)
        except ValueError as exc:
            raise UserError(f"--gain-reference: {exc}") from None
        label = f"{label} with gain reference {path}"
    return gain, calibration, label


def _shard_paths(worker_id: int | None) -> Any:
    if worker_id is None:
        return None
    from streamstore.scaleout.shard_writer import shard_paths

    return shard_paths(worker_id)


def _freeze_startup_heap() -> None:
    """Keep the cyclic garbage collector off what start-up made.

    The imports and the loaded kernels (numba's type registries and compiled
    code: some 130 000 tracked objects) live as long as the process. A full
    collection would walk them all every time, a pause of about 50 ms in the
    receive loop, and again at exit. Collect what start-up left over, then
    freeze the rest (:func:`gc.freeze`): later collections walk only what the
    daemon makes while it runs.
    """
    gc.collect()
    gc.freeze()


def run_daemon(config: IngestConfig) -> int:
    """Build and run one daemon (the target of a worker process)."""
    return IngestDaemon(config).run()


def default_log_format() -> str:
    return "%(asctime)s " + f"[{os.getpid()}] " + "%(levelname)s %(message)s"
