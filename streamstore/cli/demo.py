"""Emulate a camera, ingest its stream, and summarise what was stored.

Starts an ingest daemon (`streamstore ingest`) and a camera emulator
(`streamstore emulate`) as two processes talking ZeroMQ over tcp loopback,
streams a dark series (which becomes the calibration) and a data series with
ground truth, then opens the stored series through the Python API and prints
frames received and stored, the achieved rate, events, the counted and the
coincidence-corrected dose in e/A^2 (the file records --pixel-size), bits/event, counting recall and
precision against the truth, and where the file and a PNG (the summed image and
the dose per frame, ``plotting.save_summary``, as ``streamstore show``) are.
The default frame size and rate finish in about a minute on two cores; --full
streams 4092 x 5760 frames as fast as the machine goes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from streamstore.link.endpoints import free_tcp_endpoint

__all__ = ["add_arguments", "run"]

FULL_SHAPE = "4092x5760"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``streamstore demo``."""
    p.add_argument(
        "--out",
        default="streamstore-demo",
        metavar="DIR",
        help="where the files go (default ./streamstore-demo)",
    )
    p.add_argument("--shape", default="512x768", help="frame HxW (default 512x768)")
    p.add_argument("--frames", type=int, default=2000, help="data frames (default 2000)")
    p.add_argument(
        "--fps", type=float, default=100.0, help="send rate, frames/s; 0 = as fast as possible"
    )
    p.add_argument("--dark-frames", type=int, default=40, help="dark frames first (default 40)")
    p.add_argument(
        "--dose-rate", type=float, default=15.0, help="e/px/s (0.01 e/px/frame at 1500 fps)"
    )
    p.add_argument(
        "--pixel-size",
        type=float,
        default=1.0,
        metavar="A",
        help="pixel size at the specimen, Angstrom, recorded in the file so the dose "
        "reads in e/A^2 (default 1.0)",
    )
    p.add_argument("--pattern", default="image", choices=("uniform", "disk", "image"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pool",
        type=int,
        default=256,
        help="distinct frames the emulator cycles through (default 256; repeats compress "
        "better than new frames, so keep it large for an honest bits/event)",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help=f"full-size frames ({FULL_SHAPE}), 200 frames, as fast as possible",
    )
    p.add_argument(
        "--score-frames",
        type=int,
        default=100,
        metavar="N",
        help="frames scored against the truth for recall/precision (default 100)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="give up after S seconds")
    p.add_argument(
        "--truth",
        action="store_true",
        help="keep the emulator's ground truth (HDF5, about 20 bytes per electron) in --out; "
        "without it the truth is scored and deleted",
    )


def _say(msg: str) -> None:
    print(msg, flush=True)


class _StatusWatch:
    """Reads the daemon's status PUB socket."""

    def __init__(self, endpoint: str) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.last: dict[str, Any] | None = None

    def poll(self, timeout_s: float) -> dict[str, Any] | None:
        if self.sock.poll(int(timeout_s * 1000)):
            raw = self.sock.recv()
            while self.sock.poll(0):
                raw = self.sock.recv()
            self.last = json.loads(raw)
        return self.last

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def _wait_ready(daemon: subprocess.Popen, watch: _StatusWatch, log_path: Path) -> None:
    """Wait for the daemon's ready status (it compiles or loads its counting kernels
    first: minutes after an install, about a second later), saying what it does."""
    from streamstore.errors import UserError

    said = None
    deadline = time.monotonic() + 60  # for the first status; compiling then has no limit
    while True:
        st = watch.poll(0.5)
        if daemon.poll() is not None:
            raise UserError(f"the ingest daemon exited ({daemon.returncode}); see {log_path}")
        if st is None:
            if time.monotonic() > deadline:
                raise UserError(f"the ingest daemon did not start; see {log_path}")
            continue
        if st.get("ready", True):
            return
        state = str(st.get("state", "starting")).split(" (")[0]
        if state != said and not state.startswith("loading"):  # a load takes a second
            said = state
            _say(f"ingest daemon: {st.get('state')}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 when the series was stored and read back."""
    import numpy as np

    from streamstore.errors import UserError

    if args.full:
        args.shape, args.fps = FULL_SHAPE, 0.0
        if args.frames == 2000:
            args.frames = 200
        if args.dark_frames == 40:
            args.dark_frames = 20
        if args.pool == 256:
            args.pool = 16
    if args.frames < 1 or args.dark_frames < 0 or args.fps < 0:
        raise UserError("--frames must be >= 1, --dark-frames and --fps >= 0")
    if not args.pixel_size > 0:
        raise UserError(f"--pixel-size must be > 0 Angstrom, got {args.pixel_size}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    sid = time.strftime("demo-%Y%m%d-%H%M%S")
    scratch = tempfile.TemporaryDirectory(prefix="streamstore-demo-truth-")
    truth_path = (out if args.truth else Path(scratch.name)) / f"{sid}.truth.h5"
    log_path = out / f"{sid}.ingest.log"
    data_ep = free_tcp_endpoint()
    status_ep = free_tcp_endpoint()
    n_series = 2 if args.dark_frames else 1
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, "-m", "streamstore"]
    _say(
        f"streamstore demo: {args.frames} frames {args.shape}, sent "
        f"{'as fast as possible' if not args.fps else f'at up to {args.fps:g} frames/s'}, "
        f"{args.dark_frames} dark frames first; files in {out.resolve()}"
    )
    t_start = time.monotonic()
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(
            [*base, "ingest", "--out", str(out), "--listen", data_ep,
             "--status-endpoint", status_ep, "--exit-after-series", str(n_series),
             "--idle-timeout", "60"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        watch = _StatusWatch(status_ep)
        emulator = None
        try:
            _wait_ready(daemon, watch, log_path)
            _say(f"ingest daemon {daemon.pid} listening on {data_ep} (log: {log_path})")
            emulator = subprocess.Popen(
                [*base, "emulate", "--connect", data_ep, "--shape", args.shape,
                 "--frames", str(args.frames), "--fps", str(args.fps),
                 "--dark-frames", str(args.dark_frames), "--dose-rate", str(args.dose_rate),
                 "--pattern", args.pattern, "--seed", str(args.seed), "--series-id", sid,
                 "--pixel-size", repr(args.pixel_size),
                 "--pool", str(args.pool), "--truth", str(truth_path), "--json"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            )  # fmt: skip
            _say(f"camera emulator {emulator.pid} making frames and streaming ...")
            deadline = time.monotonic() + args.timeout
            last_print = 0.0
            while daemon.poll() is None:
                st = watch.poll(0.5)
                if time.monotonic() > deadline:
                    raise UserError(f"the demo did not finish within {args.timeout:g} s")
                if emulator.poll() not in (None, 0):
                    break
                if st and time.monotonic() - last_print > 2.0:
                    last_print = time.monotonic()
                    _say(f"  {st['frames_received']:6d} frames received, "
                         f"{st['frames_stored']:6d} stored, {st['fps']:7.1f} frames/s, "
                         f"{st['events_per_s'] / 1e6:6.2f} M events/s, "
                         f"queue {100 * st['queue_fill']:3.0f}%")  # fmt: skip
            emu_out, emu_err = emulator.communicate(timeout=60)
        finally:
            if emulator is not None and emulator.poll() is None:
                emulator.kill()
                emulator.wait()
            _stop(daemon)
            watch.close()
    if emulator.returncode != 0:  # one line, as every error: the emulator's last one
        lines = emu_err.decode(errors="replace").strip().splitlines() or ["no message"]
        raise UserError(f"the emulator failed (exit {emulator.returncode}): {lines[-1]}")
    if daemon.returncode != 0:
        raise UserError(f"the ingest daemon failed (exit {daemon.returncode}); see {log_path}")
    sent = json.loads(emu_out.decode().strip().splitlines()[-1])
    try:
        return _report(args, out, sid, truth_path, sent, time.monotonic() - t_start, np)
    finally:
        scratch.cleanup()


def _report(args, out: Path, sid: str, truth_path: Path, sent: dict, wall_s: float, np) -> int:
    import streamstore

    path = out / f"{sid}.h5"
    store = streamstore.open(path)
    acc = store.accounting
    n = store.n_frames
    span = float(acc.get("receive_seconds") or 0.0)
    ingest_fps = (int(acc.get("received", n)) - 1) / span if span > 0 else float("nan")
    h, w = store.frame_shape
    frame_bytes = h * w * np.dtype(store.attrs["raw_dtype"]).itemsize
    _say("")
    _say(f"series {sid}: {h} x {w} frames, calibration from {store.attrs['calibration_source']}")
    _say(f"  frames sent {sent['frames']}, received {acc.get('received')}, stored "
         f"{acc.get('stored')}, missing {acc.get('missing')}, duplicate "
         f"{acc.get('duplicate')}, rejected {acc.get('rejected')}, "
         f"complete {acc.get('complete')}")  # fmt: skip
    # the same two rates `streamstore info` and `show` print, from the same file
    from streamstore.cli.info import summary

    s = summary(store, path)
    ft, sent_fps = s["frame_time_s"], s["measured_frame_rate_hz"]
    _say(f"  frame time {ft * 1e3:.6g} ms ({1 / ft:,.6g} frames/s while exposing); "
         f"sent at {sent_fps or float('nan'):,.6g} frames/s (timestamps, as `info` shows), "
         f"{sent_fps * frame_bytes / 1e9 if sent_fps else float('nan'):.3f} GB/s; "
         f"received by the daemon at {ingest_fps:.1f} frames/s")  # fmt: skip
    n_events = int(store.n_events)
    _say(f"  events: {n_events} ({n_events / max(n, 1):.0f} per frame, "
         f"{n_events / max(n, 1) / (h * w):.4f} e/px/frame)")  # fmt: skip
    if store.pixel_size_A:
        dose = store.dose(unit="e/A2", corrected=False)
        _say(f"  counted dose: {float(dose.sum()):.4g} e/A^2 in {n} frames, "
             f"{float(dose.mean()) if n else 0.0:.4g} e/A^2/frame "
             f"(pixel size {store.pixel_size_A:g} A)")  # fmt: skip
        if store.dose_corrected:  # what the store's dose() gives: coincidence loss corrected
            fixed = float(store.dose(unit="e/A2").sum())
            _say(f"  corrected dose: {fixed:.4g} e/A^2 in {n} frames ({store.dose_label})")
    _say(f"  bits/event: {store.bits_per_event:.2f} (file {path.stat().st_size / 1e6:.2f} MB, "
         f"raw frames {sent['bytes'] / 1e6:.0f} MB: "
         f"{sent['bytes'] / max(path.stat().st_size, 1):.0f} x smaller)")  # fmt: skip
    _score(store, truth_path, min(args.score_frames, n), np)
    if args.truth:
        _say(f"  ground truth: {truth_path.resolve()}")
    _say(f"  file: {path.resolve()}")
    _png(store, out / f"{sid}.png", sid)
    _say(f"demo finished in {wall_s:.1f} s")
    ok = acc.get("stored") == sent["frames"] and acc.get("missing") == 0
    store.close()
    if not ok:
        from streamstore.errors import UserError

        raise UserError("not every frame was stored (see the accounting above)")
    return 0


def _score(store: Any, truth_path: Path, k: int, np) -> None:
    from streamstore.camera.truth import Truth

    truth = Truth.load(truth_path)
    ids = np.asarray(store.frame_ids[:k])
    pos = {int(f): p for f, p in zip(truth.frame_ids, truth.positions, strict=True)}
    try:
        from streamstore.counting.accuracy import score_batch

        score = score_batch(store.events(0, k), [pos[int(i)] for i in ids])
    except ImportError as exc:
        _say(f"  recall/precision: skipped ({exc.name} is not installed)")
        return
    _say(f"  counting vs emulator truth (first {k} frames, match within 1 px): "
         f"recall {score.recall:.4f}, precision {score.precision:.4f}")  # fmt: skip


def _png(store: Any, path: Path, sid: str) -> None:
    from streamstore.errors import UserError

    try:
        from streamstore.analysis.plotting import save_summary

        save_summary(store, path, title=f"{sid}: {store.n_frames} frames")
    except UserError as exc:  # matplotlib is an optional extra
        _say(f"  summed image: skipped ({exc})")
        return
    _say(f"  summed image (and dose per frame): {path.resolve()}")
