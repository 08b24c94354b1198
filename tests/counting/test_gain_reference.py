"""A gain reference from flat-field frames (``Calibration.with_gain_reference``):
each pixel's gain measured against the emulated sensor's own gain map, the frame's
edge, X-ray hits, masked pixels, bad input, and what it does for the events'
places under a 10 % gain spread."""

from __future__ import annotations

import os

import numpy as np
import pytest

from streamstore.camera.emulator import CameraEmulator
from streamstore.counting import Counter
from streamstore.counting.accuracy import score_batch
from streamstore.counting.calibration import Calibration

XRAY_THRESHOLD = 1000.0


def _sensor(shape, dose, seed, **physics):
    """An emulated sensor with a 10 % gain spread and its dark-series calibration."""
    emu = CameraEmulator(
        shape, dose_rate_e_per_px_s=dose * 1500, seed=seed, gain_sigma=0.1, **physics
    )
    dark, _ = emu.dark_frames(50)
    return emu, Calibration.from_dark_frames(dark, xray_threshold=XRAY_THRESHOLD)


def _relative(gain: np.ndarray, true_gain: np.ndarray) -> np.ndarray:
    """Correction times the sensor's gain, over its median: 1 where the gain is known."""
    rel = gain.astype(np.float64) * true_gain
    return rel / np.median(rel)


@pytest.fixture(scope="module")
def spread_flats():
    """200 flat frames at 4 e/px/frame with the default point spread (0.5 px)."""
    emu, cal = _sensor((48, 64), 4.0, seed=31)
    frames, _ = emu.generate(200)
    return emu, cal, frames


def test_flats_measure_each_pixels_gain(spread_flats):
    emu, cal, frames = spread_flats
    gcal = cal.with_gain_reference(frames)
    rel = _relative(gcal.gain, emu.gain)
    # the 10 % spread is down to the flats' statistical error (about 1.8 % here)
    assert np.std(emu.gain / np.median(emu.gain)) > 0.09
    assert rel[2:-2, 2:-2].std() < 0.025, rel[2:-2, 2:-2].std()
    assert gcal.dark is cal.dark or np.array_equal(gcal.dark, cal.dark)
    assert (gcal.n_sigma, gcal.xray_threshold, gcal.source) == (
        cal.n_sigma,
        cal.xray_threshold,
        cal.source,
    )
    # the thresholds are in raw ADU against each pixel's noise: the gain leaves them
    assert np.array_equal(gcal.threshold_maps(np.uint16)[0], cal.threshold_maps(np.uint16)[0])


def test_the_charge_the_edge_misses_is_not_taken_for_gain(spread_flats):
    emu, cal, frames = spread_flats
    scaled = _relative(cal.with_gain_reference(frames).gain, emu.gain)
    raw = _relative(cal.with_gain_reference(frames, edge=0).gain, emu.gain)

    def worst(rel):
        return max(abs(float(np.mean(e)) - 1) for e in (rel[0], rel[-1], rel[:, 0], rel[:, -1]))

    # a quarter less charge in the outer rows and columns without the scaling; with
    # it, what is left is the error of a median of ~100 pixels of 10 % spread
    assert worst(raw) > 0.15, worst(raw)
    assert worst(scaled) < 0.045, worst(scaled)
    assert scaled[0].std() < 0.03 and scaled[:, -1].std() < 0.03


def test_xray_hits_and_their_surroundings_are_left_out():
    # 8 X-ray hits a frame of 3000 ADU each (a camera's rate is ~1e-6 of this)
    emu, cal = _sensor((48, 64), 2.0, seed=32, xray_rate_per_frame=8.0)
    frames, truth = emu.generate(300)
    hits = np.zeros(cal.frame_shape, int)
    for xr in truth.xray_positions:
        np.add.at(hits, (xr[:, 0], xr[:, 1]), 1)
    hit = hits >= 2
    assert hit.sum() > 300
    kept = np.abs(_relative(cal.with_gain_reference(frames).gain, emu.gain) - 1)
    taken = _relative(cal.with_xray_threshold(None).with_gain_reference(frames).gain, emu.gain)
    taken = np.abs(taken - 1)
    # where X-rays struck, the gain is as well known as where none did (1.8 %)
    assert kept[hit].mean() < 1.2 * kept[hits == 0].mean(), (kept[hit].mean(), kept.mean())
    assert taken[hit].mean() > 2.5 * kept[hit].mean(), (taken[hit].mean(), kept[hit].mean())


def test_flats_too_bright_for_the_xray_cut_are_refused():
    # all of an electron's charge in one pixel at 4 e/px/frame: 5 % of the values
    # pass the X-ray threshold, more of a high-gain pixel's than of a low-gain one's
    emu, cal = _sensor((32, 48), 4.0, seed=35, psf_sigma_px=0.0, xray_rate_per_frame=0.0)
    frames, _ = emu.generate(100)
    with pytest.raises(ValueError, match=r"dose is too high for a gain reference"):
        cal.with_gain_reference(frames)


