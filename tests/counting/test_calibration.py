"""Calibration: from dark frames, estimated from beam frames, saved and loaded."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamstore import Calibration
from streamstore.camera.emulator import CameraEmulator
from streamstore.errors import FormatError

SHAPE = (96, 160)  # non-square on purpose


@pytest.fixture(scope="module")
def emulator_data():
    emu = CameraEmulator(SHAPE, seed=11, hot_pixel_fraction=1e-3)
    dark, _ = emu.dark_frames(40)
    frames, truth = emu.generate(8)
    return emu, dark, frames, truth


def test_from_dark_frames_recovers_dark_noise_and_hot_pixels(emulator_data):
    emu, dark, _, truth = emulator_data
    cal = Calibration.from_dark_frames(dark, n_sigma=5.0)
    assert cal.source == "dark_frames"
    assert cal.frame_shape == SHAPE
    good = ~cal.mask
    # dark offset per pixel within a few standard errors (noise / sqrt(40), plus row noise)
    err = np.abs(cal.dark - truth.dark)[good]
    assert np.median(err) < 1.0
    total_noise = np.hypot(truth.read_noise_adu, truth.row_noise_adu)
    assert abs(np.median(cal.noise[good]) - total_noise) < 0.1 * total_noise
    hot = {tuple(p) for p in truth.hot_pixels}
    masked = {tuple(p) for p in np.argwhere(cal.mask)}
    assert hot <= masked
    assert len(masked) <= len(hot) + 5  # almost nothing else is flagged


def test_user_mask_and_gain_are_kept(emulator_data):
    _, dark, _, truth = emulator_data
    user_mask = np.zeros(SHAPE, bool)
    user_mask[3, 7] = True
    cal = Calibration.from_dark_frames(dark, gain=truth.gain, mask=user_mask, xray_threshold=900)
    assert cal.mask[3, 7]
    np.testing.assert_array_equal(cal.gain, truth.gain)
    assert cal.xray_threshold == 900


def test_save_load_round_trip(tmp_path, emulator_data):
    _, dark, _, truth = emulator_data
    cal = Calibration.from_dark_frames(dark, gain=truth.gain, n_sigma=4.5, xray_threshold=1200.0)
    path = tmp_path / "cal.h5"
    cal.save(path)
    back = Calibration.load(path)
    assert back.source == "file"
    for name in ("dark", "noise", "gain", "mask"):
        np.testing.assert_array_equal(getattr(back, name), getattr(cal, name))
    assert (back.n_sigma, back.xray_threshold, back.xray_radius, back.wrapped) == (
        4.5,
        1200.0,
        cal.xray_radius,
        False,
    )
    for dt in (np.uint8, np.uint16):
        for a, b in zip(back.threshold_maps(dt), cal.threshold_maps(dt), strict=True):
            np.testing.assert_array_equal(a, b)
    # a calibration without gain, mask or X-ray threshold round-trips too
    plain = Calibration(np.full(SHAPE, 10.0), np.full(SHAPE, 2.0))
    plain.save(path)
    back = Calibration.load(path)
    assert back.gain is None and back.mask is None and back.xray_threshold is None


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Calibration.load(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(FormatError):
        Calibration.load(junk)
    import h5py

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    with pytest.raises(FormatError, match="no streamstore calibration"):
        Calibration.load(other)


def test_summary_is_json_scalars(emulator_data):
    _, dark, _, _ = emulator_data
    cal = Calibration.from_dark_frames(dark, xray_threshold=1000)
    s = cal.summary()
    json.dumps(s)
    assert s["source"] == "dark_frames"
    assert s["frame_shape"] == list(SHAPE)
    assert s["n_sigma"] == cal.n_sigma and s["xray_threshold"] == 1000
    assert s["n_masked"] == cal.n_masked and s["has_gain"] is False
    assert s["median_noise_adu"] == pytest.approx(float(np.median(cal.noise[~cal.mask])))


def _pedestal_subtracted(frames, dark):
    """What the 4D Camera sends: raw - dark in uint16 arithmetic, negatives wrapped."""
    return (frames.astype(np.int64) - np.rint(dark).astype(np.int64)).astype(np.uint16)


def _clipped(frames, dark):
    """A camera that dark-subtracts and cuts the negatives at 0."""
    return np.maximum(frames.astype(np.int64) - np.rint(dark).astype(np.int64), 0).astype(np.uint16)


@pytest.mark.parametrize("kind", ["wrapped", "pedestal", "clipped"])
def test_estimate_matches_dark_frame_thresholds(emulator_data, kind):
    _, dark, frames, truth = emulator_data
    ref = Calibration.from_dark_frames(dark)
    wrap = kind == "wrapped"
    if wrap:
        data = _pedestal_subtracted(frames, ref.dark)
        assert np.count_nonzero(data > 60000) > 0.2 * data.size  # really wrapped
    elif kind == "pedestal":
        # a camera that adds a constant pedestal instead: no wrap
        data = (frames.astype(np.int64) - np.rint(ref.dark).astype(np.int64) + 200).astype(
            np.uint16
        )
    else:
        data = _clipped(frames, ref.dark)
        assert np.count_nonzero(data == 0) > 0.4 * data.size  # really clipped
    est = Calibration.estimate(data)
    assert est.source == "estimate"
    assert est.wrapped is wrap
    assert est.background_threshold == pytest.approx(ref.background_threshold, rel=0.10)
    assert est.dark[0, 0] == pytest.approx(200.0 if kind == "pedestal" else 0.0, abs=1.0)
    if kind == "clipped":  # no dips below the peak to show the hot pixels (below)
        return
    # the X-ray threshold sits well above an electron and well below an X-ray (3000 ADU)
    assert est.xray_threshold is not None and 300 < est.xray_threshold < 2500
    # the hot pixels (noisy even after pedestal subtraction) are found from 8 frames
    hot = truth.hot_pixels
    assert est.mask[hot[:, 0], hot[:, 1]].all()
    assert est.n_masked <= len(hot) + 3


def test_estimate_on_wrapped_frames_counts_like_dark_calibration(emulator_data):
    """Counting wrapped frames with the estimate is as accurate as with dark frames."""
    from streamstore import count
    from streamstore.counting.accuracy import score_batch

    _, dark, frames, truth = emulator_data
    ref = Calibration.from_dark_frames(dark, xray_threshold=1000)
    est = Calibration.estimate(_pedestal_subtracted(frames, ref.dark))
    s_ref = score_batch(count(frames, ref), truth.positions)
    s_est = score_batch(count(_pedestal_subtracted(frames, ref.dark), est), truth.positions)
    assert s_est.recall >= 0.90 and s_est.precision >= 0.995, s_est
    assert abs(s_est.recall - s_ref.recall) < 0.03, (s_est, s_ref)


def test_estimate_on_clipped_frames_counts_like_dark_calibration(emulator_data):
    """Frames dark-subtracted and cut at 0: half the noise peak is a spike at 0. Its
    fit from the share at each value gives one dark level and the noise (the fit of
    an uncut peak took 2.1 ADU for 3.3 and went per pixel: precision 0.84), and the
    counting finds what dark frames find, streaming only the frame. The cut hides
    the noisy pixels' dips below the peak, which give them away in wrapped frames:
    from 8 frames the estimate finds only those that fire often (8 of this
    fixture's 15), and every false event is on one of the others."""
    from streamstore.counting import Counter
    from streamstore.counting.accuracy import _frame_matches, score_batch

    _, dark, frames, truth = emulator_data
    ref = Calibration.from_dark_frames(dark, xray_threshold=1000)
    data = _clipped(frames, ref.dark)
    est = Calibration.estimate(data, xray_threshold=1000)
    assert np.ptp(est.dark[~est.mask]) == 0 and abs(float(est.dark[0, 0])) < 1.0
    c = Counter(est, np.uint16, dose=False)
    s_est = score_batch(c(data), truth.positions)
    assert len(c._maps) == 7  # one dark level: the frame-only kernel
    s_ref = score_batch(Counter(ref, np.uint16, dose=False)(frames), truth.positions)
    assert abs(s_est.recall - s_ref.recall) < 0.02, (s_est, s_ref)
    assert s_est.precision >= 0.98, s_est
    hot = {tuple(p) for p in truth.hot_pixels}
    false = []
    for _tp, found, _ti, fi in _frame_matches(c(data), truth.positions, 1.0):
        unmatched = np.setdiff1d(np.arange(len(found)), fi)
        false += [tuple(np.floor(found[j]).astype(int)) for j in unmatched]
    assert false and all(p in hot for p in false), false
    with pytest.raises(ValueError, match="clipped at 0"):
        Calibration.estimate(data, per_pixel=True)


@pytest.mark.parametrize("centre", [-1.0, 0.0, 1.5, 4.0])
@pytest.mark.parametrize("sigma", [1.5, 3.0, 6.0])
def test_clipped_noise_peak_recovers_a_cut_gaussian(centre, sigma):
    """Not the emulator: Gaussian noise rounded and cut at 0, 2 % of the values with
    an electron's signal on top."""
    from streamstore.counting.robust import clipped_noise_peak

    rng = np.random.default_rng(int(100 + 10 * centre + sigma))
    x = np.rint(centre + sigma * rng.standard_normal(200_000))
    hit = rng.random(x.size) < 0.02
    x[hit] += rng.gamma(4.0, 30.0, np.count_nonzero(hit))
    x = np.maximum(x, 0).astype(np.int64)
    assert np.any(x == 0)
    got_centre, got_sigma = clipped_noise_peak(x)
    assert got_sigma == pytest.approx(sigma, rel=0.03)
    assert got_centre == pytest.approx(centre, abs=0.05 * sigma)


def test_estimate_is_reproducible_and_respects_mask(emulator_data):
    _, _, frames, _ = emulator_data
    a = Calibration.estimate(frames, seed=3, n_samples=5000)
    b = Calibration.estimate(frames, seed=3, n_samples=5000)
    np.testing.assert_array_equal(a.noise, b.noise)
    mask = np.zeros(SHAPE, bool)
    mask[:, :10] = True
    c = Calibration.estimate(frames, mask=mask)
    assert c.mask[mask].all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dark": np.zeros(5), "noise": np.ones(5)}, "dark must be a 2-d"),
        ({"dark": np.zeros((4, 5)), "noise": np.ones((5, 4))}, "noise has shape"),
        ({"dark": np.zeros((4, 5)), "noise": np.zeros((4, 5))}, "noise must be finite and > 0"),
        ({"dark": np.zeros((4, 5)), "noise": np.ones((4, 5)), "n_sigma": 0}, "n_sigma"),
        (
            {"dark": np.zeros((4, 5)), "noise": np.ones((4, 5)), "xray_threshold": -1},
            "xray_threshold",
        ),
        ({"dark": np.zeros((4, 5)), "noise": np.ones((4, 5)), "xray_radius": 1.5}, "xray_radius"),
        (
            {"dark": np.zeros((4, 5)), "noise": np.ones((4, 5)), "gain": -np.ones((4, 5))},
            "gain must be",
        ),
        (
            {"dark": np.zeros((4, 5)), "noise": np.ones((4, 5)), "mask": np.zeros((4, 5))},
            "mask must be a boolean",
        ),
        ({"dark": np.zeros((4, 5)), "noise": np.ones((4, 5)), "source": "guess"}, "source"),
    ],
)
def test_bad_calibration_inputs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Calibration(**kwargs)


