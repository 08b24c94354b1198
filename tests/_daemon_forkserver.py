"""Start the tests' ingest daemons from a warm process: ``streamstore.cli.main`` in a fork.

Every ``python -m streamstore ingest`` the tests start pays the same start-up
before it runs a line of daemon code: the interpreter, numpy, numba and its
target registries (scipy's BLAS among them), blosc2, h5py and ZeroMQ, and the
counting kernels loaded from numba's cache: about 2.2 s of CPU time each, some
190 s of the suite's 700 on a clean clone. A multiprocessing *forkserver*
pays it once per test worker (its preload, :mod:`tests._daemon_preload`, loads
every kernel) and forks a daemon per request, which runs the command
line exactly as ``python -m streamstore`` does (``main(argv)``, its exit status)
with the test's environment and its stderr in the test's log file.

The fork is the daemon: the same code from ``main`` on, its own process,
signals, sockets and files. What it does not repeat is the interpreter's
start-up, which the tests of start-up (``test_ingest_startup.py``, the demo,
the cold-cache checks) keep running for real: :class:`tests._ingest_harness.Daemon`
starts a fresh interpreter wherever a test wraps the command (``prefix``) or
sets numba's environment, and when asked (``fork=False``).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from typing import Any

__all__ = ["ForkedDaemon", "fork_daemon"]

_ctx: Any = None
_lock = threading.Lock()


def _run(argv: list[str], env: dict[str, str], log_path: str, cwd: str, umask: int) -> None:
    """The forked daemon: the test's environment, working directory and umask (a
    subprocess would inherit them), stdin and stdout on /dev/null, stderr into the
    log; then what ``python -m streamstore`` runs."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    os.umask(umask)
    null = os.open(os.devnull, os.O_RDWR)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)
    from streamstore.cli import main

    sys.exit(main(argv))


class ForkedDaemon:
    """The :class:`subprocess.Popen` calls the harness makes, on a forked daemon."""

    def __init__(self, proc: Any) -> None:
        self._proc = proc

    @property
    def pid(self) -> int:
        return int(self._proc.pid)

    @property
    def returncode(self) -> int | None:
        return self._proc.exitcode

    def poll(self) -> int | None:
        return self._proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        import subprocess

        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired("forked streamstore ingest", timeout or 0.0)
        return int(self._proc.exitcode)

    def send_signal(self, sig: int) -> None:
        if self._proc.exitcode is None:
            os.kill(self._proc.pid, sig)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)


def fork_daemon(argv: list[str], env: dict[str, str], log_path: str) -> ForkedDaemon:
    """``streamstore <argv>`` forked from the warm forkserver (started at the first call)."""
    global _ctx
    with _lock:
        if _ctx is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["tests._daemon_preload"])
            _ctx = ctx
    umask = os.umask(0o022)  # read it: only setting it returns it
    os.umask(umask)
    args = (argv, env, log_path, os.getcwd(), umask)
    proc = _ctx.Process(target=_run, args=args, name="streamstore-ingest")
    proc.start()
    return ForkedDaemon(proc)
