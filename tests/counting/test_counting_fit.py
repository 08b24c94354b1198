"""The "fit" counting rule: its cloud fit in three forms bit for bit, and what it finds.

Parity: numba == Python reference == native_ref (C) on windows cut from seeded
emulator frames (one and two electrons, masked pixels, frame edges) and on
degenerate windows; the whole method in its three implementations and at two
thread counts gives the same events. Accuracy: at sweep points of the
emulator's physics, against the resolve rule on the same frames.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from native_ref import fit_windows_native
from streamstore.camera.emulator import CameraEmulator
from streamstore.counting import Counter
from streamstore.counting._fit_kernels import fit_windows
from streamstore.counting._fit_reference import fit_windows_reference
from streamstore.counting.accuracy import score_batch
from streamstore.counting.calibration import Calibration
from streamstore.counting.fit import cloud_table, cloud_width, fit_maps, fit_splits, lone_windows
from streamstore.counting.resolve import ResolveParams
from tests.counting.test_counting_resolve import _same

NO_SPLITS = ResolveParams(pair_charge=64.0, any_charge=64.0, pair_spread=16.0)


def _emulated(shape, dose, n, seed, **physics):
    emu = CameraEmulator(shape, dose_rate_e_per_px_s=dose * 1500, seed=seed, **physics)
    dark, _ = emu.dark_frames(40)
    frames, truth = emu.generate(n)
    return frames, truth, Calibration.from_dark_frames(dark, xray_threshold=1000.0)


@pytest.fixture(scope="module")
def crowded():
    """Frames at 0.03 e/px/frame with a masked column and a wide cloud, a
    calibration, and the lone events' windows (those at the frame's edge too)."""
    frames, truth, cal = _emulated((64, 96), 0.03, 6, 31, psf_sigma_px=0.6)
    mask = np.zeros(cal.frame_shape, bool)
    mask[:, 40] = True
    cal = Calibration(cal.dark, cal.noise, mask=mask, xray_threshold=1000.0)
    c = Counter(cal, subpixel=True, method="resolve", resolve=NO_SPLITS, dose=False)
    base = c(frames)
    _, _, dark, gain, _, _ = c._derived[next(k for k in c._derived if k[0] == "resolve_maps")]
    lone = lone_windows(frames, dark, gain, fit_maps(cal, gain), base.offsets, base.indices)
    return frames, truth, cal, base, lone


def test_three_forms_fit_alike(crowded):
    *_, (which, charge, win, iv) = crowded
    assert win.shape[0] > 150
    assert (iv == 0).any(axis=1).sum() > 10  # masked or off-frame pixels in some windows
    odd = np.zeros((4, 25))
    odd[1, 12] = 50.0  # one bright pixel
    odd[2] = -3.0  # no positive charge: the one cloud starts empty
    odd[3, [6, 18]] = 80.0  # two pixels two apart
    win = np.concatenate([win[:60], odd])
    iv = np.concatenate([iv[:60], np.full((4, 25), 1 / 16)])
    for width in (0.35, 0.6):
        tab = cloud_table(width)
        for drop in (5.0, 30.0, math.inf):
            a = fit_windows(win, iv, *tab, drop, threads=1)
            b = fit_windows_reference(win, iv, *tab, drop)
            c = fit_windows_native(win, iv, *tab, drop)
            assert np.array_equal(a, b) and np.array_equal(a, c), (width, drop)
            if drop == 5.0:
                assert (a[:, 5] != 0).sum() > 20  # the two-cloud path is compared too
            if drop == math.inf:
                assert np.array_equal(a[:, 0], a[:, 1]) and not a[:, 5:].any()


def test_the_fit_finds_two_clouds_where_there_are_two():
    from scipy.special import erf

    edges = np.arange(-2.0, 3.0)

    def cloud(a, y, x):
        def share(mu):
            s = math.sqrt(2.0) * 0.5
            return 0.5 * (erf((edges + 1 - mu) / s) - erf((edges - mu) / s))

        return a * np.outer(share(y), share(x))

    one = cloud(120.0, 0.4, 0.6)
    two = cloud(100.0, 0.5, 0.0) + cloud(110.0, 0.5, 1.4)
    win = np.stack([one.ravel(), two.ravel()])
    out = fit_windows(win, np.full((2, 25), 1 / 16), *cloud_table(0.5), 1.0, threads=1)
    assert out[0, 0] < 1e-3  # one cloud fits one cloud (up to the table's steps)
    assert out[1, 0] > 50 and out[1, 1] < 1e-3, out[1]
    assert np.allclose(out[0, 2:5], [120.0, 0.4, 0.6], atol=0.01)
    centres = sorted([tuple(out[1, 6:8]), tuple(out[1, 9:11])], key=lambda p: p[1])
    assert np.allclose(centres, [(0.5, 0.0), (0.5, 1.4)], atol=0.01)


def test_cloud_width_is_measured(crowded):
    *_, (which, charge, win, iv) = crowded
    assert abs(cloud_width(win, iv) - 0.6) < 0.06


def _counted(frames, cal, **kw):
    return Counter(cal, subpixel=True, method="fit", dose=False, **kw)(frames)


def test_three_implementations_count_alike(crowded):
    frames, _, cal, _, _ = crowded
    batches = [_counted(frames[:3], cal, implementation=i) for i in ("reference", "native")]
    numba = _counted(frames[:3], cal, threads=1)
    assert all(_same(numba, b) for b in batches)
    # splits happened: the method differs from the resolve rule's base events
    base = Counter(cal, subpixel=True, method="resolve", resolve=NO_SPLITS, dose=False)
    assert numba.n_events > base(frames[:3]).n_events


def test_thread_count_does_not_change_the_events():
    frames, _, cal = _emulated((128, 192), 0.02, 8, 37)
    one = Counter(cal, subpixel=True, method="fit", dose=False, threads=1)
    two = Counter(cal, subpixel=True, method="fit", dose=False, threads=2)
    a, b = one(frames), two(frames)
    assert one.cloud_width == two.cloud_width
    assert _same(a, b)
    plain = Counter(cal, method="fit", dose=False, threads=2)(frames)
    assert np.array_equal(plain.indices, a.indices) and plain.subpixel is None


def test_events_stay_one_per_pixel_in_order(crowded):
    _, _, _, base, lone = crowded
    which, charge, win, iv = lone

    # a fitter that calls every fitted window two clouds in one pixel, or two apart
    def two_clouds(win, iv, cdf, pdf, t0, inv_h, drop):
        out = np.zeros((win.shape[0], 11))
        out[:, 0] = 1e6
        out[:, 2:5] = [200.0, 0.5, 0.5]
        out[:, 5:] = [100.0, 0.3, 0.3, 100.0, 0.6, 0.4]
        out[1::2, 8:] = [100.0, 1.9, -0.9]
        return out

    shape = (base.n_frames, *base.frame_shape)
    off, idx, sub = fit_splits(shape, lone, base.offsets, base.indices, base.subpixel, 100,
                               0.5, 30.0, 0, two_clouds)  # fmt: skip
    # every fitted window splits but where its second pixel leaves the frame
    r, c = np.divmod(base.indices[which].astype(np.int64), base.frame_shape[1])
    leaves = r + 1 >= base.frame_shape[0]  # both seconds lie a row down
    leaves[1::2] |= c[1::2] - 1 < 0
    assert off[-1] == base.n_events + which.size - leaves.sum()
    for i in range(base.n_frames):
        f = idx[off[i] : off[i + 1]]
        assert np.all(np.diff(f.astype(np.int64)) > 0)
    assert sub is not None and sub.shape == idx.shape and sub.max() <= 15


#: (physics, least recall, least gain over the resolve rule) at 0.01 e/px/frame;
#: floors a little under what these seeds measure
ACCURACY_CASES = [
    ({}, 0.95, 0.008),
    ({"gain_sigma": 0.1, "read_noise_adu": 2.0}, 0.95, 0.008),
    ({"psf_sigma_px": 0.3}, 0.95, 0.008),
    ({"psf_sigma_px": 0.3, "read_noise_adu": 6.0}, 0.95, 0.005),
]


@pytest.mark.parametrize(("physics", "least_recall", "least_gain"), ACCURACY_CASES)
def test_fit_finds_merged_electrons_at_001(physics, least_recall, least_gain):
    frames, truth, cal = _emulated((256, 384), 0.01, 16, 19, **physics)
    rule = score_batch(Counter(cal, subpixel=True, method="resolve", dose=False)(frames),
                       truth.positions)  # fmt: skip
    fit = score_batch(_counted(frames, cal), truth.positions)
    assert fit.recall >= least_recall, fit
    assert fit.recall >= rule.recall + least_gain, (fit, rule)
    assert fit.precision >= 0.999, fit
    assert fit.rms_error_px <= 0.25, fit


def test_bad_method_names_the_choices():
    cal = Calibration(np.full((4, 4), 10.0), np.ones((4, 4)))
    with pytest.raises(ValueError, match="'fit'"):
        Counter(cal, np.uint16, method="fits")
