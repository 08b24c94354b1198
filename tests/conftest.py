"""Shared fixtures: small frames, seeded randomness, ZeroMQ endpoints, kernels compiled once."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streamstore.cli import free_tcp_endpoint

# The suite starts some 250 Python processes (daemons, CLI commands, readers). Where
# the environment forbids bytecode files, every one of them compiled the same
# streamstore modules from source again (about 0.2 s CPU each); this process and
# every process it starts may write them (Python writes a .pyc atomically, so
# processes starting together do not clash).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

# small frames: the suite runs on 2 cores in minutes
SMALL_SHAPE = (256, 384)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_auto_num_workers(config) -> int:
    """Test workers for ``-n logical`` (pyproject.toml): one more than the CPUs.

    Many tests wait on daemons, sockets and timeouts (their daemons forked warm,
    :mod:`tests._daemon_forkserver`, cost little CPU): with one worker per CPU the
    two cores of the reference machine were busy 72 % of the run, and a third
    worker took the clean-clone run from 5 min 43 s to 5 min 29 s.
    ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still overrides it, as in pytest-xdist."""
    value = os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS", "").strip()
    if value:
        return int(value)
    return len(os.sched_getaffinity(0)) + 1


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261125)


@pytest.fixture
def tcp_endpoint() -> str:
    """A tcp loopback endpoint on a currently free port."""
    return free_tcp_endpoint()


@pytest.fixture
def ipc_endpoint(tmp_path) -> str:
    """An ipc endpoint in the test's temporary directory."""
    return f"ipc://{tmp_path / f'sock-{os.getpid()}'}"


@pytest.fixture
def zmq_ctx():
    """A ZeroMQ context whose sockets never linger at teardown."""
    import zmq

    ctx = zmq.Context()
    ctx.setsockopt(zmq.LINGER, 0)
    yield ctx
    ctx.destroy(linger=0)


#: The folder of the test modules that start ingest daemons.
_DAEMON_DIR = Path(__file__).resolve().parent / "daemon"
#: Source text that marks a module outside that folder as one that starts an ingest
#: daemon too: the harness, the fixture, the command (a module that mostly tests
#: something else may hold one daemon test).
_DAEMON_MARKS = ("_ingest_harness", "start_daemon", "IngestDaemon", '"ingest"', '"demo"')


def _starts_daemons(path: Path, seen: dict[Path, bool]) -> bool:
    if path not in seen:
        if _DAEMON_DIR in path.resolve().parents:
            seen[path] = True
        else:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                text = ""
            seen[path] = any(mark in text for mark in _DAEMON_MARKS)
    return seen[path]


#: The modules of the longest wall time, longest first (measured over the whole
#: suite, 2 test workers on 2 cores). Test workers (pytest-xdist, ``--dist
#: loadfile`` in pyproject.toml) take whole modules in this order: the long ones
#: early, so the last modules handed out are short and both workers end together.
#: A module missing here only costs balance, never a test.
_LONGEST_FIRST = (
    "daemon/test_reliability_series.py",
    "daemon/test_scaling.py",
    "daemon/test_reliability_kill.py",
    "daemon/test_security.py",
    "daemon/test_ingest.py",
    "store/test_store.py",
    "daemon/test_fuzz_ingest.py",
    "daemon/test_reliability_readers.py",
    "daemon/test_demo.py",
    "daemon/test_reliability_memory.py",
    "cli/test_cli_export.py",
    "store/test_integrity.py",
    "cli/test_cli_show.py",
    "daemon/test_reliability.py",
)
_TESTS_DIR = Path(__file__).resolve().parent


def _module_rank(path: Path, seen: dict[Path, bool]) -> int:
    try:
        return _LONGEST_FIRST.index(path.resolve().relative_to(_TESTS_DIR).as_posix())
    except ValueError:  # not listed (or outside tests/): daemon modules, then the rest
        return len(_LONGEST_FIRST) + (not _starts_daemons(path, seen))


def pytest_collection_modifyitems(session, config, items):
    """The longest modules first, then the other modules that start daemons (they hold
    most of the suite's wall time), so that test workers (pytest-xdist) end together."""
    seen: dict[Path, bool] = {}
    items.sort(key=lambda item: _module_rank(Path(str(item.fspath)), seen))


#: Compiles the resolve rule's kernel (one overload: 8-bit and wrapped frames go
#: through the 16-bit one); no daemon warms it: only the counting tests and the
#: accuracy benchmark use it.
_WARM_RESOLVE = """
import numpy as np
from streamstore import Calibration
from streamstore.counting import Counter
cal = Calibration(np.full((8, 70), 10.0), np.ones((8, 70)))
Counter(cal, np.uint16, method="resolve", dose=False, electron_charge=20.0)(
    np.zeros((1, 8, 70), np.uint16)
)
"""


#: Source text that marks a test module as one that counts with the resolve rule.
_RESOLVE_MARKS = ('method="resolve"', "import accuracy")


def _uses_resolve(path: Path) -> bool:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return False
    return any(mark in text for mark in _RESOLVE_MARKS)


@pytest.fixture(scope="session", autouse=True)
def _counting_kernels_compiled_once(request, tmp_path_factory):
    """A daemon compiles or loads every counting kernel variant before it listens.
    Where the run starts daemons, compile them once here, first: numba's disk
    cache then serves each daemon in about a second, and the counting tests reuse
    the same variants (on a clean clone each compiles once per run, not per test).
    Test workers share the compile: the first to take the lock fills the cache
    (one compiling child interpreter per CPU), the others wait and then load.
    Where the run also counts with the resolve rule, its kernel compiles beside
    them (else a test of each worker met it at once, one compiling, one waiting)."""
    seen: dict[Path, bool] = {}
    paths = {Path(str(item.fspath)) for item in request.session.items}
    if any(_starts_daemons(p, seen) for p in paths):
        resolve = any(_uses_resolve(p) for p in paths)
        lock = tmp_path_factory.getbasetemp().parent / "streamstore-kernels.lock"
        with open(lock, "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            # in a child process: minutes of compiling in this one would run into
            # faulthandler_timeout, whose traceback dump crashed inside numba's codegen
            code = "from streamstore.counting.warmup import warm_kernels; warm_kernels()"
            beside = subprocess.Popen([sys.executable, "-c", _WARM_RESOLVE]) if resolve else None
            try:
                subprocess.run([sys.executable, "-c", code], check=True, timeout=1800)
            finally:
                if beside is not None and beside.wait(timeout=1800) != 0:
                    raise RuntimeError("compiling the resolve kernel for the tests failed")
