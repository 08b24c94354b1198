"""The receiver's per-series state machine: start, images, end, idle timeout.

Series are keyed by ``series_id``; several may be open at once (up to
``--max-open-series``), each with its own reorder window and idle timer::

    (none) --start--> open --end----------> closed, complete
                      open --end (n_frames below what arrived)--> closed, inconsistent
                      open --idle timeout-> closed, incomplete
                      open --SIGINT/SIGTERM--> closed, incomplete ("shutdown")

A start of another series opens it beside the running ones (refused, and
counted, when ``--max-open-series`` are open); it never closes a running
series. The idle timer measures the sender's silence only: time the
receiver itself did not read (a full memory budget, a stalled process) is
credited back, and a series is not closed while messages wait in the socket.

:class:`SeriesMachine` is a mixin of :class:`~streamstore.ingest.daemon.IngestDaemon`,
which provides ``config``, ``counters``, ``budget``, ``_count_q`` and ``_reject``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from streamstore.ingest.items import CloseItem, FrameItem, MissingItem, OpenItem, SeriesInfo
from streamstore.ingest.series import FrameTracker, missing_ranges

__all__ = ["OpenSeries", "SeriesMachine", "MAX_ID_JUMP"]

log = logging.getLogger("streamstore.ingest")

#: Most ids one image may jump ahead of the next expected one. Missing ids are kept
#: as ranges (constant memory), so this bounds nothing in memory: it only refuses ids
#: no camera reaches (2**40 frames at 100 kHz take 127 days), so one hostile id cannot
#: make the rest of a series "late".
MAX_ID_JUMP = 1 << 40

# log the first few of a kind in full, then one line in 1000
_LOG_FIRST = 20


class OpenSeries:
    """Receiver-side state of one open series."""

    def __init__(self, info: SeriesInfo, window: int) -> None:
        self.info = info
        self.tracker: Any = FrameTracker(window)
        self.held_bytes = 0
        self.rejected = 0
        self.last_activity = time.monotonic()
        self.first_frame_t: float | None = None
        self.last_frame_t: float | None = None


class SeriesMachine:
    """Start / image / end handling of the open series (a mixin of the daemon)."""

    def _init_series_state(self) -> None:
        self._open: dict[str, OpenSeries] = {}  # by series_id, in start order
        self._ever_started = False
        self._recent_closed: deque[str] = deque(maxlen=64)
        # a scale-out worker records images that belong to no series (orphans.json)
        self._orphan_record: Any = None

    @property
    def _series(self) -> OpenSeries | None:
        """The most recently started open series (None when none is open)."""
        return next(reversed(self._open.values())) if self._open else None

    def open_series_ids(self) -> list[str]:
        """Ids of the open series, oldest start first."""
        return list(self._open)

    # -- messages ------------------------------------------------------------------
    def _on_start(self, msg: Any) -> None:
        from streamstore.link import protocol

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
        if sid in self._open:
            self._open[sid].rejected += 1
            self._reject("second_start", f"series {sid} is open already")
            return
        limit = self.config.max_open_series
        if len(self._open) >= limit:
            self._reject(
                "too_many_series",
                f"start of series {sid} refused: {len(self._open)} series are open "
                f"({', '.join(self._open)}; --max-open-series {limit})",
            )
            return
        meta = msg.meta if isinstance(getattr(msg, "meta", None), dict) else {}
        kind = "dark" if meta.get("kind") == "dark" else "data"
        info = SeriesInfo(sid, msg, kind=kind)
        s = OpenSeries(info, self.config.reorder_window)
        if self.config.worker_id is not None:  # a shard: the other ids are other workers'
            from streamstore.scaleout.shard_writer import ShardTracker

            s.tracker = ShardTracker(self.config.reorder_window)
        self._open[sid] = s
        self._ever_started = True
        self.counters.series_started += 1
        log.info(
            "series %s: start (%s, %s x %s %s, frame time %g s%s)%s",
            sid,
            kind,
            msg.frame_shape[0],
            msg.frame_shape[1],
            msg.dtype,
            msg.frame_time_s,
            f", {msg.n_frames} frames announced" if getattr(msg, "n_frames", None) else "",
            f"; open beside {', '.join(k for k in self._open if k != sid)}"
            if len(self._open) > 1
            else "",
        )
        self._count_q.put(OpenItem(info))

    def _on_image(self, msg: Any) -> None:
        sid = msg.series_id
        s = self._open.get(sid)
        if s is None:
            # an image whose series has no start is a sender (or dealing) fault: it is lost
            if sid in self._recent_closed:
                reason = "stale"
                self._reject(reason, f"image {msg.frame_id} of series {sid}, which is closed")
            elif not self._ever_started:
                reason = "before_start"
                self._reject(
                    reason, f"image {msg.frame_id} of {sid} before any start", logging.ERROR
                )
            else:
                reason = "unknown_series"
                self._reject(
                    reason,
                    f"image {msg.frame_id} of unknown series {sid} (it has no start)",
                    logging.ERROR,
                )
            if self._orphan_record is not None:  # no series manifest will hold it
                self._orphan_record.add(reason, sid)
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
        if ahead > MAX_ID_JUMP:
            s.rejected += 1
            self._reject(
                "frame_id_range",
                f"series {sid} image {msg.frame_id}: {ahead} ids ahead of the next expected "
                f"frame {s.tracker.next_id}; at most {MAX_ID_JUMP} may be",
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
            if s.tracker.duplicate <= _LOG_FIRST:
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
        # the windows may hold at most half the budget, so the pipeline never starves
        while s.held_bytes > self.budget.capacity // 2 and s.tracker.n_held:
            self._forward(s, s.tracker.release_lowest())

    def _forward(self, s: OpenSeries, offer: Any) -> None:
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
        s.held_bytes = max(0, s.held_bytes - sum(it.nbytes for _, it in offer.ready))
        for _, item in offer.ready:
            self._count_q.put(item)

    def _on_end(self, msg: Any) -> None:
        sid = msg.series_id
        s = self._open.get(sid)
        if s is None:
            reason = "stale" if sid in self._recent_closed else "unknown_series"
            self._reject(reason, f"end of series {sid}, which is not open")
            return
        n = int(msg.n_frames)
        t = s.tracker
        accepted = t.released + t.n_held
        if n < accepted:  # n_frames counts the images the sender sent
            # the sender's count contradicts what arrived: keep every frame, say so
            s.info.inconsistent = (
                f"the end says {n} frames but {accepted} distinct frames arrived "
                f"(ids up to {t.max_id}); every frame received is kept"
            )
            log.warning("series %s: INCONSISTENT end: %s", sid, s.info.inconsistent)
        s.info.end_extra = dict(msg.extra)  # a broker's report, for the series manifest
        self._close_series(s, "end", complete=True, n_sent=n)

    def _close_series(
        self, s: OpenSeries, reason: str, *, complete: bool, n_sent: int | None = None
    ) -> None:
        announced = getattr(s.info.start, "n_frames", None) or 0
        if complete:
            expected = max(int(n_sent or 0), int(announced))
        else:  # without an end we know only the ids up to the highest one seen
            expected = max(int(n_sent or 0), s.tracker.max_id + 1)
        s.info.n_expected = expected
        self._forward(s, s.tracker.finish(expected))
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
        self._open.pop(s.info.series_id, None)

    def _close_all(self, reason: str) -> None:
        for s in list(self._open.values()):
            self._close_series(s, reason, complete=False)

    # -- time ------------------------------------------------------------------------
    def _credit_stall(self, seconds: float) -> None:
        """Time the receiver did not read (stalled, or the budget full) is not silence."""
        if seconds > 0:
            for s in self._open.values():
                s.last_activity += seconds

    def _close_idle(self, waiting: Any) -> None:
        """Close series silent for longer than the idle timeout.

        ``waiting()`` says whether messages wait in the socket; then nothing
        is closed now (they may be the silent series' next frames).
        """
        limit = self.config.idle_timeout_s
        now = time.monotonic()
        idle = [s for s in self._open.values() if now - s.last_activity > limit]
        if not idle or waiting():
            return
        for s in idle:
            log.warning(
                "series %s: no message for %.0f s: closing it as incomplete",
                s.info.series_id,
                limit,
            )
            self._close_series(s, "idle timeout", complete=False)


def _nbytes(payload: Any) -> int:
    nb = getattr(payload, "nbytes", None)
    if nb is not None:
        return int(nb)
    buf = getattr(payload, "buffer", None)
    if buf is not None:
        return int(memoryview(buf).nbytes)
    return len(payload)
