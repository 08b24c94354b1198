"""One kernel, three forms: numba == numpy reference == native_ref (C), bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamstore.counting import Counter
from streamstore.counting.calibration import Calibration

IMPLEMENTATIONS = ("reference", "numba", "native")


@st.composite
def counting_cases(draw):
    """Frames with plateaus, ties, borders, saturation, X-rays and masks, and a calibration."""
    dtype = draw(st.sampled_from([np.uint8, np.uint16]))
    top = int(np.iinfo(dtype).max)
    h = draw(st.integers(1, 40))
    # the kernel works in 64-pixel blocks plus a scalar tail: widths on both sides
    w = draw(st.one_of(st.integers(1, 40), st.integers(60, 140)))
    n = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    base = draw(st.integers(0, min(top, 200)))
    noise = draw(st.floats(0.5, 4.0))
    # one dark level (frames the camera dark-subtracted: one-value maps), or a pattern
    one_level = draw(st.booleans())
    dark = np.full((h, w), float(base)) if one_level else base + rng.normal(0, 1.5, (h, w))
    frames = dark + rng.normal(0, noise, (n, h, w))
    # electrons: small blobs, some exactly equal neighbours (plateaus and ties)
    density = draw(st.sampled_from([0.0, 0.01, 0.05, 0.2]))
    hits = rng.random((n, h, w)) < density
    amp = rng.integers(5, 60, (n, h, w)) * (1 if top == 255 else 4)
    frames += hits * amp
    for f, r, c in zip(*np.nonzero(hits), strict=True):
        kind = rng.integers(0, 6)
        if kind == 1 and c + 1 < w:
            frames[f, r, c + 1] = frames[f, r, c]  # horizontal tie
        elif kind == 2 and r + 1 < h:
            frames[f, r + 1, c] = frames[f, r, c]  # vertical tie
        elif kind == 3 and r + 1 < h and c + 1 < w:
            frames[f, r : r + 2, c : c + 2] = frames[f, r, c]  # 2 x 2 plateau
        elif kind == 4 and r + 1 < h and c + 2 < w:
            frames[f, r + 1, c + 1] = frames[f, r, c + 2] = frames[f, r, c]  # a "V"
        elif kind == 5 and c + 2 < w:
            frames[f, r, c + 1] = frames[f, r, c]  # a ridge into a brighter pixel
            frames[f, r, c + 2] = frames[f, r, c] + 7
    frames = np.clip(np.rint(frames), 0, top)
    # saturated pixels
    sat = rng.random((n, h, w)) < draw(st.sampled_from([0.0, 0.002, 0.02]))
    frames[sat] = top
    frames = frames.astype(dtype)
    mask = rng.random((h, w)) < draw(st.sampled_from([0.0, 0.02, 0.2]))
    gain = rng.uniform(0.7, 1.4, (h, w)) if draw(st.booleans()) else None
    xray = draw(st.sampled_from([None, 30.0, 120.0]))
    cal = Calibration(
        dark,
        np.full((h, w), noise),
        gain=gain,
        mask=mask if mask.any() else None,
        n_sigma=draw(st.sampled_from([3.0, 5.0])),
        xray_threshold=xray,
        xray_radius=draw(st.integers(0, 3)),
    )
    return frames, cal


def _count_all(frames, cal, subpixel):
    return {
        impl: Counter(cal, frames.dtype, subpixel=subpixel, implementation=impl)(frames)
        for impl in IMPLEMENTATIONS
    }


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=counting_cases(), subpixel=st.booleans())
def test_three_implementations_agree(case, subpixel):
    frames, cal = case
    out = _count_all(frames, cal, subpixel)
    ref = out["reference"]
    assert out["numba"] == ref
    assert out["native"] == ref


def test_two_xray_hits_in_one_row():
    """Found by Hypothesis: the events near the second X-ray hit (a saturated
    byte, stored as 255 and tested exactly) are dropped too, after the first's."""
    row = np.zeros(60, np.uint8)
    row[[28, 29, 30, 56, 57]] = [28, 28, 35, 255, 2]
    frames = row.reshape(1, 1, 60)
    cal = Calibration(np.zeros((1, 60)), np.ones((1, 60)), xray_threshold=30.0)
    out = _count_all(frames, cal, False)
    assert out["numba"] == out["reference"] == out["native"]
    assert out["reference"].n_events == 0
    # the check can fail: without the X-ray threshold the first maximum is an
    # event (the saturated pixel stays an X-ray hit)
    plain = Calibration(np.zeros((1, 60)), np.ones((1, 60)))
    assert Counter(plain, np.uint8)(frames).indices.tolist() == [30]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=counting_cases())
