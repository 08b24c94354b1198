"""Compile (or load from numba's on-disk cache) every counting kernel variant ahead of use.

A numba kernel is compiled for each combination of argument types it meets;
from an empty cache (a fresh install, an upgrade) one counting variant takes
tens of seconds. A daemon that met them one by one would stall inside its first
series, so it calls :func:`warm_kernels` before it listens: the variants of
:data:`~streamstore.counting._maps.VARIANTS` (frame type, dark-map form, row
type, maps of one value) plus the event encoder and chunk checksum the writer
runs, the dose correction's kernels (:mod:`streamstore.counting.dose`) and the
data-only dark estimator's kernels (a camera without a dark series). Sub-pixel
output, the thread count, the gain flag and the X-ray level are run-time values:
no variant each.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
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
    from streamstore.counting._maps import VARIANTS

    return [dict(v) for v in VARIANTS if gain or not v["gain"]]


def _variant_args(v: dict[str, Any]) -> tuple[Any, ...]:
    """Tiny frames and maps of the types of variant ``v``: ``count_frames`` arguments."""
    from streamstore.counting._maps import frame_only_maps, row_type

    h, w = 3, 70  # a full 64-pixel block and a scalar tail; the types are what matter
    fdt, ddt = np.dtype(v["frames"]), np.dtype(v["dmap"])
    frames = np.zeros((1, h, w), fdt)
    dark = np.zeros((h, w), fdt)
    lo = dark + fdt.type(1)
    base = np.zeros(h, np.int64)
    compact = ddt.itemsize < fdt.itemsize
    tmap = np.ones((h, w), np.uint8 if compact else f"u{fdt.itemsize}")
    maps = (np.zeros((h, w), ddt), base, tmap)
    if v.get("frame_only"):  # one dark level and threshold: the maps' one-value form
        maps = (*maps, *frame_only_maps(maps, fdt))
    gain = np.ones((h, w), np.uint16) if v["gain"] else None
    wide = v["rows"] == "uint16"
    got = row_type(fdt, ddt, gain is not None, wide)[0]
    if np.dtype(got) != np.dtype(v["rows"]):  # the table and row_type disagree
        raise RuntimeError(f"kernel variant {v} gets {np.dtype(got)} rows")
    return frames, lo, dark, gain, 2**62, 1, False, 1, maps, wide


def _compiled(dispatchers: list[Any]) -> int:
    """How many overloads these numba dispatchers compiled (not loaded from cache)."""
    return sum(sum(getattr(d, "_cache_misses", {}).values()) for d in dispatchers)


def _warm_variant(i: int, gain: bool) -> int:
    """Compile or load variant ``i`` of :func:`kernel_variants` (the event encoder
    when ``i`` is past the last): how many kernel overloads this compiled."""
    from streamstore.counting import _kernels as k
    from streamstore.counting._launch import count_frames
    from streamstore.counting._maps import _compact_maps, kernel_maps
    from streamstore.store import _kernels as codec_kernels
    from streamstore.store.codec import gap_encode

    dispatchers = [k._count_items, k._compact, k._gather, _compact_maps, codec_kernels.gap_encode]
    before = _compiled(dispatchers)
    variants = kernel_variants(gain)
    if i < len(variants):
        args = _variant_args(variants[i])
        count_frames(*args[:7], threads=args[7], maps=args[8], wide_rows=args[9])
        if i == 0:
            lo = np.ones((3, 70), np.uint16)
            kernel_maps(lo, lo - np.uint16(1))  # the compact maps' builder
        return _compiled(dispatchers) - before
    if i == len(variants):  # what the writer runs on every chunk
        from streamstore.store import checksum

        dispatchers.append(checksum._get_kernel())
        before = _compiled(dispatchers)
        gap_encode(np.array([1, 5], np.uint32), np.array([0, 2], np.int64), 10)
        checksum.seal(bytes(5))  # the chunk's Fletcher-32, over read-only bytes as written
        return _compiled(dispatchers) - before + _warm_dose()
    # a camera with no dark series: the per-pixel estimate from its frames
    return _warm_estimator()


def _warm_dose() -> int:
    """Run the dose correction's kernels (pairs, and the charge sums on both frame
    widths: wrapped, signed frames are read as their unsigned bits, the same
    overloads): how many kernel overloads this compiled (not those this process
    compiled before)."""
    from streamstore.counting import charge, coincidence
    from streamstore.counting.tile_dose import _coarse_of, _tile_geometry
    from streamstore.events import EventBatch

    dispatchers = [
        coincidence._pair_histogram_kernel,
        coincidence._pool_tiles_kernel,
        coincidence._lookup_events_kernel,
        coincidence._lookup_tiles_kernel,
        coincidence._coarse_counts_kernel,
        charge._tile_charge_kernel,
        charge._window_charge_kernel,
    ]
    before = _compiled(dispatchers)

    b = EventBatch(np.array([0, 2]), np.array([3, 75], np.uint32), frame_shape=(8, 70))
    coincidence.pair_histogram(b, 5)
    coincidence.pool_tiles(b.indices, 70, 8, 9, np.zeros(9, np.float64))
    classes = _tile_geometry(8, 70, 8)[1]  # read-only, as the estimator passes it: its type
    coarse_of = _coarse_of(8, 70, 8, 4)  # read-only as well
    own = np.ones(3, np.bool_)
    coincidence.lookup_events(np.arange(9), np.zeros(9), classes, np.ones((4, 1)), coarse_of,
                              own, np.ones(3))  # fmt: skip
    coincidence.lookup_tiles(np.zeros(9), classes, np.ones((2, 4, 1), np.bool_))
    coincidence.coarse_counts(np.zeros(9), 1, 9, 4)
    dark16 = np.zeros((8, 70), np.int32)
    gain = np.ones((8, 70), np.uint16)
    good = np.ones((8, 70), np.uint8)
    flags = np.ones((1, 9), bool)
    for dt in (np.uint16, np.uint8):
        raw = np.zeros((8, 70), dt)
        charge.tile_charge(raw, dark16, gain, good, 2**62, 1, 8, flags)
        charge.window_charge(raw, dark16, gain, good, 2**62, 1, b.indices, flags, 8, 1)
    return _compiled(dispatchers) - before


#: The frame types the estimator's kernels meet, one overload each of the per-frame
#: pass and the median: wrapped (signed) frames are read as these, through the sign
#: bit (:func:`streamstore.counting._dark_kernels.as_read`).
_ESTIMATOR_FRAMES = (np.uint16, np.uint8)


def _estimator_kernels() -> list[Any]:
    """The data-only dark estimator's kernels: per frame type (the first two), and
    over its float maps and its integer samples (the rest, one type each)."""
    from streamstore.counting import _robust_kernels as rk
    from streamstore.counting import dark_estimate as de

    per_frame = [de._accumulate_rows, de._median_rows]
    maps = [de._fold_rows, de._noise_rows]
    samples = [de._start_residual_rows, rk._int_span, rk._bin_counts, rk._core_values]
    return [*per_frame, *maps, *samples]


def _warm_estimator() -> int:
    """Run the data-only dark estimator on tiny frames of every frame type a
    variant counts (wrapped ones meet the same overloads): how many kernel
    overloads this compiled."""
    from streamstore.counting import dark_estimate as de
    from streamstore.counting.calibration_estimate import START_FRAMES

    dispatchers = _estimator_kernels()
    before = _compiled(dispatchers)

    rng = np.random.default_rng(0)
    for k, dt in enumerate(_ESTIMATOR_FRAMES):
        frames = rng.integers(0, 100, (min(de.REFINE_AT), 8, 70)).astype(dt)
        est = de.DarkEstimator(frames[:START_FRAMES])  # median, sums
        if k == 0:  # the fold and the maps take float maps only: one frame type
            for f in frames:
                est.update(f)
            est.maps()
    return _compiled(dispatchers) - before


def _estimator_cached() -> bool:
    """Whether every kernel overload :func:`_warm_estimator` reaches is in the cache."""
    from streamstore._numba_cache import cached_overloads

    held = [cached_overloads(d) for d in _estimator_kernels()]
    need = [len(_ESTIMATOR_FRAMES)] * 2 + [1] * 6
    return None not in held and all(h >= k for h, k in zip(held, need, strict=True))


#: Environment variable that caps the compile workers of an empty cache (default:
#: the CPUs this process may use; 1 compiles in the daemon itself).
PROCESSES_ENV = "STREAMSTORE_COMPILE_PROCESSES"


def _compile_processes() -> int:
    value = os.environ.get(PROCESSES_ENV, "").strip()
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise ValueError(f"{PROCESSES_ENV} must be a whole number, got {value!r}") from None
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


#: Marks a compile worker's report lines: numba (``NUMBA_DEBUG_CACHE``) and others
#: may print to the same stdout.
_DONE = "streamstore-warm-up-done"
#: What a compile worker runs: the jobs given on its stdin, one number a line, and
#: one line ``_DONE i compiled`` on stdout as each is done; it ends at end of input.
_WORKER = (
    "import sys\n"
    "from streamstore.counting.warmup import _DONE, _warm_variant\n"
    "gain = sys.argv[1] == '1'\n"
    "for line in sys.stdin:\n"
    "    i = int(line)\n"
    "    print(_DONE, i, _warm_variant(i, gain), flush=True)\n"
)


def _compile_in_workers(
    jobs: list[int], gain: bool, workers: int, done: Callable[[int, int], None]
) -> None:
    """Compile jobs ``jobs`` (variants, :func:`_warm_variant`'s numbering) in
    ``workers`` child interpreters, calling ``done(i, compiled)`` as each
    finishes. Each worker is handed the next job in the order given as it ends
    one (the longest first: a fixed split left one core idle for the last
    tens of seconds). Children, not a multiprocessing pool: a pool would import
    the caller's ``__main__`` again."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the same streamstore
    todo = list(jobs)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, "1" if gain else "0"],
            stdout=subprocess.PIPE,
            stdin=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # not the caller's Ctrl-C: they fill the cache and exit
        )
        for _ in range(min(workers, len(todo)))
    ]

    def hand_out(proc: subprocess.Popen) -> None:
        assert proc.stdin is not None
        try:
            if todo:
                proc.stdin.write(f"{todo.pop(0)}\n")
                proc.stdin.flush()
            else:
                proc.stdin.close()
        except BrokenPipeError:  # it died: its pipe's end below says so
            pass

    try:
        lines: queue.Queue[tuple[int, str | None]] = queue.Queue()

        def pump(k: int, proc: subprocess.Popen) -> None:
            for line in proc.stdout:  # type: ignore[union-attr]
                lines.put((k, line))
            lines.put((k, None))

        for k, proc in enumerate(procs):
            threading.Thread(target=pump, args=(k, proc), daemon=True).start()
            hand_out(proc)
        open_pipes = len(procs)
        while open_pipes:
            k, line = lines.get()
            if line is None:
                open_pipes -= 1
                continue
            words = line.split()
            if len(words) == 3 and words[0] == _DONE:
                hand_out(procs[k])
                done(int(words[1]), int(words[2]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def warm_kernels(
    gain: bool = True,
    progress: Callable[[int, int, dict[str, Any], int], None] | None = None,
    processes: int | None = None,
    estimator: str = "now",
) -> dict[str, Any]:
    """Compile or load every counting kernel variant and the event encoder.

    Where numba's on-disk cache lacks variants (a fresh install or an
    upgrade), they are compiled side by side in ``processes`` child
    interpreters, each writing the cache (saves serialised by
    :func:`streamstore._numba_cache.serialize_saves`), and then loaded here
    from it: on ``c`` cores the cold start takes about ``1 / c`` of compiling
    them one by one. From a warm cache everything loads here.

    Parameters
    ----------
    gain : bool, default True
        Also the variants only a gain map leads to (see :func:`kernel_variants`).
    progress : callable, optional
        Called as ``progress(i, n, variant, compiled)`` before variant ``i`` of
        ``n`` is loaded or compiled here, and as each worker finishes one (the
        encoder and the data-only dark estimator are the last two,
        ``{"name": "gap_encode"}`` and ``{"name": "dark_estimator"}``), ``compiled`` the kernel
        overloads compiled so far (0 while everything comes from the cache).
    processes : int, optional
        Compile workers for an empty cache; default: ``$STREAMSTORE_COMPILE_PROCESSES``
        or else the CPUs this process may use. 1 compiles everything in this process.
    estimator : {"now", "background", "on_use"}, default "now"
        When to load the data-only dark estimator's kernels where all are in
        numba's cache: here, in a background thread (returning without waiting),
        or at its first use (a daemon given a calibration estimates only for a
        series of another frame shape). The estimator first runs once a series
        has brought its first frames, and a load (about 0.2 s) is never a
        compile. Where any is missing it is compiled here, before returning,
        like the rest.

    Returns
    -------
    dict
        ``variants`` (how many), ``compiled`` (how many kernel overloads had to be
        compiled, here and in the workers: 0 from a warm cache) and ``seconds``.
    """
    from streamstore._numba_cache import cached_overloads, compiling_alone
    from streamstore.counting import _kernels as k

    if estimator not in ("now", "background", "on_use"):
        raise ValueError(f"estimator must be 'now', 'background' or 'on_use', got {estimator!r}")
    t0 = time.perf_counter()
    variants = kernel_variants(gain)
    n = len(variants) + 2
    names = [*variants, {"name": "gap_encode"}, {"name": "dark_estimator"}]
    compiled = 0
    workers = min(_compile_processes() if processes is None else processes, n)
    finished = 0

    def done(i: int, got: int) -> None:
        nonlocal compiled, finished
        compiled += got
        finished += 1
        if progress is not None:
            progress(finished - 1, n, names[i], compiled)

    def cold() -> bool:
        held = cached_overloads(k._count_items)
        return held is not None and held < len(variants)

    if workers > 1 and cold():  # an empty cache
        with compiling_alone(k._count_items):  # or another daemon fills it meanwhile
            if cold():
                # the longest jobs first: the estimator, the counting variants, the encoder
                _compile_in_workers([n - 1, *range(n - 2), n - 2], gain, workers, done)
    later = estimator != "now" and _estimator_cached()
    for i in range(n - 1 if later else n):  # loads what the workers compiled (or compiles)
        if progress is not None:
            progress(i, n, names[i], compiled)
        compiled += _warm_variant(i, gain)
    if later and estimator == "background":
        threading.Thread(
            target=_warm_variant, args=(n - 1, gain), name="warm-estimator", daemon=True
        ).start()
    return {"variants": len(variants), "compiled": compiled, "seconds": time.perf_counter() - t0}
