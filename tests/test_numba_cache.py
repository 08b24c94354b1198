"""numba's on-disk cache filled by several processes at once stays right."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("fcntl")

TYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "float32"]

KERNEL = textwrap.dedent(
    """
    import numba
    import numpy as np

    from streamstore._numba_cache import serialize_saves


    @numba.njit(cache=True)
    def step(a):
        out = np.empty_like(a)
        for i in range(a.size):
            out[i] = a[i] * 3 + 1
        return out


    serialize_saves(step)
    """
)

COMPILE = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import numba.core.caching as caching

    # a slow file system (NFS, a loaded disk): the index is written a while after it
    # was read, the window in which another process's save can interleave
    write_index = caching.IndexDataCacheFile._save_index

    def slow_write(self, overloads):
        time.sleep(0.3)
        write_index(self, overloads)

    caching.IndexDataCacheFile._save_index = slow_write
    import kernel_mod
    t0 = float(sys.argv[1])
    # every process starts compiling at the same moment (to a millisecond or so: a
    # sleep, where a busy wait burnt the CPU the other processes were importing on)
    time.sleep(max(0.0, t0 - time.time()))
    for name in sys.argv[2:]:
        kernel_mod.step(np.full(4, 5, name))
    """
)

CHECK = textwrap.dedent(
    """
    import sys
    import numpy as np
    import kernel_mod
    for name in sys.argv[1:]:
        got = kernel_mod.step(np.full(4, 5, name))
        assert got.dtype == np.dtype(name) and (got == 16).all(), (name, got)
    misses = sum(kernel_mod.step._cache_misses.values())
    assert misses == 0, f"{misses} signatures were compiled again: the cache lost them"
    print(len(kernel_mod.step.signatures))
    """
)


def test_processes_compiling_one_function_at_once_lose_no_signature(tmp_path):
    """Eight signatures of one cached function, compiled by four processes started
    together: each save reads, extends and rewrites the function's one index, so
    without a lock two of them can take the same data file (the index writes are
    slowed to make that window wide, as on a slow file system). Afterwards a fresh
    process loads every signature from the cache and each computes in its own type."""
    import time

    (tmp_path / "kernel_mod.py").write_text(KERNEL)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *[p for p in sys.path if p]])
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "cache")
    start = time.time() + 3.0  # after every interpreter has imported numba
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", COMPILE, str(start), *TYPES[k::4]], env=env, cwd=tmp_path
        )
        for k in range(4)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0, 0]
    out = subprocess.run(
        [sys.executable, "-c", CHECK, *TYPES],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == len(TYPES)
    locks = list((tmp_path / "cache").rglob("*.lock"))
    assert locks, "the saves took no lock"