def test_thread_count_does_not_change_the_result(case):
    frames, cal = case
    one = Counter(cal, frames.dtype, subpixel=True, threads=1)(frames)
    two = Counter(cal, frames.dtype, subpixel=True, threads=2)(frames)
    assert one == two


def test_parity_on_a_larger_batch_across_bands(rng):
    """Many row bands and frames, every implementation and 1/2 threads."""
    h, w, n = 256, 384, 6
    dark = 100 + rng.normal(0, 2, (h, w))
    frames = dark + rng.normal(0, 3, (n, h, w))
    frames += (rng.random((n, h, w)) < 0.01) * rng.integers(20, 300, (n, h, w))
    frames[0, 100:103, 200:203] = 60000  # an X-ray
    frames = np.clip(np.rint(frames), 0, 65535).astype(np.uint16)
    cal = Calibration(
        dark, np.full((h, w), 3.0), xray_threshold=2000, gain=rng.uniform(0.8, 1.2, (h, w))
    )
    out = _count_all(frames, cal, True)
    assert out["reference"].n_events > 1000
    assert out["numba"] == out["reference"] == out["native"]
    assert Counter(cal, np.uint16, subpixel=True, threads=1)(frames) == out["reference"]


def test_parity_when_a_row_s_dark_levels_span_more_than_a_byte(rng):
    """A dark map spread too wide for the one-byte dark map: the kernel's
    two-byte fallback must give the same events as the reference and C."""
    from streamstore.counting._maps import kernel_maps

    h, w, n = 64, 96, 3
    dark = np.clip(2000 + rng.normal(0, 400, (h, w)), 0, 60000)
    frames = dark + rng.normal(0, 3, (n, h, w))
    frames += (rng.random((n, h, w)) < 0.02) * rng.integers(20, 300, (n, h, w))
    frames = np.clip(np.rint(frames), 0, 65535).astype(np.uint16)
    cal = Calibration(dark, np.full((h, w), 3.0), xray_threshold=2000)
    lo, dark_k = cal.threshold_maps(np.uint16)[:2]
    assert kernel_maps(lo, dark_k)[0].dtype == np.uint16  # the fallback path is the one tested
    for subpixel in (False, True):
        out = _count_all(frames, cal, subpixel)
        assert out["reference"].n_events > 100
        assert out["numba"] == out["reference"] == out["native"]
        two = Counter(cal, np.uint16, subpixel=subpixel, threads=2)(frames)
        assert two == out["reference"]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_wrapped_frames_are_read_as_signed(rng, dtype):
    """Pedestal-subtracted frames whose negatives wrapped: all three agree."""
    h, w = 64, 96
    signed = np.rint(rng.normal(0, 3, (2, h, w)))
    signed += (rng.random((2, h, w)) < 0.02) * 80
    stype = np.int8 if dtype == np.uint8 else np.int16
    frames = signed.astype(stype).view(dtype)
    cal = Calibration(np.zeros((h, w)), np.full((h, w), 3.0), wrapped=True)
    out = _count_all(frames, cal, False)
    assert out["numba"] == out["reference"] == out["native"]
    # nothing near 65535 was mistaken for saturation / an X-ray: the electrons are found
    assert out["numba"].n_events >= 0.8 * np.count_nonzero(signed > 40)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("with_gain", [False, True])
