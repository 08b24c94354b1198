"""What counting derives from a calibration is cached with it; the calibration is immutable;
every kernel variant a calibration can lead to is in the table the daemon warms up."""

from __future__ import annotations

import collections
import gc
import itertools
import weakref

import numpy as np
import pytest

import streamstore
from streamstore import Calibration
from streamstore.counting import Counter


def _frames(rng, h=70, w=150, n=3, dark=100.0):
    frames = dark + rng.normal(0, 2, (n, h, w))
    frames += (rng.random((n, h, w)) < 0.02) * rng.integers(20, 200, (n, h, w))
    return np.rint(frames).astype(np.uint16)


def test_count_derives_the_kernel_maps_once_and_frees_them_with_the_calibration(rng):
    h, w = 70, 150
    cal = Calibration(np.full((h, w), 100.0), np.full((h, w), 2.0))
    frames = _frames(rng, h, w)
    first = streamstore.count(frames, cal, threads=1)
    maps = cal._derived()[("kernel_maps", "<u2")][0]
    assert maps[0].dtype == np.uint8  # compact maps
    again = streamstore.count(frames, cal, threads=2)
    assert again == first == Counter(cal, np.uint16, threads=1)(frames)
    assert cal._derived()[("kernel_maps", "<u2")][0] is maps  # not derived again
    assert ("wide_rows", "<u2") in cal._derived()
    # another X-ray threshold shares what does not depend on it
    other = cal.with_xray_threshold(500.0)
    assert other._derived() is cal._derived()
    streamstore.count(frames, other)
    alive = weakref.ref(maps[0])
    del maps, cal, other
    gc.collect()
    assert alive() is None  # freed with the calibrations


def test_a_calibration_is_immutable():
    dark = np.full((6, 9), 100.0, np.float32)
    noise = np.ones((6, 9), np.float32)
    cal = Calibration(dark, noise, mask=np.zeros((6, 9), bool))
    for name in ("dark", "noise", "gain", "mask", "n_sigma", "xray_threshold", "wrapped"):
        with pytest.raises(AttributeError, match="immutable"):
            setattr(cal, name, getattr(cal, name))
    for arr in (cal.dark, cal.noise, cal.mask):
        with pytest.raises(ValueError, match="read-only"):
            arr[0, 0] = 1
    # the caller's arrays stay theirs: changing them does not change the calibration
    dark[0, 0] = 7.0
    assert cal.dark[0, 0] == 100.0
    # a calibration's own (read-only) maps are shared, not copied again
    assert cal.with_xray_threshold(50.0).dark is cal.dark
    cal.source = "estimate"  # not a defining attribute
    assert cal.source == "estimate"


def test_kernel_maps_refuse_thresholds_below_the_dark():
    from streamstore.counting._maps import kernel_maps

    dark = np.full((4, 5), 100, np.uint8)
    with pytest.raises(ValueError, match="below the dark"):
        kernel_maps(dark - np.uint8(1), dark)


@pytest.mark.parametrize(
    "dtype, wrapped, gain, wide_dark, wide_rows",
    list(
        itertools.product(
            (np.uint8, np.uint16), (False, True), (False, True), (False, True), (False, True)
        )
    ),  # fmt: skip
)
def test_every_variant_a_calibration_reaches_is_warmed_up(dtype, wrapped, gain, wide_dark,
                                                         wide_rows):  # fmt: skip
    """The daemon compiles the kernel variants of ``kernel_variants()`` before it
    listens: whatever the calibration, the Counter must pick one of them."""
    from streamstore.counting._maps import as_unsigned, frame_only_maps, kernel_maps, row_type
    from streamstore.counting.warmup import kernel_variants

    h, w = 8, 70
    rng = np.random.default_rng(3)
    dark = np.full((h, w), 0.0 if wrapped else 60.0)
    if wide_dark:  # dark levels spanning more than a byte within a row
        dark[:, ::2] += 40 if dtype == np.uint8 else 2000
    cal = Calibration(
        dark,
        np.full((h, w), 3.0),
        gain=rng.uniform(0.9, 1.1, (h, w)) if gain else None,
        mask=rng.random((h, w)) < 0.05,
        wrapped=wrapped,
    )
    lo, dk, gk, _ = cal.threshold_maps(dtype)
    lo, dk = as_unsigned(lo), as_unsigned(dk)  # how the kernel counts wrapped frames
    kt = lo.dtype
    assert kt == np.dtype(dtype)
    maps = kernel_maps(lo, dk)
    dmap, _, tmap = maps
    # as Counter picks: the one-value maps where they hold (no gain), byte rows then
    frame_only = gk is None and frame_only_maps(maps, kt) is not None
    assert frame_only == (not gain and not wide_dark and dtype == np.uint16)
    wide_rows = wide_rows and not frame_only
    rows = np.dtype(row_type(kt, dmap.dtype, gk is not None, wide_rows)[0])
    assert tmap.dtype == (np.uint8 if dmap.itemsize < kt.itemsize else f"u{kt.itemsize}")
    seen = {"frames": kt.name, "dmap": dmap.dtype.name, "rows": rows.name, "one": frame_only}

    def table(gain):
        keys = ("frames", "dmap", "rows")
        return [{**{k: v[k] for k in keys}, "one": v.get("frame_only", False)}
                for v in kernel_variants(gain)]  # fmt: skip

    assert seen in table(True)
    if gk is None:  # dark series and estimates have no gain: warmed without a gain file
        assert seen in table(False)


