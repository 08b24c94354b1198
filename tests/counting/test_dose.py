"""Corrected dose (streamstore.counting.dose) against the emulator's truth.

Frames of 128 x 192, calibration from 40 dark frames, fixed seeds. The target:
the corrected total within 2 % of the electrons that arrived, where the counter
finds lone electrons (the model corrects coincidence, not a lone electron no
pixel of which passes the threshold).
"""

from __future__ import annotations

import numpy as np
import pytest

from streamstore import Calibration, EventBatch, count
from streamstore.camera.emulator import CameraEmulator
from streamstore.counting.dose import (
    HARD_CORE_AREA,
    DoseEstimator,
    corrected_electrons,
    electrons_from_events,
    events_from_electrons,
    exclusion_areas,
    pair_histogram,
    pair_histogram_reference,
)

SHAPE = (128, 192)


def _count(pattern, dose, n_frames, seed, **emu_kw):
    emu = CameraEmulator(
        SHAPE, pattern=pattern, dose_rate_e_per_px_s=dose * 1500, seed=seed, **emu_kw
    )
    dark, _ = emu.dark_frames(40)
    cal = Calibration.from_dark_frames(dark, xray_threshold=1000.0)
    frames, truth = emu.generate(n_frames)
    return count(frames, cal), truth


def _random_batch(rng, shape, n_frames, density):
    h, w = shape
    offsets = [0]
    idx = []
    for _ in range(n_frames):
        k = rng.binomial(h * w, density)
        idx.append(np.sort(rng.choice(h * w, size=k, replace=False)))
        offsets.append(offsets[-1] + k)
    return EventBatch(np.array(offsets), np.concatenate(idx).astype(np.uint32), frame_shape=shape)


def test_model_inverts_and_is_exact_without_charge_spread():
    lam = np.array([0.0, 1e-3, 0.01, 0.05, 0.1])
    mu = events_from_electrons(lam, 9.0)
    np.testing.assert_allclose(electrons_from_events(mu, 9.0), lam, rtol=1e-9, atol=0)
    mu2 = events_from_electrons(lam, 9.0, 3.0)
    assert np.all(mu2[1:] < mu[1:])
    np.testing.assert_allclose(electrons_from_events(mu2, 9.0, 3.0), lam, rtol=1e-9, atol=0)
    # no charge spread: the 3 x 3 rule loses exactly what the model says (A = 9)
    b, truth = _count("uniform", 0.05, 16, seed=11, psf_sigma_px=0.0)
    n_true = truth.counts().sum()
    mu_meas = b.n_events / (16 * SHAPE[0] * SHAPE[1])
    lam_true = n_true / (16 * SHAPE[0] * SHAPE[1])
    assert mu_meas / lam_true < 0.85  # the check can fail: coincidence loses 15 %+ here
    assert float(events_from_electrons(lam_true, HARD_CORE_AREA)) == pytest.approx(
        mu_meas, rel=0.01
    )


@pytest.mark.parametrize("shape", [(37, 53), (64, 64)])
def test_pair_histogram_numba_matches_reference(shape):
    rng = np.random.default_rng(3)
    b = _random_batch(rng, shape, 5, 0.08)
    ref = pair_histogram_reference(b, 5)
    assert ref.sum() > 100
    np.testing.assert_array_equal(pair_histogram(b, 5), ref)
    # the last pixel of a row and the first of the next are not neighbours
    edge = EventBatch(np.array([0, 2]), np.array([shape[1] - 1, shape[1]], np.uint32),
                      frame_shape=shape)  # fmt: skip
    assert pair_histogram(edge, 2).sum() == pair_histogram_reference(edge, 2).sum() == 0
    below = EventBatch(np.array([0, 2]), np.array([1, shape[1] + 3], np.uint32),
                       frame_shape=shape)  # fmt: skip
    assert pair_histogram(below, 2)[1, 2 + 2] == pair_histogram_reference(below, 2)[1, 4] == 1


