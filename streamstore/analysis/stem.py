"""4D-STEM analysis straight from the compressed events: virtual detectors, centre of mass.

A scanned series (see :mod:`streamstore.scan`) is a 4-D array ``(scan rows,
scan cols, H, W)`` that is never built here: every analysis walks the stored
events of the selected frames once, reduces each frame to a few numbers with
a per-frame kernel (:mod:`streamstore.analysis._stem_kernels`, numpy references in
:mod:`streamstore.analysis._stem_reference`), and adds those into the output image.
The frames are split into jobs of a few million events that run on a thread
pool (the kernels release the GIL); at most ``2 x nthreads`` jobs are in
flight, so memory is the output plus a few decoded chunks.

Conventions (rows, cols everywhere, as in ``docs/format.md``):

* detector pixel ``(r, c)`` of a ``(H, W)`` frame; a ``center`` is ``(row, col)``
  in pixels (floats allowed);
* an annular detector holds the pixels with
  ``inner_radius**2 <= (r - row)**2 + (c - col)**2 < outer_radius**2``
  (stempy's rule, so integer radii give stempy's detector);
* ``center_of_mass`` returns ``(2, rows, cols)`` with index 0 the **row** (y)
  and index 1 the **column** (x) coordinate; stempy's ``com_sparse`` has them
  the other way round (index 0 = column);
* a scan region of interest ``scan_roi = (r0, r1, c0, c1)`` selects scan rows
  ``r0:r1`` and columns ``c0:c1``; outputs then have shape ``(r1 - r0, c1 - c0)``.

The same analyses run on a dask cluster with
:func:`streamstore.analysis.stem_dask.map_scan` (reductions on the events, in the
workers); :func:`streamstore.analysis.stem_dask.scan_to_dask` gives the scan as a lazy
4-D dask array for tools that want one.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from streamstore.errors import UserError
from streamstore.scan import ScanGeometry, scan_positions
from streamstore.store.scan_methods import require_scan

__all__ = [
    "annular_mask",
    "center_of_mass",
    "diffraction_sum",
    "radial_profile",
    "scan_coverage",
    "virtual_image",
    "virtual_images",
    "virtual_images_and_com",
]

# events per job: big enough that per-job overhead vanishes, small enough to
# spread a scan over the threads and keep the decoded buffers small
_JOB_EVENTS = 1 << 22
_JOB_EVENTS_MIN = 1 << 16
# frames per read when the store has no direct chunk access (a sharded series)
_FALLBACK_FRAMES = 4096


# --------------------------------------------------------------- geometry --
# the rule "a store must have a scan" is the store's own
_geometry = require_scan


def _scan_roi(geom: ScanGeometry, scan_roi: Sequence[int] | None) -> tuple[int, int, int, int]:
    rows, cols = geom.scan_shape
    if scan_roi is None:
        return 0, rows, 0, cols
    try:
        r0, r1, c0, c1 = (int(v) for v in scan_roi)
    except (TypeError, ValueError):
        raise UserError(f"scan_roi must be (row0, row1, col0, col1), got {scan_roi!r}") from None
    if not (0 <= r0 < r1 <= rows and 0 <= c0 < c1 <= cols):
        raise UserError(
            f"scan_roi {(r0, r1, c0, c1)} is outside the scan: need 0 <= row0 < row1 <= {rows} "
            f"and 0 <= col0 < col1 <= {cols}"
        )
    return r0, r1, c0, c1


def _selection(
    store: Any, scan_roi: Sequence[int] | None, start: int | None, stop: int | None
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Frames of the region (indices, ascending), their flat position in it, its shape."""
    geom = _geometry(store)
    r0, r1, c0, c1 = _scan_roi(geom, scan_roi)
    s, e = store._window(start, stop)
    if hasattr(store, "_damaged") and hasattr(store, "_check_damaged"):
        # a single file: frames with damaged per-frame data have no id to place them by
        store._check_damaged(np.arange(s, e, dtype=np.int64))
    pos = scan_positions(geom, store.frame_ids[s:e])
    cols = geom.scan_shape[1]
    row, col = pos // cols, pos % cols
    keep = (pos >= 0) & (row >= r0) & (row < r1) & (col >= c0) & (col < c1)
    sel = np.flatnonzero(keep).astype(np.int64) + s
    local = (row[keep] - r0) * (c1 - c0) + (col[keep] - c0)
    return sel, local, (r1 - r0, c1 - c0)