def _kinds(rng):
    """(frames, calibration) of every kind of calibration and frame type."""
    h, w = 70, 150
    flat = np.full((h, w), 100.0)
    noise = np.full((h, w), 2.0)
    u16 = _frames(rng, h, w)
    high = np.rint(flat + rng.normal(0, 2, (2, h, w)) + (rng.random((2, h, w)) < 0.02) * 600)
    wide_dark = flat.copy()
    wide_dark[:, ::2] += 2000
    signed = np.rint(rng.normal(0, 3, (2, h, w)) + (rng.random((2, h, w)) < 0.02) * 80)
    gain = rng.uniform(0.9, 1.1, (h, w))
    ripple = flat + np.arange(w) % 3  # not one dark level: per-pixel maps
    return [
        (u16, Calibration(flat, noise)),
        (high.astype(np.uint16), Calibration(ripple, noise, xray_threshold=12000)),
        ((u16 + wide_dark.astype(np.uint16) - 100), Calibration(wide_dark, noise)),
        (u16, Calibration(flat, noise, gain=gain)),
        (u16.astype(np.uint8), Calibration(flat, noise)),
        (u16.astype(np.uint8), Calibration(flat, noise, gain=gain)),
        (signed.astype(np.int16).view(np.uint16), Calibration(flat * 0, noise, wrapped=True)),
        (signed.astype(np.int8).view(np.uint8), Calibration(flat * 0, noise, wrapped=True)),
    ]


def test_after_the_warm_up_no_calibration_compiles_a_kernel(rng):
    """What the daemon warms up before it listens covers every calibration and frame
    type: counting any of them afterwards adds no compiled kernel."""
    from streamstore.counting import _kernels as k
    from streamstore.counting import charge, coincidence
    from streamstore.counting.dose import DoseEstimator
    from streamstore.counting.warmup import warm_kernels

    warm_kernels()
    assert warm_kernels()["compiled"] == 0  # all there now
    # the counting kernels and the dose's (the types they meet in use, read-only
    # tables included, are those the warm-up gave them)
    kernels = (k._count_items, k._compact, k._gather, coincidence._pair_histogram_kernel,
               coincidence._pool_tiles_kernel, coincidence._lookup_events_kernel,
               coincidence._lookup_tiles_kernel, coincidence._coarse_counts_kernel,
               charge._tile_charge_kernel,
               charge._window_charge_kernel)  # fmt: skip
    compiled = [len(d.signatures) for d in kernels]
    rows = set()
    for frames, cal in _kinds(rng):
        for subpixel, threads in ((False, 1), (True, 2)):
            c = Counter(cal, frames.dtype, subpixel=subpixel, threads=threads)
            got = c(frames)
            rows.add((c.kernel_dtype.name, c._maps[0].dtype.name, c._wide_rows, len(c._maps)))
            assert got == Counter(cal, frames.dtype, subpixel=subpixel, implementation="native")(
                frames
            )
            assert got.electrons is not None
            assert streamstore.count(frames, cal, threads=threads).electrons is not None
        est = DoseEstimator(cal.frame_shape, flag_limits=((0.0, np.inf),))
        est.update(got)
        assert est.tile_flags().any()  # the flag maps were made, by the lookup kernel
    assert [len(d.signatures) for d in kernels] == compiled
    assert len(rows) >= 7  # the kinds did reach different variants


