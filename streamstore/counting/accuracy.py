"""Score counted events against ground truth: one-to-one matching, recall, precision.

Used by the accuracy tests, ``benchmarks/counting.py`` and
``benchmarks/accuracy.py`` (and useful for anyone tuning a calibration on
emulator frames).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamstore.events import EventBatch

__all__ = ["Score", "match_positions", "matched_electrons", "score_batch"]


def match_positions(
    truth: np.ndarray, found: np.ndarray, max_distance: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Match points one-to-one, greedily by increasing distance.

    Parameters
    ----------
    truth, found : ndarray, shape (k, 2)
        ``(y, x)`` positions in pixels.
    max_distance : float, default 1.0
        Pairs further apart than this (Euclidean, pixels) are never matched.

    Returns
    -------
    ti, fi : ndarray of int64
        Indices of the matched pairs (``truth[ti[j]]`` with ``found[fi[j]]``).
    """
    from scipy.spatial import cKDTree

    truth = np.asarray(truth, np.float64).reshape(-1, 2)
    found = np.asarray(found, np.float64).reshape(-1, 2)
    if truth.shape[0] == 0 or found.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = cKDTree(truth).sparse_distance_matrix(
        cKDTree(found), max_distance, output_type="ndarray"
    )
    order = np.lexsort((pairs["j"], pairs["i"], pairs["v"]))  # by distance, then index
    used_t = np.zeros(truth.shape[0], bool)
    used_f = np.zeros(found.shape[0], bool)
    ti: list[int] = []
    fi: list[int] = []
    for k in order:
        i, j = int(pairs["i"][k]), int(pairs["j"][k])
        if not used_t[i] and not used_f[j]:
            used_t[i] = used_f[j] = True
            ti.append(i)
            fi.append(j)
    return np.asarray(ti, np.int64), np.asarray(fi, np.int64)


@dataclass(frozen=True)
class Score:
    """Accuracy of a batch against the truth.

    Attributes
    ----------
    n_true, n_found, n_matched : int
        True electrons, reported events, matched pairs.
    recall : float
        ``n_matched / n_true``.
    precision : float
        ``n_matched / n_found``.
    rms_error_px : float
        RMS Euclidean distance of matched pairs, pixels.
    """

    n_true: int
    n_found: int
    n_matched: int
    recall: float
    precision: float
    rms_error_px: float


def _frame_matches(batch: EventBatch, true_positions: list[np.ndarray], max_distance: float):
    """Per frame: ``(truth, found, ti, fi)``, the frame's true and found positions and
    their matched pairs (:func:`match_positions`)."""
    if len(true_positions) != batch.n_frames:
        raise ValueError(
            f"true_positions has {len(true_positions)} frames, the batch {batch.n_frames}"
        )
    for fe, tp in zip(batch, true_positions, strict=True):
        tp = np.asarray(tp, np.float64).reshape(-1, 2)
        found = fe.positions()
        ti, fi = match_positions(tp, found, max_distance)
        yield tp, found, ti, fi


def matched_electrons(
    batch: EventBatch, true_positions: list[np.ndarray], max_distance: float = 1.0
) -> np.ndarray:
    """Which true electrons an event was matched to: bool, one per electron, the
    frames' electrons one after the other (as ``np.concatenate(true_positions)``)."""
    hits = []
    for tp, _, ti, _ in _frame_matches(batch, true_positions, max_distance):
        hit = np.zeros(len(tp), bool)
        hit[ti] = True
        hits.append(hit)
    return np.concatenate(hits) if hits else np.zeros(0, bool)


def score_batch(
    batch: EventBatch, true_positions: list[np.ndarray], max_distance: float = 1.0
) -> Score:
    """Match each frame's events to its true electron positions and pool the counts.

    Event positions are pixel centres, or sub-cell centres when the batch has
    sub-pixel data (:meth:`streamstore.events.FrameEvents.positions`).
    """
    n_true = n_found = n_matched = 0
    sq = 0.0
    for tp, found, ti, fi in _frame_matches(batch, true_positions, max_distance):
        n_true += len(tp)
        n_found += len(found)
        n_matched += ti.size
        if ti.size:
            sq += float(np.sum((tp[ti] - found[fi]) ** 2))
    return Score(
        n_true=n_true,
        n_found=n_found,
        n_matched=n_matched,
        recall=n_matched / n_true if n_true else float("nan"),
        precision=n_matched / n_found if n_found else float("nan"),
        rms_error_px=float(np.sqrt(sq / n_matched)) if n_matched else float("nan"),
    )
