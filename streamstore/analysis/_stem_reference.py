"""Plain numpy references of the per-frame 4D-STEM kernels (``_stem_kernels``).

Every kernel reduces each frame ``f`` -- the gap-encoded events
``gaps[starts[f] : starts[f] + counts[f]]`` of one stored frame -- to a few
numbers, and adds them into row ``f`` of ``out``. The numba forms in
:mod:`streamstore.analysis._stem_kernels` must give the same results; tests hold them
equal. These are analysis kernels, not counting kernels: they have no C twin.
"""

from __future__ import annotations

import numpy as np

__all__ = ["frame_label_counts", "frame_moments", "frame_weighted_sums"]


def _decode(
    gaps: np.ndarray, starts: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Absolute flat indices of the listed frames and the frame number of each event."""
    frame = np.repeat(np.arange(starts.size, dtype=np.int64), counts)
    pos = np.repeat(np.asarray(starts, np.int64), counts) + (
        np.arange(frame.size, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    )
    g = np.asarray(gaps, np.int64)[pos] if frame.size else np.zeros(0, np.int64)
    # per-frame cumulative sum: one running sum, minus its value before each frame
    run = np.cumsum(g)
    before = np.cumsum(counts) - counts
    base = np.zeros(starts.size, np.int64)
    nz = counts > 0
    base[nz] = run[before[nz]] - g[before[nz]]
    idx = run - np.repeat(base, counts)
    return idx, frame


def frame_label_counts(gaps, starts, counts, labels, out):
    """``out[f, labels[i]] += 1`` for every event ``i`` of frame ``f`` with ``labels[i] >= 0``."""
    idx, frame = _decode(gaps, starts, counts)
    lab = np.asarray(labels)[idx].astype(np.int64)
    keep = lab >= 0
    np.add.at(out, (frame[keep], lab[keep]), 1)
    return out


def frame_weighted_sums(gaps, starts, counts, weights, out):
    """``out[f] += weights[i]`` summed over the events ``i`` of frame ``f``."""
    idx, frame = _decode(gaps, starts, counts)
    np.add.at(out, frame, np.asarray(weights, np.float64)[idx])
    return out


def frame_moments(gaps, starts, counts, width, mask, out):
    """``out[f] += (sum of rows, sum of cols, number)`` of frame ``f``'s events in ``mask``.

    ``mask`` is a flat uint8 detector mask, or empty for every pixel.
    """
    idx, frame = _decode(gaps, starts, counts)
    if mask.size:
        keep = np.asarray(mask)[idx] != 0
        idx, frame = idx[keep], frame[keep]
    rows = idx // width
    cols = idx - rows * width
    np.add.at(out[:, 0], frame, rows.astype(np.float64))
    np.add.at(out[:, 1], frame, cols.astype(np.float64))
    np.add.at(out[:, 2], frame, 1.0)
    return out
