"""Where the broker's CPU goes: CPU time per forwarded frame, per role, per transport variant.

Three processes per run: a camera (one PUSH socket, sends the same frame buffer
without a user-space copy), optionally a forwarder in the middle (the real
:class:`~streamstore.scaleout.broker.Broker`, or a bare ``recv_multipart`` /
``send_multipart`` loop with ``copy=False``), and a sink (PULL, drops every
frame). Each process's CPU time (all threads; user and system apart) and
minor page faults are read from outside (``/proc``) after a warm-up series
and after the timed series, so start-up is not counted. CPU time, not wall
time: the figures are meant to be compared on a shared host.

    python benchmarks/broker_cpu.py --frames 30 [--shape 4092x5760] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
from typing import Any

WARM, TIMED = "warmup", "timed"


def _stat(pid: int) -> tuple[float, float, int]:
    """(user s, system s, minor faults) of process ``pid``, all its threads."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    # after the command name: state=0, ..., minflt=7, utime=11, stime=12
    return int(fields[11]) / tick, int(fields[12]) / tick, int(fields[7])


def _socket(ctx: Any, kind: int, opts: dict[str, Any]) -> Any:
    import zmq

    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 60000)
    for name in ("SNDHWM", "RCVHWM", "SNDBUF", "RCVBUF"):
        key = name.lower()
        if opts.get(key) is not None:
            s.setsockopt(getattr(zmq, name), int(opts[key]))
    return s


def _keep(opts: dict[str, Any]) -> None:
    if opts.get("keep_large_buffers", True):
        from streamstore.ingest.allocator import keep_large_buffers

        keep_large_buffers()


def camera(ep: str, shape: tuple[int, int], n_warm: int, n: int, go: Any, opts: dict) -> None:
    """Bind PUSH; a warm-up series, wait for ``go``, the timed series."""
    import numpy as np
    import zmq

    frame = np.random.default_rng(1).integers(0, 50, size=shape, dtype=np.uint16)
    ctx = zmq.Context(opts.get("io_threads", 1))
    s = _socket(ctx, zmq.PUSH, {"sndhwm": 2, **opts})
    s.bind(ep)
    for sid, count in ((WARM, n_warm), (TIMED, n)):
        if sid == TIMED:
            go.wait()
        start = {"htype": "start", "series_id": sid, "frame_shape": list(shape),
                 "dtype": "uint16", "frame_time_s": 1e-3, "n_frames": count}  # fmt: skip
        s.send(json.dumps(start).encode())
        for i in range(count):
            hdr = {"htype": "image", "series_id": sid, "frame_id": i, "timestamp_ns": i}
            s.send_multipart([json.dumps(hdr).encode(), frame], copy=False)
        s.send(json.dumps({"htype": "end", "series_id": sid, "n_frames": count}).encode())
    s.close()
    ctx.term()


def sink(ep: str, bind: bool, warm_done: Any, done: Any, opts: dict) -> None:
    """PULL; signal the end of each series."""
    import zmq

    _keep(opts)
    ctx = zmq.Context(opts.get("io_threads", 1))
    s = _socket(ctx, zmq.PULL, {"rcvhwm": 2, **opts})
    s.bind(ep) if bind else s.connect(ep)
    while True:
        parts = s.recv_multipart(copy=False)
        if len(parts) == 1:
            head = json.loads(parts[0].bytes)
            if head["htype"] == "end":
                (warm_done if head["series_id"] == WARM else done).set()
                if head["series_id"] == TIMED:
                    break
    s.close(0)
    ctx.term()


def forwarder(cam: str, out: str, opts: dict) -> None:
    """The broker's data path alone: receive, send on, copy=False, nothing else."""
    import zmq

    _keep(opts)
    ctx = zmq.Context(opts.get("io_threads", 1))
    o = _socket(ctx, zmq.PUSH, {"sndhwm": 2, **opts})
    o.bind(out)
    i = _socket(ctx, zmq.PULL, {"rcvhwm": 2, **opts})
    i.connect(cam)
    while True:
        parts = i.recv_multipart(copy=False)
        o.send_multipart(parts, copy=False)
        if len(parts) == 1 and b'"end"' in parts[0].bytes and TIMED.encode() in parts[0].bytes:
            break
    i.close(0)
    o.close()
    ctx.term()


def broker(cam: str, out: str, nbytes: int, opts: dict) -> None:
    """The real broker (``streamstore.scaleout.broker``), one worker stream."""
    import zmq

    from streamstore.scaleout.broker import Broker, BrokerConfig

    if not opts.get("one_arena", True):  # the broker as it was: I/O thread in its own arena
        from streamstore.ingest import allocator

        allocator.one_malloc_arena = lambda: False  # type: ignore[assignment]
    io = opts.get("io_threads", 1)
    if io != 1:
        init = zmq.Context.__init__

        def patched(self: Any, io_threads: int = io, **kw: Any) -> None:
            init(self, io_threads, **kw)

        zmq.Context.__init__ = patched  # type: ignore[method-assign]
    cfg = BrokerConfig(camera=cam, workers=[out], exit_after_series=2, max_frame_bytes=nbytes,
                       status_interval_s=3600, drain_s=5)  # fmt: skip
    Broker(cfg).run()


