"""The joint fit compiled: numba compiles the reference's own functions.

The reference (``_joint_reference.py``, the frame's rules, and
``_joint_group_reference.py``, the group fit) is written in the loops over
arrays numba compiles, so the kernel is that code, not a second copy of it:
each function of ``GROUP_FUNCTIONS`` and ``JOINT_FUNCTIONS`` is compiled with
the others compiled as its globals (numba's cache keys on each function's file,
so an edit there compiles anew). Without fastmath numba keeps every float64
operation as written, so the compiled fit matches the plain Python one bit for
bit; the C twin is ``native_ref/joint.c``.

A frame's fit is sequential (each cloud's refit sees the ones before it); frames
are independent and run on a thread pool, so the result does not depend on the
thread count.
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any

import numba
import numpy as np
from numba import njit

from streamstore._numba_cache import compiling_alone, serialize_saves
from streamstore.counting import _joint_group_reference as group
from streamstore.counting import _joint_reference as ref

__all__ = ["joint_frames"]

_OPTS = {"nogil": True, "cache": True, "error_model": "numpy", "boundscheck": False}
_pool: ThreadPoolExecutor | None = None
_ran = False


def _compile() -> Any:
    # one namespace for both modules' functions: each calls the others compiled
    space = {**vars(group), **vars(ref)}
    names = [(group, n) for n in group.GROUP_FUNCTIONS] + [(ref, n) for n in ref.JOINT_FUNCTIONS]
    for module, name in names:
        f = getattr(module, name)
        copy = types.FunctionType(f.__code__, space, f.__name__, f.__defaults__, f.__closure__)
        copy.__qualname__ = f.__qualname__
        space[name] = njit(**_OPTS)(copy)
    serialize_saves(*(space[name] for _, name in names))
    return space["joint_frame"]


_joint_frame = _compile()


def joint_frames(
    frames: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    e: float,
    width: float,
    cdf: np.ndarray,
    pdf: np.ndarray,
    t0: float,
    inv_h: float,
    conf: np.ndarray,
    threads: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each frame's ``(signal, iv, starts)`` fitted (``_joint_reference.joint_frame``),
    frames on ``threads`` threads (None: numba's thread count); one ``(clouds,
    event)`` a frame, in order. ``frames`` is read as the fits go: an iterator holds
    only the frames in flight (a full frame's inputs are 0.4 GB)."""
    global _pool, _ran
    conf = np.asarray(conf, np.float64)

    def one(f: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        signal, iv, starts, c, p = ref.joint_inputs(*f, cdf, pdf)
        return _joint_frame(signal, iv, starts, float(e), float(width), c, p, float(t0),
                            float(inv_h), conf)  # fmt: skip

    out = []
    rest = iter(frames)
    if not _ran:  # compiled (or loaded) once under the cache's lock
        first = next(rest, None)
        if first is None:
            return out
        with compiling_alone(_joint_frame):
            out.append(one(first))
        _ran = True
    k = numba.config.NUMBA_NUM_THREADS if threads is None else int(threads)
    if k <= 1:
        return out + [one(f) for f in rest]
    if _pool is None:
        _pool = ThreadPoolExecutor(
            max_workers=numba.config.NUMBA_NUM_THREADS, thread_name_prefix="streamstore-joint"
        )
    # at most k frames in flight: the caller's thread count holds
    while chunk := list(islice(rest, k)):
        out += list(_pool.map(one, chunk))
    return out
