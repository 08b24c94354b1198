"""A real ``streamstore ingest`` subprocess for the reliability, fuzz and security tests.

:class:`Daemon` starts the daemon with ``--status-endpoint`` and reads its
JSON status (the same the operator sees with ``streamstore status``) to know
when it listens (``ready``) and what it has counted. :class:`Series` holds a pool of
small emulated frames, the calibration the daemon is given with
``--calibration`` and the events ``streamstore.count`` finds in each frame, so
a test can check every stored frame against the truth.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

#: frame shape of these tests: small, non-square
SHAPE = (64, 96)


def free_endpoint() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class Series:
    """A pool of emulated frames plus the calibration and the expected events.

    Frame ``i`` of any series is ``frames[i % len(frames)]``.
    """

    def __init__(self, tmp: Path, shape=SHAPE, pool: int = 16, seed: int = 7) -> None:
        from streamstore.camera.emulator import CameraEmulator
        from streamstore.counting import count
        from streamstore.counting.calibration import Calibration

        emu = CameraEmulator(shape, seed=seed, dose_rate_e_per_px_s=30.0, frame_time_s=1e-3)
        dark, _ = emu.dark_frames(16)
        self.calibration = Calibration.from_dark_frames(dark)
        self.calibration_path = tmp / "calibration.h5"
        self.calibration.save(self.calibration_path)
        self.frames, _ = emu.generate(pool)
        self.shape = shape
        self.frame_nbytes = int(self.frames[0].nbytes)
        batch = count(self.frames, self.calibration)
        self.expected = [batch.frame(i).indices.copy() for i in range(pool)]

    def frame(self, i: int) -> np.ndarray:
        return self.frames[i % len(self.frames)]

    def expected_indices(self, i: int) -> np.ndarray:
        return self.expected[i % len(self.expected)]

    def start(self, series_id: str, n_frames: int | None = None, **kw: Any) -> list[bytes]:
        from streamstore.link import protocol

        return protocol.encode_start(
            protocol.Start(
                series_id=series_id,
                frame_shape=self.shape,
                dtype="uint16",
                frame_time_s=1e-3,
                n_frames=n_frames,
                **kw,
            )
        )

    def image(self, series_id: str, i: int) -> list[Any]:
        from streamstore.link import protocol

        return protocol.encode_image(series_id, i, 1_000_000 * i, self.frame(i))

    @staticmethod
    def end(series_id: str, n: int) -> list[bytes]:
        from streamstore.link import protocol

        return protocol.encode_end(series_id, n)

    def check_store(self, store: Any) -> int:
        """Assert every stored frame's events equal ``count`` of its frame; return the count."""
        ids = store.frame_ids
        if ids.size:
            batch = store.events(0, store.n_frames)
            for k, fid in enumerate(ids.tolist()):
                got = batch.frame(k).indices
                exp = self.expected_indices(fid)
                if not np.array_equal(got, exp):
                    raise AssertionError(
                        f"{store.path}: frame {fid} has {got.size} events, expected {exp.size} "
                        "(or they differ)"
                    )
        return int(ids.size)


