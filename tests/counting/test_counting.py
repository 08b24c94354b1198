"""count() and Counter: API, input checks, and the semantics spelled out in docs/counting.md."""

from __future__ import annotations

import numpy as np
import pytest

import streamstore
from streamstore import Calibration, EventBatch, count
from streamstore.counting import Counter

IMPLS = ("numba", "reference", "native")


def flat_cal(h, w, *, dark=10.0, noise=2.0, **kw):
    return Calibration(np.full((h, w), dark), np.full((h, w), noise), **kw)


def events(frame, cal, impl="numba", subpixel=False):
    batch = Counter(cal, frame.dtype, subpixel=subpixel, implementation=impl)(frame)
    return batch.frame(0)


def test_top_level_names_and_shapes():
    assert streamstore.count is count
    cal = flat_cal(6, 9)
    frame = np.full((6, 9), 10, np.uint16)
    frame[2, 7] = 100
    one = count(frame, cal)
    assert isinstance(one, EventBatch)
    assert one.n_frames == 1 and one.frame_shape == (6, 9)
    assert one.frame(0).indices.tolist() == [2 * 9 + 7]
    many = count(np.stack([frame, frame, np.full_like(frame, 10)]), cal, threads=1)
    assert many.counts.tolist() == [1, 1, 0]
    assert many.subpixel is None
    assert count(frame, cal, subpixel=True).subpixel.dtype == np.uint8


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "block",
    [
        [(0, 0)],  # single
        [(0, 0), (0, 1)],  # horizontal tie
        [(0, 0), (1, 0)],  # vertical tie
        [(0, 1), (1, 0)],  # anti-diagonal tie
        [(0, 0), (1, 1)],  # diagonal tie
        [(0, 0), (0, 1), (1, 0), (1, 1)],  # 2 x 2 plateau
        [(r, c) for r in range(3) for c in range(3)],  # 3 x 3 plateau
        [(0, 0), (0, 1), (0, 2), (0, 3)],  # a line
        [(0, 0), (1, 1), (0, 2)],  # a "V": two raster-first candidates under a plain order
        [(0, 0), (1, 0), (2, 1), (1, 2), (0, 2)],  # a "U"
        [(0, 1), (1, 0), (2, 1), (1, 2)],  # a diamond ring around a dimmer centre
    ],
)
def test_plateau_of_equal_maxima_gives_exactly_one_event(impl, block):
    cal = flat_cal(12, 13)
    for dtype in (np.uint8, np.uint16):
        frame = np.full((12, 13), 10, dtype)
        for r, c in block:
            frame[4 + r, 5 + c] = 90
        ev = events(frame, cal, impl)
        first = min(block)  # raster-first pixel wins
        assert ev.indices.tolist() == [(4 + first[0]) * 13 + 5 + first[1]]


@pytest.mark.parametrize("impl", IMPLS)
def test_plateau_beside_a_brighter_pixel_gives_no_event(impl):
    """A ridge of equal values running into a brighter pixel: one event, at the peak."""
    cal = flat_cal(7, 12)
    frame = np.full((7, 12), 10, np.uint16)
    frame[3, 3:6] = [40, 40, 90]
    frame[5, 8:10] = 40  # a lone equal pair elsewhere: one event
    assert events(frame, cal, impl).indices.tolist() == [3 * 12 + 5, 5 * 12 + 8]


@pytest.mark.parametrize("impl", IMPLS)
def test_borders_and_corners_are_counted(impl):
    h, w = 7, 11
    cal = flat_cal(h, w)
    frame = np.full((h, w), 10, np.uint16)
    spots = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (0, 5), (3, 0), (h - 1, 5), (3, w - 1)]
    for r, c in spots:
        frame[r, c] = 80
    ev = events(frame, cal, impl)
    assert sorted(ev.indices.tolist()) == sorted(r * w + c for r, c in spots)


@pytest.mark.parametrize("impl", IMPLS)
def test_local_maximum_uses_dark_subtracted_signal(impl):
    """A raw-brighter pixel with a higher dark offset loses to its neighbour."""
    dark = np.full((5, 6), 10.0)
    dark[2, 3] = 40.0
    cal = Calibration(dark, np.full((5, 6), 2.0))
    frame = np.full((5, 6), 10, np.uint16)
    frame[2, 2] = 60  # signal 50
    frame[2, 3] = 80  # raw higher, signal 40
    assert events(frame, cal, impl).indices.tolist() == [2 * 6 + 2]