def test_wrapped_frames_counted_as_unsigned_keep_every_rule(rng, dtype, with_gain):
    """The numba kernel reads wrapped frames with the sign bit flipped as each value
    is read (no signed variant, no flipped copy): the events of the signed values,
    as the reference and C read them, with saturated, masked and X-ray pixels, a
    dark pattern wider than a byte within a row, and sub-pixel cells."""
    from streamstore.counting._maps import as_unsigned

    h, w = 40, 70  # a full 64-pixel block and a scalar tail
    stype = np.dtype(np.int8 if dtype == np.uint8 else np.int16)
    top = np.iinfo(stype).max
    dark = np.round(rng.normal(0, 2, (h, w)))
    dark[:, ::3] += -40 if dtype == np.uint8 else -3000  # spans more than a byte in a row
    signed = np.rint(dark + rng.normal(0, 3, (3, h, w)))
    signed += (rng.random((3, h, w)) < 0.03) * (30 if dtype == np.uint8 else 90)
    signed[rng.random((3, h, w)) < 0.005] = top  # saturated
    signed = np.clip(signed, np.iinfo(stype).min, top)
    frames = signed.astype(stype).view(dtype)
    cal = Calibration(
        dark,
        np.full((h, w), 3.0),
        gain=rng.uniform(0.9, 1.1, (h, w)) if with_gain else None,
        mask=rng.random((h, w)) < 0.03,
        xray_threshold=60.0 if dtype == np.uint8 else 200.0,
        wrapped=True,
    )
    # the flip keeps the order, the differences and the type's maximum
    lo, dk = cal.threshold_maps(dtype)[:2]
    ulo, udk = as_unsigned(lo), as_unsigned(dk)
    assert ulo.dtype == np.dtype(dtype)
    assert np.array_equal(ulo.astype(np.int64) - udk, lo.astype(np.int64) - dk)
    assert np.array_equal(ulo == np.iinfo(dtype).max, lo == top)
    out = _count_all(frames, cal, True)
    assert out["numba"] == out["reference"] == out["native"]
    assert out["numba"].n_events > 0 and np.all(np.diff(out["numba"].offsets) > 0)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_empty_batch(impl):
    cal = Calibration(np.zeros((8, 9)), np.ones((8, 9)))
    batch = Counter(cal, np.uint8, implementation=impl)(np.zeros((0, 8, 9), np.uint8))
    assert batch.n_frames == 0 and batch.n_events == 0


def test_flood_of_xray_hits(rng):
    """More X-ray hits than a work item's first buffer holds: the kernel redoes the call."""
    from streamstore.counting._kernels import XRAY_CAPACITY

    h, w = 100, 200
    frames = np.rint(50 + rng.normal(0, 2, (2, h, w)))
    frames += (rng.random((2, h, w)) < 0.03) * 60
    frames[rng.random((2, h, w)) < 0.02] = 65535
    frames = frames.astype(np.uint16)
    cal = Calibration(np.full((h, w), 50.0), np.full((h, w), 2.0), xray_radius=1)
    assert np.count_nonzero(frames[0, :64] == 65535) > XRAY_CAPACITY
    out = _count_all(frames, cal, True)
    assert out["numba"] == out["reference"] == out["native"]
    assert out["numba"].n_events > 0


@pytest.mark.parametrize("xray_threshold", [None, 500.0, 40000.0])
@pytest.mark.parametrize("with_gain", [False, True])
def test_every_kernel_map_form_agrees_with_the_reference(rng, xray_threshold, with_gain):
    """The kernel's map forms (one-byte dark over a row base, two-byte dark and
    threshold) and its three row types (bytes clamped at 255 with an exact test of
    the clamped centres, 16-bit, int32) give
    the reference's events, on a width with full 64-pixel blocks and a scalar tail,
    with masked, saturated and X-ray pixels and neighbours that only differ above 255."""
    from streamstore.counting._launch import count_frames
    from streamstore.counting._maps import kernel_maps, row_type
    from streamstore.counting._reference import count_reference

    h, w, n = 70, 203, 2
    dark = 300 + rng.normal(0, 20, (h, w))
    frames = dark + rng.normal(0, 3, (n, h, w))
    hits = rng.random((n, h, w)) < 0.03
    frames += hits * rng.integers(20, 400, (n, h, w))
    frames[:, 10, 198:201] = frames[:, 10, 197:198]  # a plateau in the tail
    frames[0, 30:33, 100:103] = 20000  # an X-ray
    frames[1, 40, 5] = 65535  # saturated
    # signals of 255 or more, equal once clamped to a byte: the earlier one, the
    # later one or neither (a plateau) wins
    pairs = {
        (50, 60): (300, 260),
        (53, 60): (260, 300),
        (56, 60): (300, 300),
        (59, 120): (290, 270),
    }
    for (r, c), (a, b) in pairs.items():
        frames[0, r - 1 : r + 2, c - 1 : c + 3] = dark[r - 1 : r + 2, c - 1 : c + 3]
        frames[0, r, c] = np.rint(dark[r, c]) + a
        frames[0, r, c + 1] = np.rint(dark[r, c + 1]) + b
    frames = np.clip(np.rint(frames), 0, 65535).astype(np.uint16)
    mask = rng.random((h, w)) < 0.01
    gain = rng.uniform(0.8, 1.2, (h, w)) if with_gain else None
    cal = Calibration(dark, np.full((h, w), 3.0), gain=gain, mask=mask,
                      xray_threshold=xray_threshold, xray_radius=1)  # fmt: skip
    lo, dk, gk, level = cal.threshold_maps(np.uint16)
    ref = count_reference(frames, lo, dk, gk, level, 1, True)
    compact = kernel_maps(lo, dk)
    assert compact[0].dtype == np.uint8  # dark spread < 256 per row
    t = lo.astype(np.int64) - dk.astype(np.int64)
    forms = {
        "compact": compact,
        "dark16": (dk, np.zeros(h, np.int64), t.astype(np.uint16)),  # what a wide dark gets
    }
    rows = set()
    for name, maps in forms.items():
        # wide_rows asks for 16-bit rows, which only compact maps without gain use
        for wide in (False, True) if name == "compact" else (False,):
            rows.add(row_type(frames.dtype, maps[0].dtype, gk is not None, wide)[0])
            for threads in (1, 2):
                got = count_frames(frames, lo, dk, gk, level, 1, True, threads=threads,
                                   maps=maps, wide_rows=wide)  # fmt: skip
                for a, b in zip(got, ref, strict=True):
                    np.testing.assert_array_equal(a, b, err_msg=f"{name}, wide rows {wide}")
    assert ref[1].size > 500
    # without gain each pair gives the event its signals say (X-ray levels below 300 aside)
    if gk is None and level >= 300:
        for (r, c), (a, b) in pairs.items():
            first, second = r * w + c, r * w + c + 1
            want = {first} if a >= b else {second}
            assert {first, second} & set(ref[1][ref[0][0] : ref[0][1]].tolist()) == want
    # without gain the byte and 16-bit rows are used, int32 rows for the two-byte dark
    assert (np.uint8 in rows) == (np.uint16 in rows) == (gk is None) and np.int32 in rows


