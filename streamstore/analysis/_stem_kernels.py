"""numba forms of the per-frame 4D-STEM kernels (imported lazily: it loads numba).

Same contracts as the numpy references in :mod:`streamstore.analysis._stem_reference`
(tests hold them equal). Single-threaded and ``nogil``: :mod:`streamstore.analysis.stem`
runs one per job from its own threads, each job a disjoint set of frames, so
no two threads write the same output row.
"""

from __future__ import annotations

import numba
import numpy as np

from streamstore._numba_cache import serialize_saves

__all__ = ["frame_label_counts", "frame_moments", "frame_weighted_sums"]


@numba.njit(cache=True, nogil=True)
def frame_label_counts(gaps, starts, counts, labels, out):  # pragma: no cover - compiled
    """``out[f, labels[i]] += 1`` for every event ``i`` of frame ``f`` with ``labels[i] >= 0``."""
    if out.shape[1] == 1:
        # one detector: count in a register; an increment of out[f, 0] per event
        # waits on the previous one through memory (3 x slower, measured)
        for f in range(starts.size):
            idx = np.int64(0)
            n = np.int64(0)
            for k in range(starts[f], starts[f] + counts[f]):
                idx += gaps[k]
                n += labels[idx] >= 0
            out[f, 0] += n
        return out
    for f in range(starts.size):
        idx = np.int64(0)
        for k in range(starts[f], starts[f] + counts[f]):
            idx += gaps[k]
            lab = labels[idx]
            if lab >= 0:
                out[f, lab] += 1
    return out


@numba.njit(cache=True, nogil=True)
def frame_weighted_sums(gaps, starts, counts, weights, out):  # pragma: no cover - compiled
    """``out[f] += weights[i]`` summed over the events ``i`` of frame ``f``."""
    for f in range(starts.size):
        idx = np.int64(0)
        acc = 0.0
        for k in range(starts[f], starts[f] + counts[f]):
            idx += gaps[k]
            acc += weights[idx]
        out[f] += acc
    return out


@numba.njit(cache=True, nogil=True)
def frame_moments(gaps, starts, counts, width, mask, out):  # pragma: no cover - compiled
    """``out[f] += (sum of rows, sum of cols, number)`` of frame ``f``'s events in ``mask``."""
    use_mask = mask.size > 0
    # a multiply by the reciprocal and one correction instead of an integer
    # division per event (the division was two thirds of the kernel's time)
    inv_w = 1.0 / width
    for f in range(starts.size):
        idx = np.int64(0)
        sr = np.int64(0)
        sc = np.int64(0)
        n = np.int64(0)
        for k in range(starts[f], starts[f] + counts[f]):
            idx += gaps[k]
            if use_mask and mask[idx] == 0:
                continue
            r = np.int64(idx * inv_w)
            if r * width > idx:
                r -= 1
            elif (r + 1) * width <= idx:
                r += 1
            sr += r
            sc += idx - r * width
            n += 1
        # integer sums are exact; float64 holds them exactly below 2**53
        out[f, 0] += sr
        out[f, 1] += sc
        out[f, 2] += n
    return out


# several processes may compile these at once (see streamstore._numba_cache)
serialize_saves(frame_label_counts, frame_weighted_sums, frame_moments)
