"""Compile (or load from numba's on-disk cache) every counting kernel variant ahead of use.

A numba kernel is compiled for each combination of argument types it meets;
from an empty cache (a fresh install, an upgrade) one counting variant takes
tens of seconds. A daemon that met them one by one would stall inside its first
series, so it calls :func:`warm_kernels` before it listens: the variants of
:data:`~streamstore.counting._kernels.VARIANTS` (frame type, dark-map form,
row type) plus the event encoder the writer runs. Sub-pixel output, the thread
count, the gain flag and the X-ray level are run-time values: no variant each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["kernel_variants", "warm_kernels"]


def kernel_variants(gain: bool = True) -> list[dict[str, Any]]:
    """The counting kernel variants a calibration can lead to.

    Parameters
    ----------
    gain : bool, default True
        Include the variants only a gain map leads to (a calibration file
        with a gain map; dark series and estimates have none).
    """
    from streamstore.counting._kernels import VARIANTS

    return [dict(v) for v in VARIANTS if gain or not v["gain"]]


def _variant_args(v: dict[str, Any]) -> tuple[Any, ...]:
    """Tiny frames and maps of the types of variant ``v``: ``count_frames`` arguments."""
    from streamstore.counting._kernels import row_type

    h, w = 3, 70  # a full 64-pixel block and a scalar tail; the types are what matter
    fdt, ddt = np.dtype(v["frames"]), np.dtype(v["dmap"])
    frames = np.zeros((1, h, w), fdt)
    dark = np.zeros((h, w), fdt)
    lo = dark + fdt.type(1)
    base = np.zeros(h, np.int64)
    compact = ddt.itemsize < fdt.itemsize
    tmap = np.ones((h, w), np.uint8 if compact else f"u{fdt.itemsize}")
    maps = (np.zeros((h, w), ddt), base, tmap)
    gain = np.ones((h, w), np.uint16) if v["gain"] else None
    wide = v["rows"] == "uint16"
    got = row_type(fdt, ddt, gain is not None, wide)[0]
    if np.dtype(got) != np.dtype(v["rows"]):  # the table and row_type disagree
        raise RuntimeError(f"kernel variant {v} gets {np.dtype(got)} rows")
    return frames, lo, dark, gain, 2**62, 1, False, 1, maps, wide


def _compiled(dispatchers: list[Any]) -> int:
    """How many overloads these numba dispatchers compiled (not loaded from cache)."""
    return sum(sum(getattr(d, "_cache_misses", {}).values()) for d in dispatchers)


def warm_kernels(
    gain: bool = True,
    progress: Callable[[int, int, dict[str, Any], int], None] | None = None,
) -> dict[str, Any]:
    """Compile or load every counting kernel variant and the event encoder.

    Parameters
    ----------
    gain : bool, default True
        Also the variants only a gain map leads to (see :func:`kernel_variants`).
    progress : callable, optional
        Called as ``progress(i, n, variant, compiled)`` before variant ``i`` of
        ``n`` (the encoder is the last, ``{"name": "gap_encode"}``), ``compiled``
        the kernel overloads compiled so far (0 while everything comes from the
        cache).

    Returns
    -------
    dict
        ``variants`` (how many), ``compiled`` (how many kernel overloads had to be
        compiled: 0 from a warm cache) and ``seconds``.
    """
    from streamstore.counting import _kernels as k
    from streamstore.store import _kernels as codec_kernels
    from streamstore.store.codec import gap_encode

    t0 = time.perf_counter()
    dispatchers = [k._count_items, k._compact, k._gather, k._compact_maps, codec_kernels.gap_encode]
    before = _compiled(dispatchers)
    variants = kernel_variants(gain)
    n = len(variants) + 1
    for i, v in enumerate(variants):
        if progress is not None:
            progress(i, n, v, _compiled(dispatchers) - before)
        args = _variant_args(v)
        k.count_frames(*args[:7], threads=args[7], maps=args[8], wide_rows=args[9])
    lo = np.ones((3, 70), np.uint16)
    k.kernel_maps(lo, lo - np.uint16(1))  # the compact maps' builder
    if progress is not None:
        progress(n - 1, n, {"name": "gap_encode"}, _compiled(dispatchers) - before)
    gap_encode(np.array([1, 5], np.uint32), np.array([0, 2], np.int64), 10)
    return {
        "variants": len(variants),
        "compiled": _compiled(dispatchers) - before,
        "seconds": time.perf_counter() - t0,
    }
