"""Counting accuracy against the emulator's ground truth (recall, precision, position error).

Emulator frames of 256 x 384 with default physics; calibration from 50 dark
frames of the same emulator; events matched one-to-one to true electrons
within 1 px (greedy by distance).
"""

from __future__ import annotations

import numpy as np
import pytest

from streamstore import Calibration, count
from streamstore.camera.emulator import CameraEmulator
from streamstore.counting.accuracy import match_positions, matched_electrons, score_batch

SHAPE = (256, 384)
XRAY_THRESHOLD = 1000.0  # ADU: ~8 electrons' total signal, a third of an X-ray's


def _run(pattern, dose_per_frame, n_frames, seed, **emu_kw):
    emu = CameraEmulator(
        SHAPE,
        pattern=pattern,
        dose_rate_e_per_px_s=dose_per_frame / (1 / 1500),
        seed=seed,
        **emu_kw,
    )
    dark, _ = emu.dark_frames(50)
    frames, truth = emu.generate(n_frames)
    cal = Calibration.from_dark_frames(dark, xray_threshold=XRAY_THRESHOLD)
    return frames, truth, cal


@pytest.fixture(scope="module")
def uniform_001():
    return _run("uniform", 0.01, 16, seed=101)


def test_match_positions_is_one_to_one():
    truth = np.array([[0.5, 0.5], [0.9, 0.9], [5.0, 5.0]])
    found = np.array([[0.55, 0.55], [9.0, 9.0]])
    ti, fi = match_positions(truth, found, 1.0)
    assert ti.tolist() == [0] and fi.tolist() == [0]


def test_matched_electrons_flags_each_true_electron_in_frame_order():
    from streamstore import EventBatch

    batch = EventBatch(offsets=np.array([0, 1, 1]), indices=np.array([5], np.uint32),
                       frame_shape=(4, 4))  # fmt: skip
    truth = [np.array([[1.4, 1.6], [3.5, 3.5]]), np.array([[0.5, 0.5]])]
    assert matched_electrons(batch, truth).tolist() == [True, False, False]
    with pytest.raises(ValueError, match="frames"):
        matched_electrons(batch, truth[:1])


@pytest.mark.parametrize("subpixel", [False, True])
def test_uniform_dose_001(uniform_001, subpixel):
    frames, truth, cal = uniform_001
    s = score_batch(count(frames, cal, subpixel=subpixel), truth.positions)
    assert s.n_true > 15000
    assert s.recall >= 0.90, s
    assert s.precision >= 0.995, s
    if subpixel:
        assert s.rms_error_px < 0.3, s


def test_uniform_dose_0001():
    frames, truth, cal = _run("uniform", 0.001, 60, seed=102)
    s = score_batch(count(frames, cal, subpixel=True), truth.positions)
    assert s.n_true > 5000
    assert s.recall >= 0.97, s
    assert s.precision >= 0.995, s
    assert s.rms_error_px < 0.3, s


@pytest.fixture(scope="module")
def disk_001():
    return _run("disk", 0.01, 16, seed=103)


@pytest.mark.xfail(
    strict=True,
    reason=(
        "emulator 'disk' puts 70 % of the electrons in 8 % of the frame: at a frame-mean "
        "0.01 e/px the disk holds ~0.08 e/px/frame, where half the electrons have another "
        "within one pixel and merge into one 3 x 3 local maximum (measured recall ~0.72). "
        "The target stands; see test_disk_loss_is_the_local_dose and "
        "test_disk_at_counting_dose. The dose of this disk, corrected for the loss, is "
        "within 2 % (test_dose.py::test_disk_at_a_frame_mean_of_001_is_dosed_right)."
    ),
)
def test_disk_dose_001(disk_001):
    frames, truth, cal = disk_001
    s = score_batch(count(frames, cal), truth.positions)
    assert s.recall >= 0.90, s
    assert s.precision >= 0.995, s


