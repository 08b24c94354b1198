"""The preload of the tests' daemon forkserver (:mod:`tests._daemon_forkserver`).

Imported by the forkserver alone: the daemon's code, and every counting kernel
loaded from numba's cache (the session's compile filled it), single-threaded,
since a fork copies only the calling thread.
"""

from __future__ import annotations

import threading

import blosc2  # noqa: F401 - the writer's codec, imported at the first chunk
import h5py  # noqa: F401
import hdf5plugin  # noqa: F401
import zmq  # noqa: F401

from streamstore.cli import main  # noqa: F401 - the command line and the modules it reaches
from streamstore.counting.warmup import warm_kernels
from streamstore.ingest import daemon  # noqa: F401
from streamstore.store import writer  # noqa: F401

warm_kernels(processes=1)
if threading.active_count() != 1:  # pragma: no cover - a fork would copy a broken pool
    raise RuntimeError("the daemon forkserver started threads while it loaded the kernels")