def run(variant: dict[str, Any], shape: tuple[int, int], n: int, n_warm: int = 4) -> dict:
    """One variant: per-role CPU ms per frame (user, system), minor faults per frame."""
    from streamstore.cli import free_tcp_endpoint

    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="streamstore-cpu-")
    cam_ep = free_tcp_endpoint()
    mid = variant.get("mid")  # None, "raw" or "broker"
    hop = variant.get("hop", "tcp")
    out_ep = free_tcp_endpoint() if hop == "tcp" else f"ipc://{tmp}/w"
    opts = variant.get("opts", {})
    warm_done, done, go = ctx.Event(), ctx.Event(), ctx.Event()
    procs = {"camera": ctx.Process(target=camera, args=(cam_ep, shape, n_warm, n, go, {}))}
    nbytes = shape[0] * shape[1] * 2
    if mid is None:
        procs["sink"] = ctx.Process(target=sink, args=(cam_ep, False, warm_done, done, {}))
    else:
        target = forwarder if mid == "raw" else broker
        args = (cam_ep, out_ep, opts) if mid == "raw" else (cam_ep, out_ep, nbytes, opts)
        procs["broker"] = ctx.Process(target=target, args=args)
        procs["sink"] = ctx.Process(target=sink, args=(out_ep, False, warm_done, done, {}))
    env = variant.get("env", {})
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the spawned processes' C library reads it at start
    try:
        for p in procs.values():
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if not warm_done.wait(300):
        raise RuntimeError("warm-up did not finish")
    time.sleep(0.3)  # the warm-up's end settles in every process
    before = {k: _stat(p.pid) for k, p in procs.items()}
    t0 = time.monotonic()
    go.set()
    if not done.wait(600):
        raise RuntimeError("timed series did not finish")
    wall = time.monotonic() - t0
    after = {k: _stat(p.pid) for k, p in procs.items()}
    for p in procs.values():
        p.join(60)
        if p.is_alive():
            p.kill()
    out: dict[str, Any] = {"variant": variant["name"], "frames": n, "wall_s": round(wall, 3)}
    for k in procs:
        u = (after[k][0] - before[k][0]) / n * 1e3
        s = (after[k][1] - before[k][1]) / n * 1e3
        out[k] = {"cpu_ms": round(u + s, 2), "user_ms": round(u, 2), "sys_ms": round(s, 2),
                  "minflt": round((after[k][2] - before[k][2]) / n, 1)}  # fmt: skip
    return out


VARIANTS: list[dict[str, Any]] = [
    {"name": "bare tcp (camera -> sink)"},
    {"name": "raw forwarder, tcp out", "mid": "raw", "hop": "tcp"},
    {"name": "raw forwarder, ipc out", "mid": "raw", "hop": "ipc"},
    {"name": "raw, ipc out, io_threads 2", "mid": "raw", "hop": "ipc", "opts": {"io_threads": 2}},
    {
        "name": "raw, ipc out, SNDBUF/RCVBUF 8 MiB",
        "mid": "raw",
        "hop": "ipc",
        "opts": {"sndbuf": 8 << 20, "rcvbuf": 8 << 20},
    },  # fmt: skip
    {
        "name": "raw, ipc out, SNDHWM/RCVHWM 8",
        "mid": "raw",
        "hop": "ipc",
        "opts": {"sndhwm": 8, "rcvhwm": 8},
    },  # fmt: skip
    {
        "name": "raw, ipc out, no keep_large_buffers",
        "mid": "raw",
        "hop": "ipc",
        "opts": {"keep_large_buffers": False},
    },  # fmt: skip
    {"name": "bare tcp, MALLOC_ARENA_MAX=1", "env": {"MALLOC_ARENA_MAX": "1"}},
    {
        "name": "raw, ipc out, MALLOC_ARENA_MAX=1",
        "mid": "raw",
        "hop": "ipc",
        "env": {"MALLOC_ARENA_MAX": "1"},
    },  # fmt: skip
    {
        "name": "Broker, tcp out, own arena (before)",
        "mid": "broker",
        "hop": "tcp",
        "opts": {"one_arena": False},
    },  # fmt: skip
    {
        "name": "Broker, ipc out, own arena (before)",
        "mid": "broker",
        "hop": "ipc",
        "opts": {"one_arena": False},
    },  # fmt: skip
    {"name": "Broker, tcp out", "mid": "broker", "hop": "tcp"},
    {"name": "Broker, ipc out", "mid": "broker", "hop": "ipc"},
    {
        "name": "Broker, ipc out, io_threads 2",
        "mid": "broker",
        "hop": "ipc",
        "opts": {"io_threads": 2},
    },  # fmt: skip
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--shape", default="4092x5760")
    ap.add_argument("--only", default=None, help="comma-separated variant indices")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split("x"))
    picks = range(len(VARIANTS)) if args.only is None else [int(v) for v in args.only.split(",")]
    rows = []
    print(f"{'variant':38s} {'role':7s} {'CPU ms':>7s} {'user':>6s} {'sys':>6s} {'minflt':>7s}")
    for k in picks:
        r = run(VARIANTS[k], shape, args.frames)  # type: ignore[arg-type]
        rows.append(r)
        for role in ("camera", "broker", "sink"):
            if role in r:
                c = r[role]
                print(f"{r['variant']:38s} {role:7s} {c['cpu_ms']:7.2f} {c['user_ms']:6.2f} "
                      f"{c['sys_ms']:6.2f} {c['minflt']:7.1f}", flush=True)  # fmt: skip
    if args.json:
        print(json.dumps({"shape": shape, "load": os.getloadavg(), "runs": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