@pytest.mark.parametrize("impl", IMPLS)
def test_gain_changes_which_pixel_wins(impl):
    gain = np.ones((5, 6))
    gain[2, 3] = 2.0
    frame = np.full((5, 6), 10, np.uint16)
    frame[2, 2] = 60  # signal 50
    frame[2, 3] = 40  # signal 30 * 2 = 60
    cal = Calibration(np.full((5, 6), 10.0), np.full((5, 6), 2.0), gain=gain)
    assert events(frame, cal, impl).indices.tolist() == [2 * 6 + 3]
    cal_no_gain = Calibration(np.full((5, 6), 10.0), np.full((5, 6), 2.0))
    assert events(frame, cal_no_gain, impl).indices.tolist() == [2 * 6 + 2]


@pytest.mark.parametrize("impl", IMPLS)
def test_threshold_is_per_pixel_and_strict(impl):
    noise = np.full((4, 8), 2.0)
    noise[1, 5] = 20.0
    cal = Calibration(np.full((4, 8), 10.0), noise, n_sigma=5.0)  # lo = 20, or 110 at (1, 5)
    frame = np.full((4, 8), 10, np.uint16)
    frame[1, 1] = 20  # not above 20
    frame[1, 3] = 21
    frame[1, 5] = 60  # below its own threshold: not a candidate, does not compete
    frame[2, 6] = 30
    ev = events(frame, cal, impl)
    assert ev.indices.tolist() == [1 * 8 + 3, 2 * 8 + 6]


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_pixels_yield_no_event_and_do_not_compete(impl):
    mask = np.zeros((6, 6), bool)
    mask[2, 2] = True
    cal = Calibration(np.full((6, 6), 10.0), np.full((6, 6), 2.0), mask=mask)
    frame = np.full((6, 6), 10, np.uint16)
    frame[2, 2] = 5000  # a hot pixel
    frame[2, 3] = 60  # a real event next to it
    assert events(frame, cal, impl).indices.tolist() == [2 * 6 + 3]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("radius", [0, 1, 2, 3])
def test_xray_neighbourhood_yields_no_event(impl, radius):
    h, w = 15, 16
    cal = flat_cal(h, w, xray_threshold=500.0, xray_radius=radius)
    frame = np.full((h, w), 10, np.uint16)
    frame[7, 7] = 3000  # X-ray
    near = [(9, 6), (5, 9), (7, 10), (4, 7), (10, 4)]  # Chebyshev distances 2, 2, 3, 3, 3
    for r, c in near:
        frame[r, c] = 100
    frame[0, 15] = 100  # far away
    kept = {r * w + c for r, c in near if max(abs(r - 7), abs(c - 7)) > radius}
    kept.add(15)
    assert set(events(frame, cal, impl).indices.tolist()) == kept


@pytest.mark.parametrize("impl", IMPLS)
def test_saturated_pixel_is_an_xray_even_without_threshold(impl):
    cal = flat_cal(8, 8, xray_radius=1)
    for dtype in (np.uint8, np.uint16):
        frame = np.full((8, 8), 10, dtype)
        frame[4, 4] = np.iinfo(dtype).max
        frame[4, 5] = 100
        frame[0, 0] = 100
        assert events(frame, cal, impl).indices.tolist() == [0]


@pytest.mark.parametrize("impl", IMPLS)
def test_subpixel_is_the_quantised_centre_of_mass(impl):
    cal = flat_cal(9, 9, dark=10.0, noise=1.0)
    frame = np.full((9, 9), 10, np.uint16)
    frame[4, 4] = 10 + 100
    ev = events(frame, cal, impl, subpixel=True)
    assert ev.subpixel.tolist() == [(2 << 2) | 2]  # centred: 0.5 -> cell 2 of 0..3
    frame[4, 5] = 10 + 100 - 1  # right neighbour almost as bright: x ~ 0.5 + 0.5 = 1.0 -> 3
    frame[3, 4] = 10 + 30  # some charge above: y = 0.5 - 30 / 229 = 0.37 -> cell 1
    ev = events(frame, cal, impl, subpixel=True)
    assert ev.indices.tolist() == [4 * 9 + 4]
    assert ev.subpixel.tolist() == [(1 << 2) | 3]
    pos = ev.positions()[0]
    assert pos[0] == pytest.approx(4 + 1.5 / 4) and pos[1] == pytest.approx(4 + 3.5 / 4)


def test_counter_is_reusable_and_matches_count(rng):
    cal = flat_cal(32, 48, xray_threshold=400.0)
    frames = (10 + rng.normal(0, 2, (5, 32, 48))).round()
    frames += (rng.random((5, 32, 48)) < 0.02) * 80
    frames = frames.astype(np.uint16)
    c = Counter(cal, np.uint16, subpixel=True, threads=1)
    joined = EventBatch.concatenate([c(f) for f in frames])
    assert joined == count(frames, cal, subpixel=True)
    assert "Counter(" in repr(c)