def test_disk_loss_is_the_local_dose(disk_001):
    """What the frame-mean 0.01 disk loses is coincidence at the disk's local dose:
    electrons where the beam is dim are found as at 0.01 e/px, those in the disk as
    on a uniform frame at the disk's dose."""
    frames, truth, cal = disk_001
    emu = CameraEmulator(SHAPE, pattern="disk", seed=103)
    local = 0.01 * emu.pattern_map()  # e/px/frame at each pixel
    pos = np.concatenate(truth.positions).astype(np.int64)
    dose_at = local[pos[:, 0], pos[:, 1]]
    hit = matched_electrons(count(frames, cal), truth.positions)
    dim = dose_at <= 0.012
    bright = dose_at >= 0.06
    assert dim.sum() > 1500 and bright.sum() > 5000
    assert hit[dim].mean() >= 0.90, hit[dim].mean()
    disk_dose = float(np.median(dose_at[bright]))
    uframes, utruth, ucal = _run("uniform", disk_dose, 4, seed=108)
    uniform = score_batch(count(uframes, ucal), utruth.positions).recall
    assert uniform < 0.85  # the check can fail: at this dose coincidence is what loses
    assert abs(hit[bright].mean() - uniform) < 0.04, (hit[bright].mean(), uniform, disk_dose)


def test_disk_at_counting_dose():
    """Disk pattern whose brightest pixel gets 0.01 e/px/frame (the counting dose where
    the beam is; frame mean about 0.0012)."""
    peak = float(CameraEmulator(SHAPE, pattern="disk", seed=104).pattern_map().max())
    frames, truth, cal = _run("disk", 0.01 / peak, 60, seed=104)
    s = score_batch(count(frames, cal, subpixel=True), truth.positions)
    assert s.n_true > 5000
    assert s.recall >= 0.90, s
    assert s.precision >= 0.995, s
    assert s.rms_error_px < 0.3, s


def test_xray_hits_produce_no_events():
    frames, truth, cal = _run("uniform", 0.01, 16, seed=105, xray_rate_per_frame=4.0)
    n_xray = sum(len(x) for x in truth.xray_positions)
    assert n_xray > 30
    batch = count(frames, cal)
    r = cal.xray_radius

    def near_xray_events(b):
        n = 0
        for fe, xs in zip(b, truth.xray_positions, strict=True):
            for y, x in xs:
                n += int(np.sum((np.abs(fe.rows - y) <= r) & (np.abs(fe.cols - x) <= r)))
        return n

    assert near_xray_events(batch) == 0
    # the check can fail: without an X-ray threshold each X-ray becomes an event
    no_xray = Calibration(cal.dark, cal.noise, mask=cal.mask, xray_threshold=None)
    assert near_xray_events(count(frames, no_xray)) >= n_xray


def test_hot_pixels_produce_no_events_once_masked():
    frames, truth, cal = _run("uniform", 0.01, 8, seed=106, hot_pixel_fraction=5e-4)
    hot = truth.hot_pixels
    assert len(hot) > 20
    assert cal.mask[hot[:, 0], hot[:, 1]].all()
    hot_flat = set((hot[:, 0] * SHAPE[1] + hot[:, 1]).tolist())
    batch = count(frames, cal)
    assert not hot_flat & set(batch.indices.tolist())
    # the check can fail: unmasked, with a plain dark level, the hot pixels fire
    unmasked = Calibration(np.full(SHAPE, float(np.median(cal.dark))), cal.noise)
    assert hot_flat & set(count(frames, unmasked).indices.tolist())


def test_uint8_frames():
    frames, truth, cal = _run("uniform", 0.01, 8, seed=107, dtype="uint8")
    cal = Calibration(
        cal.dark, cal.noise, mask=cal.mask, xray_threshold=XRAY_THRESHOLD / 4
    )  # adu_scale 0.25
    s = score_batch(count(frames, cal), truth.positions)
    assert s.recall >= 0.90, s
    assert s.precision >= 0.995, s
