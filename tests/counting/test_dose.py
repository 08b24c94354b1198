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
from streamstore.counting import Counter
from streamstore.counting.dose import (
    HARD_CORE_AREA,
    MIN_EVENTS,
    DoseEstimator,
    coarse_counts,
    coarse_counts_reference,
    corrected_electrons,
    electrons_from_events,
    events_from_electrons,
    exclusion_areas,
    packing_excess,
    pair_histogram,
    pair_histogram_reference,
    pool_tiles,
    pool_tiles_reference,
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


@pytest.mark.parametrize(
    ("shape", "density"), [((37, 53), 0.08), ((64, 64), 0.08), ((90, 300), 0.004)]
)
def test_pair_histogram_numba_matches_reference(shape, density):
    """Dense frames, and sparse wide ones whose events skip rows (the kernel follows
    the row from event to event) and span several 64-bit words per row."""
    rng = np.random.default_rng(3)
    b = _random_batch(rng, shape, 5, density)
    ref = pair_histogram_reference(b, 5)
    assert ref.sum() > 100 if density > 0.01 else ref.sum() > 5
    np.testing.assert_array_equal(pair_histogram(b, 5), ref)
    # the last pixel of a row and the first of the next are not neighbours
    edge = EventBatch(np.array([0, 2]), np.array([shape[1] - 1, shape[1]], np.uint32),
                      frame_shape=shape)  # fmt: skip
    assert pair_histogram(edge, 2).sum() == pair_histogram_reference(edge, 2).sum() == 0
    below = EventBatch(np.array([0, 2]), np.array([1, shape[1] + 3], np.uint32),
                       frame_shape=shape)  # fmt: skip
    assert pair_histogram(below, 2)[1, 2 + 2] == pair_histogram_reference(below, 2)[1, 4] == 1


def test_pair_count_limited_to_a_frames_first_events():
    rng = np.random.default_rng(5)
    b = _random_batch(rng, (64, 96), 4, 0.06)
    full = pair_histogram_reference(b, 5)
    for first in (0, 1, 57, 200):
        ref = pair_histogram_reference(b, 5, first)
        np.testing.assert_array_equal(pair_histogram(b, 5, first), ref)
        assert ref.sum() <= full.sum()
    assert pair_histogram_reference(b, 5, 0).sum() == 0
    assert 0 < pair_histogram_reference(b, 5, 57).sum() < full.sum()  # the limit bites
    np.testing.assert_array_equal(pair_histogram_reference(b, 5, 10**9), full)
    # the second event of a pair may lie beyond the first events: more pairs than
    # among the first events alone
    one = b.slice(0, 1)
    k = int(one.counts[0]) // 2
    alone = EventBatch(np.array([0, k]), one.indices[:k], frame_shape=one.frame_shape)
    assert pair_histogram(one, 5, k).sum() > pair_histogram(alone, 5).sum() > 0


@pytest.mark.parametrize(("shape", "tile"), [((37, 53), 8), ((64, 64), 8), ((40, 70), 3)])
def test_pool_tiles_numba_matches_reference(shape, tile):
    rng = np.random.default_rng(6)
    b = _random_batch(rng, shape, 3, 0.08)
    n_tx = -(-shape[1] // tile)
    n_tiles = -(-shape[0] // tile) * n_tx
    got_counts = np.full(n_tiles, 2.0)
    ref_counts = np.full(n_tiles, 2.0)
    got = pool_tiles(b.indices, shape[1], tile, n_tx, got_counts)
    ref = pool_tiles_reference(b.indices, shape[1], tile, n_tx, ref_counts)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(got_counts, ref_counts)
    assert ref_counts.sum() == 2.0 * n_tiles + b.n_events > 2.0 * n_tiles


@pytest.mark.parametrize(("n_ty", "n_tx"), [(8, 12), (9, 13), (3, 2), (1, 1)])
def test_coarse_counts_numba_matches_reference(n_ty, n_tx):
    """Equal bit for bit, forgetting's fractional counts included (the same order
    of additions), whole coarse tiles and those the frame's edge cuts short."""
    rng = np.random.default_rng(11)
    counts = rng.random(n_ty * n_tx) * rng.integers(0, 2, n_ty * n_tx) * 1e3 / 7
    got = coarse_counts(counts, n_ty, n_tx, 4)
    ref = coarse_counts_reference(counts, n_ty, n_tx, 4)
    assert got.tobytes() == ref.tobytes()
    n_cx = -(-n_tx // 4)
    grid = counts.reshape(n_ty, n_tx)
    for cy in range(-(-n_ty // 4)):
        for cx in range(n_cx):
            block = grid[4 * cy : 4 * cy + 4, 4 * cx : 4 * cx + 4]
            assert got[cy * n_cx + cx] == pytest.approx(block.sum(), rel=1e-12, abs=1e-12)


def test_estimators_agree_whatever_pools_the_tiles():
    """The numba and numpy estimators give the same electrons, with and without
    forgetting (the lookup of whole tiles' factors and the direct computation)."""
    rng = np.random.default_rng(8)
    b = _random_batch(rng, (50, 77), 12, 0.05)
    for memory in (None, 5.0):
        fast = DoseEstimator((50, 77), memory=memory, refresh=3)
        slow = DoseEstimator((50, 77), memory=memory, refresh=3, implementation="reference")
        two = DoseEstimator((50, 77), memory=memory, refresh=3, threads=2)  # pairs beside
        for i in range(0, 12, 4):
            expect = slow.update(b.slice(i, i + 4))
            np.testing.assert_array_equal(fast.update(b.slice(i, i + 4)), expect)
            np.testing.assert_array_equal(two.update(b.slice(i, i + 4)), expect)
        np.testing.assert_array_equal(two.pair_counts(), slow.pair_counts())
        np.testing.assert_array_equal(fast._tile_factor(), slow._tile_factor())
    # the lookup gives what the direct computation gives: tiles of many events
    # from their own count, the others from their coarse tile's (both here: a
    # dense left part, a dim right one)
    half = _random_batch(rng, (50, 77), 12, 0.05)
    keep = (half.indices % 77) < 40
    keep |= rng.random(keep.size) < 0.05
    frame_of = np.repeat(np.arange(12), half.counts)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(frame_of[keep], minlength=12))])
    mixed = EventBatch(offsets, half.indices[keep], frame_shape=(50, 77))
    est = DoseEstimator((50, 77), refresh=3)
    est.update(mixed)
    direct = est._factor_of(*est._effective())
    np.testing.assert_array_equal(est.event_factors(np.arange(direct.size)), direct)
    assert direct.max() > 1.0
    coarse = np.bincount(est._coarse_of, est._counts)
    own = est._own_of(coarse)
    assert own.any() and not own.all()  # both kinds of tile here
    assert np.all(coarse[own] * 64 / est._coarse_area[own] >= MIN_EVENTS)
    # and the tile flags looked up by count are those of the electron densities of
    # the tiles' own counts, from the numba lookup and its reference, with and
    # without forgetting
    limits = ((0.05, np.inf), (-np.inf, 0.04), (0.02, 0.06))
    for memory in (None, 5.0):
        for impl in ("numba", "reference"):
            est = DoseEstimator(
                (50, 77), refresh=3, memory=memory, implementation=impl, flag_limits=limits
            )
            est.update(b)
            mu = est.event_density().ravel()
            lam = (est._factor_of(est._counts, est._tile_area) * mu).reshape(mu.size)
            for flag, (low, high) in zip(est.tile_flags(), limits, strict=True):
                want = (lam > low) & (lam < high) & (mu > 0)
                np.testing.assert_array_equal(flag.ravel(), want)
                assert flag.any() and not flag.all()


def test_tile_lookups_match_their_references():
    from streamstore.counting.coincidence import (
        lookup_events,
        lookup_events_reference,
        lookup_tiles,
        lookup_tiles_reference,
    )

    rng = np.random.default_rng(9)
    # tiles with few events (their coarse tile's value) and with many (their own)
    counts = rng.poisson(rng.choice([0.7, 60.0], 20_011)).astype(np.float64)
    classes = rng.integers(0, 4, counts.size).astype(np.uint8)
    lut = rng.uniform(1.0, 1.5, (4, int(counts.max()) + 1))
    coarse_of = np.arange(counts.size) // 16
    own = rng.random(coarse_of[-1] + 1) < 0.5
    coarse = rng.uniform(1.0, 1.5, own.size)
    args = (coarse_of, own, coarse)
    tiles = np.sort(rng.integers(0, counts.size, 5000))
    expect = lookup_events_reference(tiles, counts, classes, lut, *args)
    np.testing.assert_array_equal(lookup_events(tiles, counts, classes, lut, *args), expect)
    for i in range(40):
        t, k = tiles[i], coarse_of[tiles[i]]
        assert expect[i] == (lut[classes[t], int(counts[t])] if own[k] else coarse[k])
    luts = rng.random((2, 4, lut.shape[1])) < 0.5
    flags = lookup_tiles_reference(counts, classes, luts)
    assert flags.shape == (2, counts.size) and flags.any() and not flags.all()
    np.testing.assert_array_equal(lookup_tiles(counts, classes, luts), flags)


def _hard_core_events(rng, shape, n_frames, lam):
    """Events of the 3 x 3 rule on electrons without charge spread: Poisson arrivals
    per pixel with exchangeable signals (a pixel's value is its brightest
    electron's: electrons of one pixel make one event), an event where a pixel's
    value beats its 8 neighbours' (not the emulator: the hard core alone)."""
    from scipy.ndimage import maximum_filter

    h, w = shape
    offsets, idx, electrons = [0], [], 0
    for _ in range(n_frames):
        n = rng.poisson(lam, (h, w))
        hit = n > 0
        # the largest of n uniform signals: U ** (1 / n)
        value = np.where(hit, rng.random((h, w)) ** (1.0 / np.maximum(n, 1)) + 1.0, 0.0)
        around = maximum_filter(value, size=3, mode="constant")
        keep = np.flatnonzero(hit & (value >= around))
        idx.append(keep)
        offsets.append(offsets[-1] + keep.size)
        electrons += int(n.sum())
    idx = np.concatenate(idx).astype(np.uint32)
    return EventBatch(np.array(offsets), idx, frame_shape=shape), electrons


@pytest.mark.parametrize("lam", [0.05, 0.1])
def test_packing_of_the_hard_core_is_what_the_model_adds_back(lam):
    """Events of the hard core alone pack: two pixels apart they are more frequent
    than far apart (g > 1), which reads as a negative soft area. packing_excess
    gives that excess (the check can fail: it is 0.49 and 0.90 px of area here), and
    with it added back the measured soft area of the hard core alone is 0."""
    rng = np.random.default_rng(int(lam * 1000))
    shape = (512, 512)
    b, electrons = _hard_core_events(rng, shape, 80, lam)
    hist = pair_histogram(b, 5)
    _, raw = exclusion_areas(hist, shape)  # clipped at 0: the excess is below it
    dy = np.arange(6)[:, None]
    dx = np.arange(-5, 6)[None, :]
    cheb = np.maximum(dy, np.abs(dx))
    half = (dy > 0) | (dx > 0)
    rate = hist / ((shape[0] - dy) * (shape[1] - np.abs(dx)))
    far = half & (cheb >= 4)
    g = rate / rate[far].mean()
    measured = 2.0 * float(np.sum(g[half & (cheb == 2)] - 1.0))
    expected = packing_excess(lam)
    assert expected > 10 * lam * 0.85 and raw == 0.0
    # 8 offsets two pixels apart of >= 30,000 pairs each: the sum to about 0.03
    assert measured == pytest.approx(expected, abs=0.1)
    hard, soft = exclusion_areas(hist, shape, pair_events=b.n_events)
    assert hard == pytest.approx(9.0) and soft < 0.1
    # and the corrected dose of the hard core alone is the electrons that arrived
    assert b.n_events / electrons < 1.0 - 3 * lam  # the check can fail: 20 and 34 % lost
    assert corrected_electrons(b).sum() / electrons == pytest.approx(1.0, abs=0.01)


def test_a_smaller_hard_core_packs_less():
    """A counter that keeps electrons one pixel apart apart (the fit of clouds)
    measures a hard core below 9 px: its events pack less, and so less is added
    back; the 3 x 3 rule's hard core keeps the excess it had."""
    lam = 0.05
    full = packing_excess(lam)
    assert packing_excess(lam, 2, 9.0) == full
    assert full > packing_excess(lam, 2, 6.0) > packing_excess(lam, 2, 3.0) > 0.0


def test_the_fit_counters_dose_is_corrected_within_2_percent():
    emu = CameraEmulator((256, 384), dose_rate_e_per_px_s=0.05 * 1500, seed=23)
    dark, _ = emu.dark_frames(40)
    frames, truth = emu.generate(8)
    cal = Calibration.from_dark_frames(dark, xray_threshold=1000.0)
    b = Counter(cal, method="fit", threads=2)(frames)
    n_true = sum(len(p) for p in truth.positions)
    assert b.n_events / n_true < 0.85  # the check can fail: a sixth of the electrons merge
    assert b.electrons.sum() / n_true == pytest.approx(1.0, abs=0.02)


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
        # 24 frames: with 12 (3,300-3,500 far pairs) the soft area's noise alone
        # moved these points by 1-2 % (the raw soft area 1.9 px against 0.8 with
        # more pairs at point spread 0.3; 3.7 against 2.8 at the defaults: 1.021)
        ("uniform", 0.02, 24, {}),
        ("uniform", 0.02, 24, {"gain_sigma": 0.1, "psf_sigma_px": 0.3}),
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
    """A stream's first frames take the densities of coarse tiles (32 x 32 pixels)
    until its tiles have pooled MIN_EVENTS events: on frames of 256 x 384 the disk
    spans several of them (on 128 x 192, 1.5: the stream's first frames are then
    a few % low, the coarse tiles straddling its edge)."""
    frames, truth, cal = _frames("disk", 0.003, 40, seed=22, shape=(256, 384))
    b = count(frames, cal)
    est = DoseEstimator((256, 384), refresh=4)
    per_frame = np.concatenate([est.update(b.slice(i, i + 1)) for i in range(b.n_frames)])
    pooled = corrected_electrons(b)
    assert per_frame.sum() == pytest.approx(pooled.sum(), rel=0.02)
    n_true = truth.counts()
    # per frame: the estimate follows the frame's own arrivals, not the series mean
    assert np.corrcoef(pooled, n_true)[0, 1] > 0.8


def test_a_short_stream_and_one_frame_take_coarse_tiles_where_tiles_are_empty():
    """At 0.025 e/px/frame a tile of 8 x 8 holds 1.4 events a frame: inverted alone,
    its noisy density gave one-frame count()s 0.953 of the electrons and a 12-frame
    stream 0.938 here (0.892 and 0.919 at the default point spread, where the
    counter also misses 1.5 % of lone electrons); through the coarse tiles 0.998
    and 0.989 (0.984 and 0.979). Point spread 0.3: the counter finds the lone
    electrons, so what is left is the model's."""
    frames, truth, cal = _frames("uniform", 0.025, 12, seed=24, shape=(512, 768), psf_sigma_px=0.3)
    n_true = truth.counts()
    one = np.array([count(frames[i], cal).electrons[0] for i in range(4)])
    assert one.sum() / n_true[:4].sum() == pytest.approx(1.0, abs=0.02)
    c = Counter(cal)
    stream = np.concatenate([c(frames[i : i + 1]).electrons for i in range(12)])
    assert stream.sum() / n_true.sum() == pytest.approx(1.0, abs=0.02)
    assert count(frames[0], cal).n_events / n_true[0] < 0.9  # what is corrected


def test_a_long_stream_keeps_the_counts_its_tables_were_made_for():
    """Between refreshes the pooled counts grow past those the tables were made for;
    the electrons per event are those of the last refresh (the counts then), so a
    stream of a few hundred frames at 0.05 e/px/frame ends where the pooled estimate
    does (the check can fail: looked up with the grown counts, the stream fell to
    0.87 of the truth after 200 frames, and numba read past the table's end), and the
    numpy reference, which would raise there, gives the same values."""
    b, truth = _count("uniform", 0.05, 200, seed=23)
    streams = {}
    for impl in ("numba", "reference"):
        est = DoseEstimator(SHAPE, implementation=impl)
        streams[impl] = np.concatenate([est.update(b.slice(i, i + 2)) for i in range(0, 200, 2)])
    np.testing.assert_allclose(streams["reference"], streams["numba"], rtol=1e-12)
    late = slice(100, 200)  # past the first refreshes, whose pooled maps are young
    stream = streams["numba"][late].sum()
    assert stream / corrected_electrons(b)[late].sum() == pytest.approx(1.0, abs=0.01)
    assert stream / truth.counts()[late].sum() == pytest.approx(1.0, abs=0.02)


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


# ------------------------------------------------------------ charge, count, Counter
def _frames(pattern, dose, n_frames, seed, shape=SHAPE, **emu_kw):
    emu = CameraEmulator(
        shape, pattern=pattern, dose_rate_e_per_px_s=dose * 1500, seed=seed, **emu_kw
    )
    dark, _ = emu.dark_frames(40)
    cal = Calibration.from_dark_frames(dark, xray_threshold=1000.0)
    frames, truth = emu.generate(n_frames)
    return frames, truth, cal


def test_charge_kernels_match_their_references():
    from streamstore.counting import dose as D

    shape = (45, 61)  # tiles cut at both edges
    frames, _, cal = _frames("disk", 0.05, 3, seed=31, shape=shape, xray_rate_per_frame=4.0)
    mask = np.zeros(shape, bool)
    mask[3, 4] = mask[20, 30] = True
    gain = np.linspace(0.9, 1.1, 45 * 61).reshape(shape)
    cal = Calibration(cal.dark, cal.noise, mask=mask, gain=gain, xray_threshold=1000.0)
    maps = D._signal_maps(cal, np.uint16)
    batch = count(frames, cal)
    rng = np.random.default_rng(8)
    flags = rng.random((6, 8)) < 0.6
    allowed = rng.random((6, 8)) < 0.8
    n_windows = 0
    for i in range(3):
        ref = D.tile_charge_reference(frames[i], *maps, 8, flags)
        assert np.any(ref != 0) and np.all(ref[~flags] == 0)
        np.testing.assert_array_equal(D.tile_charge(frames[i], *maps, 8, flags), ref)
        idx = batch.indices[batch.offsets[i] : batch.offsets[i + 1]]
        for limit in (3, 1000):
            q_ref, t_ref = D.window_charge_reference(frames[i], *maps, idx, allowed, 8, limit)
            q, t = D.window_charge(frames[i], *maps, idx, allowed, 8, limit)
            np.testing.assert_array_equal(q, q_ref)
            np.testing.assert_array_equal(t, t_ref)
            assert q.size <= limit
        n_windows += q.size
    assert n_windows > 10  # the check can fail: isolated events were found
    # wrapped (signed) frames: the kernels read their unsigned bits, less 2**16 at and
    # above the sign bit; values below zero, a saturated pixel, same sums as numpy's
    pedestal = 100.0
    signed = (frames.astype(np.int32) - int(pedestal)).astype(np.int16)
    signed[0, 7, 9] = np.iinfo(np.int16).max
    assert (signed < 0).any()
    cal_w = Calibration(cal.dark - pedestal, cal.noise, mask=mask, gain=gain,
                        xray_threshold=1000.0, wrapped=True)  # fmt: skip
    maps_w = D._signal_maps(cal_w, np.uint16)
    assert maps_w[-1] == np.iinfo(np.int16).max
    for i in range(3):
        ref = D.tile_charge_reference(signed[i], *maps_w, 8, flags)
        np.testing.assert_array_equal(D.tile_charge(signed[i], *maps_w, 8, flags), ref)
        if i:  # the same charges as the unsigned frames' (frame 0 has a saturated pixel)
            np.testing.assert_array_equal(ref, D.tile_charge_reference(frames[i], *maps, 8, flags))
        idx = batch.indices[batch.offsets[i] : batch.offsets[i + 1]]
        q_ref, t_ref = D.window_charge_reference(signed[i], *maps_w, idx, allowed, 8, 1000)
        q, t = D.window_charge(signed[i], *maps_w, idx, allowed, 8, 1000)
        np.testing.assert_array_equal(q, q_ref)
        np.testing.assert_array_equal(t, t_ref)
    # an X-ray hit adds no charge: a saturated pixel in a flagged tile changes nothing
    hot = frames[0].copy()
    r, c = np.argwhere(np.kron(flags, np.ones((8, 8), bool))[:45, :61])[5]
    before = D.tile_charge_reference(hot, *maps, 8, flags).sum()
    hot[r, c] = 65535
    assert (
        D.tile_charge_reference(hot, *maps, 8, flags).sum()
        == before - (D._pixel_signal(frames[0], *maps)[r, c])
    )


def test_electrons_do_not_depend_on_batching_or_threads():
    frames, _, cal = _frames("disk", 0.02, 12, seed=32)
    b1 = count(frames, cal, threads=1)
    b2 = count(frames, cal, threads=2)
    np.testing.assert_array_equal(b1.electrons, b2.electrons)
    # a Counter corrects frame by frame: batches of any size give the same electrons
    whole = Counter(cal)(frames).electrons
    c = Counter(cal, threads=1)
    parts = [c(frames[a:b]).electrons for a, b in ((0, 1), (1, 5), (5, 12))]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert c.dose_model()["frames_seen"] == 12
    assert Counter(cal, dose=False)(frames).electrons is None


@pytest.mark.parametrize(
    ("pattern", "dose", "n_frames"),
    [
        ("uniform", 0.001, 120),
        ("uniform", 0.005, 40),
        ("uniform", 0.02, 20),
        ("uniform", 0.05, 16),
        ("disk", 0.001, 120),
        ("disk", 0.005, 40),
        ("disk", 0.02, 20),
        ("disk", 0.05, 16),
    ],
)
def test_count_electrons_follow_the_truth(pattern, dose, n_frames):
    """count() fills electrons: total within 3 % of the electrons that arrived.

    The target is 2 %; what is left is mostly the counter's lone electrons that no
    pixel shows above the threshold (about 1.5 % at these defaults), which neither
    the events nor the charge of one electron measured from isolated events can see
    (the charge estimate reads every electron, but divides by the charge of a found
    one, about 1.5 % more than an average electron's). Measured here: uniform 0.9858,
    0.9772, 1.0006, 0.9867; disk 0.9816, 0.9900, 0.9751, 0.9988 (before the hard
    core's packing was counted into the soft area: 0.9984 and 0.9714 at uniform
    0.02 and 0.05, 0.9722 and 0.9972 at disk 0.02 and 0.05). The disk at 0.02
    and 0.05 holds 0.18 and 0.44 e/px/frame where it is bright: the events alone
    give 0.58 and 0.38 of the truth there, the event model 0.74 and 0.45.
    """
    frames, truth, cal = _frames(pattern, dose, n_frames, seed=21)
    b = count(frames, cal)
    n_true = int(truth.counts().sum())
    assert b.electrons.shape == (n_frames,) and b.electrons.dtype == np.float64
    ratio = b.electrons.sum() / n_true
    assert abs(ratio - 1.0) <= 0.03, (ratio, b.n_events / n_true)
    if pattern == "disk" and dose >= 0.02:
        # the check can fail: the events lose 40 % and more here
        assert b.n_events / n_true < 0.6
    # per frame, the estimate follows the frame's own arrivals
    if n_frames >= 20:
        assert np.corrcoef(b.electrons, truth.counts())[0, 1] > 0.5
    if dose == 0.02:  # dose=False: the same events, no electrons
        events = count(frames, cal, dose=False)
        assert events.electrons is None
        assert events == b and np.array_equal(events.indices, b.indices)


def test_disk_at_a_frame_mean_of_001_is_dosed_right():
    """The counter's recall on this disk is about 0.72 (the strict xfail
    test_disk_dose_001 of test_counting_accuracy.py); the corrected dose is within
    the 2 % target: 256 x 384 frames, as there."""
    frames, truth, cal = _frames("disk", 0.01, 16, seed=103, shape=(256, 384))
    b = count(frames, cal)
    n_true = int(truth.counts().sum())
    assert b.n_events / n_true < 0.8
    # the target, 2 % (measured -1.1 %; the resolving counters -0.1 to +0.8 %)
    assert abs(b.electrons.sum() / n_true - 1.0) <= 0.02, b.electrons.sum() / n_true


def test_uniform_005_within_2_percent():
    """Default physics at 0.05 e/px/frame: the events give 0.75 of the electrons;
    the model, with the hard core's packing counted back into its soft area, 0.987
    (0.971 without), where the counter misses 1.5 % of lone electrons."""
    frames, truth, cal = _frames("uniform", 0.05, 16, seed=21)
    b = count(frames, cal)
    ratio = b.electrons.sum() / truth.counts().sum()
    assert b.n_events / truth.counts().sum() < 0.8
    assert abs(ratio - 1.0) <= 0.02, ratio


def test_model_records_the_charge_estimate():
    frames, truth, cal = _frames("disk", 0.05, 30, seed=33)
    c = Counter(cal)
    electrons = c(frames).electrons
    m = c.dose_model()
    assert m["name"] == "tile-coincidence" and m["charge"] is True
    assert m["charge_tiles"] > 20 and m["windows"] >= 300
    # one electron: the emulator's mean deposit is about 123 ADU (Moyal, loc 100, scale 18)
    assert 100 < m["electron_charge_adu"] < 150
    assert m["hard_area"] == pytest.approx(9.0)
    # streaming: once the charge of one electron is known (300 windows, here after a
    # dozen small frames), the frames are corrected as well as by count()
    late = truth.counts()[15:].sum()
    assert electrons[15:].sum() == pytest.approx(late, rel=0.03)


def test_pair_count_stops_once_the_areas_are_known(monkeypatch):
    from streamstore.counting import tile_dose as D

    rng = np.random.default_rng(6)
    b = _random_batch(rng, (64, 64), 10, 0.03)
    monkeypatch.setattr(D, "MAX_FAR_PAIRS", 200)
    est = DoseEstimator((64, 64))
    est.update(b.slice(0, 2))
    first = est.pair_counts()
    assert est.pairs_complete and est.model()["far_pairs"] >= 200
    areas = est.exclusion_areas
    est.update(b.slice(2, 10))
    np.testing.assert_array_equal(est.pair_counts(), first)
    assert est.exclusion_areas == areas and est.frames_seen == 10
