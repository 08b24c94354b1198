"""The broker: owns the camera's one stream and deals it over ``N`` ingest workers.

Any sender that speaks ``docs/protocol.md`` on one PUSH socket works: the
broker's PULL socket is its only receiver. Towards the workers the broker
looks like a multi-stream camera: ``N`` PUSH sockets on consecutive
endpoints (:mod:`streamstore.scaleout.deal`), worker ``K`` connected to
stream ``K``, each stream carrying its own ``start``, its images and its
``end`` in one ordered pipe. So:

* the broker connects to the camera only when every worker is connected, and
  takes no message before that;
* ``start`` and ``end`` go to every worker (the ``start`` gains the extra
  keys ``workers`` and ``block_frames``, the ``end`` a ``broker`` object
  with what the broker rejected or could not deliver);
* images are dealt by blocks, ``(frame_id // block_frames) % N``; the
  received ZeroMQ frames are passed on as they are (no copy in the broker);
* a send to a worker blocks while its queue is full: the broker then stops
  reading, its own queue fills and the camera's PUSH blocks. A slow worker
  slows the camera; nothing is dropped in between;
* a worker not connected at a ``start`` sits the series out (the others
  share its blocks); a worker whose connection drops during a series
  (killed, host gone: ZeroMQ heartbeats) is *lost* for that series: the
  broker logs it at ERROR, deals its blocks over the workers that remain
  and names it in the ``end``; the reader lists the frames it held as
  missing and the series as incomplete. It is dealt to again from the next
  ``start`` once it is connected;
* an image of a series that has no ``start``, or an ``end`` that closes
  nothing, is rejected, counted by reason and logged at ERROR; the counts
  travel in the next ``end`` into the series manifest. What no ``end``
  carries (rejected after the last series, or while the broker stops) goes
  to ``orphans_dir/orphans.json`` when the broker stops
  (:class:`~streamstore.scaleout.shard_writer.OrphanRecord`). With
  ``exit_after_series``, what the camera sends after the last ``end`` while
  the workers finish is read and rejected as ``after_last_series``, not
  dropped unseen.

``zmq`` is imported inside the functions only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from streamstore.errors import UserError
from streamstore.scaleout.broker_config import BrokerConfig

__all__ = ["BrokerConfig", "Broker", "format_broker_status"]

log = logging.getLogger("streamstore.fanout")

# log the first few rejections of each reason in full, then one line in 1000
_LOG_FIRST = 20


@dataclass
class _SeriesState:
    series_id: str
    workers: list[int]  # dealt to, in order; lost ones are removed
    lost: list[int] = field(default_factory=list)
    forwarded: int = 0
    undelivered: int = 0  # images whose worker was lost while they were being sent


class Broker:
    """Receive one camera stream and deal it over the worker streams.

    Parameters
    ----------
    config : BrokerConfig

    Attributes
    ----------
    counters : collections.Counter
        ``messages``, ``images``, ``starts``, ``ends``, ``forwarded``,
        ``undelivered``, ``rejected`` and ``rejected:<reason>``.
    """

    def __init__(self, config: BrokerConfig) -> None:
        config.check()
        self.config = config
        self.n = len(config.workers)
        self.counters: Counter[str] = Counter()
        self.forwarded_to = [0] * self.n
        self._peers = [0] * self.n
        self._stop = threading.Event()
        self._series: _SeriesState | None = None
        self._orphans: Counter[str] = Counter()  # rejections since the last end
        self._orphan_series: Counter[str] = Counter()  # their series ids, when known
        self.ready = threading.Event()
        self.endpoints: list[str] = []
        self.camera_endpoint = config.camera
        self.ends_passed = 0

    # -- control ---------------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        """Stop at the next message boundary (safe from a signal handler or thread)."""
        self._stop.set()

    def status(self) -> dict[str, Any]:
        """The broker's counters as a JSON-able dict (``role: "broker"``)."""
        c = self.counters
        return {
            "role": "broker",
            "time": time.time(),
            "series": self._series.series_id if self._series else None,
            "workers": self.n,
            "workers_connected": sum(1 for p in self._peers if p > 0),
            "forwarded": c["forwarded"],
            "forwarded_to": list(self.forwarded_to),
            "undelivered": c["undelivered"],
            "rejected": c["rejected"],
            "rejected_by_reason": {
                k.split(":", 1)[1]: v for k, v in c.items() if k.startswith("rejected:")
            },
            "lost_workers": list(self._series.lost) if self._series else [],
            "cpu_s": round(time.process_time(), 4),
        }

    # -- sockets ---------------------------------------------------------------------
    def _open(self, zmq: Any) -> None:
        cfg = self.config
        self.ctx = zmq.Context()
        self.outs: list[Any] = []
        self.monitors: list[Any] = []
        self.auth: Any = None
        self.pub: Any = None
        self.inp: Any = None
        events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        for ep in cfg.workers:
            s = self.ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.SNDHWM, max(1, cfg.sndhwm))
            s.setsockopt(zmq.LINGER, int(cfg.linger_s * 1000))
            hb = max(1, int(cfg.heartbeat_s * 1000))
            s.setsockopt(zmq.HEARTBEAT_IVL, hb)
            s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5 * hb)
            if cfg.curve_client is not None:
                from streamstore.link.security import curve_client

                curve_client(s, cfg.curve_keys, cfg.curve_client)  # type: ignore[arg-type]
            self.outs.append(s)
            self.monitors.append(s.get_monitor_socket(events))
            try:
                s.bind(ep)
            except zmq.ZMQError as exc:
                raise UserError(f"cannot bind the worker endpoint {ep}: {exc}") from None
            self.endpoints.append(s.getsockopt_string(zmq.LAST_ENDPOINT))
        if cfg.status_endpoint is not None:
            self.pub = self.ctx.socket(zmq.PUB)
            self.pub.setsockopt(zmq.LINGER, 0)
            self.pub.setsockopt(zmq.SNDHWM, 10)
            try:
                self.pub.bind(cfg.status_endpoint)
            except zmq.ZMQError as exc:
                raise UserError(f"cannot bind {cfg.status_endpoint}: {exc}") from None
        self.inp = self.ctx.socket(zmq.PULL)
        self.inp.setsockopt(zmq.LINGER, 0)
        self.inp.setsockopt(zmq.RCVHWM, max(1, cfg.rcvhwm))
        self.inp.setsockopt(zmq.MAXMSGSIZE, int(cfg.max_frame_bytes) + (1 << 16))
        if cfg.curve_keys is not None:
            from streamstore.link.security import curve_server

            self.auth = curve_server(self.ctx, self.inp, cfg.curve_keys)

    def _close(self) -> None:
        for s in self.outs:
            s.disable_monitor()
        for m in self.monitors:
            m.close(0)
        if self.inp is not None:
            self.inp.close(0)
        for s in self.outs:
            s.close()  # linger: the last ends still go out
        if self.pub is not None:
            self.pub.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()

    def _poll_monitors(self, zmq: Any) -> None:
        from zmq.utils.monitor import recv_monitor_message

        for k, m in enumerate(self.monitors):
            while m.poll(0, zmq.POLLIN):
                ev = recv_monitor_message(m)["event"]
                if ev == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._peers[k] += 1
                    log.info("worker %d connected on %s", k, self.endpoints[k])
                elif ev == zmq.EVENT_DISCONNECTED:
                    self._peers[k] = max(0, self._peers[k] - 1)
                    log.warning("worker %d disconnected from %s", k, self.endpoints[k])

    def _wait_ready(self, zmq: Any) -> bool:
        timeout = self.config.ready_timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        log.info("waiting for %d workers on %s", self.n, ", ".join(self.endpoints))
        while not self._stop.is_set():
            self._poll_monitors(zmq)
            if all(p > 0 for p in self._peers):
                return True
            if deadline is not None and time.monotonic() > deadline:
                missing = [k for k, p in enumerate(self._peers) if p == 0]
                raise TimeoutError(
                    f"workers {missing} did not connect within {timeout:g} s "
                    f"(endpoints {[self.endpoints[k] for k in missing]})"
                )
            zmq.select(self.monitors, [], [], 0.1)
        return False

    # -- main loop -------------------------------------------------------------------
    def run(self) -> int:
        """Deal the camera's stream until stopped (or ``exit_after_series``); return 0.

        Raises
        ------
        UserError
            If an endpoint cannot be bound or connected.
        TimeoutError
            If the workers did not all connect within ``ready_timeout_s``.
        """
        import zmq

        from streamstore.ingest.allocator import keep_large_buffers, one_malloc_arena

        # every frame is one ZeroMQ message buffer: reuse freed ones instead of
        # mapping (and zeroing) 47 MB anew per frame, as the ingest daemon does;
        # ZeroMQ's I/O thread allocates them, and only from the main heap are they
        # reused without page faults (before the context starts that thread)
        keep_large_buffers()
        one_malloc_arena()
        try:
            self._open(zmq)
        except BaseException:
            self._close()
            raise
        try:
            if not self._wait_ready(zmq):
                return 0
            self.ready.set()
            try:
                if self.config.camera_bind:
                    self.inp.bind(self.config.camera)
                    self.camera_endpoint = self.inp.getsockopt_string(zmq.LAST_ENDPOINT)
                else:
                    self.inp.connect(self.config.camera)
            except zmq.ZMQError as exc:
                raise UserError(f"cannot open the camera endpoint: {exc}") from None
            log.info(
                "all %d workers connected; taking the camera stream from %s%s "
                "(blocks of %d frames)",
                self.n,
                self.camera_endpoint,
                " (CURVE)" if self.auth is not None else "",
                self.config.block_frames,
            )
            self._loop(zmq)
        finally:
            self._publish(force=True)
            self._record_orphans()
            log.info("broker stopped: %s", json.dumps(self.status()))
            self._close()
        return 0

    def _record_orphans(self) -> None:
        """Put the rejections no ``end`` carried into ``orphans.json`` (or say they are in none)."""
        if not self._orphans:
            return
        n = int(sum(self._orphans.values()))
        what = f"{n} rejected messages no series end reported ({dict(self._orphans)})"
        if self.config.orphans_dir is None:
            log.error("%s: in the status and this log only (no output directory)", what)
            return
        from streamstore.scaleout.shard_writer import OrphanRecord

        rec = OrphanRecord(self.config.orphans_dir, "broker")
        for reason, k in self._orphans.items():
            rec.by_reason[reason] += k
        for sid, k in self._orphan_series.items():
            rec.by_series[sid] += k
        try:
            path = rec.write()
        except OSError as exc:
            log.error("%s: cannot record them in %s: %s", what, rec.path, exc)
            return
        log.error("%s: recorded in %s", what, path)

    def _loop(self, zmq: Any) -> None:
        limit = self.config.exit_after_series
        while not self._stop.is_set():
            if limit is not None and self.ends_passed >= limit:
                log.info("%d series passed on (--exit-after-series): stopping", self.ends_passed)
                self._wait_workers_gone(zmq)
                return
            self._poll_monitors(zmq)
            self._publish()
            if not self.inp.poll(100, zmq.POLLIN):
                continue
            for _ in range(64):  # a burst, then housekeeping
                try:
                    parts = self.inp.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._handle(parts, zmq)
                if self._stop.is_set():
                    return
                if limit is not None and self.ends_passed >= limit:
                    break  # what follows the last end is not dealt: _refuse_queued takes it

    def _wait_workers_gone(self, zmq: Any) -> None:
        """Keep the worker links open until every worker has disconnected.

        Closing a link drops what the worker has not read yet (ZeroMQ's linger
        covers the broker's queue, not the bytes already on their way), so the
        last frames and the ``end`` must be taken before the broker goes.
        """
        deadline = time.monotonic() + self.config.drain_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            self._poll_monitors(zmq)
            if not any(self._peers):
                return
            self._refuse_queued(zmq)
            zmq.select([*self.monitors, self.inp], [], [], 0.1)
        still = [k for k, p in enumerate(self._peers) if p]
        if still:
            log.warning("workers %s still connected after %g s", still, self.config.drain_s)

    def _refuse_queued(self, zmq: Any) -> None:
        """Reject what the camera sent after the last series: closing the socket drops it."""
        from streamstore.link import protocol

        while True:
            try:
                parts = self.inp.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.counters["messages"] += 1
            try:
                msg = protocol.parse(parts, max_frame_bytes=self.config.max_frame_bytes)
            except protocol.ProtocolError as exc:
                self._reject("malformed", str(exc))
                continue
            what = type(msg).__name__.lower()
            if isinstance(msg, protocol.Image):
                self.counters["images"] += 1
                what = f"image {msg.frame_id}"
            self._reject(
                "after_last_series",
                f"{what} of series {msg.series_id} after the last series "
                f"(--exit-after-series {self.config.exit_after_series})",
                msg.series_id,
            )

    _last_pub = 0.0
    _last_log = 0.0

    def _publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.pub is not None and (force or now - self._last_pub >= 0.5):
            self._last_pub = now
            self.pub.send_string(json.dumps(self.status()))
        if not force and now - self._last_log >= self.config.status_interval_s:
            self._last_log = now
            log.info(format_broker_status(self.status()))

    # -- messages --------------------------------------------------------------------
    def _reject(self, reason: str, detail: str, series_id: str | None = None) -> None:
        self.counters["rejected"] += 1
        self.counters[f"rejected:{reason}"] += 1
        self._orphans[reason] += 1
        if series_id is not None and (series_id in self._orphan_series or
                                      len(self._orphan_series) < 64):  # fmt: skip
            self._orphan_series[series_id] += 1
        n = self.counters[f"rejected:{reason}"]
        if n <= _LOG_FIRST or n % 1000 == 0:
            log.error("rejected: %s: %s (%d so far)", reason, detail, n)

    def _handle(self, parts: list[Any], zmq: Any) -> None:
        from streamstore.link import protocol

        self.counters["messages"] += 1
        try:
            msg = protocol.parse(parts, max_frame_bytes=self.config.max_frame_bytes)
        except protocol.ProtocolError as exc:
            self._reject("malformed", str(exc))
            return
        if isinstance(msg, protocol.Image):
            self._on_image(msg, parts, zmq)
        elif isinstance(msg, protocol.Start):
            self._on_start(msg, zmq)
        else:
            self._on_end(msg, zmq)

    def _on_start(self, msg: Any, zmq: Any) -> None:
        from streamstore.link import protocol

        if self._series is not None and self._series.series_id == msg.series_id:
            self._reject("second_start", f"series {msg.series_id} is open already", msg.series_id)
            return
        if self._series is not None:
            log.error(
                "series %s starts while %s is open: the workers close %s as aborted",
                msg.series_id,
                self._series.series_id,
                self._series.series_id,
            )
        self._poll_monitors(zmq)
        live = [k for k in range(self.n) if self._peers[k] > 0]
        gone = [k for k in range(self.n) if self._peers[k] == 0]
        if gone:
            log.error("series %s: workers %s are not connected: dealt over %s", msg.series_id,
                      gone, live)  # fmt: skip
        # "workers": the shards to expect, so a worker that dies before writing anything
        # still leaves the series incomplete; a worker absent at the start gets nothing
        extra = {**msg.extra, "workers": len(live), "block_frames": self.config.block_frames}
        if gone:
            extra["workers_absent"] = gone
        parts = protocol.encode_start(dataclasses.replace(msg, extra=extra))
        self._series = _SeriesState(msg.series_id, live)
        self.counters["starts"] += 1
        for k in list(live):
            self._send(k, parts, zmq)

    def _on_image(self, msg: Any, parts: list[Any], zmq: Any) -> None:
        s = self._series
        self.counters["images"] += 1
        if s is None or s.series_id != msg.series_id:
            why = "before_start" if s is None else "unknown_series"
            self._reject(
                why,
                f"image {msg.frame_id} of series {msg.series_id}, which has no start",
                msg.series_id,
            )
            return
        while s.workers:
            block = int(msg.frame_id) // self.config.block_frames
            k = self._dealt_to(block, s)
            if self._send(k, parts, zmq):
                self.counters["forwarded"] += 1
                self.forwarded_to[k] += 1
                s.forwarded += 1
                return
            if self._stop.is_set():
                return
        # every worker of the series is lost: nobody holds its start any more
        sid = msg.series_id
        self._reject("no_worker", f"image {msg.frame_id} of {sid}: every worker lost", sid)

    def _dealt_to(self, block: int, s: _SeriesState) -> int:
        k = block % self.n
        if k in s.workers:
            return k
        return s.workers[block % len(s.workers)]  # a lost worker's blocks: the others in turn

    def _on_end(self, msg: Any, zmq: Any) -> None:
        from streamstore.link import protocol

        s = self._series
        if s is None or s.series_id != msg.series_id:
            self._reject(
                "unknown_end", f"end of series {msg.series_id}, which is not open", msg.series_id
            )
            return
        report = {
            "forwarded": s.forwarded,
            "undelivered": s.undelivered,
            "workers_lost": sorted(s.lost),
            "rejected": int(sum(self._orphans.values())),
            "rejected_by_reason": dict(self._orphans),
        }
        extra = {**msg.extra, "broker": report}
        parts = protocol.encode_end(msg.series_id, msg.n_frames, extra=extra)
        for k in list(s.workers):
            self._send(k, parts, zmq)
        if s.lost or report["rejected"]:
            log.error("series %s ended: %s", s.series_id, json.dumps(report))
        self._orphans.clear()
        self._orphan_series.clear()
        self._series = None
        self.counters["ends"] += 1
        self.ends_passed += 1

    # -- sending ---------------------------------------------------------------------
    def _send(self, k: int, parts: list[Any], zmq: Any) -> bool:
        """Send to worker ``k``, waiting while its queue is full; False if it is lost."""
        sock = self.outs[k]
        stop_deadline: float | None = None
        while True:
            try:
                sock.send_multipart(parts, zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                pass
            self._poll_monitors(zmq)
            if self._peers[k] == 0:
                self._lose(k)
                return False
            if self._stop.is_set():  # a worker that takes nothing must not block the exit
                stop_deadline = stop_deadline or time.monotonic() + 5.0
                if time.monotonic() > stop_deadline:
                    return False
            sock.poll(50, zmq.POLLOUT)
            self._publish()

    def _lose(self, k: int) -> None:
        s = self._series
        self.counters["undelivered"] += 1
        if s is None:
            return
        s.undelivered += 1
        if k in s.workers:
            s.workers.remove(k)
            s.lost.append(k)
            log.error(
                "series %s: worker %d is lost (disconnected from %s): its frames in flight are "
                "missing, the series is incomplete; its next blocks go to workers %s",
                s.series_id,
                k,
                self.endpoints[k],
                s.workers,
            )


def format_broker_status(st: dict[str, Any]) -> str:
    """One human line from a broker status dict."""
    per = " ".join(str(v) for v in st.get("forwarded_to", []))
    return (
        f"broker {st.get('series') or '-'}: forwarded {st.get('forwarded', 0)} [{per}] "
        f"workers {st.get('workers_connected', 0)}/{st.get('workers', 0)} "
        f"undelivered {st.get('undelivered', 0)} rejected {st.get('rejected', 0)} "
        f"{st.get('rejected_by_reason') or ''}"
    ).rstrip()
