"""``streamstore ingest --workers N``: the broker in this process, N worker processes.

The parent process owns the only receiver of the camera's stream (the
:class:`~streamstore.scaleout.broker.Broker`); each worker is a separate
process (``spawn``: numba's OpenMP layer is not fork-safe) running the
ingest daemon as worker ``K``, connected to its own stream from the broker
over ``ipc`` in a private temporary directory. The broker hands on the
ZeroMQ frames it received without copying them; the ipc transport then
moves each frame once through a Unix socket, cheaper than the TCP stack.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import tempfile
import threading
from typing import Any

from streamstore.scaleout.broker import Broker, BrokerConfig
from streamstore.scaleout.deal import DEFAULT_BLOCK_FRAMES, offset_endpoint, stream_endpoints

__all__ = ["run_local", "worker_configs"]

log = logging.getLogger("streamstore.ingest")


def _worker_entry(config: Any, quiet: bool) -> None:
    """Target of a spawned worker process."""
    from streamstore.ingest.daemon import IngestDaemon
    from streamstore.ingest.logsetup import setup_logging

    setup_logging(quiet)
    raise SystemExit(IngestDaemon(config).run())


def worker_configs(config: Any, endpoints: list[str]) -> list[Any]:
    """Per-worker copies of ``config``: worker ``k`` connects to ``endpoints[k]``.

    Worker ids are ``K0 + k`` (``K0 = config.worker_id or 0``); a status
    endpoint ``EP`` is the broker's, worker ``k`` publishes on ``EP`` + 1 + k.
    The workers' link is local, so ``curve_keys`` stays with the broker.
    """
    first = config.worker_id or 0
    out = []
    for k, ep in enumerate(endpoints):
        status = config.status_endpoint
        if status is not None:
            status = offset_endpoint(status, 1 + k)
        out.append(
            dataclasses.replace(
                config,
                connect=ep,
                listen=None,
                worker_id=first + k,
                n_workers=len(endpoints),
                status_endpoint=status,
                curve_keys=None,
            )
        )
    return out


def run_local(
    config: Any,
    n: int,
    *,
    block_frames: int = DEFAULT_BLOCK_FRAMES,
    quiet: bool = False,
    camera_bind: bool = False,
) -> int:
    """Run the broker here and ``n`` ingest workers as processes until stopped.

    Parameters
    ----------
    config : IngestConfig
        The ingest options; ``connect`` (or ``listen`` with ``camera_bind``)
        is the camera, ``curve_keys`` secures the camera link.
    n : int
        Number of workers.
    block_frames : int
        Consecutive frames dealt to one worker.
    quiet : bool
        Workers log warnings and errors only.
    camera_bind : bool
        Bind the camera endpoint (a camera that connects).

    Returns
    -------
    int
        0 if every worker exited 0, else 1 (a lost worker is logged at ERROR).
    """
    import multiprocessing as mp

    from streamstore.ingest.allocator import one_malloc_arena

    one_malloc_arena()  # the broker's frame buffers (Broker.run), before any thread starts
    camera = config.listen if camera_bind else config.connect
    ipc_dir = tempfile.mkdtemp(prefix="streamstore-fanout-")
    try:
        endpoints = stream_endpoints(f"ipc://{ipc_dir}/w", n)
        broker = Broker(
            BrokerConfig(
                camera=camera,
                workers=endpoints,
                camera_bind=camera_bind,
                block_frames=block_frames,
                curve_keys=config.curve_keys,
                max_frame_bytes=config.max_frame_bytes,
                status_endpoint=config.status_endpoint,
                status_interval_s=config.status_interval_s,
                exit_after_series=config.exit_after_series,
                orphans_dir=config.out_dir,
            )
        )
        configs = worker_configs(config, endpoints)
        for c in configs:
            c.check()
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=_worker_entry, args=(c, quiet), name=f"ingest-worker-{c.worker_id}")
            for c in configs
        ]

        def forward(signum: int, _frame: Any) -> None:
            broker.request_stop()
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
            watcher = threading.Thread(target=_watch, args=(procs, configs, broker), daemon=True)
            watcher.start()
            broker.run()
            return _join(procs, configs)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join(5)
    finally:
        shutil.rmtree(ipc_dir, ignore_errors=True)


def _watch(procs: list[Any], configs: list[Any], broker: Broker) -> None:
    """Stop the broker when a worker exits before all are connected, or when all have exited."""
    from multiprocessing.connection import wait

    alive = list(procs)
    while alive:
        done = wait([p.sentinel for p in alive])
        alive = [p for p in alive if p.sentinel not in done]
        if not broker.ready.is_set():
            log.error("a worker exited before every worker was connected: stopping")
            broker.request_stop()
            return
    broker.request_stop()


def _join(procs: list[Any], configs: list[Any]) -> int:
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
            log.error("worker %d %s: its unflushed frames are reported missing", c.worker_id, how)
    return status
