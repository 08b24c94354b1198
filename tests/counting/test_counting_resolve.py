"""The "resolve" counting rule: three forms agree bit for bit, and it finds more electrons.

Parity: numba == numpy reference == native_ref (C) on crowded frames with
plateaus, ties, borders, saturation, X-rays, masks, gain maps and both frame
types, with split thresholds low enough that many events split. Accuracy: on
seeded emulator frames, at sweep points of the emulator's physics, against the
peak rule on the same frames.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamstore.camera.emulator import CameraEmulator
from streamstore.counting import Counter, count
from streamstore.counting.accuracy import score_batch
from streamstore.counting.calibration import Calibration
from streamstore.counting.resolve import ResolveParams
from streamstore.events import EventBatch
from tests.counting.test_counting_parity import counting_cases

IMPLEMENTATIONS = ("reference", "numba", "native")
#: thresholds that split often, so that the split path is compared too
EAGER = ResolveParams(candidate_sigma=1.5, quadrant_sigma=3.0, pair_charge=1.2, any_charge=2.0,
                      pair_spread=0.1)  # fmt: skip


def _count_all(frames, cal, subpixel, params, e_charge=40.0, threads=None):
    out = {}
    for impl in IMPLEMENTATIONS:
        c = Counter(cal, frames.dtype, subpixel=subpixel, implementation=impl, method="resolve",
                    resolve=params, electron_charge=e_charge, threads=threads)  # fmt: skip
        out[impl] = c(frames)
    return out


def _same(a: EventBatch, b: EventBatch) -> bool:
    return (
        np.array_equal(a.offsets, b.offsets)
        and np.array_equal(a.indices, b.indices)
        and (a.subpixel is None) == (b.subpixel is None)
        and (a.subpixel is None or np.array_equal(a.subpixel, b.subpixel))
    )


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    case=counting_cases(),
    subpixel=st.booleans(),
    params=st.sampled_from([EAGER, ResolveParams()]),
    e_charge=st.sampled_from([10.0, 40.0, 150.0]),
)
def test_three_forms_agree(case, subpixel, params, e_charge):
    frames, cal = case
    out = _count_all(frames, cal, subpixel, params, e_charge)
    ref = out["reference"]
    # a legal batch: strictly ascending pixels in each frame (validate checks it)
    EventBatch(ref.offsets, ref.indices, ref.subpixel, ref.frame_shape)
    for impl in ("numba", "native"):
        assert _same(out[impl], ref), impl


def _crowded(rng, dtype, n=3, h=48, w=70):
    """Dense electrons (many merged), X-rays, a masked block, saturated pixels."""
    top = int(np.iinfo(dtype).max)
    scale = 1 if top == 65535 else 0.25
    dark = 100 * scale + rng.normal(0, 2 * scale, (h, w))
    frames = dark + rng.normal(0, 3 * scale, (n, h, w))
    yy, xx = np.mgrid[0:h, 0:w]
    for f in range(n):
        for _ in range(int(0.08 * h * w)):
            y, x = rng.uniform(-1, h + 1), rng.uniform(-1, w + 1)
            q = rng.gamma(4, 30 * scale)
            frames[f] += (
                q * np.exp(-((yy + 0.5 - y) ** 2 + (xx + 0.5 - x) ** 2) / 0.5) / np.pi / 0.5
            )
        frames[f, rng.integers(0, h), rng.integers(0, w)] = top
    frames = np.clip(np.rint(frames), 0, top).astype(dtype)
    mask = np.zeros((h, w), bool)
    mask[10:14, 20:23] = True
    mask[:, -1] = True
    cal = Calibration(dark, np.full((h, w), 3 * scale), mask=mask, xray_threshold=600 * scale)
    return frames, cal


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("params", [EAGER, ResolveParams()])
def test_three_forms_agree_on_crowded_frames(rng, dtype, params):
    frames, cal = _crowded(rng, dtype)
    e = 120.0 if dtype == np.uint16 else 30.0
    out = _count_all(frames, cal, True, params, e)
    ref = out["reference"]
    assert ref.indices.size > 200
    for impl in ("numba", "native"):
        assert _same(out[impl], ref), impl
    if params is EAGER:  # the split path ran: events on 8-adjacent pixels
        for fe in ref:
            r, c = fe.rows.astype(int), fe.cols.astype(int)
            d = np.maximum(abs(r[:, None] - r[None]), abs(c[:, None] - c[None]))
            np.fill_diagonal(d, 9)
            assert (d <= 1).any()


def test_wrapped_frames_agree(rng):
    frames, cal0 = _crowded(rng, np.uint16)
    cal = Calibration(cal0.dark - 150, cal0.noise, mask=cal0.mask, wrapped=True,
                      xray_threshold=600.0)  # fmt: skip
    shifted = (frames.astype(np.int64) - 150).astype(np.int16).view(np.uint16)
    out = _count_all(shifted, cal, True, EAGER, 120.0)
    for impl in ("numba", "native"):
        assert _same(out[impl], out["reference"]), impl


def test_thread_count_does_not_change_the_result(rng):
    frames, cal = _crowded(rng, np.uint16, n=7)
    runs = [
        Counter(cal, np.uint16, subpixel=True, method="resolve", resolve=EAGER,
                electron_charge=120.0, threads=t)(frames)
        for t in (1, 2, 3, None)
    ]  # fmt: skip
    for r in runs[1:]:
        assert _same(r, runs[0])


@pytest.mark.parametrize("threads", [2, 5, 16])
@pytest.mark.parametrize("radius", [2, 5])
def test_a_frame_counted_in_row_bands_is_counted_the_same(rng, monkeypatch, threads, radius):
    """A frame alone on several threads is counted in row bands, each band reading
    the rows around it; bands of 3 rows (many band edges, X-rays and splits across
    them) give the reference's events, with the X-ray radius within the kernel's
    first ring of rows and beyond it."""
    from streamstore.counting import _resolve_kernels as rk

    monkeypatch.setattr(rk, "_BAND_ROWS", 3)
    frames, cal0 = _crowded(rng, np.uint16, n=2)
    cal = Calibration(cal0.dark, cal0.noise, mask=cal0.mask, xray_threshold=600.0,
                      xray_radius=radius)  # fmt: skip
    ref = Counter(cal, np.uint16, subpixel=True, method="resolve", resolve=EAGER,
                  electron_charge=120.0, implementation="reference")(frames)  # fmt: skip
    c = Counter(cal, np.uint16, subpixel=True, method="resolve", resolve=EAGER,
                electron_charge=120.0, threads=threads)  # fmt: skip
    for i in range(2):
        alone = c(frames[i])
        assert np.array_equal(alone.indices, ref[i].indices)
        assert np.array_equal(alone.subpixel, ref[i].subpixel)


def test_a_frame_counts_the_same_alone_and_in_a_batch(rng):
    frames, cal = _crowded(rng, np.uint16, n=4)
    c = Counter(cal, np.uint16, method="resolve", resolve=EAGER, electron_charge=120.0)
    batch = c(frames)
    for i in range(4):
        assert np.array_equal(c(frames[i]).indices, batch[i].indices)


def test_a_lone_spread_electron_is_found_and_a_lone_pixel_is_not():
    """Charge spread evenly over a 2 x 2 (no pixel passes the peak rule) is one event;
    the peak rule misses it."""
    h = w = 12
    cal = Calibration(np.full((h, w), 100.0), np.full((h, w), 4.0))
    frame = np.full((h, w), 100, np.uint16)
    frame[5:7, 5:7] += 18  # each pixel 4.5 sigma: below n_sigma = 5, 72 ADU in the quadrant
    assert count(frame, cal).indices.size == 0
    ev = count(frame, cal, method="resolve")
    assert ev.indices.tolist() == [5 * w + 5]
    lone = np.full((h, w), 100, np.uint16)
    lone[3, 3] += 18  # 4.5 sigma, nothing around: neither rule
    assert count(lone, cal, method="resolve").indices.size == 0


def test_a_big_event_splits_into_two_neighbours():
    h = w = 12
    cal = Calibration(np.full((h, w), 100.0), np.full((h, w), 2.0))
    frame = np.full((h, w), 100, np.uint16)
    frame[5, 5] += 400
    frame[5, 6] += 380
    split = ResolveParams(any_charge=3.5)
    c = Counter(cal, np.uint16, subpixel=True, method="resolve", electron_charge=100.0,
                resolve=split)  # fmt: skip
    ev = c(frame)
    assert ev.indices.tolist() == [5 * w + 5, 5 * w + 6]
    # each takes its own side: the partner's charge does not pull it off its centre
    assert ev.subpixel.tolist() == [(2 << 2) | 2] * 2
    whole = Counter(cal, np.uint16, subpixel=True, electron_charge=100.0, method="resolve")(frame)
    assert whole.indices.tolist() == [5 * w + 5] and whole.subpixel[0] & 3 == 3
    one = Counter(cal, np.uint16, method="resolve", electron_charge=500.0, resolve=split)(frame)
    assert one.indices.tolist() == [5 * w + 5]


def test_bad_arguments():
    cal = Calibration(np.full((4, 4), 10.0), np.ones((4, 4)))
    with pytest.raises(ValueError, match="method"):
        Counter(cal, np.uint16, method="nope")
    with pytest.raises(ValueError, match="electron_charge"):
        Counter(cal, np.uint16, method="resolve", electron_charge=-1.0)
    with pytest.raises(ValueError, match="ResolveParams"):
        Counter(cal, np.uint16, method="resolve", resolve={"candidate_sigma": 2})


# ------------------------------------------------------------------- accuracy
SHAPE = (96, 128)


def _emulated(dose, seed, n_electrons, **physics):
    emu = CameraEmulator(SHAPE, dose_rate_e_per_px_s=dose * 1500, seed=seed, **physics)
    dark, _ = emu.dark_frames(40)
    n = max(2, int(np.ceil(n_electrons / (dose * SHAPE[0] * SHAPE[1]))))
    frames, truth = emu.generate(n)
    return frames, truth, Calibration.from_dark_frames(dark, xray_threshold=1000.0)


#: (physics, dose, least resolve recall, least recall gain over the peak rule),
#: floors a little under what these seeds measure
ACCURACY_CASES = [
    ({}, 0.001, 0.985, 0.005),
    ({}, 0.01, 0.93, 0.005),
    ({"read_noise_adu": 6.0}, 0.001, 0.90, 0.04),
    ({"psf_sigma_px": 0.8}, 0.001, 0.84, 0.15),
    ({"deposit": "gamma"}, 0.01, 0.83, 0.02),
    ({"read_noise_adu": 2.0, "gain_sigma": 0.1}, 0.01, 0.93, 0.0),
    ({"dtype": "uint8"}, 0.01, 0.93, 0.01),
]


@pytest.mark.parametrize(("physics", "dose", "least_recall", "least_gain"), ACCURACY_CASES)
def test_resolve_finds_more_electrons_at_the_same_precision(
    physics, dose, least_recall, least_gain
):
    frames, truth, cal = _emulated(dose, 11, 1500, **physics)
    peak = score_batch(count(frames, cal, subpixel=True), truth.positions)
    res = score_batch(count(frames, cal, subpixel=True, method="resolve"), truth.positions)
    assert res.recall >= least_recall
    assert res.recall >= peak.recall + least_gain
    # the mislocalised weak events of a wide point spread (found more than 1 px off
    # their electron) cost precision first
    assert res.precision >= (0.995 if physics.get("psf_sigma_px", 0) > 0.6 else 0.998)
    assert res.rms_error_px <= 0.32


def test_splitting_finds_merged_electrons_at_high_dose():
    """Splits on charge and anisotropy recover merged electrons at 0.05 e/px/frame
    and keep the precision: a split needs no other maximum within 2 px."""
    frames, truth, cal = _emulated(0.05, 11, 2500)
    off = ResolveParams(pair_spread=16.0)
    plain = score_batch(
        Counter(cal, np.uint16, subpixel=True, method="resolve", resolve=off)(frames),
        truth.positions,
    )
    split = ResolveParams(pair_charge=1.6, pair_spread=0.45)
    c = Counter(cal, np.uint16, subpixel=True, method="resolve", resolve=split)
    res = score_batch(c(frames), truth.positions)
    assert res.recall >= plain.recall + 0.015
    # nearly every extra event is an electron
    assert res.n_matched - plain.n_matched >= 0.9 * (res.n_found - plain.n_found)
    assert res.precision >= 0.997


@pytest.mark.parametrize(("row_noise", "low", "high"), [(1.0, 1.04, 1.14), (0.0, 1.0, 1.02)])
def test_quadrant_noise_factor_sees_row_noise(row_noise, low, high):
    """Read noise 2 ADU and a row offset of 1 ADU: a 2 x 2 sum has sigma
    sqrt(4 * 4 + 2 * 4) = 4.9 ADU where independent pixels of sigma sqrt(5) give 4.47."""
    from streamstore.counting.resolve import quadrant_noise_factor

    emu = CameraEmulator(SHAPE, seed=3, read_noise_adu=2.0, row_noise_adu=row_noise)
    dark, _ = emu.dark_frames(50)
    frames, _ = emu.generate(8, dose=0.001)
    cal = Calibration.from_dark_frames(dark)
    assert low <= quadrant_noise_factor(cal, frames) <= high


def test_low_read_noise_keeps_its_precision():
    """At read noise 2 ADU the row noise is half the pixel noise: without the measured
    widening of the quadrant noise, noise passed the charge rule (precision 0.998)."""
    frames, truth, cal = _emulated(0.001, 7, 2500, read_noise_adu=2.0)
    c = Counter(cal, np.uint16, subpixel=True, method="resolve")
    res = score_batch(c(frames), truth.positions)
    assert c.noise_factor > 1.03
    assert res.precision >= 0.999 and res.recall >= 0.99


def _blobs(points, h=14, w=14, sigma=0.5):
    """Noise-free frame over a dark of 100: Gaussian clouds ``(y, x, charge)``
    integrated over the pixels."""
    from scipy.special import ndtr

    ey = np.arange(h + 1, dtype=np.float64)
    ex = np.arange(w + 1, dtype=np.float64)
    frame = np.full((h, w), 100.0)
    for y, x, q in points:
        fy = np.diff(ndtr((ey - y) / sigma))
        fx = np.diff(ndtr((ex - x) / sigma))
        frame += q * fy[:, None] * fx[None, :]
    return np.rint(frame).astype(np.uint16)


@pytest.mark.parametrize(
    ("points", "events", "unsplit"),
    [
        ([(7.5, 7.0, 360.0)], 1, 1),  # one bright electron on a pixel edge: round, no split
        ([(7.5, 7.5, 360.0)], 1, 1),  # one in a pixel's centre
        ([(7.5, 6.2, 180.0), (7.5, 7.7, 180.0)], 2, 1),  # two, 1.5 px apart in a row
        ([(6.8, 6.8, 180.0), (7.9, 7.9, 180.0)], 2, 1),  # two, 1.56 px apart on a diagonal
        ([(7.5, 6.8, 180.0), (7.5, 8.3, 180.0)], 2, 2),  # two maxima already: no split
    ],
)
def test_anisotropy_splits_two_clouds_and_keeps_one(points, events, unsplit):
    frame = _blobs(points)
    cal = Calibration(np.full(frame.shape, 100.0), np.full(frame.shape, 2.0))
    split = ResolveParams(pair_charge=1.6, pair_spread=0.45)
    c = Counter(cal, np.uint16, method="resolve", resolve=split, electron_charge=180.0)
    assert c(frame).indices.size == events
    assert count(frame, cal, method="resolve").indices.size == unsplit


def test_a_processs_first_frames_of_a_type_are_counted_under_the_compile_lock(rng, monkeypatch):
    """Processes that first meet the resolve kernel together (test workers, analysis
    workers) compile it once: the first call of each frame type in a process holds
    the cache's lock; later calls do not wait for it. The events are the same."""
    import contextlib

    from streamstore.counting import _resolve_kernels as rk

    held = []

    @contextlib.contextmanager
    def recording(dispatcher):
        held.append(dispatcher)
        yield

    monkeypatch.setattr(rk, "compiling_alone", recording)
    monkeypatch.setattr(rk, "_ran", set())
    frames, cal = _crowded(rng, np.uint16, n=3)
    c = Counter(cal, np.uint16, method="resolve", resolve=EAGER, electron_charge=120.0, threads=2)
    first = c(frames)
    assert held == [rk._resolve_rows]
    again = c(frames)
    assert held == [rk._resolve_rows] and again == first
    c8 = Counter(cal, np.uint8, method="resolve", resolve=EAGER, electron_charge=120.0)
    c8(np.clip(frames, 0, 255).astype(np.uint8))
    assert held == [rk._resolve_rows]  # 8-bit frames: the 16-bit kernel, already run
    monkeypatch.setattr(rk, "_ran", set())
    c8(np.clip(frames, 0, 255).astype(np.uint8))
    assert held == [rk._resolve_rows] * 2  # the first call of this process's kernel