def test_independent_events_show_no_deficit_beyond_their_own_pixel():
    rng = np.random.default_rng(4)
    b = _random_batch(rng, (128, 128), 40, 0.02)
    hard, soft = exclusion_areas(pair_histogram(b, 5), (128, 128))
    assert hard == pytest.approx(1.0, abs=0.5)
    assert soft < 0.8
    assert exclusion_areas(np.zeros((6, 11), np.int64), (128, 128)) == (HARD_CORE_AREA, 0.0)


def test_measured_area_follows_the_point_spread():
    b3, _ = _count("uniform", 0.02, 24, seed=12, psf_sigma_px=0.3)
    b8, _ = _count("uniform", 0.02, 24, seed=12, psf_sigma_px=0.8)
    e3 = DoseEstimator(SHAPE)
    e3.update(b3)
    e8 = DoseEstimator(SHAPE)
    e8.update(b8)
    (h3, s3), (h8, s8) = e3.exclusion_areas, e8.exclusion_areas
    # two local maxima are never 8-neighbours: the hard core is the 3 x 3
    assert h3 == h8 == pytest.approx(9.0)
    assert s3 < 2.0
    assert s8 > s3 + 2.0


@pytest.mark.parametrize(
    ("pattern", "dose", "n_frames", "emu_kw"),
    [
        ("uniform", 0.001, 120, {}),
        ("uniform", 0.02, 12, {}),
        ("uniform", 0.02, 12, {"gain_sigma": 0.1, "psf_sigma_px": 0.3}),
        ("uniform", 0.05, 16, {"psf_sigma_px": 0.3, "read_noise_adu": 2.0}),
        ("uniform", 0.05, 16, {"read_noise_adu": 2.0, "gain_sigma": 0.0}),
        ("disk", 0.003, 60, {}),
        ("disk", 0.003, 60, {"read_noise_adu": 2.0, "gain_sigma": 0.1}),
    ],
)
def test_corrected_dose_within_2_percent(pattern, dose, n_frames, emu_kw):
    b, truth = _count(pattern, dose, n_frames, seed=21, **emu_kw)
    n_true = int(truth.counts().sum())
    electrons = corrected_electrons(b)
    assert electrons.shape == (n_frames,) and electrons.dtype == np.float64
    assert np.all(electrons >= b.counts)
    ratio = electrons.sum() / n_true
    assert abs(ratio - 1.0) <= 0.02, (ratio, b.n_events / n_true)


def test_streaming_matches_the_pooled_estimate():
    b, truth = _count("disk", 0.003, 60, seed=22)
    est = DoseEstimator(SHAPE, refresh=4)
    per_frame = np.concatenate([est.update(b.slice(i, i + 1)) for i in range(b.n_frames)])
    pooled = corrected_electrons(b)
    assert per_frame.sum() == pytest.approx(pooled.sum(), rel=0.02)
    n_true = truth.counts()
    # per frame: the estimate follows the frame's own arrivals, not the series mean
    assert np.corrcoef(pooled, n_true)[0, 1] > 0.8


def test_tiles_follow_the_disk():
    """The disk is corrected as a disk: one tile for the whole frame (the frame
    mean) under-corrects a disk pattern by far more than the tiles do. At a frame
    mean of 0.01 the disk holds about 0.09 e/px/frame, where 1 - exp(-lam a) is
    0.55: measured 0.94 of the truth, short of the 2 % target (a regression bound)."""
    b, truth = _count("disk", 0.01, 48, seed=23)
    n_true = truth.counts().sum()
    tiled = corrected_electrons(b).sum() / n_true
    whole = corrected_electrons(b, tile=max(SHAPE)).sum() / n_true
    assert abs(tiled - 1) <= 0.07
    # the check can fail: the frame mean hides the disk's crowding
    assert whole < tiled - 0.1


def test_bad_arguments():
    with pytest.raises(ValueError, match="tile"):
        DoseEstimator(SHAPE, tile=0)
    with pytest.raises(ValueError, match="pair_radius"):
        DoseEstimator(SHAPE, pair_radius=4, far_radii=(4, 5))
    with pytest.raises(ValueError, match="frame shape"):
        DoseEstimator(SHAPE).update(EventBatch.empty(1, (10, 10)))
    assert DoseEstimator(SHAPE).update(EventBatch.empty(0, SHAPE)).shape == (0,)
