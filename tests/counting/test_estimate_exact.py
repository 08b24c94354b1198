"""The data-only estimate's fast pieces equal their plain numpy definitions, bit for bit:
histogram medians and clipped refits of integer samples, the per-pixel medians of the
first frames, the window model and the electron peaks' local maxima."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.special import ndtr

from streamstore.counting import dark_estimate as de
from streamstore.counting import robust
from streamstore.counting.calibration_estimate import _local_max_values


# -- plain numpy definitions ---------------------------------------------------------
def _robust_sigma_numpy(x):
    x = np.asarray(x, dtype=np.float64)
    centre = float(np.median(x))
    sigma = 1.4826 * float(np.median(np.abs(x - centre)))
    for _ in range(5):
        if sigma <= 0:
            break
        core = x[np.abs(x - centre) <= 3.0 * sigma]
        if core.size < 16:
            break
        new_centre = float(core.mean())
        new_sigma = float(core.std()) / 0.98658
        if abs(new_sigma - sigma) <= 1e-3 * sigma and abs(new_centre - centre) <= 1e-3 * sigma:
            centre, sigma = new_centre, new_sigma
            break
        centre, sigma = new_centre, new_sigma
    if sigma <= 0:
        sigma = float(np.std(x[np.abs(x - centre) <= max(1.0, 3.0 * float(np.std(x)))]))
    return centre, sigma


def _noise_peak_numpy(x):
    centre0, sigma0 = _robust_sigma_numpy(x)
    if not sigma0 > 0:
        return centre0, sigma0
    half = max(4, int(math.ceil(5 * sigma0)))
    base = int(math.floor(centre0)) - half
    counts = np.bincount(np.clip(x - base, 0, 2 * half), minlength=2 * half + 1)[1:-1]
    xs = np.arange(1, 2 * half, dtype=np.float64) + base
    smooth = np.convolve(counts, np.ones(3), mode="same")
    mode = float(xs[int(np.argmax(smooth))])
    sel = (xs >= mode - max(3.0, 2.5 * sigma0)) & (xs <= mode + max(1.0, 0.5 * sigma0))
    sel &= counts > 0
    if np.count_nonzero(sel) < 4:
        return centre0, sigma0
    xf, nf = xs[sel] - mode, counts[sel].astype(np.float64)
    coef = np.polyfit(xf, np.log(nf), 2, w=np.sqrt(nf))
    if not coef[0] < 0:
        return centre0, sigma0
    sigma = math.sqrt(-1.0 / (2.0 * coef[0]))
    centre = mode - coef[1] / (2.0 * coef[0])
    if not (math.isfinite(sigma) and 0.3 * sigma0 < sigma < 3.0 * sigma0):
        return centre0, sigma0
    return centre, sigma


def _start_residuals_numpy(sample):
    k = sample.shape[0]
    sample = sample.astype(np.int64)
    m = k - 1 if k % 2 == 0 else k - 2
    res = [sample[t] - np.median(np.delete(sample, t, axis=0)[:m], axis=0) for t in range(k)]
    return np.rint(np.stack(res)).astype(np.int64)


def _samples(rng):
    """Integer samples with even and odd counts, ties, spikes, tails and negatives."""
    out = []
    for n in (1, 2, 3, 4, 15, 16, 17, 18, 101, 1000, 4001):
        out.append(rng.integers(-3, 4, n))  # few values: ties everywhere
        noise = np.rint(rng.normal(rng.uniform(-50, 500), rng.uniform(0.2, 6), n))
        hits = rng.random(n) < 0.08
        noise[hits] += rng.integers(30, 3000, hits.sum())  # electrons: a tail above
        out.append(noise.astype(np.int64))
        spike = np.full(n, 7, np.int64)
        spike[: n // 9] += 1  # quantised: a spike at one value (the MAD is 0)
        out.append(spike)
    return out


# -- the tests -----------------------------------------------------------------------
def test_histogram_median_and_mad_equal_numpy(rng):
    for x in _samples(rng):
        values, lo, counts = robust._histogram(x)
        centre, mad = robust._median_mad(lo, counts, x.size)
        assert centre == float(np.median(x.astype(np.float64)))
        assert mad == float(np.median(np.abs(x - np.median(x.astype(np.float64)))))
        assert np.array_equal(values, x) and counts.sum() == x.size


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int16, np.uint16, np.uint8])
def test_robust_sigma_of_integers_equals_the_values_own(rng, dtype):
    for x in _samples(rng):
        if dtype in (np.uint16, np.uint8):
            x = x - x.min()
            if x.max() > np.iinfo(dtype).max:
                continue
        x = x.astype(dtype)
        assert robust.robust_sigma(x) == _robust_sigma_numpy(x)
        if dtype == np.int64:
            assert robust.noise_peak(x) == _noise_peak_numpy(x)
    wide = rng.integers(0, 1 << 40, 100)  # too wide for a histogram: the values' own
    assert robust._histogram(wide) is None
    assert robust.robust_sigma(wide) == _robust_sigma_numpy(wide)
    floats = rng.normal(3.0, 2.0, 5000).astype(np.float32)
    assert robust.robust_sigma(floats) == _robust_sigma_numpy(floats)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.int16, np.int8])
def test_start_residuals_equal_numpy_medians_of_the_other_frames(rng, dtype):
    for k in (2, 3, 4, 5, 7, 8, 9, 16, 17):
        for top in (3, 60):  # many ties, and few
            sample = rng.integers(0, top, (k, 9, 37)).astype(dtype)
            if np.dtype(dtype).kind == "i":
                sample -= dtype(top // 2)
            m = k - 1 if k % 2 == 0 else k - 2
            out = np.empty(sample.shape, np.int64)
            given = sample.astype(np.int16)  # as the estimator passes it: its compiled type
            given.flags.writeable = False
            de._run_rows(de._start_residual_rows, 9, given, m, out)
            np.testing.assert_array_equal(out, _start_residuals_numpy(sample), err_msg=str(k))


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.int16, np.int8])
def test_start_median_equals_numpy_with_ties(rng, dtype):
    for k in (1, 2, 3, 6, 7, 8, 15, 16):
        frames = rng.integers(0, 4, (k, 9, 37)).astype(dtype)
        if np.dtype(dtype).kind == "i":  # across zero, where the sign bit's flip orders them
            frames -= dtype(2)
        out = np.empty((9, 37), np.float32)
        # as the estimator passes them: unsigned bits, signed values through the sign bit
        de._run_rows(de._median_rows, 9, *de.as_read(frames, False), out)
        np.testing.assert_array_equal(out, np.median(frames, axis=0).astype(np.float32))


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.int16, np.int32, np.uint32])
def test_start_sigma_equals_the_numpy_definition(rng, dtype):
    for k in (2, 3, 8, 9):
        frames = np.rint(100 + rng.normal(0, 3, (k, 30, 50)))
        frames[rng.random(frames.shape) < 0.03] += 150
        frames = frames.astype(dtype)
        if dtype == np.uint16:  # values on both sides of 32768 (int16's wrap)
            frames[:, :15] += np.uint16(32668)
        m = k - 1 if k % 2 == 0 else k - 2
        ref = _noise_peak_numpy(_start_residuals_numpy(frames).reshape(-1))[1]
        ref = max(ref / math.sqrt(1.0 + de._median_variance(m)), 0.5)
        assert de._start_sigma(frames) == ref


def test_truncated_moments_equal_the_one_expression(rng):
    a = rng.normal(0, 4, (40, 30))
    b = a + rng.uniform(0.1, 6, a.shape)
    mean, var = de._truncated_moments(a, b)
    pa = np.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
    pb = np.exp(-0.5 * b * b) / math.sqrt(2.0 * math.pi)
    z = np.where(a > 0, ndtr(-a) - ndtr(-b), ndtr(b) - ndtr(a))
    ref_mean = (pa - pb) / z
    np.testing.assert_array_equal(mean, ref_mean)
    np.testing.assert_array_equal(var, 1.0 + (a * pa - b * pb) / z - ref_mean * ref_mean)
    # a remembered window model is the model, and a copy: changing it changes nothing
    first = de._window_model_copy(3.0, 2.5)
    first[2][:] = 0.0
    for got, ref in zip(de._window_model_copy(3.0, 2.5), de.window_model(3.0, 2.5), strict=True):
        np.testing.assert_array_equal(got, ref)


def test_segment_sigma_equals_its_per_pixel_definition():
    from streamstore.camera.emulator import CameraEmulator

    frames, _ = CameraEmulator((48, 80), seed=4, dose_rate_e_per_px_s=20.0).generate(40)
    est = de.DarkEstimator(frames[:8])
    est.update_batch(frames[8:15])  # earlier segments and a current one
    for v_start in (0.0, 0.3):
        n = est.n.reshape(-1).astype(np.float64)
        ok = (n >= 2) & (est.low.reshape(-1) < de.LOW_HOT)
        n = n[ok]
        s1 = est.s1.reshape(-1)[ok].astype(np.float64)
        ss = np.maximum(est.s2.reshape(-1)[ok] - s1 * s1 / n, 0.0) / (n - 1.0)
        ww = est.w.reshape(-1)[ok].astype(np.float64)
        assert len(np.unique(ww)) > 1  # counts of earlier values differ per pixel
        sigma = est.sigma
        for _ in range(8):
            a, b = (c * est.sigma / sigma for c in est.clip)
            _, vt0, _, vtab = de.window_model(a, b)
            tau2 = np.where(ww == 0, v_start, 1.0 / (vt0 * np.maximum(ww, 1.0)))
            t = np.minimum(tau2 * ((len(vtab) - 1) / de.TAU2_MAX), len(vtab) - 1.000001)
            i = t.astype(np.int64)
            vbar = vtab[i] + (t - i) * (vtab[i + 1] - vtab[i])
            new = max(math.sqrt(float(np.mean(ss / vbar))), 1e-3)
            done = abs(new - sigma) <= 1e-4 * sigma
            sigma = new
            if done:
                break
        assert est._segment_sigma(v_start) == max(sigma, 1e-3)


def test_local_maxima_equal_a_maximum_filter(rng):
    for _ in range(200):
        h, w = rng.integers(1, 20, 2)
        f = rng.integers(-3, 4, (h, w)).astype(np.float64)  # ties between neighbours
        f[rng.random((h, w)) < 0.2] = -np.inf  # masked pixels
        candidate = rng.random((h, w)) < rng.uniform(0, 1)
        peak = ndimage.maximum_filter(f, size=3, mode="constant", cval=-np.inf)
        np.testing.assert_array_equal(_local_max_values(f, candidate), f[candidate & (f >= peak)])


def test_sampled_pixels_come_back_sorted(rng):
    from streamstore.counting.calibration_estimate import _sorted_unique

    for size, n in ((1000, 999), (100_000, 2000), (100_000, 1000), (10**7, 100)):
        idx = rng.choice(size, size=n, replace=False)
        np.testing.assert_array_equal(_sorted_unique(idx.copy(), size), np.sort(idx))


def test_noise_map_equals_its_numpy_definition(rng):
    h, w = 33, 70
    centre = rng.normal(100, 5, (h, w)).astype(np.float32)
    var = rng.uniform(0, 30, (h, w)).astype(np.float32)
    var[0, :5] = 0.0
    counts = rng.integers(0, 80, (h, w)).astype(np.uint16)
    low = rng.integers(0, 3, (h, w)).astype(np.uint8)
    rms = np.float32(3.7)
    for check in (False, True):
        tops = (np.float32(108.25), np.float32(4.5)) if check else (np.float32(0),) * 2
        args = (centre, var, counts, low, check, *tops, rms)
        hot = np.empty((h, w), bool)
        noise = np.empty((h, w), np.float32)
        de._run_rows(de._noise_rows, h, *args, hot, noise)
        ref_hot, ref_noise = de.noise_numpy(*args)
        assert hot.any() and (noise > rms).any() and (noise == rms).any()
        np.testing.assert_array_equal(hot, ref_hot)
        np.testing.assert_array_equal(noise, ref_noise)