def test_masked_pixels_wrapped_frames_and_chunks():
    emu, cal = _sensor((32, 48), 1.0, seed=33, psf_sigma_px=0.0)
    frames, _ = emu.generate(1000)
    mask = np.zeros(cal.frame_shape, bool)
    mask[5, 7] = mask[20, 30] = True
    mcal = Calibration(cal.dark, cal.noise, mask=mask, xray_threshold=XRAY_THRESHOLD)
    whole = mcal.with_gain_reference(frames).gain
    assert whole[5, 7] == 1 and whole[20, 30] == 1
    # frames one at a time and in chunks: the same sums
    one_by_one = mcal.with_gain_reference(iter(frames)).gain
    chunks = mcal.with_gain_reference([frames[:400], frames[400:]]).gain
    np.testing.assert_allclose(one_by_one, whole, rtol=1e-6)
    np.testing.assert_allclose(chunks, whole, rtol=1e-6)
    # the camera's pedestal subtracted and negative values wrapped: the same gains
    dark = np.rint(cal.dark).astype(np.int32)
    wrapped = (frames.astype(np.int32) - dark).astype(np.uint16)
    wcal = Calibration(
        np.zeros(cal.frame_shape),
        cal.noise,
        mask=mask,
        xray_threshold=XRAY_THRESHOLD,
        wrapped=True,
    )
    np.testing.assert_allclose(wcal.with_gain_reference(wrapped).gain, whole, rtol=0.01)


def test_bad_flats_say_why():
    emu, cal = _sensor((16, 24), 1.0, seed=34, psf_sigma_px=0.0)
    frames, _ = emu.generate(40)
    with pytest.raises(ValueError, match="frame shape"):
        cal.with_gain_reference(frames[:, :8])
    with pytest.raises(ValueError, match="uint8 or uint16"):
        cal.with_gain_reference(frames.astype(np.float32))
    with pytest.raises(ValueError, match="no flat frames"):
        cal.with_gain_reference([])
    with pytest.raises(ValueError, match="edge"):
        cal.with_gain_reference(frames, edge=-1)
    dark, _ = emu.dark_frames(40)
    with pytest.raises(ValueError, match="no positive mean signal"):
        cal.with_gain_reference(dark)
    dim = CameraEmulator((16, 24), dose_rate_e_per_px_s=15, seed=34, gain_sigma=0.1)
    few, _ = dim.generate(3)
    # 0.01 e/px/frame: most pixels see nothing; keep the empty ones out with a mask
    seen = (few.astype(np.float64) - cal.dark).sum(0) > 0
    mcal = Calibration(cal.dark, cal.noise, mask=~seen, xray_threshold=XRAY_THRESHOLD)
    with pytest.raises(ValueError, match=r"take more flat frames or a higher dose"):
        mcal.with_gain_reference(few)


def test_events_are_placed_as_with_the_sensors_own_gain():
    """At 0.05 e/px/frame with a 10 % gain spread the gain leans the joint
    counter's events towards the pixels that amplify more; with a gain reference
    from flats they sit where the sensor's true gain map puts them."""
    shape = (128, 192)
    emu, cal = _sensor(shape, 0.05, seed=2029)
    frames, truth = emu.generate(16)
    # the same sensor (its maps come from the seed) under a flat beam of 1 e/px/frame,
    # all of an electron's charge in its pixel (what the flat measures is the gain,
    # whatever the cloud; this keeps the emulation short)
    flat, _ = _sensor(shape, 1.0, seed=2029, psf_sigma_px=0.0)
    assert np.array_equal(flat.gain, emu.gain)
    flats = (flat.generate(500)[0] for _ in range(6))
    gcal = cal.with_gain_reference(flats)
    true_cal = Calibration(cal.dark, cal.noise, gain=1 / emu.gain, xray_threshold=XRAY_THRESHOLD)

    def score(c):
        batch = Counter(c, subpixel=True, method="joint", dose=False)(frames)
        return score_batch(batch, truth.positions)

    without, with_ref, with_truth = score(cal), score(gcal), score(true_cal)
    assert with_ref.rms_error_px < without.rms_error_px - 0.003, (with_ref, without)
    assert abs(with_ref.rms_error_px - with_truth.rms_error_px) < 0.002, (with_ref, with_truth)
    assert with_ref.precision >= 0.999 and with_ref.recall >= 0.85, with_ref


def test_gain_maps_load_from_npy_and_calibration_files(tmp_path):
    import tifffile

    from streamstore.counting.gain_reference import load_gain

    rng = np.random.default_rng(5)
    gain = (1 + 0.1 * rng.standard_normal((8, 12))).astype(np.float32)
    np.save(tmp_path / "g.npy", gain)
    np.testing.assert_array_equal(load_gain(tmp_path / "g.npy"), gain)
    # asked again (the daemon's options check, then its start): the same map, unread
    again = load_gain(tmp_path / "g.npy")
    assert again is load_gain(tmp_path / "g.npy") and not again.flags.writeable
    before = (tmp_path / "g.npy").stat().st_mtime_ns
    np.save(tmp_path / "g.npy", 2 * gain)  # a new file at the same path is read anew
    os.utime(tmp_path / "g.npy", ns=(before + 10**9, before + 10**9))  # coarse clocks too
    np.testing.assert_array_equal(load_gain(tmp_path / "g.npy"), 2 * gain)
    tifffile.imwrite(tmp_path / "g.tif", gain)
    np.testing.assert_array_equal(load_gain(tmp_path / "g.tif"), gain)
    tifffile.imwrite(tmp_path / "stack.tiff", np.stack([gain, gain]))
    with pytest.raises(ValueError, match=r"expected a numeric \(H, W\) map"):
        load_gain(tmp_path / "stack.tiff")
    mask = np.zeros((8, 12), bool)
    mask[1, 1] = True
    in_file = gain.copy()
    in_file[1, 1] = 0  # a masked pixel's gain is never read: any value
    Calibration(np.zeros((8, 12)), np.ones((8, 12)), gain=in_file, mask=mask).save(
        tmp_path / "c.h5"
    )
    loaded = load_gain(tmp_path / "c.h5")
    assert loaded[1, 1] == 1
    np.testing.assert_array_equal(loaded[~mask], gain[~mask])