def test_input_errors_are_clear():
    cal = flat_cal(6, 9)
    with pytest.raises(ValueError, match="uint8 or uint16"):
        count(np.zeros((6, 9), np.float32), cal)
    with pytest.raises(ValueError, match="uint8 or uint16"):
        count(np.zeros((6, 9), np.int32), cal)
    with pytest.raises(ValueError, match=r"\(H, W\) = \(9, 6\)"):
        count(np.zeros((9, 6), np.uint16), cal)
    with pytest.raises(ValueError, match=r"\(H, W\) or \(n, H, W\)"):
        count(np.zeros((1, 2, 6, 9), np.uint16), cal)
    with pytest.raises(ValueError, match="threads"):
        count(np.zeros((6, 9), np.uint16), cal, threads=0)
    with pytest.raises(ValueError, match="calibration must be"):
        count(np.zeros((6, 9), np.uint16), "cal.h5")
    c = Counter(cal, np.uint8)
    with pytest.raises(ValueError, match="built for uint8"):
        c(np.zeros((6, 9), np.uint16))
    with pytest.raises(ValueError, match="implementation"):
        Counter(cal, np.uint8, implementation="gpu")
    # frames with 2**32 pixels or more: their flat indices do not fit the events'
    # uint32 (a zero-stride view: the kernel refuses before touching memory)
    from streamstore.counting._launch import count_frames

    huge = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), (1, 65536, 65536), (0, 0, 0))
    small = np.zeros((2, 2), np.uint8)
    with pytest.raises(ValueError, match="65536 x 65536 = 4294967296 pixels"):
        count_frames(huge, small, small, None, 255, 1, False)


@pytest.mark.parametrize("gain_adu, wide", [(120, False), (600, True)])
def test_counter_picks_16_bit_rows_for_high_gain_data(rng, gain_adu, wide):
    """Electrons of several hundred ADU would send most maxima through the byte
    rows' exact scalar test: the counter then uses 16-bit rows. Same events."""
    h, w = 70, 150  # at least one work item of rows: smaller frames keep bytes
    dark = np.full((h, w), 100.0)
    frames = dark + rng.normal(0, 2, (2, h, w))
    hits = rng.random((2, h, w)) < 0.02
    frames += hits * rng.normal(gain_adu, gain_adu / 4, (2, h, w)).clip(20)
    frames = np.rint(frames).astype(np.uint16)
    cal = Calibration(dark, np.full((h, w), 2.0), xray_threshold=20 * gain_adu)
    c = Counter(cal, np.uint16)
    got = c(frames)
    assert c._wide_rows is wide
    assert got.n_events > 50
    assert got == Counter(cal, np.uint16, implementation="native")(frames)


def test_non_contiguous_frames_are_accepted(rng):
    cal = flat_cal(16, 20)
    big = np.full((16, 40), 10, np.uint16)
    big[5, 8] = 90
    view = big[:, ::2]
    assert count(view, cal).frame(0).indices.tolist() == [5 * 20 + 4]


@pytest.mark.parametrize("threads", [1, None])
def test_one_counter_from_several_python_threads(rng, threads):
    """The kernel releases the GIL; concurrent calls give the sequential results."""
    from concurrent.futures import ThreadPoolExecutor

    cal = flat_cal(64, 96, xray_threshold=400.0)
    frames = (10 + rng.normal(0, 2, (12, 64, 96))).round()
    frames += (rng.random((12, 64, 96)) < 0.02) * 80
    frames = frames.astype(np.uint16)
    c = Counter(cal, np.uint16, subpixel=True, threads=threads)
    expected = [c(f) for f in frames]
    with ThreadPoolExecutor(max_workers=3) as pool:
        got = list(pool.map(c, frames))
    assert all(a == b for a, b in zip(got, expected, strict=True))


def test_kernel_cache_key_follows_the_simd_intrinsics():
    """numba caches a module's functions keyed on that file alone; the vector
    code they inline lives in _simd.py. Editing _simd.py without updating
    SIMD_SOURCE_SHA in every module that imports it would leave stale compiled
    kernels in use."""
    import ast
    import hashlib
    import importlib
    from pathlib import Path

    from streamstore.counting import _kernels

    here = Path(_kernels.__file__).parent
    sha = hashlib.sha256((here / "_simd.py").read_bytes()).hexdigest()[:16]
    users = sorted(
        path.stem
        for path in here.glob("*.py")
        if any(
            isinstance(node, ast.ImportFrom) and (node.module or "").endswith("_simd")
            for node in ast.walk(ast.parse(path.read_text("utf-8")))
        )
    )
    assert {"_kernels", "_maps"} <= set(users)  # the walk finds the importers
    for name in users:
        module = importlib.import_module(f"streamstore.counting.{name}")
        assert getattr(module, "SIMD_SOURCE_SHA", None) == sha, name
