"""Counting raw frames without a dark series: a per-pixel dark estimated from the data."""

from __future__ import annotations

import numpy as np
import pytest

from streamstore import Calibration, count
from streamstore.camera.emulator import CameraEmulator
from streamstore.counting.accuracy import score_batch
from streamstore.counting.dark_estimate import DarkEstimator

SHAPE = (96, 160)  # non-square on purpose
XRAY = 1000.0

# the emulator's full fixed-pattern dark, gain spread and row noise, then sweeps of them
SWEEPS = {
    "default": {},
    "low-noise": {"read_noise_adu": 2.0, "row_noise_adu": 0.5},
    "gain-spread": {"gain_sigma": 0.15},
    "strong-dark-pattern": {"dark_sigma_adu": 25.0},
}


def _scores(params: dict, dose: float, seed: int):
    emu = CameraEmulator(SHAPE, dose_rate_e_per_px_s=dose * 1500, seed=seed, **params)
    dark, _ = emu.dark_frames(50)
    n = max(64, int(6000 / (dose * SHAPE[0] * SHAPE[1])))
    frames, truth = emu.generate(n)
    ref = Calibration.from_dark_frames(dark, xray_threshold=XRAY)
    est = Calibration.estimate(frames[:64], xray_threshold=XRAY)
    assert est.source == "estimate" and not est.wrapped
    s_ref = score_batch(count(frames, ref), truth.positions)
    s_est = score_batch(count(frames, est), truth.positions)
    return est, s_ref, s_est


@pytest.mark.parametrize("dose", [0.001, 0.02])
@pytest.mark.parametrize("sweep", list(SWEEPS))
def test_data_only_calibration_counts_like_a_dark_series(sweep, dose):
    est, s_ref, s_est = _scores(SWEEPS[sweep], dose, seed=31)
    assert abs(s_est.recall - s_ref.recall) <= 0.01, (s_est, s_ref)
    assert s_est.precision >= 0.995, s_est


def test_estimate_finds_the_fixed_pattern_and_the_noise():
    emu = CameraEmulator(SHAPE, dose_rate_e_per_px_s=15.0, seed=5, hot_pixel_fraction=1e-3)
    frames, truth = emu.generate(64)
    est = DarkEstimator(frames[:8])
    for f in frames[8:]:
        est.update(f)
    dark, noise, hot = est.maps()
    true_noise = float(np.hypot(truth.read_noise_adu, truth.row_noise_adu))
    good = np.ones(SHAPE, bool)
    good[truth.hot_pixels[:, 0], truth.hot_pixels[:, 1]] = False
    err = dark[good] - truth.dark[good]
    # the dark map is each pixel's own (the pattern is 5 ADU, the estimate's error ~ 0.15 sigma)
    assert abs(float(np.median(err))) < 0.2 * true_noise
    assert float(np.std(err)) < 0.25 * true_noise
    assert est.sigma == pytest.approx(true_noise, rel=0.05)
    assert float(noise[0, 0]) == pytest.approx(est.sigma * np.sqrt(1 + 1 / 64), rel=1e-5)
    # hot pixels are masked, and few others
    assert hot[~good].all() and hot.sum() <= (~good).sum() + 3


def test_pedestal_subtracted_frames_keep_one_dark_level():
    emu = CameraEmulator(SHAPE, seed=11)
    dark, _ = emu.dark_frames(40)
    frames, _ = emu.generate(8)
    ref = Calibration.from_dark_frames(dark)
    sub = (frames.astype(np.int64) - np.rint(ref.dark).astype(np.int64)).astype(np.uint16)
    kept: list = []
    est = Calibration.estimate(sub, estimator_out=kept)
    assert est.wrapped and np.ptp(est.dark) == 0  # no fixed pattern left to map
    assert kept == []
    raw = Calibration.estimate(frames, estimator_out=kept)
    assert np.ptp(raw.dark) > 10  # raw frames: a per-pixel map
    assert len(kept) == 1 and isinstance(kept[0], DarkEstimator) and kept[0].n_frames == 8
    forced = Calibration.estimate(sub, per_pixel=True)
    assert forced.wrapped and np.ptp(forced.dark) > 0


def test_estimator_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2 frames"):
        DarkEstimator(np.zeros((1, 4, 5), np.uint16))
    with pytest.raises(ValueError, match="integer"):
        DarkEstimator(np.zeros((3, 4, 5), np.float32))
    est = DarkEstimator(np.random.default_rng(0).integers(90, 110, (4, 4, 5), dtype=np.uint16))
    with pytest.raises(ValueError, match="frame is"):
        est.update(np.zeros((5, 4), np.uint16))
