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
sets numba's environment, and when asked (``fork=False``). The reliability tests'
reader processes (``python -c`` scripts that open the files the daemon writes)
fork from the same server (:func:`fork_python`).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = ["ForkedProcess", "fork_daemon", "fork_python"]

_ctx: Any = None
_lock = threading.Lock()


def _redirect(env: dict[str, str], cwd: str, umask: int, out: str, err: str) -> None:
    """The test's environment, working directory and umask (a subprocess would
    inherit them); stdin on /dev/null, stdout and stderr into files (or /dev/null)."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    os.umask(umask)
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, path in ((0, os.devnull), (1, out), (2, err)):
        flags = os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_APPEND | os.O_CREAT
        f = os.open(path, flags, 0o644)
        os.dup2(f, fd)
        os.close(f)


def _run(argv: list[str], env: dict[str, str], log_path: str, cwd: str, umask: int) -> None:
    """The forked daemon: stderr into the log; then what ``python -m streamstore`` runs."""
    _redirect(env, cwd, umask, os.devnull, log_path)
    from streamstore.cli import main

    sys.exit(main(argv))


def _run_code(code: str, argv: list[str], env: dict[str, str], cwd: str, umask: int,
              out_path: str) -> None:  # fmt: skip
    """A forked ``python -c code *argv``: stdout into ``out_path``, stderr beside it."""
    _redirect(env, cwd, umask, out_path, out_path + ".err")
    sys.argv = ["-c", *argv]
    exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})


class ForkedProcess:
    """The :class:`subprocess.Popen` calls the tests make, on a forked process."""

    def __init__(self, proc: Any, out: str | None = None) -> None:
        self._proc = proc
        self._out = out

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
            raise subprocess.TimeoutExpired("forked process", timeout or 0.0)
        return int(self._proc.exitcode)

    def send_signal(self, sig: int) -> None:
        if self._proc.exitcode is None:
            os.kill(self._proc.pid, sig)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait, then the stdout and stderr a :func:`fork_python` process wrote."""
        self.wait(timeout)
        out = Path(self._out or os.devnull)
        err = Path(f"{self._out}.err" if self._out else os.devnull)
        return out.read_text(errors="replace"), err.read_text(errors="replace")


def _context() -> Any:
    global _ctx
    with _lock:
        if _ctx is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["tests._daemon_preload"])
            _ctx = ctx
    return _ctx


def _umask() -> int:
    umask = os.umask(0o022)  # read it: only setting it returns it
    os.umask(umask)
    return umask


def fork_daemon(argv: list[str], env: dict[str, str], log_path: str) -> ForkedProcess:
    """``streamstore <argv>`` forked from the warm forkserver (started at the first call)."""
    args = (argv, env, log_path, os.getcwd(), _umask())
    proc = _context().Process(target=_run, args=args, name="streamstore-ingest")
    proc.start()
    return ForkedProcess(proc)


def fork_python(code: str, argv: list[str], out_path: Path) -> ForkedProcess:
    """``python -c code *argv`` forked from the warm forkserver, in this process's
    environment; its stdout goes to ``out_path`` (``communicate`` reads it): the
    reader processes of the reliability tests, which import streamstore, h5py and
    numba's kernels as a daemon does."""
    Path(out_path).write_bytes(b"")
    args = (code, argv, dict(os.environ), os.getcwd(), _umask(), str(out_path))
    proc = _context().Process(target=_run_code, args=args, name="python-c")
    proc.start()
    return ForkedProcess(proc, str(out_path))
