"""Scale-out ingest: one camera stream dealt over several ingest workers.

The camera's PUSH socket deals images round-robin over the connected PULL
workers (ZeroMQ skips a worker whose queue is full, so a slow worker gets
fewer frames). ``start`` and ``end`` must reach *every* worker, so they travel
on a separate **control channel**: the sender binds an XPUB socket (by default
on the data port + 1) and publishes them there; each worker connects a SUB
socket to it. The design and its races are described in ``docs/protocol.md``
("Several receivers"); in short:

* the sender learns its workers from their subscriptions (XPUB), waits for
  the expected number before the first ``start`` (no "slow joiner" loss), and
  re-publishes the open series' ``start`` whenever a worker subscribes late;
* a worker buffers images of a series whose ``start`` has not arrived yet
  (bounded in bytes and time) and replays them once it does;
* a worker applies an ``end`` only once its data pipe has moved past the
  series: when an image of another series arrives (ZeroMQ keeps each pipe in
  order) or when the data socket has been quiet for ``end_grace_s`` while the
  worker was reading. An image of the series arriving later still is rejected
  as ``stale`` and counted, never dropped silently.

Each worker writes its own shard ``DIR/<series_id>/shard-<K>.h5`` and records
it in ``DIR/<series_id>/manifest.json`` (see :mod:`streamstore.shards`, which
reads the shards back as one store). A shard never declares frame ids missing
(the other workers hold them); the combined store does, from the ids the
sender announced or ended with.

This module holds the sender (:class:`FanoutSender`), the worker-side pieces
the daemon uses (:class:`ControlState`, :class:`ShardTracker`,
:func:`shard_paths`, :func:`record_shard`) and the process launcher
(:func:`run_workers`). ``zmq`` is imported lazily.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from streamstore.errors import UserError
from streamstore.protocol import Sender, encode_end, encode_start

__all__ = [
    "FanoutSender",
    "ControlState",
    "ShardTracker",
    "control_endpoint_for",
    "offset_endpoint",
    "shard_paths",
    "record_shard",
    "run_workers",
    "MANIFEST_NAME",
    "SHARD_PATTERN",
]

log = logging.getLogger("streamstore.ingest")

#: Name of the series manifest inside a series directory.
MANIFEST_NAME = "manifest.json"
#: Glob of shard files inside a series directory.
SHARD_PATTERN = "shard-*.h5"
#: Longest quiet time a worker waits for late images after an end, s.
MAX_GRACE_S = 10.0


# ------------------------------------------------------------------ endpoints
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
    return f"tcp://{host}:{int(port) + k}"


def control_endpoint_for(data_endpoint: str) -> str:
    """The default control endpoint of a data endpoint: tcp port + 1, ipc path + ``.control``.

    A bind to any port (``tcp://host:*``) gives ``tcp://host:*`` again: the
    sender then reports the port it got in ``FanoutSender.control_endpoint``.
    """
    scheme, sep, rest = data_endpoint.partition("://")
    if scheme in ("ipc", "inproc") and sep:
        return data_endpoint + ".control"
    if rest.endswith(":*"):  # bind to any free port: the control socket too
        return data_endpoint
    return offset_endpoint(data_endpoint, 1)


# ---------------------------------------------------------------- the sender
class FanoutSender(Sender):
    """A :class:`~streamstore.protocol.Sender` whose start and end reach every worker.

    Images go over the PUSH socket as usual (round-robin over the workers);
    ``start`` and ``end`` are published on an XPUB control socket that every
    worker subscribes to.

    Parameters
    ----------
    endpoint : str
        Data endpoint (PUSH), as for :class:`Sender`.
    control_endpoint : str, optional
        Control endpoint (XPUB); default :func:`control_endpoint_for` of
        ``endpoint`` (tcp port + 1). With ``bind=True`` a ``*`` port is
        resolved; read the result from :attr:`control_endpoint`.
    bind : bool, default True
        Bind both sockets (the camera binds, workers connect).
    **kwargs
        Passed to :class:`Sender` (``sndhwm``, ``send_timeout_s``,
        ``linger_s``, ``context``).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        control_endpoint: str | None = None,
        bind: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(endpoint, bind=bind, **kwargs)
        zmq = self._zmq
        if control_endpoint is None:
            control_endpoint = control_endpoint_for(self.endpoint)
        ctx = kwargs.get("context") or zmq.Context.instance()
        self.control = ctx.socket(zmq.XPUB)
        self.control.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription, also repeated ones
        self.control.setsockopt(zmq.SNDHWM, 10000)
        linger = kwargs.get("linger_s", 10.0)
        self.control.setsockopt(zmq.LINGER, -1 if linger is None else int(linger * 1000))
        try:
            if bind:
                self.control.bind(control_endpoint)
                control_endpoint = self.control.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                self.control.connect(control_endpoint)
        except zmq.ZMQError as exc:
            self.control.close(linger=0)
            self.socket.close(linger=0)
            raise OSError(f"cannot bind the control socket {control_endpoint}: {exc}") from None
        self.control_endpoint = control_endpoint
        #: subscriptions seen so far (one per worker that connected)
        self.subscriptions = 0
        #: data (PUSH) peers connected now, from the socket monitor
        self.data_peers = 0
        self._open_start: list[bytes] | None = None
        self._monitor = self.socket.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        )

    def _poll_monitor(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        zmq = self._zmq
        while self._monitor.poll(0, zmq.POLLIN):
            ev = recv_monitor_message(self._monitor)["event"]
            if ev == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.data_peers += 1
            elif ev == zmq.EVENT_DISCONNECTED:
                self.data_peers = max(0, self.data_peers - 1)

    def _poll_control(self, timeout_ms: int = 0) -> None:
        zmq = self._zmq
        while self.control.poll(timeout_ms, zmq.POLLIN):
            timeout_ms = 0
            msg = self.control.recv()
            if msg[:1] == b"\x01":  # a (late) subscriber: give it the open series' start
                self.subscriptions += 1
                if self._open_start is not None:
                    self.control.send_multipart(self._open_start)

    def wait_workers(self, n: int, timeout_s: float | None = 60.0) -> int:
        """Wait until ``n`` workers are attached: subscribed to the control
        channel and connected to the data socket (so the first frames are dealt
        over all of them, and none misses the first start).

        Returns
        -------
        int
            Workers attached (the smaller of subscriptions and data peers).

        Raises
        ------
        TimeoutError
            If fewer than ``n`` attached within ``timeout_s``.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            self._poll_monitor()
            if min(self.subscriptions, self.data_peers) >= n:
                return min(self.subscriptions, self.data_peers)
            left = 50 if deadline is None else int((deadline - time.monotonic()) * 1000)
            if left <= 0:
                raise TimeoutError(
                    f"only {self.subscriptions} of {n} workers subscribed to "
                    f"{self.control_endpoint} and {self.data_peers} connected to "
                    f"{self.endpoint} within {timeout_s} s"
                )
            self._poll_control(min(left, 50))

    def send_start(self, start: Any) -> None:
        """Publish the start of a series to every worker.

        The header gets the extra key ``workers``: the number of workers
        attached now, so a series knows how many shards to expect even if a
        worker dies before it writes anything.
        """
        import dataclasses

        self._poll_control()
        self._poll_monitor()
        attached = min(self.subscriptions, self.data_peers)
        start = dataclasses.replace(start, extra={**start.extra, "workers": attached})
        parts = encode_start(start)
        self._open_start = parts
        self.control.send_multipart(parts)

    def send_image(self, *args: Any, **kwargs: Any) -> None:
        """Send one frame to the next worker (zero-copy), as :meth:`Sender.send_image`."""
        self._poll_control()
        super().send_image(*args, **kwargs)

    def send_end(self, series_id: str, n_frames: int) -> None:
        """Publish the end of a series to every worker."""
        self._poll_control()
        self._open_start = None
        self.control.send_multipart(encode_end(series_id, n_frames))

    def close(self, linger_s: float | None = None) -> None:
        """Close both sockets (queued messages go for up to the linger time)."""
        self.socket.disable_monitor()
        self._monitor.close(linger=0)
        super().close(linger_s)
        if linger_s is None:
            self.control.close()
        else:
            self.control.close(linger=int(linger_s * 1000))


# ---------------------------------------------------------- the worker side
class ShardTracker:
    """Frame-id bookkeeping of one worker's share of a series.

    The interface of :class:`streamstore.ingest.series.FrameTracker`, but a
    gap in the ids is normal (the other workers got those frames), so nothing
    is ever declared missing here. Frames are released in ascending id order:
    a frame is held while a lower id may still come, that is until an id at
    least ``window`` higher arrived, more than ``window`` frames are held, or
    it was held for ``max_hold_s`` (:meth:`release_older`, from the daemon's
    housekeeping, so frames reach the disk at low rates too). An id seen
    before is a duplicate; an id below one already released is *late* (a
    shard is written in ascending order).
    """

    def __init__(self, window: int = 64) -> None:
        from streamstore.ingest.series import Offer

        if window < 0:
            raise ValueError(f"reorder window must be >= 0 frames, got {window}")
        self._offer = Offer
        self.window = int(window)
        self._held: dict[int, Any] = {}
        self._since: dict[int, float] = {}
        self._seen: set[int] = set()
        self.last_released = -1
        self.received = 0
        self.released = 0
        self.duplicate = 0
        self.late = 0
        self.max_id = -1
        self.next_id = 0  # compatibility: lowest id that may still be stored

    @property
    def n_held(self) -> int:
        return len(self._held)

    @property
    def n_missing(self) -> int:
        return 0

    @property
    def missing_ids(self) -> list[int]:
        return []

    def held_items(self) -> list[Any]:
        return list(self._held.values())

    def offer(self, frame_id: int, item: Any) -> Any:
        if frame_id < 0:
            raise ValueError(f"frame_id must be >= 0, got {frame_id}")
        self.received += 1
        if frame_id in self._seen:
            self.duplicate += 1
            return self._offer("duplicate")
        if frame_id <= self.last_released:
            self.late += 1
            return self._offer("late")
        self._seen.add(frame_id)
        self.max_id = max(self.max_id, frame_id)
        self._held[frame_id] = item
        self._since[frame_id] = time.monotonic()
        out = self._offer("accepted")
        while self._held and (
            len(self._held) > self.window or min(self._held) <= self.max_id - self.window
        ):
            self._release_lowest(out)
        return out

    def release_older(self, max_hold_s: float) -> Any:
        """Release (in id order) every frame up to the last one held longer than ``max_hold_s``."""
        out = self._offer("accepted")
        if self._held:
            cutoff = time.monotonic() - max_hold_s
            old = [f for f, t in self._since.items() if t <= cutoff]
            if old:
                last = max(old)
                while self._held and min(self._held) <= last:
                    self._release_lowest(out)
        return out

    def release_lowest(self) -> Any:
        out = self._offer("accepted")
        if self._held:
            self._release_lowest(out)
        return out

    def finish(self, n_expected: int | None = None) -> Any:
        out = self._offer("accepted")
        while self._held:
            self._release_lowest(out)
        return out

    def _release_lowest(self, out: Any) -> None:
        low = min(self._held)
        out.ready.append((low, self._held.pop(low)))
        del self._since[low]
        self.released += 1
        self.last_released = low
        self.next_id = low + 1


class ControlState:
    """A worker's view of the control channel: ordering of start, images and end.

    Parameters
    ----------
    daemon : IngestDaemon
        The daemon whose ``_on_start``, ``_on_end`` and ``_on_image`` apply
        the messages.
    end_grace_s : float
        Quiet time on the data socket (while reading) after which an ``end``
        received on the control channel closes its series. The grace grows to
        four times the typical (median) gap between this series' recent images
        (at most ``MAX_GRACE_S``), so slow links and big frames are waited for,
        while a pause of the sender does not stretch it.
    wait_s : float
        How long images of a series whose ``start`` has not arrived are kept.
    max_pending_bytes : int
        Bytes of such images kept at most (the oldest are rejected first).
    max_hold_s : float, default 0.5
        A shard's reorder window holds a frame at most this long.
    """

    def __init__(
        self,
        daemon: Any,
        *,
        end_grace_s: float,
        wait_s: float,
        max_pending_bytes: int,
        max_hold_s: float = 0.5,
    ) -> None:
        self.d = daemon
        self.max_hold_s = float(max_hold_s)
        self.end_grace_s = float(end_grace_s)
        self.wait_s = float(wait_s)
        self.max_pending_bytes = int(max_pending_bytes)
        self._queue: deque[Any] = deque()
        self._ending: Any = None
        self._pending: deque[tuple[float, Any, int]] = deque()
        self._pending_bytes = 0
        self._last_data = time.monotonic()
        self._gaps: deque[float] = deque(maxlen=64)  # recent gaps between images, s
        self.messages = 0

    def grace_s(self) -> float:
        """The quiet time that closes an ending series now."""
        typical = float(np.median(self._gaps)) if self._gaps else 0.0
        return max(self.end_grace_s, min(MAX_GRACE_S, 4.0 * typical))

    # -- control messages ------------------------------------------------------
    def on_control(self, parts: list[Any]) -> None:
        """Handle one message from the SUB socket."""
        from streamstore import protocol

        self.messages += 1
        try:
            msg = protocol.parse(
                parts,
                max_frame_bytes=self.d.config.max_frame_bytes,
                max_header_bytes=self.d.config.max_header_bytes,
            )
        except protocol.ProtocolError as exc:
            self.d._reject("malformed control", str(exc))
            return
        if isinstance(msg, protocol.Image):
            self.d._reject("image_on_control", f"image {msg.frame_id} on the control channel")
            return
        self._queue.append(msg)
        self._process()

    def _process(self) -> None:
        from streamstore import protocol

        d = self.d
        while self._queue and self._ending is None:
            msg = self._queue.popleft()
            open_id = d._series.info.series_id if d._series is not None else None
            if isinstance(msg, protocol.Start):
                if msg.series_id == open_id:
                    continue  # the sender re-published the open start for a late worker
                d._on_start(msg)
                self._gaps.clear()
                self._last_data = time.monotonic()
                self._replay(msg.series_id)
            elif msg.series_id != open_id or self._has_pending_other(msg.series_id):
                d._on_end(msg)  # not open (rejected there), or the data pipe moved on already
            else:
                self._ending = msg
                self._last_data = time.monotonic()

    def _apply_end(self) -> None:
        msg, self._ending = self._ending, None
        self.d._on_end(msg)
        self._process()

    # -- data messages -----------------------------------------------------------
    def before_image(self, series_id: str) -> None:
        """Note data activity; an image of another series proves the ending one is done."""
        now = time.monotonic()
        self._gaps.append(now - self._last_data)
        self._last_data = now
        if self._ending is not None and self._ending.series_id != series_id:
            self._apply_end()

    def buffer(self, msg: Any, nbytes: int) -> bool:
        """Keep an image of a series not (yet) started; False if it must be rejected now."""
        if msg.series_id in self.d._recent_closed:
            return False
        self._pending.append((time.monotonic(), msg, nbytes))
        self._pending_bytes += nbytes
        self.d.budget.add(nbytes)
        while self._pending_bytes > self.max_pending_bytes and len(self._pending) > 1:
            self._drop_oldest("too many images before their start")
        return True

    def _has_pending_other(self, series_id: str) -> bool:
        return any(m.series_id != series_id for _, m, _ in self._pending)

    def _drop_oldest(self, why: str) -> None:
        _, msg, nbytes = self._pending.popleft()
        self._pending_bytes -= nbytes
        self.d.budget.release(nbytes)
        self.d._reject("before_start", f"image {msg.frame_id} of {msg.series_id}: {why}")

    def _replay(self, series_id: str) -> None:
        keep: deque[tuple[float, Any, int]] = deque()
        replay = []
        for entry in self._pending:
            (replay if entry[1].series_id == series_id else keep).append(entry)
        self._pending = keep
        for _, msg, nbytes in replay:
            self._pending_bytes -= nbytes
            self.d.budget.release(nbytes)
            self.d._on_image(msg)

    # -- time ---------------------------------------------------------------------
    def tick(self, reading: bool) -> None:
        """Housekeeping: close an ending series once the data pipe is quiet; expire images."""
        now = time.monotonic()
        s = self.d._series
        if s is not None and isinstance(s.tracker, ShardTracker):
            offer = s.tracker.release_older(self.max_hold_s)
            if offer.ready:
                self.d._forward(s, offer)
        if not reading:
            self._last_data = now  # back-pressure: quiet does not mean drained
        if self._ending is not None and now - self._last_data >= self.grace_s():
            self._apply_end()
        while self._pending and now - self._pending[0][0] > self.wait_s:
            self._drop_oldest(f"no start within {self.wait_s:g} s")

    def finish(self) -> None:
        """At shutdown: apply a received end (the series is complete), reject the rest."""
        if self._ending is not None:
            self._apply_end()
        while self._pending:
            self._drop_oldest("shutdown before its start")


# -------------------------------------------------------------------- shards
def shard_paths(worker_id: int) -> Callable[[str | os.PathLike, str], Iterator[Path]]:
    """Candidate paths of worker ``worker_id``'s shard of a series.

    ``DIR/<series_id>/shard-<K>.h5``; if that exists (an earlier run of the
    same series id), ``DIR/<series_id>-1/shard-<K>.h5``, ``-2``, ... The
    workers choose independently, so runs with the same set of workers land
    in the same directory.
    """
    from streamstore.ingest.safety import candidate_paths

    def paths(out_dir: str | os.PathLike, series_id: str) -> Iterator[Path]:
        for p in candidate_paths(out_dir, series_id):
            series_dir = p.with_suffix("")
            yield series_dir / f"shard-{worker_id}.h5"

    return paths


def _locked_update(path: Path, update: Callable[[dict[str, Any]], None]) -> None:
    """Read-modify-write a JSON file under an exclusive lock, replaced atomically."""
    import fcntl

    lock = path.with_name(f".{path.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            data = {}
        update(data)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    finally:
        os.close(fd)  # releases the lock


def record_shard(series: Any, *, worker_id: int, n_workers: int | None) -> Path | None:
    """Add a closed shard to its series' manifest; return the manifest path.

    Parameters
    ----------
    series : SeriesInfo
        A closed data series (``path`` set by the write stage).
    worker_id : int
    n_workers : int, optional
        Workers the series was dealt over, when known.
    """
    if series.path is None or series.kind != "data":
        return None
    manifest = Path(series.path).parent / MANIFEST_NAME
    start = series.start
    entry = {
        "worker_id": int(worker_id),
        "file": Path(series.path).name,
        "frames_stored": int(series.stored),
        "events": int(series.events),
        "complete": bool(series.complete),
        "frames_expected": getattr(series, "n_expected", None),
        "calibration_source": series.calibration_source,
        "closed_unix_s": round(time.time(), 3),
    }

    def update(data: dict[str, Any]) -> None:
        from streamstore.shards import MANIFEST_FORMAT, MANIFEST_VERSION

        data.setdefault("format", MANIFEST_FORMAT)
        data.setdefault("format_version", MANIFEST_VERSION)
        data["series_id"] = series.series_id
        data.setdefault("frame_shape", list(start.frame_shape))
        data.setdefault("frames_announced", getattr(start, "n_frames", None))
        told = (getattr(start, "extra", None) or {}).get("workers")  # FanoutSender's count
        for n in (n_workers, told):
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                data["n_workers"] = max(n, int(data.get("n_workers") or 0))
        shards = [s for s in data.get("shards", []) if s.get("file") != entry["file"]]
        shards.append(entry)
        data["shards"] = sorted(shards, key=lambda s: (s["worker_id"], s["file"]))

    _locked_update(manifest, update)
    return manifest


# ------------------------------------------------------------------ launcher
def _worker_main(config: Any, quiet: bool) -> int:
    """Target of a spawned worker process."""
    from streamstore.commands.ingest import setup_logging
    from streamstore.ingest.daemon import IngestDaemon

    setup_logging(quiet)
    return IngestDaemon(config).run()


def _worker_entry(config: Any, quiet: bool) -> None:
    raise SystemExit(_worker_main(config, quiet))


def worker_configs(config: Any, n: int) -> list[Any]:
    """Per-worker copies of ``config``: ids ``K0 .. K0 + n - 1``, status endpoints offset by k."""
    import dataclasses

    first = config.worker_id or 0
    out = []
    for k in range(n):
        status = config.status_endpoint
        if status is not None:
            status = offset_endpoint(status, k)
        out.append(dataclasses.replace(config, worker_id=first + k, status_endpoint=status))
    return out


def run_workers(config: Any, n: int, *, quiet: bool = False) -> int:
    """Run ``n`` ingest workers as separate processes (``spawn``) until they exit.

    SIGINT/SIGTERM received by this process are passed on to the workers,
    which drain and close their files. Returns 0 if every worker exited 0,
    else 1 (a worker that died of a signal is logged with it).
    """
    import multiprocessing as mp
    import signal

    ctx = mp.get_context("spawn")  # numba's omp layer is not fork-safe (NOTES.md)
    configs = worker_configs(config, n)
    for c in configs:
        c.check()
    procs = [
        ctx.Process(
            target=_worker_entry, args=(c, quiet), name=f"ingest-worker-{c.worker_id}", daemon=False
        )
        for c in configs
    ]

    def forward(signum: int, _frame: Any) -> None:
        for p in procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for p in procs:
            p.start()
        log.info(
            "started %d ingest workers (ids %s), pids %s",
            n,
            [c.worker_id for c in configs],
            [p.pid for p in procs],
        )
        status = 0
        for p, c in zip(procs, configs, strict=True):
            p.join()
            if p.exitcode != 0:
                status = 1
                how = (
                    f"was killed by signal {-p.exitcode}"
                    if p.exitcode and p.exitcode < 0
                    else f"exited with status {p.exitcode}"
                )
                log.error(
                    "worker %d %s: its unflushed frames are reported missing", c.worker_id, how
                )
        return status
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