def test_masked_pixels_may_have_any_noise():
    mask = np.zeros((4, 5), bool)
    mask[1, 1] = True
    noise = np.ones((4, 5))
    noise[1, 1] = 0.0
    cal = Calibration(np.zeros((4, 5)), noise, mask=mask)
    assert cal.n_masked == 1


def test_from_dark_frames_input_errors():
    with pytest.raises(ValueError, match="at least 2 frames"):
        Calibration.from_dark_frames(np.zeros((1, 4, 5), np.uint16))
    with pytest.raises(ValueError, match=r"\(n, H, W\)"):
        Calibration.from_dark_frames(np.zeros((2, 3, 4, 5), np.uint16))
    with pytest.raises(ValueError, match="integer frames"):
        Calibration.estimate(np.zeros((2, 4, 5), np.float32))
    with pytest.raises(ValueError, match="xray_threshold"):
        Calibration.estimate(np.ones((2, 4, 5), np.uint16), xray_threshold="big")


def test_integer_maps_are_computed_once_and_shared_across_xray_thresholds(rng):
    """The ingest daemon derives a calibration per series with its own X-ray
    threshold: the per-pixel integer maps (a full-frame pass each) are reused."""
    cal = Calibration(100 + rng.normal(0, 2, (16, 24)), np.full((16, 24), 3.0))
    lo, dark, gain, level = cal.threshold_maps(np.uint16)
    assert gain is None and level == 2**62
    derived = cal.with_xray_threshold(500.0)
    lo2, dark2, _, level2 = derived.threshold_maps(np.uint16)
    assert lo2 is lo and dark2 is dark and level2 == 500
    # another type gets its own maps
    assert cal.threshold_maps(np.uint8)[0].dtype == np.uint8


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_threshold_maps_made_a_few_rows_at_a_time_equal_their_definition(
    dtype, wrapped, monkeypatch
):
    """The maps are computed in pieces of rows (a piece that does not divide the
    frame, values beyond the type's range clipped, masked pixels at the type's
    maximum): equal to the definition over the whole frame."""
    from streamstore.counting import calibration as calmod

    rng = np.random.default_rng(12)
    h, w = 37, 53
    kt = np.dtype(f"int{8 * np.dtype(dtype).itemsize}") if wrapped else np.dtype(dtype)
    info = np.iinfo(kt)
    span = float(info.max) - float(info.min)
    dark = rng.uniform(info.min - 0.1 * span, info.max + 0.1 * span, (h, w)).astype(np.float32)
    dark[rng.random((h, w)) < 0.1] = np.round(dark[0, 0]) + 0.5  # ties of rint
    noise = rng.uniform(0.5, 40, (h, w)).astype(np.float32)
    mask = rng.random((h, w)) < 0.05
    cal = Calibration(dark, noise, mask=mask, n_sigma=4.5, wrapped=wrapped)
    monkeypatch.setattr(calmod, "_MAP_ROWS_PIXELS", 3 * w + 7)  # 3 rows a piece
    lo, dk, _, _ = cal.threshold_maps(dtype)
    assert cal.frame_dtype(dtype) == kt
    d = dark.astype(np.float64)
    want_lo = np.maximum(np.floor(d + 4.5 * noise.astype(np.float64)), np.rint(d))
    want_lo = np.clip(want_lo, info.min, info.max).astype(kt)
    want_dk = np.clip(np.rint(d), info.min, info.max).astype(kt)
    want_lo[mask] = want_dk[mask] = info.max
    assert lo.dtype == dk.dtype == kt
    np.testing.assert_array_equal(lo, want_lo)
    np.testing.assert_array_equal(dk, want_dk)
    assert np.any(lo == info.min) and np.any(lo[~mask] == info.max)  # both clips reached
