"""Transport ceiling: emulator pool -> ZeroMQ PUSH -> a PULL receiver that discards.

The receiver runs in its own process (``multiprocessing`` spawn context),
parses every message with :func:`streamstore.link.protocol.parse` (zero-copy) and
drops it. The rate is timed on the receiver, from the ``start`` message to the
``end`` message of a series, after a short untimed warm-up series. This is the
ceiling the ingest benchmark is compared with; the anchor measured in the
same run is one in-process ``np.copyto`` of a frame (memory bandwidth).

Usage::

    python -m benchmarks.transport            # 4092 x 5760 uint16, tcp and ipc
    python -m benchmarks.transport --json     # one JSON object
    python -m benchmarks.transport --frames 20 --shape 1024x1024

Other benchmarks can call :func:`measure` to get the same figures in their run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks import record
from streamstore.shapes import parse_shape

WARMUP_FRAMES = 3


def _receiver(endpoint: str, series: list[str], results: Any, ready: Any) -> None:
    """PULL, parse and discard; report (n_images, n_bytes, seconds) per series.

    With the daemon's allocator setting (:mod:`streamstore.ingest.allocator`),
    so the ceiling is the transport's best, not one slowed by page faults.
    """
    import zmq

    from streamstore.ingest.allocator import keep_large_buffers
    from streamstore.link.protocol import End, Image, Start, parse

    keep_large_buffers()

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 4)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    ready.set()
    try:
        for sid in series:
            n = nbytes = 0
            t0 = None
            while True:
                if not sock.poll(120_000):
                    results.put({"error": f"receiver: nothing for 120 s in series {sid}"})
                    return
                msg = parse(sock.recv_multipart(copy=False))
                if isinstance(msg, Start):
                    t0 = time.perf_counter()
                    frame_nbytes = msg.frame_nbytes
                elif isinstance(msg, Image):
                    if msg.nbytes != frame_nbytes:
                        results.put({"error": f"frame {msg.frame_id}: {msg.nbytes} bytes"})
                        return
                    n += 1
                    nbytes += msg.nbytes
                elif isinstance(msg, End):
                    dt = time.perf_counter() - (t0 or time.perf_counter())
                    results.put(
                        {"series": msg.series_id, "images": n, "bytes": nbytes, "seconds": dt}
                    )
                    break
    finally:
        sock.close(linger=0)
        ctx.term()


def memcpy_gb_per_s(frame: np.ndarray, repeats: int = 5) -> float:
    """Best in-process copy rate of ``frame`` (GB/s), the anchor."""
    dst = np.empty_like(frame)
    np.copyto(dst, frame)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, frame)
        best = min(best, time.perf_counter() - t)
    return frame.nbytes / 1e9 / best


def measure(
    transport: str,
    pool: np.ndarray,
    n_frames: int,
    *,
    hwm: int = 4,
    endpoint: str | None = None,
) -> dict[str, Any]:
    """Send ``n_frames`` frames cycled from ``pool`` to a receiver process.

    Parameters
    ----------
    transport : {"tcp", "ipc"}
        Loopback tcp on a free port, or an ipc socket in a temporary directory.
    pool : ndarray, shape (P, H, W)
        Frames to cycle (C-contiguous, uint8 or uint16).
    n_frames : int
        Timed images.
    hwm : int, default 4
        Send and receive high-water marks, messages.
    endpoint : str, optional
        Use this endpoint instead of choosing one.

    Returns
    -------
    dict
        ``transport, endpoint, frames, bytes, seconds, fps, gb_per_s``.
    """
    import zmq

    from streamstore.link.protocol import Start
    from streamstore.link.sockets import Sender

    tmpdir = None
    if endpoint is None:
        if transport == "tcp":
            endpoint = "tcp://127.0.0.1:*"
        elif transport == "ipc":
            tmpdir = tempfile.mkdtemp(prefix="ss-transport-")
            endpoint = f"ipc://{tmpdir}/sock"
        else:
            raise ValueError(f"transport: must be 'tcp' or 'ipc', got {transport!r}")
    _, h, w = pool.shape
    ctx = zmq.Context()
    sender = Sender(endpoint, sndhwm=hwm, send_timeout_s=120, linger_s=30, context=ctx)
    spawn = mp.get_context("spawn")
    results = spawn.Queue()
    ready = spawn.Event()
    series = [("warmup", WARMUP_FRAMES), ("timed", n_frames)]
    proc = spawn.Process(
        target=_receiver, args=(sender.endpoint, [s for s, _ in series], results, ready)
    )
    proc.start()
    try:
        if not ready.wait(120):
            raise RuntimeError("receiver process did not start")
        out: dict[str, Any] = {}
        for sid, n in series:
            start = Start(sid, (h, w), pool.dtype.name, 1 / 1500, n_frames=n)
            sender.send_start(start)
            for i in range(n):
                sender.send_image(sid, i, pool[i % len(pool)], timestamp_ns=i)
            sender.send_end(sid, n)
            res = results.get(timeout=300)
            if "error" in res:
                raise RuntimeError(res["error"])
            out = res
        if out["images"] != n_frames:
            raise RuntimeError(f"receiver got {out['images']} of {n_frames} images")
        return {
            "transport": transport,
            "endpoint": sender.endpoint,
            "frames": n_frames,
            "bytes": out["bytes"],
            "seconds": out["seconds"],
            "fps": n_frames / out["seconds"],
            "gb_per_s": out["bytes"] / 1e9 / out["seconds"],
        }
    finally:
        sender.close(linger_s=0)
        ctx.term()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
        if tmpdir is not None:
            for name in os.listdir(tmpdir):
                os.unlink(os.path.join(tmpdir, name))
            os.rmdir(tmpdir)


def main(argv: list[str] | None = None) -> int:
    """Run the transport benchmark and print a table (or JSON)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=60, help="timed frames per transport")
    p.add_argument(
        "--shape", type=parse_shape, default=(4092, 5760), help="HxW (default 4092x5760)"
    )
    p.add_argument("--dtype", choices=("uint16", "uint8"), default="uint16")
    p.add_argument("--pool", type=int, default=4, help="distinct frames to cycle")
    p.add_argument("--hwm", type=int, default=4, help="high-water marks, messages")
    p.add_argument("--transports", default="tcp,ipc", help="comma list of tcp, ipc")
    p.add_argument("--repeats", type=int, default=1, help="runs per transport; best kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    record.add_options(p)
    args = p.parse_args(argv)

    from streamstore.camera.emulator import CameraEmulator

    t = time.perf_counter()
    emu = CameraEmulator(args.shape, dtype=args.dtype, seed=args.seed, pool_size=args.pool)
    pool, _ = emu.pool()
    pool_s = time.perf_counter() - t
    anchor = memcpy_gb_per_s(pool[0])
    results = {}
    for transport in args.transports.split(","):
        runs = [measure(transport, pool, args.frames, hwm=args.hwm) for _ in range(args.repeats)]
        best = max(runs, key=lambda r: r["gb_per_s"])
        best["ratio_to_memcpy"] = best["gb_per_s"] / anchor
        best["runs_gb_per_s"] = [r["gb_per_s"] for r in runs]
        results[transport] = best
    report = {
        "benchmark": "transport",
        "frame_shape": list(args.shape),
        "dtype": args.dtype,
        "frame_bytes": int(pool[0].nbytes),
        "pool": args.pool,
        "pool_generation_s_per_frame": pool_s / args.pool,
        "hwm": args.hwm,
        "memcpy_gb_per_s": anchor,
        "results": results,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
    }
    record.save("transport", report, args)
    if args.json:
        print(json.dumps(report))
        return 0
    h, w = args.shape
    print(
        f"transport: {h}x{w} {args.dtype} ({pool[0].nbytes / 1e6:.1f} MB/frame), "
        f"{args.frames} frames per transport, pool {args.pool} "
        f"({pool_s / args.pool:.2f} s/frame to generate), hwm {args.hwm}"
    )
    print(f"  anchor  memcpy       {anchor:8.2f} GB/s")
    for name, r in results.items():
        print(
            f"  {name:<7} PUSH->PULL  {r['gb_per_s']:8.2f} GB/s  {r['fps']:8.1f} fps  "
            f"({r['ratio_to_memcpy']:.3f} x memcpy; runs "
            + ", ".join(f"{g:.2f}" for g in r["runs_gb_per_s"])
            + " GB/s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