def test_plateaus_reaching_past_the_maximums_neighbours():
    """Plateaus the kernel cannot settle next to their maximum (walked in full when
    the items are joined): one event for a free-standing one, none for one touching
    a brighter pixel; and more of them in one item than it has room to list."""
    from streamstore.counting._kernels import UNDECIDED_CAPACITY

    h, w = 40, 450
    frames = np.full((1, h, w), 100, np.uint16)
    frames[0, 2:12, 3:13] = 400  # 100 equal pixels
    frames[0, 20:27, 70:140] = 300  # 490 equal pixels across two 64-pixel blocks ...
    frames[0, 30:33, 100:120] = 250  # ... and 60 more, beside a brighter pixel
    frames[0, 33, 119] = 260
    frames[0, 36:39:2, 4:448:4] = 200  # 222 runs of three equal pixels in one item
    frames[0, 36:39:2, 5:448:4] = 200
    frames[0, 36:39:2, 6:448:4] = 200
    assert 222 > UNDECIDED_CAPACITY
    cal = Calibration(np.full((h, w), 100.0), np.full((h, w), 2.0), xray_threshold=1000)
    out = _count_all(frames, cal, True)
    assert out["numba"] == out["reference"] == out["native"]
    idx = out["reference"].indices
    assert 2 * w + 3 in idx and 20 * w + 70 in idx  # their raster-first pixels
    plateau = (idx >= 30 * w) & (idx < 33 * w) & (idx % w >= 100) & (idx % w < 120)
    assert not plateau.any() and 33 * w + 119 in idx  # only the brighter pixel
    runs = idx[idx >= 36 * w]
    assert runs.size == 222 and set((runs % w % 4).tolist()) == {0}  # each run's first pixel