class Daemon:
    """``streamstore ingest`` in its own process, with its status on a SUB socket.

    By default the process is forked from a warm forkserver
    (:mod:`tests._daemon_forkserver`: the command line run as ``python -m
    streamstore`` runs it, without the interpreter's start-up each time); a fresh
    ``python -m streamstore ingest`` where ``prefix`` wraps the command, ``env``
    sets numba's variables, or ``fork=False``.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        listen: str | None = None,
        connect: str | None = None,
        calibration: Path | None = None,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
        log_path: Path | None = None,
        threads: int | None = 1,
        fork: bool | None = None,
    ) -> None:
        import zmq

        self.out_dir = Path(out_dir)
        self.listen = listen or free_endpoint()
        self.status_endpoint = free_endpoint()
        self.log_path = log_path or self.out_dir.parent / f"ingest-{time.monotonic_ns()}.log"
        argv = [
            "ingest",
            "--out",
            str(self.out_dir),
            *(("--connect", connect) if connect else ("--listen", self.listen)),
            "--status-endpoint",
            self.status_endpoint,
            *(() if threads is None else ("--threads", str(threads))),
            *args,
        ]
        if calibration is not None:
            argv += ["--calibration", str(calibration)]
        full_env = dict(os.environ)
        full_env.update(env or {})
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        if fork is None:  # a fresh interpreter where the test wraps it or sets numba's env
            fork = not prefix and not any(k.startswith("NUMBA_") for k in env or {})
        self.proc: Any
        if fork:  # streamstore.cli.main(argv) forked from a warm process
            from tests._daemon_forkserver import fork_daemon

            self.proc = fork_daemon(argv, full_env, str(self.log_path))
        else:
            cmd = [*prefix, sys.executable, "-m", "streamstore", *argv]
            self.proc = subprocess.Popen(
                cmd,
                stdout=subprocess.DEVNULL,
                stderr=self._log,
                stdin=subprocess.DEVNULL,
                env=full_env,
            )
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(self.status_endpoint)
        self.last: dict[str, Any] | None = None
        self.statuses: list[dict[str, Any]] = []

    # -- status -------------------------------------------------------------
    def _take(self, timeout_s: float) -> bool:
        if not self.sub.poll(int(timeout_s * 1000)):
            return False
        while True:
            self.last = json.loads(self.sub.recv())
            self.statuses.append(self.last)
            if not self.sub.poll(0):
                return True

    def wait_until(self, pred, timeout_s: float = 60.0, what: str = "condition") -> dict[str, Any]:
        """Read statuses until ``pred(status)`` holds; fail with the log if it never does."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._take(0.5) and pred(self.last):
                return self.last  # type: ignore[return-value]
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited ({self.proc.returncode}) waiting for {what}:\n{self.log()}"
                )
        raise AssertionError(f"timed out waiting for {what}; last status {self.last}\n{self.log()}")

    def wait_ready(self, timeout_s: float = 600.0) -> dict[str, Any]:
        """Wait for the status that says the daemon listens (its counting kernels are
        compiled or loaded first: minutes on a cold numba cache, about a second warm)."""
        return self.wait_until(lambda st: st.get("ready") is True, timeout_s, "a ready status")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    # -- life -------------------------------------------------------------------
    def pid(self) -> int:
        return self.proc.pid

    def rss_bytes(self) -> int:
        import psutil

        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def stop(self, timeout_s: float = 30.0, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` (SIGTERM) and wait; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        finally:
            self.close()

    def wait_exit(self, timeout_s: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            self.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        if not self.sub.closed:
            self.sub.close(0)
            self.ctx.term()
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def final_summary(self) -> dict[str, Any]:
        """Numbers of the daemon's last log line ("stopped: ...")."""
        text = self.log()
        m = re.search(
            r"stopped: (\d+) series, (\d+) frames received, (\d+) stored, (\d+) missing, "
            r"(\d+) duplicate, (\d+) rejected (\{.*?\}); peak buffer ([\d.]+) MB",
            text,
        )
        if m is None:
            raise AssertionError(f"no final summary in the daemon log:\n{text[-3000:]}")
        keys = ("series", "received", "stored", "missing", "duplicate", "rejected")
        out: dict[str, Any] = {k: int(m.group(i + 1)) for i, k in enumerate(keys)}
        out["peak_buffer_mb"] = float(m.group(8))
        return out


def send_series(
    sock: Any, series: Series, sid: str, ids, *, start: int | None = None, end: int | None = None
) -> None:
    """Send ``series``' images ``ids`` of ``sid`` on ``sock``, with a start and an end if given
    (their ``n_frames``)."""
    if start is not None:
        sock.send_multipart(series.start(sid, start))
    for i in ids:
        sock.send_multipart(series.image(sid, i), copy=False)
    if end is not None:
        sock.send_multipart(series.end(sid, end))


def pusher(ctx: Any, endpoint: str, *, sndhwm: int = 1000, curve: Any = None) -> Any:
    """A PUSH socket connected to ``endpoint`` (``curve``: a callable that sets CURVE options)."""
    import zmq

    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, sndhwm)
    if curve is not None:
        curve(s)
    s.connect(endpoint)
    return s


def h5_files(out_dir: Path) -> list[Path]:
    return sorted(p for p in Path(out_dir).glob("*.h5") if "calibration" not in p.name)
