"""CameraEmulator: dose statistics, truth, dark frames, saturation, seeding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamstore.camera.emulator import MOYAL_MEAN, PATTERNS, CameraEmulator
from streamstore.camera.truth import Truth

SMALL_SHAPE = (256, 384)  # as tests/conftest.py: non-square, small


@pytest.mark.parametrize("pattern", PATTERNS)
def test_mean_counts_within_4_sigma_of_dose(pattern):
    emu = CameraEmulator(SMALL_SHAPE, pattern=pattern, seed=3)
    assert emu.dose_per_frame == pytest.approx(0.01)
    n = 12
    _, truth = emu.generate(n)
    expected = emu.dose_per_frame * SMALL_SHAPE[0] * SMALL_SHAPE[1] * n
    total = truth.counts().sum()
    assert abs(total - expected) < 4 * math.sqrt(expected)
    pm = emu.pattern_map()
    assert pm.shape == SMALL_SHAPE
    assert float(pm.mean(dtype=np.float64)) == pytest.approx(1.0, rel=1e-4)


def test_arrivals_follow_the_pattern():
    emu = CameraEmulator(SMALL_SHAPE, pattern="disk", dose_rate_e_per_px_s=300.0, seed=4)
    _, truth = emu.generate(4)
    pos = np.concatenate(truth.positions)
    pm = emu.pattern_map()
    inside = pm > 2.0  # the bright-field disk
    hits = inside[pos[:, 0].astype(int), pos[:, 1].astype(int)]
    expected_share = pm[inside].sum() / pm.sum()
    n = len(pos)
    sigma = math.sqrt(n * expected_share * (1 - expected_share))
    assert abs(hits.sum() - n * expected_share) < 4 * sigma


def test_truth_positions_inside_frame_and_seen_in_their_pixel():
    emu = CameraEmulator(SMALL_SHAPE, seed=5)
    frames, truth = emu.generate(5)
    h, w = SMALL_SHAPE
    assert truth.n_frames == 5
    assert list(truth.frame_ids) == [0, 1, 2, 3, 4]
    for frame, pos, energy in zip(frames, truth.positions, truth.energies, strict=True):
        assert pos.dtype == np.float64 and pos.shape[1] == 2
        assert (pos[:, 0] >= 0).all() and (pos[:, 0] < h).all()
        assert (pos[:, 1] >= 0).all() and (pos[:, 1] < w).all()
        assert energy.shape == (len(pos),)
        r, c = pos[:, 0].astype(int), pos[:, 1].astype(int)
        excess = frame[r, c].astype(np.float64) - truth.dark[r, c]
        # the hit pixel holds the largest share of the charge cloud
        assert (excess > 3 * truth.read_noise_adu).mean() > 0.95


def test_electron_signal_is_moyal_with_the_documented_mean():
    emu = CameraEmulator(SMALL_SHAPE, dose_rate_e_per_px_s=150.0, seed=6)
    _, truth = emu.generate(2)
    e = np.concatenate(truth.energies).astype(np.float64)
    sd = emu.electron_scale_adu * math.pi / math.sqrt(2)  # Moyal std
    assert abs(e.mean() - truth.electron_adu_mean) < 4 * sd / math.sqrt(len(e))
    assert truth.electron_adu_mean == pytest.approx(100.0 + 18.0 * MOYAL_MEAN)
    # most probable value (mode) near loc: median of the standard Moyal is -ln(0.4549)
    assert np.median(e) == pytest.approx(100.0 + 18.0 * 0.7877, abs=1.5)


def test_gamma_deposit_has_the_moyal_mean_and_its_own_spread():
    emu = CameraEmulator(
        SMALL_SHAPE, dose_rate_e_per_px_s=150.0, seed=6, deposit="gamma", deposit_shape=4.0
    )
    _, truth = emu.generate(2)
    e = np.concatenate(truth.energies).astype(np.float64)
    sd = truth.electron_adu_mean / 2.0  # gamma of shape 4: relative spread 1/2
    assert abs(e.mean() - truth.electron_adu_mean) < 4 * sd / math.sqrt(len(e))
    assert np.std(e) == pytest.approx(sd, rel=0.1)
    # unlike the Moyal (median about 114 ADU), a gamma of shape 4 puts its median below the mean
    assert np.median(e) < 0.95 * truth.electron_adu_mean
    assert truth.params["deposit"] == "gamma"
    with pytest.raises(ValueError, match="deposit"):
        CameraEmulator(SMALL_SHAPE, deposit="landau")


def test_deposited_charge_adds_up():
    emu = CameraEmulator(SMALL_SHAPE, seed=7, xray_rate_per_frame=0.0, hot_pixel_fraction=0.0)
    n = 10
    frames, truth = emu.generate(n)
    excess = (frames.astype(np.float64) - truth.dark).sum()
    deposited = sum(float(e.sum()) for e in truth.energies)
    h, w = SMALL_SHAPE
    noise = math.sqrt(n * (h * w * emu.read_noise_adu**2 + h * (w * emu.row_noise_adu) ** 2))
    # gain has mean 1; a little charge falls off the frame edges
    assert abs(excess - deposited) < 4 * noise + 0.01 * deposited


def test_dark_frames_have_no_pixel_above_6_sigma_except_hot():
    emu = CameraEmulator(SMALL_SHAPE, seed=8, hot_pixel_fraction=1e-4)
    frames, truth = emu.dark_frames(6)
    assert all(len(p) == 0 for p in truth.positions)
    assert all(len(x) == 0 for x in truth.xray_positions)
    assert truth.dose_per_frame == 0
    above = frames.astype(np.float64) > truth.dark + 6 * truth.read_noise_adu
    rows, cols = np.nonzero(above.any(axis=0))
    hot = {tuple(p) for p in truth.hot_pixels.tolist()}
    assert len(hot) == round(1e-4 * SMALL_SHAPE[0] * SMALL_SHAPE[1])
    assert {(int(r), int(c)) for r, c in zip(rows, cols, strict=True)} == hot
    # the noise is what the truth says it is
    mask = np.ones(SMALL_SHAPE, dtype=bool)
    mask[truth.hot_pixels[:, 0], truth.hot_pixels[:, 1]] = False
    resid = (frames.astype(np.float64) - truth.dark)[:, mask]
    var = truth.read_noise_adu**2 + truth.row_noise_adu**2 + 1 / 12
    assert resid.var() == pytest.approx(var, rel=0.03)
    assert abs(resid.mean()) < 4 * math.sqrt(
        var / resid.size + truth.row_noise_adu**2 / (6 * SMALL_SHAPE[0])
    )


def test_generate_dose_zero_equals_dark_frames():
    a, _ = CameraEmulator(SMALL_SHAPE, seed=9).generate(2, dose=0)
    b, _ = CameraEmulator(SMALL_SHAPE, seed=9).dark_frames(2)
    np.testing.assert_array_equal(a, b)


def test_xrays_are_far_brighter_than_electrons():
    emu = CameraEmulator(SMALL_SHAPE, seed=10, xray_rate_per_frame=3.0)
    frames, truth = emu.generate(4)
    xr = [(i, *p) for i, x in enumerate(truth.xray_positions) for p in x.tolist()]
    assert len(xr) > 0
    for i, r, c in xr:
        assert frames[i, r, c] - truth.dark[r, c] > 10 * truth.electron_adu_mean


def test_uint8_saturates_instead_of_wrapping():
    kw = dict(seed=11, dose_rate_e_per_px_s=3000.0, adu_scale=1.0)  # 2 e/px/frame
    f16, _ = CameraEmulator(SMALL_SHAPE, dtype="uint16", **kw).generate(2)
    f8, _ = CameraEmulator(SMALL_SHAPE, dtype="uint8", **kw).generate(2)
    assert f8.dtype == np.uint8
    assert (f16 > 255).mean() > 0.3  # the comparison below is not vacuous
    np.testing.assert_array_equal(f8, np.minimum(f16, 255).astype(np.uint8))


def test_uint8_default_scale_is_usable():
    emu = CameraEmulator(SMALL_SHAPE, dtype="uint8", seed=12)
    frames, truth = emu.generate(3)
    assert truth.electron_adu_mean > 20 * truth.read_noise_adu
    assert truth.dark.mean() + truth.electron_adu_mean * 2 < 255
    assert (frames == 255).sum() >= len(truth.hot_pixels)  # hot pixels saturate


def test_same_seed_same_frames_and_calls_continue_the_stream():
    def run(seed):
        emu = CameraEmulator(SMALL_SHAPE, seed=seed, pattern="image")
        a, ta = emu.generate(2)
        d, _ = emu.dark_frames(1)
        b, tb = emu.generate(3)
        return np.concatenate([a, d, b]), ta.positions + tb.positions, tb.frame_ids

    f1, p1, ids = run(13)
    f2, p2, _ = run(13)
    f3, _, _ = run(14)
    np.testing.assert_array_equal(f1, f2)
    for x, y in zip(p1, p2, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(f1, f3)
    assert list(ids) == [3, 4, 5]
    # splitting a generate call does not change the frames
    whole, _ = CameraEmulator(SMALL_SHAPE, seed=13).generate(4)
    emu = CameraEmulator(SMALL_SHAPE, seed=13)
    parts = np.concatenate([emu.generate(1)[0], emu.generate(3)[0]])
    np.testing.assert_array_equal(whole, parts)


def test_pool_is_cached_and_distinct():
    emu = CameraEmulator(SMALL_SHAPE, seed=15, pool_size=3)
    frames, truth = emu.pool()
    assert frames.shape == (3, *SMALL_SHAPE)
    assert emu.pool()[0] is frames
    assert not np.array_equal(frames[0], frames[1])
    sel = truth.take([0, 1, 2, 0], frame_ids=[10, 11, 12, 13])
    assert sel.n_frames == 4 and list(sel.frame_ids) == [10, 11, 12, 13]
    assert sel.positions[3] is truth.positions[0]


def test_truth_save_load_round_trip(tmp_path):
    emu = CameraEmulator(SMALL_SHAPE, seed=16, xray_rate_per_frame=2.0)
    _, truth = emu.generate(3)
    path = tmp_path / "truth.h5"
    truth.save(path)
    back = Truth.load(path)
    assert back.frame_shape == truth.frame_shape
    np.testing.assert_array_equal(back.frame_ids, truth.frame_ids)
    for name in ("positions", "energies", "xray_positions"):
        for x, y in zip(getattr(back, name), getattr(truth, name), strict=True):
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(back.dark, truth.dark)
    np.testing.assert_array_equal(back.gain, truth.gain)
    np.testing.assert_array_equal(back.hot_pixels, truth.hot_pixels)
    assert back.read_noise_adu == truth.read_noise_adu
    assert back.electron_adu_mean == truth.electron_adu_mean
    assert back.params == truth.params


def test_truth_load_rejects_other_files(tmp_path):
    import h5py

    from streamstore.errors import FormatError

    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = 1
    with pytest.raises(FormatError, match="format"):
        Truth.load(path)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dtype": "int16"}, "dtype"),
        ({"pattern": "stripes"}, "pattern"),
        ({"dose_rate_e_per_px_s": -1.0}, "dose_rate_e_per_px_s"),
        ({"frame_time_s": 0.0}, "frame_time_s"),
        ({"psf_sigma_px": float("nan")}, "psf_sigma_px"),
        ({"seed": -1}, "seed"),
        ({"pool_size": 0}, "pool_size"),
        ({"hot_pixel_fraction": 2.0}, "hot_pixel_fraction"),
        ({"read_noise_adu": "loud"}, "read_noise_adu"),
    ],
)
def test_bad_parameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CameraEmulator(SMALL_SHAPE, **kwargs)


def test_bad_shape_and_n():
    with pytest.raises(ValueError, match="frame_shape"):
        CameraEmulator((0, 5))
    with pytest.raises(ValueError, match="frame_shape"):
        CameraEmulator((4, 5, 6))
    emu = CameraEmulator((8, 8))
    with pytest.raises(ValueError, match="n:"):
        emu.generate(-1)
    with pytest.raises(ValueError, match="dose"):
        emu.generate(1, dose=-0.5)


def test_pool_of_another_size_continues_the_stream():
    emu = CameraEmulator(SMALL_SHAPE, seed=17, pool_size=2)
    first, _ = emu.pool()
    other, truth = emu.pool(3)
    assert other.shape[0] == 3 and list(truth.frame_ids) == [2, 3, 4]
    assert emu.pool(3)[0] is other
    assert not np.array_equal(first[0], other[0])


def test_emulator_generates_frames_at_the_top_level():
    import streamstore

    emu = streamstore.CameraEmulator((8, 12), seed=1)
    frames, truth = emu.generate(2)
    assert frames.shape == (2, 8, 12) and frames.dtype == emu.dtype == np.uint16
    assert truth.frame_shape == emu.frame_shape == (8, 12)
