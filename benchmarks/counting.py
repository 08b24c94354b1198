"""Counting speed and accuracy on one full-size frame, every anchor measured in the same run.

    python -m benchmarks.counting                 # 4092 x 5760 uint16 at 0.01 e/px/frame
    python -m benchmarks.counting --json          # one JSON object
    python -m benchmarks.counting --shape 1024x1536 --repeats 3   # a quick run

Measures, on the same emulator frame (seeded):

- ``np.copyto`` of the frame (the memory-stream bound) and a plain numpy
  compare-and-count pass over frame and threshold map;
- streamstore's ``Counter`` with 1 and 2 threads (ratio to the copy; 2-thread
  speed-up), which fills the coincidence-corrected dose (``EventBatch.electrons``),
  and the same without it, ``Counter(dose=False)`` (``events_only`` in the JSON);
- the one-call form ``streamstore.count(frame, cal, threads=...)`` called frame
  after frame, 1 and 2 threads, against the reused ``Counter`` (``one_call`` in
  the JSON; target: at most 1.15 x the Counter, 2 threads never slower than 1),
  and its first call on a calibration (the kernel's maps and row type are then
  derived and cached with the calibration); also against Counters whose dose model
  has settled (a series' first few hundred full frames count event pairs for the
  model's areas, later frames do not; ``count()`` measures them from its own frames
  every call);
- a plain read of the bytes the kernel streams (the frame and its two
  one-byte calibration maps) with 1 and 2 threads: the memory bound of the
  kernel, and the 2-thread speed-up any kernel running at that bound could
  reach (``stream_read`` in the JSON);
- copy and the kernel again from a cold cache (``cold_cache`` in the JSON): the
  caches emptied before every timed call, as for a stream of new frames. The
  warm figures let the 32 MB L3 keep part of the previous identical pass, and
  how much depends on what ran just before;
- frames the camera dark-subtracted (``dark_subtracted`` in the JSON): the same
  frame less its dark, negatives clipped to 0 or wrapped (signed), counted with
  one dark level and noise for every pixel, where the kernel streams only the
  frame (``Counter(dose=False)``), against the same calibration through
  per-pixel maps and against a plain read of the frame alone, 1 and 2 threads;
- the counters that resolve merged electrons (``--methods``, default ``resolve,fit,joint``;
  ``methods`` in the JSON): a reused ``Counter(method=...)`` with the dose on, 1
  and 2 threads (a frame alone on 2 threads is counted in row bands), against the
  copy, with its recall and precision; the first call (compiled or loaded, and
  one electron's charge or cloud measured from the frame) apart. The fit and the
  joint fit are timed over ``min(repeats, 3)`` runs (the joint fit of one frame is
  sequential: its threads count frames);
- the C twin in ``native_ref`` (single-threaded; numba / native ratio);
- stempy's ``electron_count_frame`` when stempy is installed (speed ratio);
- recall and precision of streamstore and stempy against the emulator's truth
  (one-to-one matching within 1 px), events/s and GB/s of frame data.

Times are the best of ``--repeats`` runs (the machine is shared; the best run is the
least disturbed). Targets: 1 thread <= 2.0 x copy, 2 threads >= 1.7 x the
1-thread rate, numba at least as fast as native_ref.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any

import numpy as np

from benchmarks import record
from benchmarks.accuracy import NEW_METHODS, method_list
from streamstore import Calibration, count
from streamstore.camera.emulator import CameraEmulator
from streamstore.counting import Counter
from streamstore.counting._maps import kernel_maps
from streamstore.counting.accuracy import score_batch
from streamstore.counting.dose import MAX_FAR_PAIRS
from streamstore.events import EventBatch
from streamstore.shapes import parse_shape

XRAY_THRESHOLD = 1000.0  # ADU, the same for streamstore and stempy


#: Frames fed to a Counter at most until its dose model has settled.
SETTLE_FRAMES = 1000


def _parse_shape(text: str) -> tuple[int, int]:
    h, w = parse_shape(text)
    if h < 8 or w < 8:
        raise argparse.ArgumentTypeError(f"shape must be at least 8x8, got {text!r}")
    return h, w


def best_time(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def best_times(fns, repeats: int, before=None) -> list[float]:
    """Best wall time of each function, calling them in turn ``repeats`` times
    (``before``, when given, runs untimed ahead of every timed call)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def cold_times(fns, repeats: int, flush_bytes: int = 128 * 2**20) -> list[float]:
    """:func:`best_times` with the caches emptied before every timed call (a read
    of ``flush_bytes``, larger than any L3 here), as a stream of new frames meets
    them: nothing of the previous, identical pass is left."""
    junk = np.ones(flush_bytes // 8)
    return best_times(fns, repeats, before=junk.sum)


def _stream_reader():
    """A numba function ``read(a, b, c)`` of three 2-D uint8 arrays with the same
    rows, read in parallel bands of 64 rows as the counting kernel streams them;
    returns their largest byte."""
    import numba

    @numba.njit(parallel=True, cache=False)
    def read(a, b, c):
        rows = a.shape[0]
        bands = (rows + 63) // 64
        out = np.zeros(bands, np.uint8)
        for band in numba.prange(bands):
            m = np.uint8(0)
            for r in range(band * 64, min(rows, band * 64 + 64)):
                ra, rb, rc = a[r], b[r], c[r]
                for i in range(ra.size):
                    m = max(m, ra[i])
                for i in range(rb.size):
                    m = max(m, rb[i])
                for i in range(rc.size):
                    m = max(m, rc[i])
            out[band] = m
        return out.max()

    return read


def _with_threads(fn, args, threads: int):
    """``fn(*args)`` under numba's thread count ``threads``, as a no-argument call."""
    import numba

    def call():
        previous = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            return fn(*args)
        finally:
            numba.set_num_threads(previous)

    return call


def run(
    shape: tuple[int, int],
    dose: float,
    repeats: int,
    seed: int,
    n_dark: int,
    stempy: bool,
    log=print,
    methods: tuple[str, ...] = NEW_METHODS,
) -> dict[str, Any]:
    """Run the benchmark; return the results as a dict."""
    import numba

    t0 = time.perf_counter()
    emu = CameraEmulator(shape, dose_rate_e_per_px_s=dose * 1500, frame_time_s=1 / 1500, seed=seed)
    dark, _ = emu.dark_frames(n_dark)
    frames, truth = emu.generate(1)
    frame = frames[0]
    cal = Calibration.from_dark_frames(dark, xray_threshold=XRAY_THRESHOLD)
    log(
        f"frame {shape[0]} x {shape[1]} uint16, {len(truth.positions[0])} electrons "
        f"({dose} e/px/frame); calibration from {n_dark} dark frames "
        f"({time.perf_counter() - t0:.1f} s to emulate)"
    )
    nbytes = frame.nbytes
    res: dict[str, Any] = {
        "frame_shape": list(shape),
        "dtype": "uint16",
        "dose_e_per_px_frame": dose,
        "n_true": len(truth.positions[0]),
        "repeats": repeats,
        "machine": {
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "numba_threads_max": numba.config.NUMBA_NUM_THREADS,
            "threading_layer": None,
            "load_average_at_start": list(os.getloadavg()),
        },
    }

    dst = np.empty_like(frame)
    t_copy = best_time(lambda: np.copyto(dst, frame), repeats)
    lo = cal.threshold_maps(np.uint16)[0]
    t_cmp = best_time(lambda: np.count_nonzero(frame > lo), repeats)

    c1 = Counter(cal, np.uint16, threads=1)
    c2 = Counter(cal, np.uint16, threads=2)
    # the events alone, without the coincidence-corrected dose (Counter(dose=False))
    k1 = Counter(cal, np.uint16, threads=1, dose=False)
    k2 = Counter(cal, np.uint16, threads=2, dose=False)
    batch = c1(frame)
    # the one-call form's first call on a calibration: derives the kernel's maps
    fresh = Calibration(
        cal.dark, cal.noise, mask=cal.mask, xray_threshold=XRAY_THRESHOLD, source=cal.source
    )
    t_first = time.perf_counter()
    first_same = count(frame, fresh, threads=1) == batch
    t_first = time.perf_counter() - t_first
    # Counters whose dose model has settled: a series' first few hundred full frames
    # also count event pairs (the model's exclusion areas), later ones do not
    s1 = Counter(cal, np.uint16, threads=1)
    s2 = Counter(cal, np.uint16, threads=2)
    fed = 0
    for settled in (s1, s2):
        # about 330 frames at 4092 x 5760 and 0.01 e/px/frame; small frames give up
        for fed in range(1, SETTLE_FRAMES + 1):  # noqa: B007  (fed: reported)
            settled(frame)
            if settled.dose_model()["far_pairs"] >= MAX_FAR_PAIRS:
                break
    is_settled = all(c.dose_model()["far_pairs"] >= MAX_FAR_PAIRS for c in (s1, s2))
    # 1 and 2 threads, Counter and count(), alternate: a burst of load hits all alike
    t1, t2, tc1_call, tc2_call, tk1, tk2, ts1, ts2 = best_times(
        [
            lambda: c1(frame),
            lambda: c2(frame),
            lambda: count(frame, cal, threads=1),
            lambda: count(frame, cal, threads=2),
            lambda: k1(frame),
            lambda: k2(frame),
            lambda: s1(frame),
            lambda: s2(frame),
        ],
        repeats,
    )
    assert_same = c2(frame) == batch
    # the memory bound: a plain read of what the kernel streams, 1 and 2 threads
    dmap, _, tmap = kernel_maps(*cal.threshold_maps(np.uint16)[:2])  # what the kernel reads
    streams = [a.view(np.uint8) for a in (frame, dmap, tmap)]
    reader = _stream_reader()
    r1, r2 = best_times(
        [_with_threads(reader, streams, 1), _with_threads(reader, streams, 2)], repeats
    )
    res["machine"]["threading_layer"] = numba.threading_layer()  # the plain read's only
    read_bytes = sum(a.nbytes for a in streams)
    # the same three from a cold cache (a stream of new frames; copy and counting alike)
    tc_copy, tc1, tc2 = cold_times(
        [lambda: np.copyto(dst, frame), lambda: c1(frame), lambda: c2(frame)], repeats
    )

    res["dark_subtracted"] = _dark_subtracted(frame, cal, reader, repeats, log)

    native = Counter(cal, np.uint16, implementation="native")
    t_nat = best_time(lambda: native(frame), repeats)
    same_native = native(frame) == batch

    score = score_batch(batch, truth.positions)
    score_sub = score_batch(Counter(cal, np.uint16, subpixel=True)(frame), truth.positions)
    n_ev = batch.n_events
    res["machine"]["load_average_at_end"] = list(os.getloadavg())
    res.update(
        {
            "copy_s": t_copy,
            "numpy_compare_s": t_cmp,
            "numba_1thread_s": t1,
            "numba_2threads_s": t2,
            "native_ref_s": t_nat,
            "ratio_1thread_to_copy": t1 / t_copy,
            "ratio_compare_to_copy": t_cmp / t_copy,
            "speedup_2threads": t1 / t2,
            "ratio_native_to_numba": t_nat / t1,
            "identical_1_2_threads": bool(assert_same),
            "one_call": {
                "count_1thread_s": tc1_call,
                "count_2threads_s": tc2_call,
                "ratio_to_counter_1thread": tc1_call / t1,
                "ratio_to_counter_2threads": tc2_call / t2,
                "ratio_1thread_to_copy": tc1_call / t_copy,
                "speedup_2threads": tc1_call / tc2_call,
                "first_call_s": t_first,
                "first_call_identical": bool(first_same),
                "settled_counter_1thread_s": ts1,
                "settled_counter_2threads_s": ts2,
                "ratio_to_settled_counter_1thread": tc1_call / ts1,
                "ratio_to_settled_counter_2threads": tc2_call / ts2,
                "settled": is_settled,
                "settle_frames": fed,
            },
            "events_only": {
                "numba_1thread_s": tk1,
                "numba_2threads_s": tk2,
                "ratio_1thread_to_copy": tk1 / t_copy,
                "dose_cost_1thread": t1 / tk1,
                "dose_cost_2threads": t2 / tk2,
            },
            "identical_numba_native": bool(same_native),
            "n_events": n_ev,
            "events_per_s_1thread": n_ev / t1,
            "events_per_s_2threads": n_ev / t2,
            "gb_per_s_1thread": nbytes / t1 / 1e9,
            "gb_per_s_2threads": nbytes / t2 / 1e9,
            "copy_gb_per_s": nbytes / t_copy / 1e9,
            "stream_read": {
                "bytes": read_bytes,
                "read_1thread_s": r1,
                "read_2threads_s": r2,
                "speedup_ceiling_2threads": r1 / r2,
                "ratio_1thread_to_read": t1 / r1,
                "ratio_2threads_to_read": t2 / r2,
            },
            "cold_cache": {
                "copy_s": tc_copy,
                "numba_1thread_s": tc1,
                "numba_2threads_s": tc2,
                "ratio_1thread_to_copy": tc1 / tc_copy,
                "speedup_2threads": tc1 / tc2,
            },
            "recall": score.recall,
            "precision": score.precision,
            "rms_error_px_subpixel": score_sub.rms_error_px,
        }
    )
    load = res["machine"]["load_average_at_start"][0]
    log(f"load average {load:.2f} on {os.cpu_count()} cores (other jobs disturb the timings)")
    log(f"np.copyto                 {t_copy * 1e3:8.2f} ms  ({nbytes / t_copy / 1e9:.1f} GB/s)")
    log(f"numpy compare pass        {t_cmp * 1e3:8.2f} ms  ({t_cmp / t_copy:.2f} x copy)")
    log(
        f"numba, 1 thread           {t1 * 1e3:8.2f} ms  ({t1 / t_copy:.2f} x copy, "
        f"{nbytes / t1 / 1e9:.1f} GB/s, {n_ev / t1 / 1e6:.1f} M events/s)"
    )
    log(
        f"numba, 2 threads          {t2 * 1e3:8.2f} ms  (speed-up {t1 / t2:.2f} x, "
        f"{nbytes / t2 / 1e9:.1f} GB/s, identical: {assert_same})"
    )
    log(
        f"events only (dose=False)  {tk1 * 1e3:8.2f} ms  ({tk1 / t_copy:.2f} x copy; with the "
        f"dose {t1 / tk1:.2f} x), 2 threads {tk2 * 1e3:.2f} ms ({t2 / tk2:.2f} x)"
    )
    log(
        f"count(), 1 thread         {tc1_call * 1e3:8.2f} ms  ({tc1_call / t1:.2f} x Counter, "
        f"{tc1_call / t_copy:.2f} x copy)"
    )
    log(
        f"count(), 2 threads        {tc2_call * 1e3:8.2f} ms  ({tc2_call / t2:.2f} x Counter, "
        f"speed-up {tc1_call / tc2_call:.2f} x); first call on a calibration "
        f"{t_first * 1e3:.1f} ms (maps derived and cached)"
    )
    log(
        f"Counter, dose model settled after {fed} frames"
        f"{'' if is_settled else ' (NOT settled: small frames)'}: 1 thread {ts1 * 1e3:.2f} ms "
        f"(count() {tc1_call / ts1:.2f} x), 2 threads {ts2 * 1e3:.2f} ms "
        f"(count() {tc2_call / ts2:.2f} x)"
    )
    log(
        f"plain read of the kernel's {read_bytes / 1e6:.0f} MB (frame and maps): 1 thread "
        f"{r1 * 1e3:.2f} ms, 2 threads {r2 * 1e3:.2f} ms: a kernel at memory speed "
        f"speeds up at most {r1 / r2:.2f} x (counting: {t1 / r1:.2f} / {t2 / r2:.2f} x the read)"
    )
    log(
        f"cold cache: copy {tc_copy * 1e3:.2f} ms, 1 thread {tc1 * 1e3:.2f} ms "
        f"({tc1 / tc_copy:.2f} x copy), 2 threads {tc2 * 1e3:.2f} ms (speed-up {tc1 / tc2:.2f} x)"
    )
    log(
        f"native_ref (C, 1 thread)  {t_nat * 1e3:8.2f} ms  (native / numba {t_nat / t1:.2f}, "
        f"identical: {same_native})"
    )
    log(
        f"streamstore: {n_ev} events, recall {score.recall:.4f}, precision "
        f"{score.precision:.4f}; sub-pixel RMS error {score_sub.rms_error_px:.3f} px"
    )

    res["methods"] = _methods(frame, cal, truth, t_copy, repeats, methods, log)
    if stempy:
        try:
            import stempy.image as si
        except ImportError:
            log("stempy not installed: skipped (pip install -e '.[compare]')")
            res["stempy"] = None
        else:
            res["stempy"] = _stempy(si, frame, cal, truth, t1, max(1, min(repeats, 3)), log)
    return res


def _dark_subtracted(frame, cal, reader, repeats, log) -> dict[str, Any]:
    """Frames the camera dark-subtracted: counted streaming only the frame (one dark
    level and threshold for every pixel), against per-pixel maps of the same
    calibration and a plain read of the frame, 1 and 2 threads, ``dose=False``."""
    from streamstore.counting._launch import count_frames
    from streamstore.counting._maps import as_unsigned

    sub = frame.astype(np.int32) - np.rint(cal.dark).astype(np.int32)
    noise = float(np.median(cal.noise))
    out: dict[str, Any] = {}
    for kind in ("clipped", "wrapped"):
        if kind == "clipped":
            raw = np.clip(sub, 0, 65535).astype(np.uint16)
        else:
            raw = sub.astype(np.int16).view(np.uint16)
        one_cal = Calibration(
            np.zeros(frame.shape, np.float32), np.full(frame.shape, noise, np.float32),
            mask=cal.mask, xray_threshold=XRAY_THRESHOLD, wrapped=kind == "wrapped",
        )  # fmt: skip
        counters = [Counter(one_cal, np.uint16, threads=t, dose=False) for t in (1, 2)]
        batch = counters[0](raw)
        assert len(counters[0]._maps) == 7, "not counted reading the frame only"
        lo, dark, _, level = one_cal.threshold_maps(np.uint16)
        lo, dark = as_unsigned(lo), as_unsigned(dark)  # once, as Counter does
        per_pixel = counters[0]._maps[:3]  # the same calibration's per-pixel maps
        kframe = raw.view(np.int16) if kind == "wrapped" else raw  # as Counter passes it
        radius = one_cal.xray_radius

        def maps_call(threads, kframe=kframe, lo=lo, dark=dark, level=level, maps=per_pixel,
                      radius=radius):  # fmt: skip
            return count_frames(kframe[None], lo, dark, None, level, radius, False, threads, maps)

        same = all(
            np.array_equal(a, b)
            for a, b in zip(maps_call(2)[:2], (batch.offsets, batch.indices), strict=True)
        )
        none = np.zeros((frame.shape[0], 0), np.uint8)
        streams = [raw.view(np.uint8), none, none]
        dst = np.empty_like(raw)
        t_copy, o1, o2, m1, m2, r1, r2 = best_times(
            [
                lambda raw=raw, dst=dst: np.copyto(dst, raw),
                lambda c=counters[0], raw=raw: c(raw),
                lambda c=counters[1], raw=raw: c(raw),
                lambda f=maps_call: f(1),
                lambda f=maps_call: f(2),
                _with_threads(reader, streams, 1),
                _with_threads(reader, streams, 2),
            ],
            repeats,
        )
        out[kind] = {
            "copy_s": t_copy,
            "frame_only_1thread_s": o1,
            "frame_only_2threads_s": o2,
            "per_pixel_maps_1thread_s": m1,
            "per_pixel_maps_2threads_s": m2,
            "read_frame_1thread_s": r1,
            "read_frame_2threads_s": r2,
            "ratio_1thread_to_copy": o1 / t_copy,
            "ratio_2threads_to_read": o2 / r2,
            "n_events": batch.n_events,
            "identical_to_per_pixel_maps": bool(same),
        }
        log(
            f"dark-subtracted ({kind}): frame only {o1 * 1e3:.2f} / {o2 * 1e3:.2f} ms on 1 / 2 "
            f"threads ({o1 / t_copy:.2f} x copy, {o2 / r2:.2f} x the 2-thread read of the "
            f"frame), per-pixel maps {m1 * 1e3:.2f} / {m2 * 1e3:.2f} ms, identical: {same}"
        )
    return out


def _methods(frame, cal, truth, t_copy, repeats, methods, log) -> dict[str, Any]:
    """The resolving counters (``Counter(method=...)``, the dose on) on the frame."""
    out: dict[str, Any] = {}
    for method in methods:
        counters = [Counter(cal, np.uint16, method=method, threads=t) for t in (1, 2)]
        t_first = time.perf_counter()
        batch = counters[0](frame)
        t_first = time.perf_counter() - t_first
        counters[1](frame)
        reps = max(1, min(repeats, 3)) if method in ("fit", "joint") else repeats
        t1, t2 = best_times([lambda c=c: c(frame) for c in counters], reps)
        same = counters[1](frame) == batch
        score = score_batch(batch, truth.positions)
        out[method] = {
            "counter_1thread_s": t1,
            "counter_2threads_s": t2,
            "ratio_1thread_to_copy": t1 / t_copy,
            "ratio_2threads_to_copy": t2 / t_copy,
            "speedup_2threads": t1 / t2,
            "first_call_s": t_first,
            "repeats": reps,
            "identical_1_2_threads": bool(same),
            "n_events": batch.n_events,
            "recall": score.recall,
            "precision": score.precision,
        }
        log(
            f"method {method!r:9} 1 thread {t1 * 1e3:8.1f} ms ({t1 / t_copy:.1f} x copy), "
            f"2 threads {t2 * 1e3:.1f} ms ({t2 / t_copy:.1f} x copy, identical: {same}); first "
            f"call {t_first:.2f} s; recall {score.recall:.4f}, precision {score.precision:.4f}"
        )
    return out


def _stempy(si, frame, cal, truth, t1, repeats, log) -> dict[str, Any]:
    """stempy's per-frame counting with the same dark, background and X-ray levels."""
    good = ~cal.mask
    background = float(cal.n_sigma * np.median(cal.noise[good]))  # absolute ADU in stempy
    dark = np.where(cal.mask, np.float32(65535), cal.dark).astype(np.float32)

    def go():
        return si.electron_count_frame(
            frame,
            darkreference=dark,
            background_threshold=background,
            xray_threshold=XRAY_THRESHOLD,
        )

    t = best_time(go, repeats)
    sparse = go()
    idx = np.sort(np.asarray(sparse.data[0, 0], dtype=np.uint32))
    # stempy returns row * W + col for an (H, W) frame (checked with non-square frames)
    batch = EventBatch(np.array([0, idx.size]), idx, None, frame.shape)
    score = score_batch(batch, truth.positions)
    log(
        f"stempy electron_count_frame {t * 1e3:8.1f} ms  (stempy / streamstore 1 thread "
        f"{t / t1:.0f} x); {idx.size} events, recall {score.recall:.4f}, precision "
        f"{score.precision:.4f}"
    )
    return {
        "time_s": t,
        "ratio_to_numba_1thread": t / t1,
        "n_events": int(idx.size),
        "recall": score.recall,
        "precision": score.precision,
        "background_threshold_adu": background,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=_parse_shape, default=(4092, 5760), help="HxW (4092x5760)")
    p.add_argument("--dose", type=float, default=0.01, help="e/px/frame (0.01)")
    p.add_argument("--repeats", type=int, default=21, help="timed runs per method (21)")
    p.add_argument("--dark-frames", type=int, default=8, help="dark frames for calibration (8)")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--no-stempy", action="store_true", help="skip the stempy comparison")
    p.add_argument(
        "--methods",
        default=",".join(NEW_METHODS),
        help="resolving counters to time beside the 3 x 3 rule, comma-separated "
        f"({','.join(NEW_METHODS)})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    record.add_options(p)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.dark_frames < 2:
        p.error("--dark-frames must be >= 2")
    methods = method_list(args.methods)
    if not set(methods) <= set(NEW_METHODS):
        p.error(f"--methods takes {', '.join(NEW_METHODS)}")
    log = (lambda *a, **k: None) if args.json else print
    res = run(
        args.shape,
        args.dose,
        args.repeats,
        args.seed,
        args.dark_frames,
        not args.no_stempy,
        log,
        methods,
    )
    record.save("counting", res, args)
    if args.json:
        print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
