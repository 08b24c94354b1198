"""Histogram passes of :mod:`streamstore.counting.robust` over integer samples.

Each takes the sample as a read-only contiguous int64 array (one compiled
signature) and does in one pass what numpy would in several: its range, its
counts per value, and the values of a clipped core in the sample's order.
"""

from __future__ import annotations

import numba
import numpy as np

from streamstore._numba_cache import serialize_saves

_OPTS = {"nogil": True, "cache": True, "error_model": "numpy", "boundscheck": False}


@numba.njit(**_OPTS)
def _int_span(x):  # pragma: no cover - compiled
    """The smallest and largest of ``x`` (not empty)."""
    lo = x[0]
    hi = x[0]
    for i in range(x.size):
        v = x[i]
        lo = min(lo, v)
        hi = max(hi, v)
    return lo, hi


@numba.njit(**_OPTS)
def _bin_counts(x, lo, counts):  # pragma: no cover - compiled
    """Add one to ``counts[v - lo]`` for each value ``v`` of ``x``."""
    for i in range(x.size):
        counts[x[i] - lo] += 1


@numba.njit(**_OPTS)
def _core_values(x, lo, keep, out):  # pragma: no cover - compiled
    """The values ``v`` of ``x`` with ``keep[v - lo]``, in order, as float64 into
    the front of ``out`` (at least as long as ``x``): how many."""
    n = 0
    for i in range(x.size):
        v = x[i]
        out[n] = np.float64(v)  # written always, kept by the count: no branch
        n += np.int64(keep[v - lo])
    return n


# the start-up's compile workers may save these at once (streamstore._numba_cache)
serialize_saves(_int_span, _bin_counts, _core_values)
