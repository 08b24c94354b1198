"""Daemon start-up: time until ``streamstore ingest`` is ready, from a cold and a warm numba cache.

    python -m benchmarks.startup            # one cold start, three warm starts
    python -m benchmarks.startup --json     # one JSON object
    python -m benchmarks.startup --no-cold --warm-runs 1   # a quick check
    python -m benchmarks.startup --sequential   # and a cold start compiling in one process

The daemon compiles or loads every counting kernel variant before it binds its
data socket, and publishes its state meanwhile. Each run starts a real daemon
(``python -m streamstore ingest --listen ... --status-endpoint ...``) and times,
from the process start: the first status message, and the first status that
says ``ready`` (it listens). *Cold* runs get an empty ``NUMBA_CACHE_DIR`` (as
after an install or an upgrade); *warm* runs reuse the cache the cold run
filled (the usual start). The daemon's own log line gives the number of kernel
variants and how many were compiled. Every number comes from this run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import record
from streamstore.counting.warmup import PROCESSES_ENV
from streamstore.link.endpoints import free_tcp_endpoint

_READY_LINE = re.compile(r"counting kernels ready: (\d+) variants in ([\d.]+) s \((\d+) compiled\)")


def start_once(
    cache_dir: Path | None, work: Path, timeout_s: float, processes: int | None = None
) -> dict[str, Any]:
    """Start one daemon with ``NUMBA_CACHE_DIR=cache_dir`` (None: numba's default,
    beside the installed modules) and, where given, that many compile workers;
    time it until ready."""
    import zmq

    status_ep = free_tcp_endpoint()
    out = Path(tempfile.mkdtemp(dir=work))
    log_path = out.with_suffix(".log")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NUMBA_CACHE_DIR", None)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = str(cache_dir)
    env.pop(PROCESSES_ENV, None)
    if processes is not None:
        env[PROCESSES_ENV] = str(processes)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(status_ep)
    states: list[str] = []
    first = ready = None
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamstore", "ingest", "--out", str(out / "o"),
             "--listen", free_tcp_endpoint(), "--status-endpoint", status_ep, "--threads", "1"],
            stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        try:
            while time.perf_counter() - t0 < timeout_s and proc.poll() is None:
                if not sub.poll(100):
                    continue
                st = json.loads(sub.recv())
                now = time.perf_counter() - t0
                first = now if first is None else first
                state = str(st.get("state", "?")).split(" (")[0]
                if not states or states[-1] != state:
                    states.append(state)
                if st.get("ready") is True:
                    ready = now
                    break
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            sub.close(0)
            ctx.term()
    text = log_path.read_text(errors="replace")
    m = _READY_LINE.search(text)
    if ready is None:
        raise RuntimeError(f"the daemon never said ready; its log:\n{text[-3000:]}")
    return {
        "first_status_s": first,
        "ready_s": ready,
        "states": states,
        "variants": int(m.group(1)) if m else None,
        "warm_up_s": float(m.group(2)) if m else None,
        "compiled": int(m.group(3)) if m else None,
    }


def run(
    cold: bool, warm_runs: int, timeout_s: float, log=print, sequential: bool = False
) -> dict[str, Any]:
    """Run the benchmark; the results as a dict. ``sequential`` adds a cold start
    that compiles in the daemon alone (one compile worker), for the ratio."""
    res: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "load_average_at_start": list(os.getloadavg()),
        },
        "cold": None,
        "cold_sequential": None,
        "warm": [],
    }
    with tempfile.TemporaryDirectory(prefix="streamstore-startup-") as tmp:
        work = Path(tmp)
        cache = work / "numba-cache"
        cache.mkdir()
        if cold and sequential:
            r = start_once(work / "numba-cache-sequential", work, timeout_s, processes=1)
            res["cold_sequential"] = r
            log(
                f"cold start, one compile worker: ready after {r['ready_s']:.1f} s "
                f"({r['compiled']} kernel overloads compiled)"
            )
        if cold:
            r = start_once(cache, work, timeout_s)
            res["cold"] = r
            log(
                f"cold start (empty numba cache): ready after {r['ready_s']:.1f} s "
                f"(first status {r['first_status_s']:.1f} s; {r['compiled']} kernel "
                f"overloads compiled for {r['variants']} variants; states: "
                f"{' -> '.join(r['states'])})"
            )
        elif warm_runs:  # numba's own cache, as installed; one untimed start fills it
            cache = None
            log("no cold run: warm starts on numba's default cache (one untimed start first)")
            start_once(cache, work, timeout_s)
        for _ in range(warm_runs):
            r = start_once(cache, work, timeout_s)
            res["warm"].append(r)
            log(
                f"warm start: ready after {r['ready_s']:.2f} s "
                f"(first status {r['first_status_s']:.2f} s, kernels {r['warm_up_s']} s, "
                f"{r['compiled']} compiled)"
            )
    if res["warm"]:
        res["warm_best_ready_s"] = min(r["ready_s"] for r in res["warm"])
        res["warm_worst_ready_s"] = max(r["ready_s"] for r in res["warm"])
    res["machine"]["load_average_at_end"] = list(os.getloadavg())
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--warm-runs", type=int, default=3, help="warm starts (3)")
    p.add_argument(
        "--no-cold",
        action="store_true",
        help="skip the cold start; warm starts then use numba's default cache",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="also a cold start with one compile worker (STREAMSTORE_COMPILE_PROCESSES=1)",
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per start (1800)")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    record.add_options(p)
    args = p.parse_args(argv)
    if args.warm_runs < 0:
        p.error("--warm-runs must be >= 0")
    res = run(
        not args.no_cold,
        args.warm_runs,
        args.timeout,
        log=(lambda *a, **k: None) if args.json else print,
        sequential=args.sequential,
    )
    record.save("startup", res, args)
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