@pytest.mark.parametrize("wrapped", [False, True])
def test_one_value_maps_count_what_per_pixel_maps_count(rng, wrapped):
    """Frames the camera dark-subtracted (one dark level and noise): the kernel
    streams only the frame, reading the maps as one value, and lists the masked
    pixels (in the vector blocks, in the scalar tail, a whole row, next to
    events); the events and sub-pixel cells are those of the per-pixel maps, the
    reference and C, on 1 and 2 threads."""
    from streamstore.counting._launch import count_frames
    from streamstore.counting._maps import as_unsigned, frame_only_maps, kernel_maps

    h, w, n = 150, 200, 4  # three full 64-pixel blocks and a tail of 8
    level = 0.0 if wrapped else 40.0
    frames = level + rng.normal(0, 3, (n, h, w))
    frames += (rng.random((n, h, w)) < 0.02) * rng.integers(20, 200, (n, h, w))
    frames[3, 20:23, 60:66] = 30000  # an X-ray across a block edge (not in the first
    # frame, which would choose 16-bit rows: a share of its candidates at 255 or more)
    frames[1, 70, 195] = 65535 if not wrapped else 32767  # saturated, in the tail
    frames[2, 5, 10:14] = 200.0  # a plateau
    mask = np.zeros((h, w), bool)
    mask[[3, 3, 9, 40], [5, 64, 197, 130]] = True
    mask[100] = True  # a whole row
    hot = rng.integers(0, h * w, 30)
    mask.flat[hot] = True
    frames.reshape(n, -1)[:, hot] += 500  # hot pixels the mask hides
    if wrapped:
        frames = np.rint(frames).astype(np.int16).view(np.uint16)
    else:
        frames = np.clip(np.rint(frames), 0, 65535).astype(np.uint16)
    cal = Calibration(
        np.full((h, w), level), np.full((h, w), 3.0), mask=mask, xray_threshold=3000,
        wrapped=wrapped,
    )  # fmt: skip
    for subpixel in (False, True):
        out = _count_all(frames, cal, subpixel)
        ref = out["reference"]
        assert ref.n_events > 1000
        for threads in (1, 2):
            c = Counter(cal, np.uint16, subpixel=subpixel, threads=threads)
            got = c(frames)
            assert len(c._maps) == 7  # the one-value form was taken
            assert got == ref == out["native"]
            assert np.array_equal(got.indices, ref.indices)
    # against the per-pixel maps of the same calibration, through the launcher
    lo, dark, _, level_x = cal.threshold_maps(np.uint16)
    lo, dark = as_unsigned(lo), as_unsigned(dark)
    maps = kernel_maps(lo, dark)
    one = frame_only_maps(maps, lo.dtype)
    assert one is not None and one[3].size == int(mask.sum())
    kernel_frames = as_unsigned(frames.view(np.int16)) if wrapped else frames
    a = count_frames(kernel_frames, lo, dark, None, level_x, 1, True, 2, maps)
    b = count_frames(kernel_frames, lo, dark, None, level_x, 1, True, 2, (*maps, *one))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_one_value_maps_only_where_every_pixel_shares_them():
    from streamstore.counting._maps import frame_only_maps, kernel_maps

    h, w = 6, 70
    lo = np.full((h, w), 120, np.uint16)
    dark = np.full((h, w), 100, np.uint16)
    one = frame_only_maps(kernel_maps(lo, dark), np.uint16)
    assert one is not None and one[0].strides == (0, 0) and not one[0].flags.writeable
    assert one[0][0, 0] == 0 and one[1][5, 69] == 20 and one[3].size == 0
    other = lo.copy()
    other[2, 3] += 1  # one pixel's threshold differs
    assert frame_only_maps(kernel_maps(other, dark), np.uint16) is None
    pattern = dark.copy()
    pattern[4] += 3  # a row's dark level differs
    assert frame_only_maps(kernel_maps(lo + 3 * (pattern > 100), pattern), np.uint16) is None
    # 8-bit frames and two-byte maps keep their per-pixel maps
    lo8, dark8 = lo.astype(np.uint8), dark.astype(np.uint8)
    assert frame_only_maps(kernel_maps(lo8, dark8), np.uint8) is None
    wide = dark + np.uint16(300) * (np.arange(w) % 2).astype(np.uint16)
    assert frame_only_maps(kernel_maps(wide + 20, wide), np.uint16) is None
    # a masked pixel (lo = dark = TMAX) is listed, not a level of its own
    lo[1, 7] = dark[1, 7] = 65535
    one = frame_only_maps(kernel_maps(lo, dark), np.uint16)
    assert one is not None and one[2].tolist() == [0, 0, 1, 1, 1, 1, 1] and one[3].tolist() == [7]
    # maps neither C-contiguous nor one value are refused, not misread
    from streamstore.counting._launch import count_frames

    maps = kernel_maps(lo, dark)
    strided = np.zeros((h, 2 * w), np.uint8)[:, ::2]
    with pytest.raises(ValueError, match="one value"):
        count_frames(np.zeros((1, h, w), np.uint16), lo, dark, None, 2**62, 1, False, 1,
                     (*maps, strided, *one[1:]))  # fmt: skip