def test_after_the_warm_up_no_data_only_estimate_compiles_a_kernel(rng):
    """The data-only dark estimator's kernels (per frame type, and over its integer
    samples) are all in its warm-up: estimates from every frame type a camera
    without a dark series sends, as ingest stacks them, add no compiled kernel."""
    import numba

    from streamstore.counting import _dark_kernels, _robust_kernels
    from streamstore.counting.warmup import _estimator_cached, _estimator_kernels, _warm_estimator

    _warm_estimator()
    assert _estimator_cached()
    # every kernel of the estimator's modules (but those inlined into others) is
    # one the start-up checks the cache for
    kernels = [
        d
        for m in (_dark_kernels, _robust_kernels)
        for d in vars(m).values()
        if isinstance(d, numba.core.registry.CPUDispatcher)
        and d.targetoptions.get("inline") != "always"
    ]
    assert len(kernels) >= 8 and set(kernels) == set(_estimator_kernels())
    compiled = [len(d.signatures) for d in kernels]
    h, w = 40, 70
    signal = (rng.random((16, h, w)) < 0.02) * rng.integers(30, 120, (16, h, w))
    dark = rng.normal(0, 6, (h, w))  # a fixed pattern: the estimate goes per pixel
    raw = np.rint(dark + rng.normal(0, 2, (16, h, w)) + signal)
    kinds = [
        ((raw + 100).astype(np.uint16), False),
        ((raw + 100).astype(np.uint8), False),
        (raw.astype(np.int16).view(np.uint16), True),
        (raw.astype(np.int8).view(np.uint8), True),
    ]
    for frames, wrapped in kinds:
        ests = []
        cal = Calibration.estimate(np.stack(list(frames)), estimator_out=ests)
        assert ests and cal.wrapped == wrapped  # per pixel, the frame type detected
    assert [len(d.signatures) for d in kernels] == compiled


def test_the_warm_up_counts_only_what_it_compiles_itself(monkeypatch):
    """A kernel this process compiled before the warm-up (a test, a first count)
    is not reported as compiled again by every later warm-up."""
    from streamstore.counting import coincidence
    from streamstore.counting import dark_estimate as de
    from streamstore.counting.warmup import _warm_variant, kernel_variants, warm_kernels

    warm_kernels()  # everything in the cache and loaded
    n = len(kernel_variants(True))
    assert _warm_variant(n, True) == 0 and _warm_variant(n + 1, True) == 0
    for d in (coincidence._pool_tiles_kernel, de._median_rows):  # as if compiled earlier
        misses = collections.Counter(d._cache_misses)
        misses["an earlier signature"] += 1
        monkeypatch.setattr(d, "_cache_misses", misses)
    assert _warm_variant(n, True) == 0 and _warm_variant(n + 1, True) == 0


def test_compile_workers_report_past_what_else_they_print(monkeypatch):
    """A compile worker's stdout also carries what numba prints there (its cache
    log with NUMBA_DEBUG_CACHE=1): the start-up reads its own report lines only."""
    from streamstore.counting.warmup import _compile_in_workers, kernel_variants

    monkeypatch.setenv("NUMBA_DEBUG_CACHE", "1")
    encoder = len(kernel_variants(True))  # the event encoder's slot: quick to load
    seen: list[tuple[int, int]] = []
    _compile_in_workers([encoder], True, 1, lambda i, got: seen.append((i, got)))
    assert len(seen) == 1 and seen[0][0] == encoder and seen[0][1] >= 0


def test_compile_workers_take_the_next_job_as_they_end_one():
    """More jobs than workers: each job is done once, by whichever worker is free
    (handed out in the order given), and every worker ends when none is left."""
    from streamstore.counting.warmup import _compile_in_workers, kernel_variants

    encoder = len(kernel_variants(True))
    jobs = [encoder, 0, encoder, 3, encoder]  # from the cache: each loads in a moment
    seen: list[int] = []
    _compile_in_workers(jobs, True, 2, lambda i, got: seen.append(i))
    assert sorted(seen) == sorted(jobs)
    seen.clear()
    _compile_in_workers([0], True, 3, lambda i, got: seen.append(i))  # fewer jobs than workers
    assert seen == [0]
