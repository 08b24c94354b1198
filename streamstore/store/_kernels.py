"""numba kernels of the event codec and reader (imported lazily: it loads numba).

Each kernel has a plain numpy reference next to its user (``codec.gap_*_numpy``,
``EventBatch.to_dense``) and tests hold them equal. All are single-threaded and
``nogil`` so the reader runs several of them from its own threads.
"""

from __future__ import annotations

import numba
import numpy as np

from streamstore._numba_cache import serialize_saves

__all__ = [
    "dense_frames",
    "gap_decode",
    "gap_encode",
    "gather",
    "gather_decode",
    "sum_frames",
]


@numba.njit(cache=True, nogil=True)
def gap_encode(indices, offsets, out, npix):  # pragma: no cover - compiled
    """out[k] = indices[k] - indices[k - 1] within a frame; the first is absolute.

    Returns -1, or the position of the first index that is not strictly
    ascending within its frame or not below ``npix`` (then ``out`` is garbage).
    """
    for f in range(offsets.size - 1):
        prev = np.int64(-1)
        for k in range(offsets[f], offsets[f + 1]):
            v = np.int64(indices[k])
            if v <= prev or v >= npix:
                return k
            out[k] = np.uint32(v - prev) if prev >= 0 else np.uint32(v)
            prev = v
    return -1


@numba.njit(cache=True, nogil=True)
def gap_decode(gaps, offsets, out):  # pragma: no cover - compiled
    """Per-frame cumulative sum of gaps (uint32)."""
    for f in range(offsets.size - 1):
        acc = np.uint32(0)
        for k in range(offsets[f], offsets[f + 1]):
            acc = acc + gaps[k]
            out[k] = acc
    return out


@numba.njit(cache=True, nogil=True)
def sum_frames(gaps, starts, counts, width, roi, acc, band):  # pragma: no cover - compiled
    """Add the events of frames ``(starts[f], counts[f])`` of ``gaps`` into ``acc``.

    ``acc`` is the flat ``(row1 - row0) * (col1 - col0)`` image of the roi. The
    image is walked in bands of ``band`` flat pixels, every frame advancing its
    own cursor through each band, so the part of ``acc`` being written stays in
    cache (a frame-after-frame scatter over a 24 MP image is memory-bound).
    """
    r0, r1, c0, c1 = roi
    full = c0 == 0 and c1 == width
    lo = r0 * width
    hi = r1 * width
    rw = c1 - c0
    n = starts.size
    pos = starts.copy()
    end = starts + counts
    cur = np.zeros(n, np.int64)  # last index consumed per frame (gaps are relative)
    band_lo = 0
    while band_lo < hi:
        band_hi = min(band_lo + band, hi)
        for f in range(n):
            k = pos[f]
            e = end[f]
            idx = cur[f]
            while k < e:
                nxt = idx + gaps[k]
                if nxt >= band_hi:
                    break
                idx = nxt
                k += 1
                if idx >= lo:
                    if full:
                        acc[idx - lo] += 1
                    else:
                        r = idx // width
                        c = idx - r * width
                        if c >= c0 and c < c1:
                            acc[(r - r0) * rw + (c - c0)] += 1
            pos[f] = k
            cur[f] = idx
        band_lo = band_hi


@numba.njit(cache=True, nogil=True)
def dense_frames(gaps, starts, counts, width, roi, out):  # pragma: no cover - compiled
    """Scatter frame ``f``'s events into ``out[f]`` (flat roi image per frame)."""
    r0, r1, c0, c1 = roi
    lo = r0 * width
    hi = r1 * width
    rw = c1 - c0
    for f in range(starts.size):
        idx = np.int64(0)
        for k in range(starts[f], starts[f] + counts[f]):
            idx += gaps[k]
            if idx >= lo and idx < hi:
                r = idx // width
                c = idx - r * width
                if c >= c0 and c < c1:
                    out[f, (r - r0) * rw + (c - c0)] += 1


@numba.njit(cache=True, nogil=True)
def gather_decode(gaps, starts, counts, out):  # pragma: no cover - compiled
    """Decode frames ``(starts[f], counts[f])`` of ``gaps`` into compact ``out``."""
    j = 0
    for f in range(starts.size):
        acc = np.uint32(0)
        for k in range(starts[f], starts[f] + counts[f]):
            acc = acc + gaps[k]
            out[j] = acc
            j += 1
    return out


@numba.njit(cache=True, nogil=True)
def gather(src, starts, counts, out):  # pragma: no cover - compiled
    """Copy the ranges ``(starts[f], counts[f])`` of ``src`` into compact ``out``."""
    j = 0
    for f in range(starts.size):
        for k in range(starts[f], starts[f] + counts[f]):
            out[j] = src[k]
            j += 1
    return out


# several processes may compile these at once (see streamstore._numba_cache)
serialize_saves(gap_encode, gap_decode, sum_frames, dense_frames, gather_decode, gather)