def scan_coverage(store: Any, scan_roi: Sequence[int] | None = None) -> np.ndarray:
    """Stored frames per scan position (int64 ``(rows, cols)``).

    Every position should have ``frames_per_position``; fewer means frames were
    lost (their positions have fewer counts), never silently filled.
    """
    _sel, local, shape = _selection(store, scan_roi, None, None)
    return np.bincount(local, minlength=shape[0] * shape[1]).astype(np.int64).reshape(shape)


# ---------------------------------------------------------------- driver --
def _kernels() -> Any:
    from streamstore.analysis import _stem_kernels

    return _stem_kernels


def _read_chunks(
    store: Any, a: int, b: int, starts: np.ndarray, counts: np.ndarray, scratch: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # one buffer per thread, reused by its jobs: fresh memory for every job
    # costs page faults comparable to the decompression
    buf = getattr(scratch, "buf", None)
    if buf is None or buf.size < b - a:
        buf = scratch.buf = np.empty(b - a, np.uint32)
    checked = getattr(store, "_read_checked", None)
    if checked is not None:  # a damaged chunk raises an error naming the frames
        return checked(store._gaps, a, starts, counts, out=buf[: b - a]), starts, counts
    return store._gaps.read(a, b, out=buf[: b - a]), starts, counts


def _read_events(store: Any, part: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from streamstore.store.codec import gap_encode

    batch = store.events(int(part[0]), int(part[-1]) + 1)
    rel = part - part[0]
    npix = store.frame_shape[0] * store.frame_shape[1]
    gaps = gap_encode(batch.indices, batch.offsets, npix)
    return gaps, batch.offsets[:-1][rel], batch.counts[rel]


def _reduce(
    store: Any,
    sel: np.ndarray,
    local: np.ndarray,
    n_out: int,
    k: int,
    dtype: Any,
    kernel: Any,
) -> np.ndarray:
    """Run ``kernel(gaps, starts, counts, out)`` over the frames ``sel``; sum into positions.

    Returns ``(n_out, k)``: row ``local[i]`` holds the sum of frame ``sel[i]``'s values.
    """
    out = np.zeros((n_out, k), dtype)
    if sel.size == 0:
        return out

    def run(job: tuple[int, Callable[[], tuple[np.ndarray, ...]]]) -> tuple[int, np.ndarray]:
        first, load = job
        gaps, starts, counts = load()
        vals = np.zeros((starts.size, k), dtype)
        kernel(gaps, starts, counts, vals)
        return first, vals

    def add(first: int, vals: np.ndarray) -> None:
        loc = local[first : first + vals.shape[0]]
        if loc.size == 0:
            return
        # positions ascend along the selection (raster order): add runs, not events
        run_start = np.flatnonzero(np.diff(loc)) + 1
        if run_start.size and np.any(loc[run_start] < loc[run_start - 1]):
            np.add.at(out, loc, vals)
            return
        starts = np.concatenate([[0], run_start])
        out[loc[starts]] += np.add.reduceat(vals, starts, axis=0)

    def jobs() -> Iterator[tuple[int, Callable[[], tuple[np.ndarray, ...]]]]:
        """(first selected frame, loader of its gaps, starts, counts); loaded when run."""
        if hasattr(store, "_gaps") and hasattr(store, "_jobs"):
            n_ev = int(store.event_counts[sel].sum())
            nth = max(store.nthreads, 1)
            size = int(np.clip(n_ev // (4 * nth), _JOB_EVENTS_MIN, _JOB_EVENTS))
            first = 0
            scratch = threading.local()
            for a, b, starts, counts in store._jobs(sel, size):
                load = functools.partial(_read_chunks, store, a, b, starts, counts, scratch)
                yield first, load
                first += starts.size
        else:  # no direct chunk access (a sharded series): read events, re-encode as gaps
            for i in range(0, sel.size, _FALLBACK_FRAMES):
                yield i, functools.partial(_read_events, store, sel[i : i + _FALLBACK_FRAMES])

    nthreads = max(int(getattr(store, "nthreads", 1)), 1)
    if nthreads == 1 or sel.size == 1:
        for job in jobs():
            add(*run(job))
        return out
    with ThreadPoolExecutor(nthreads) as pool:
        pending = []
        for job in jobs():
            pending.append(pool.submit(run, job))
            if len(pending) >= 2 * nthreads:  # bound the decoded data in flight
                add(*pending.pop(0).result())
        for fut in pending:
            add(*fut.result())
    return out


# --------------------------------------------------------------- detectors --
def annular_mask(
    frame_shape: tuple[int, int],
    inner_radius: float,
    outer_radius: float,
    center: tuple[float, float],
) -> np.ndarray:
    """Boolean ``(H, W)`` annulus ``inner**2 <= (r - row)**2 + (c - col)**2 < outer**2``.

    ``center`` is ``(row, col)``; ``inner_radius=0`` gives a disk (bright field).
    """
    try:
        inner, outer = float(inner_radius), float(outer_radius)
    except (TypeError, ValueError):
        raise UserError(
            f"radii must be numbers, got {inner_radius!r} and {outer_radius!r}"
        ) from None
    if not (np.isfinite(inner) and np.isfinite(outer) and 0 <= inner < outer):
        raise UserError(f"need 0 <= inner_radius < outer_radius, got {inner:g} and {outer:g}")
    cr, cc = _center(center)
    h, w = frame_shape
    r = np.arange(h, dtype=np.float64)[:, None] - cr
    c = np.arange(w, dtype=np.float64)[None, :] - cc
    d2 = r * r + c * c
    return (d2 >= inner * inner) & (d2 < outer * outer)


def _center(center: Any) -> tuple[float, float]:
    try:
        cr, cc = (float(v) for v in center)
    except (TypeError, ValueError):
        raise UserError(f"center must be (row, col), got {center!r}") from None
    if not (np.isfinite(cr) and np.isfinite(cc)):
        raise UserError(f"center must be finite, got {center!r}")
    return cr, cc


def _pattern_center(store: Any, sel: np.ndarray) -> tuple[float, float]:
    """Centre of mass ``(row, col)`` of the summed pattern of frames ``sel``."""
    img = store.sum(select=sel).astype(np.float64)
    total = img.sum()
    if total == 0:
        raise UserError("the selected frames hold no events: give the center explicitly")
    h, w = img.shape
    return (
        float(img.sum(axis=1) @ np.arange(h) / total),
        float(img.sum(axis=0) @ np.arange(w) / total),
    )


def _check_mask(store: Any, mask: Any) -> np.ndarray:
    m = np.asarray(mask)
    if m.shape != tuple(store.frame_shape):
        raise UserError(f"mask has shape {m.shape}, the frames are {tuple(store.frame_shape)}")
    if m.dtype.kind not in "biuf":
        raise UserError(f"mask must be boolean or numeric, got dtype {m.dtype}")
    return m


def virtual_image(
    store: Any,
    inner_radius: float | None = None,
    outer_radius: float | None = None,
    center: tuple[float, float] | None = None,
    *,
    mask: Any = None,
    scan_roi: Sequence[int] | None = None,
    start: int | None = None,
    stop: int | None = None,
) -> np.ndarray:
    """Virtual detector image ``(rows, cols)``: per position, the events inside the detector.

    See :meth:`ScanMethods.virtual_image`; ``start``/``stop`` restrict it to a
    window of stored frames (how :func:`map_scan` splits a scan).
    """
    sel, local, shape = _selection(store, scan_roi, start, stop)
    if mask is None:
        if inner_radius is None or outer_radius is None:
            raise UserError("give inner_radius and outer_radius, or mask")
        if center is None:
            center = _pattern_center(store, sel)
        m = annular_mask(store.frame_shape, inner_radius, outer_radius, center)
    else:
        if inner_radius is not None or outer_radius is not None or center is not None:
            raise UserError("give either a mask or radii (with an optional center), not both")
        m = _check_mask(store, mask)
    n = shape[0] * shape[1]
    kern = _kernels()
    if m.dtype.kind == "f":
        weights = np.ascontiguousarray(m, np.float64).ravel()
        out = _reduce(
            store, sel, local, n, 1, np.float64,
            lambda g, s, c, o: kern.frame_weighted_sums(g, s, c, weights, o[:, 0]),
        )  # fmt: skip
    else:
        labels = np.where(m.ravel() != 0, 0, -1).astype(np.int32)
        out = _reduce(
            store, sel, local, n, 1, np.int64,
            lambda g, s, c, o: kern.frame_label_counts(g, s, c, labels, o),
        )  # fmt: skip
    return out[:, 0].reshape(shape)


def _radii_pairs(radii: Any) -> list[tuple[float, float]]:
    """``radii`` as a non-empty list of (inner, outer) floats."""
    try:
        pairs = [(float(a), float(b)) for a, b in radii]
    except (TypeError, ValueError):
        raise UserError(f"radii must be (inner, outer) pairs, got {radii!r}") from None
    if not pairs:
        raise UserError("give at least one (inner, outer) detector")
    return pairs


def _detector_labels(
    store: Any, pairs: list[tuple[float, float]], center: tuple[float, float]
) -> np.ndarray | None:
    """Each pixel's detector (-1: none), or None when two detectors share a pixel."""
    masks = [annular_mask(store.frame_shape, a, b, center) for a, b in pairs]
    if np.sum(masks, axis=0).max(initial=0) > 1:  # a pixel can carry one label only
        return None
    labels = np.full(store.frame_shape, -1, np.int32)
    for k, m in enumerate(masks):
        labels[m] = k
    return labels.ravel()


def virtual_images(
    store: Any,
    radii: Sequence[tuple[float, float]],
    center: tuple[float, float] | None = None,
    *,
    scan_roi: Sequence[int] | None = None,
    start: int | None = None,
    stop: int | None = None,
) -> np.ndarray:
    """Several annular detectors ``(n, rows, cols)``, in one pass over the events when disjoint.

    See :meth:`ScanMethods.virtual_images`.
    """
    pairs = _radii_pairs(radii)
    sel, local, shape = _selection(store, scan_roi, start, stop)
    if center is None:
        center = _pattern_center(store, sel)
    labels = _detector_labels(store, pairs, center)
    if labels is None:
        return np.stack(
            [
                virtual_image(store, a, b, center, scan_roi=scan_roi, start=start, stop=stop)
                for a, b in pairs
            ]
        )
    kern = _kernels()
    out = _reduce(
        store, sel, local, shape[0] * shape[1], len(pairs), np.int64,
        lambda g, s, c, o: kern.frame_label_counts(g, s, c, labels, o),
    )  # fmt: skip
    return np.ascontiguousarray(out.T).reshape(len(pairs), *shape)


def virtual_images_and_com(
    store: Any,
    radii: Sequence[tuple[float, float]],
    center: tuple[float, float] | None = None,
    *,
    scan_roi: Sequence[int] | None = None,
    start: int | None = None,
    stop: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`virtual_images` and :func:`center_of_mass` from one pass over the events.

    See :meth:`ScanMethods.virtual_images_and_com`.
    """
    pairs = _radii_pairs(radii)
    sel, local, shape = _selection(store, scan_roi, start, stop)
    if center is None:
        center = _pattern_center(store, sel)
    labels = _detector_labels(store, pairs, center)
    if labels is None:
        return (
            virtual_images(store, pairs, center, scan_roi=scan_roi, start=start, stop=stop),
            center_of_mass(store, scan_roi=scan_roi, start=start, stop=stop),
        )
    k = len(pairs)
    width = store.frame_shape[1]
    no_mask = np.zeros(0, np.uint8)
    kern = _kernels()

    def both(g: np.ndarray, s: np.ndarray, c: np.ndarray, o: np.ndarray) -> None:
        # the events are decoded once and read twice while they are in cache
        kern.frame_label_counts(g, s, c, labels, o[:, :k])
        kern.frame_moments(g, s, c, width, no_mask, o[:, k:])

    # float64 holds the counts exactly (below 2**53 events per position)
    sums = _reduce(store, sel, local, shape[0] * shape[1], k + 3, np.float64, both)
    images = np.ascontiguousarray(sums[:, :k].T).astype(np.int64).reshape(k, *shape)
    return images, _finish_com(sums[:, k:], shape)


def _moments(
    store: Any, mask: Any, scan_roi: Any, start: int | None, stop: int | None
) -> tuple[np.ndarray, tuple[int, int]]:
    sel, local, shape = _selection(store, scan_roi, start, stop)
    m = np.zeros(0, np.uint8) if mask is None else (_check_mask(store, mask).ravel() != 0)
    m = np.ascontiguousarray(m, np.uint8)
    w = store.frame_shape[1]
    kern = _kernels()
    sums = _reduce(
        store, sel, local, shape[0] * shape[1], 3, np.float64,
        lambda g, s, c, o: kern.frame_moments(g, s, c, w, m, o),
    )  # fmt: skip
    return sums, shape


def _finish_com(sums: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    n = sums[:, 2]
    com = np.full((2, sums.shape[0]), np.nan)
    ok = n > 0
    com[:, ok] = sums[ok, :2].T / n[ok]
    return com.reshape(2, *shape)


def center_of_mass(
    store: Any,
    mask: Any = None,
    *,
    scan_roi: Sequence[int] | None = None,
    start: int | None = None,
    stop: int | None = None,
) -> np.ndarray:
    """Centre of mass of each position's events, ``(2, rows, cols)`` float64 pixels.

    See :meth:`ScanMethods.center_of_mass`.
    """
    sums, shape = _moments(store, mask, scan_roi, start, stop)
    return _finish_com(sums, shape)


def diffraction_sum(
    store: Any,
    scan_roi: Sequence[int] | None = None,
    *,
    start: int | None = None,
    stop: int | None = None,
) -> np.ndarray:
    """Summed diffraction pattern (uint32 ``(H, W)``) of the positions in ``scan_roi``."""
    sel, _local, _shape = _selection(store, scan_roi, start, stop)
    return store.sum(select=sel)


def _radial_edges(
    frame_shape: tuple[int, int], center: tuple[float, float], bins: Any
) -> np.ndarray:
    h, w = frame_shape
    cr, cc = center
    rmax = max(np.hypot(r - cr, c - cc) for r in (0, h - 1) for c in (0, w - 1))
    if bins is None:
        return np.arange(int(np.ceil(rmax)) + 2, dtype=np.float64)
    if isinstance(bins, int | np.integer) and not isinstance(bins, bool):
        if bins < 1:
            raise UserError(f"bins must be >= 1, got {bins}")
        return np.linspace(0.0, rmax, int(bins) + 1)
    edges = np.asarray(bins, np.float64)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0) or edges[0] < 0:
        raise UserError("bins must be a number of rings or >= 2 ascending edges >= 0")
    return edges


def radial_profile(
    store: Any,
    center: tuple[float, float] | None = None,
    bins: Any = None,
    *,
    scan_roi: Sequence[int] | None = None,
    start: int | None = None,
    stop: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Events per ring around ``center`` for every position: ``(profile, edges)``.

    See :meth:`ScanMethods.radial_profile`.
    """
    sel, local, shape = _selection(store, scan_roi, start, stop)
    if center is None:
        center = _pattern_center(store, sel)
    cr, cc = _center(center)
    edges = _radial_edges(store.frame_shape, (cr, cc), bins)
    h, w = store.frame_shape
    r = np.hypot(np.arange(h, dtype=np.float64)[:, None] - cr, np.arange(w)[None, :] - cc).ravel()
    nb = edges.size - 1
    # numpy.histogram's rule: [e_k, e_k+1) and the last ring closed
    lab = np.searchsorted(edges, r, side="right") - 1
    lab[r == edges[-1]] = nb - 1
    lab[(r < edges[0]) | (r > edges[-1])] = -1
    labels = lab.astype(np.int32)
    kern = _kernels()
    out = _reduce(
        store, sel, local, shape[0] * shape[1], nb, np.int64,
        lambda g, s, c, o: kern.frame_label_counts(g, s, c, labels, o),
    )  # fmt: skip
    return out.T.reshape(nb, *shape), edges
