"""Dark-series calibration: peak memory and time against the number of dark frames.

For each number of dark frames (default 10 and 100, 4092 x 5760 uint16), in a
fresh process each so the peaks do not mix:

* ``library``: ``Calibration.from_dark_frames`` given a generator of frames
  (drawn from a pool of 8 seeded noise frames), peak RSS and wall time;
* ``daemon``: a real ``streamstore ingest`` (memory budget: 4 frames)
  receiving a dark series of that many frames over tcp loopback and saving its
  calibration; peak RSS of the daemon process (``wait4``) and the time from
  the first frame sent to its exit.

Anchors measured in the same run: the bytes of one frame, of the running sums
(16 bytes per pixel) and of the stacked frames the array path would need.
Memory independent of the number of frames means the peak at 100 frames is the
peak at 10 plus noise, far below the stacked size.

Run ``python -m benchmarks.dark`` (table) or ``--json``; ``--quick`` uses
512 x 768 frames for a check while developing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import record

ROOT = Path(__file__).resolve().parents[1]  # where `python -m benchmarks.dark` runs
FULL_SHAPE = (4092, 5760)
POOL = 8


def _pool(shape: tuple[int, int], seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.normal(100.0, 3.0, size=shape)
    return [
        np.clip(base + rng.normal(0.0, 4.0, size=shape), 0, 65535).astype(np.uint16)
        for _ in range(POOL)
    ]


def _library_child(n: int, shape: tuple[int, int]) -> dict:
    from streamstore import Calibration

    pool = _pool(shape)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    cal = Calibration.from_dark_frames(pool[i % POOL] for i in range(n))
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "peak_rss_bytes": peak,
        "rss_before_bytes": rss0,
        "growth_bytes": peak - rss0,
        "seconds": dt,
        "n_masked": cal.n_masked,
    }


def _free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _daemon_run(n: int, shape: tuple[int, int]) -> dict:
    import zmq

    from streamstore.link import protocol

    pool = _pool(shape)
    endpoint = _free_endpoint()
    with tempfile.TemporaryDirectory(prefix="bench-dark-") as tmp:
        frame_bytes = shape[0] * shape[1] * 2
        cmd = [
            sys.executable, "-m", "streamstore", "ingest", "--out", str(Path(tmp) / "out"),
            "--listen", endpoint, "--exit-after-series", "1", "--quiet",
            "--max-frame-bytes", str(frame_bytes),
            "--max-buffer-mb", str(4 * frame_bytes / 2**20),  # frames in flight: about 4
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        ctx = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 4)
        push.connect(endpoint)
        start = protocol.Start("dk", shape, "uint16", 1e-3, n_frames=n, meta={"kind": "dark"})
        t0 = time.perf_counter()
        push.send_multipart(protocol.encode_start(start))
        for i in range(n):
            push.send_multipart(protocol.encode_image("dk", i, i, pool[i % POOL]), copy=False)
        push.send_multipart(protocol.encode_end("dk", n))
        _, status, usage = os.wait4(proc.pid, 0)
        dt = time.perf_counter() - t0
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        proc.returncode = os.waitstatus_to_exitcode(status)
        push.close(0)
        ctx.term()
        saved = (Path(tmp) / "out" / "dk.calibration.h5").exists()
    if proc.returncode != 0 or not saved:
        raise RuntimeError(f"daemon exit {proc.returncode}, calibration saved {saved}: {err}")
    return {"peak_rss_bytes": usage.ru_maxrss * 1024, "seconds": dt}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="dark-series calibration memory benchmark")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    record.add_options(ap)
    ap.add_argument("--quick", action="store_true", help="512 x 768 frames")
    ap.add_argument("--frames", default="10,100", help="numbers of dark frames (default 10,100)")
    ap.add_argument("--mode", choices=("library", "daemon", "both"), default="both")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shape = (512, 768) if args.quick else FULL_SHAPE
    if args.shape:
        shape = tuple(int(v) for v in args.shape.split("x"))  # type: ignore[assignment]
    if args.child is not None:  # one library measurement in a fresh process
        print(json.dumps(_library_child(args.child, shape)))
        return 0
    counts = [int(v) for v in args.frames.split(",")]
    frame_bytes = shape[0] * shape[1] * 2
    rows = []
    for n in counts:
        row: dict = {"n_frames": n, "stacked_bytes": n * frame_bytes}
        if args.mode in ("library", "both"):
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.dark", "--child", str(n),
                 "--shape", f"{shape[0]}x{shape[1]}"],
                capture_output=True, text=True, check=True, cwd=ROOT,
            )  # fmt: skip
            row["library"] = json.loads(out.stdout.strip().splitlines()[-1])
        if args.mode in ("daemon", "both"):
            row["daemon"] = _daemon_run(n, shape)
        rows.append(row)
    result = {
        "frame_shape": list(shape),
        "frame_bytes": frame_bytes,
        "running_sums_bytes": 16 * shape[0] * shape[1],
        "rows": rows,
    }
    record.save("dark", result, args)
    if args.json:
        print(json.dumps(result))
        return 0
    mb = 1e6
    print(
        f"frames {shape[0]} x {shape[1]} uint16: {frame_bytes / mb:.1f} MB each, "
        f"running sums {result['running_sums_bytes'] / mb:.0f} MB"
    )
    print(
        "| dark frames | stacked MB | library peak RSS MB (above the frame pool) | library s "
        "| daemon peak RSS MB |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        lib, dmn = r.get("library"), r.get("daemon")
        print(
            f"| {r['n_frames']} | {r['stacked_bytes'] / mb:.0f} | "
            f"{lib['peak_rss_bytes'] / mb:.0f} ({lib['growth_bytes'] / mb:.0f}) | "
            f"{lib['seconds']:.2f} | "
            if lib
            else f"| {r['n_frames']} | {r['stacked_bytes'] / mb:.0f} | - | - | ",
            end="",
        )
        print(f"{dmn['peak_rss_bytes'] / mb:.0f} |" if dmn else "- |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
