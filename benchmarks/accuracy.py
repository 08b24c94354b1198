"""Counting accuracy against the emulator's truth, as the dose rises, counter beside counter.

    python -m benchmarks.accuracy                  # tables: one line per dose and counter
    python -m benchmarks.accuracy --json           # one JSON object
    python -m benchmarks.accuracy --doses 0.001,0.01 --frames 4   # a quick run
    python -m benchmarks.accuracy --emulator read_noise_adu=2,gain_sigma=0.1   # a sweep point
    python -m benchmarks.accuracy --patterns disk --no-stempy --no-data-only

For each illumination pattern (``--patterns``: uniform, and the 4D-STEM like
bright-field disk whose local dose is several times the frame mean) and each
dose (electrons per pixel per frame, frame mean), a seeded emulator makes
``--frames`` frames of ``--shape`` (more at low doses, so that each dose
expects at least ``--electrons`` true electrons) with default physics and 50
dark frames for the calibration. Every counter of the table counts the same
frames with the same dark-series calibration:

``3x3``
    ``streamstore.count`` (sub-pixel on): a local maximum of its 3 x 3
    neighbourhood above ``n_sigma`` x each pixel's noise.
``resolve``, ``fit``, ``joint``
    ``streamstore.count(..., method="resolve")``, ``method="fit"`` and
    ``method="joint"``, the counters that separate coincident electrons (the
    resolve rule's charge and anisotropy; a fit of electron clouds to each
    event's window; the clouds of a frame fitted together), when this
    tree's ``count`` takes those methods (``--method`` names them, comma
    separated); otherwise skipped, with the reason in the output.
``stempy``
    stempy's own ``electron_count_frame`` (a strict 3 x 3 maximum of the
    dark-subtracted frame above a background threshold and below an X-ray
    threshold), frame by frame, as the outside anchor, when stempy imports.
    It is given the calibration's dark map (bad pixels set to 65535, so they
    never count), ``background_threshold = n_sigma x median(noise)`` in ADU
    (one absolute level, where streamstore has a per-pixel one), and
    ``xray_threshold`` = 1000 ADU, the level streamstore's calibration uses.
    stempy reports pixels, not sub-pixel cells: its RMS error is that of pixel
    centres (about 0.41 px for an electron uniform within its pixel).

Each counter's events are matched one-to-one to the true electrons within
1 px. Reported per pattern, dose and counter: recall, precision, sub-pixel RMS
position error, dose error (estimated dose / true dose - 1; the true dose is
the emulator's electrons over frames x pixels, the estimate the counted events
over the same, and, where the counter's batch carries ``electrons``
(coincidence-corrected electrons per frame), that sum as a second estimate),
and the time per frame: process CPU time of the counting call (``--threads``
threads, 1 by default, after an untimed call on one frame), over the frames.
Times are only comparable within one run, and only on an unloaded machine;
the frame shape is in the output. Per dose also: the share of electrons that
have another electron within one pixel (Chebyshev distance <= 1, the 3 x 3
neighbourhood) in the same frame: two such electrons form one local maximum,
so ``1 - recall`` of the 3 x 3 rule follows that share. It tells a
microscopist which dose a counting camera can take, where the beam is: what
matters is the local dose, not the frame mean (``peak_local_dose`` is the
pattern's brightest pixel; see ``docs/counting.md``).

Beside the dark-series calibration, each dose is counted by the 3 x 3 rule
with a calibration estimated from the data frames alone (no dark series:
``Calibration.estimate`` on the first 64 frames, a per-pixel dark map, as
ingest has it once refined; on the first 8, the provisional one ingest
starts with; and on the first 16, its first rebuild): recall and precision of
each, and the recall difference to the dark series (``--no-data-only`` skips
them).

Not a speed benchmark: the accuracy figures are the same on any machine.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks import record
from streamstore import Calibration, count
from streamstore.camera.emulator import PATTERNS, CameraEmulator
from streamstore.counting.accuracy import score_batch
from streamstore.events import EventBatch
from streamstore.shapes import parse_shape

DOSES = (0.001, 0.003, 0.01, 0.02, 0.05, 0.1)
XRAY_THRESHOLD = 1000.0  # ADU, as in tests/counting/test_counting_accuracy.py
#: Dose of the flat frames of ``--gain-reference`` (e/px/frame): bright enough for a
#: few hundred frames to measure each pixel's gain to 2 %, dim enough that no
#: electron's pixel reaches the X-ray threshold.
FLAT_DOSE = 2.0
#: ``streamstore.count``'s methods measured beside the 3 x 3 rule
NEW_METHODS = ("resolve", "fit", "joint")
TIMING_NOTE = (
    "time_per_frame_s: process CPU time of one counting call over all the dose's frames "
    "(after an untimed call on one frame), divided by the frames; comparable only between "
    "counters of one run on an unloaded machine"
)

#: A counter: frames (n, H, W) -> an EventBatch (positions per frame; maybe ``electrons``).
CountFn = Callable[[np.ndarray], EventBatch]


def crowded_share(positions: list[np.ndarray]) -> float:
    """Share of electrons with another electron of the same frame within one pixel
    (the pixels' Chebyshev distance <= 1)."""
    from scipy.spatial import cKDTree

    n = crowded = 0
    for p in positions:
        if len(p) == 0:
            continue
        pix = np.floor(p).astype(np.int64)
        pairs = cKDTree(pix).query_pairs(1, p=np.inf, output_type="ndarray")
        mark = np.zeros(len(pix), bool)
        mark[pairs.ravel()] = True
        n += len(pix)
        crowded += int(mark.sum())
    return crowded / n if n else float("nan")


def stempy_counter(cal: Calibration) -> CountFn:
    """stempy's ``electron_count_frame``, frame by frame, with ``cal``'s dark map and levels.

    Parameters
    ----------
    cal : Calibration
        Dark-series calibration; its dark map (bad pixels raised to 65535, so
        that they never exceed the threshold), ``n_sigma x median(noise)`` of
        the good pixels as stempy's absolute background threshold (ADU) and
        :data:`XRAY_THRESHOLD` as its X-ray threshold are handed to stempy.

    Returns
    -------
    callable
        ``frames (n, H, W) -> EventBatch`` of pixel events (no sub-pixel cells).

    Raises
    ------
    ImportError
        stempy is not installed.
    ValueError
        ``cal`` has a gain map: stempy's gain convention is not checked here.
    """
    import stempy.image as si

    if cal.gain is not None:
        raise ValueError("stempy_counter: a calibration with a gain map is not supported")
    good = np.ones(cal.frame_shape, bool) if cal.mask is None else ~cal.mask
    background = float(cal.n_sigma * np.median(cal.noise[good]))
    dark = np.where(good, cal.dark, np.float32(65535)).astype(np.float32)

    def run(frames: np.ndarray) -> EventBatch:
        frames = np.asarray(frames)
        per_frame = []
        for frame in frames:
            sparse = si.electron_count_frame(
                frame,
                darkreference=dark,
                background_threshold=background,
                xray_threshold=XRAY_THRESHOLD,
            )
            # row * W + col for an (H, W) frame (checked with non-square frames in
            # benchmarks/counting.py); EventBatch wants them ascending
            per_frame.append(np.sort(np.asarray(sparse.data[0, 0], dtype=np.uint32)))
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in per_frame])])
        indices = np.concatenate(per_frame) if per_frame else np.zeros(0, np.uint32)
        return EventBatch(offsets.astype(np.int64), indices, None, frames.shape[1:])

    run.background_threshold_adu = background  # type: ignore[attr-defined]
    return run


def method_support(method: str) -> str | None:
    """Why ``streamstore.count`` cannot count with ``method=method`` on this tree, or None.

    Only the signature is looked at; a method name ``count`` refuses shows up at
    the first call (:func:`run` records it as a skip).
    """
    if "method" not in inspect.signature(count).parameters:
        return f"streamstore.count has no method= parameter on this tree ({method!r} skipped)"
    return None


def method_list(method: str | tuple[str, ...]) -> tuple[str, ...]:
    """Method names from a comma-separated string (empty names dropped) or a tuple."""
    return tuple(m for m in method.split(",") if m) if isinstance(method, str) else tuple(method)


def counter_table(
    cal: Calibration,
    *,
    method: str | tuple[str, ...] = NEW_METHODS,
    threads: int | None = 1,
    stempy: bool = True,
) -> tuple[dict[str, CountFn], dict[str, str]]:
    """The counters measured side by side, and why any is missing.

    Parameters
    ----------
    cal : Calibration
        The calibration every counter uses.
    method : str or tuple of str, default ("resolve", "fit", "joint")
        ``streamstore.count``'s ``method=`` of the new counters (a string: comma
        separated).
    threads : int or None, default 1
        Threads for ``streamstore.count`` (stempy counts frame by frame on one).
    stempy : bool, default True
        Include stempy's rule when stempy imports.

    Returns
    -------
    counters : dict
        Name -> ``frames -> EventBatch``, in the order of the output.
    skipped : dict
        Name -> reason, for counters left out.
    """
    table: dict[str, CountFn] = {
        "3x3": lambda f: count(f, cal, subpixel=True, threads=threads),
    }
    skipped: dict[str, str] = {}
    for name in method_list(method):
        why = method_support(name)
        if why is None:
            table[name] = lambda f, m=name: count(f, cal, subpixel=True, threads=threads, method=m)
        else:
            skipped[name] = why
    if stempy:
        try:
            table["stempy"] = stempy_counter(cal)
        except ImportError:
            skipped["stempy"] = "stempy not installed (pip install -e '.[compare]')"
        except ValueError as exc:  # a gain map
            skipped["stempy"] = str(exc)
    else:
        skipped["stempy"] = "--no-stempy"
    return table, skipped


def batch_electrons(batch: Any) -> float | None:
    """Total coincidence-corrected electrons of a batch that carries ``electrons``
    (per frame), or None when it does not."""
    e = getattr(batch, "electrons", None)
    if callable(e):
        e = e()
    return None if e is None else float(np.sum(np.asarray(e, np.float64)))


def measure_counter(
    fn: CountFn, frames: np.ndarray, true_positions: list[np.ndarray]
) -> dict[str, Any]:
    """Count ``frames`` with ``fn`` and score the events against the truth.

    Returns recall, precision, sub-pixel RMS error, the events and the batch's
    ``electrons`` total (None when absent), each as a dose in e/px/frame, and
    the process CPU time per frame of the counting call.
    """
    n, h, w = frames.shape
    fn(frames[:1])  # untimed: compiled code loaded, the calibration's maps derived
    t0 = time.process_time()
    batch = fn(frames)
    t = time.process_time() - t0
    s = score_batch(batch, true_positions)
    electrons = batch_electrons(batch)
    pixels = n * h * w
    return {
        "n_found": s.n_found,
        "n_matched": s.n_matched,
        "recall": s.recall,
        "precision": s.precision,
        "rms_error_px": s.rms_error_px,
        "dose_events": s.n_found / pixels,
        "dose_electrons": None if electrons is None else electrons / pixels,
        "time_per_frame_s": t / n,
    }


def _dose_error(estimate: float | None, true: float) -> float | None:
    return None if estimate is None or not true else estimate / true - 1


def run(
    shape: tuple[int, int],
    doses: list[float],
    n_frames: int,
    seed: int,
    electrons: int = 0,
    log=print,
    emulator: dict[str, Any] | None = None,
    *,
    patterns: tuple[str, ...] = ("uniform",),
    method: str | tuple[str, ...] = NEW_METHODS,
    stempy: bool = True,
    data_only: bool = True,
    threads: int | None = 1,
    gain_reference: int = 0,
) -> dict[str, Any]:
    """Measure every pattern and dose; return the results as a dict.

    ``gain_reference`` > 0: the calibration of every row takes the gain that this
    many flat frames of the same sensor measure (``Calibration.with_gain_reference``;
    the emulator's seed makes its maps, so the flats share them), at
    ``FLAT_DOSE`` e/px/frame and the row's own physics.

    ``doses`` holds one row per pattern and dose (patterns outer): the
    counters' figures under ``counters``, and the 3 x 3 rule's also as the
    flat ``recall``, ``precision``, ``rms_error_px`` and ``n_found``. The
    emulator seed of a row is ``seed + 100 * PATTERNS.index(pattern) + i``
    (dose ``i``), so a uniform row is the same whatever else runs.
    """
    res: dict[str, Any] = {
        "frame_shape": list(shape),
        "min_frames_per_dose": n_frames,
        "min_electrons_per_dose": electrons,
        "seed": seed,
        "emulator": dict(emulator or {}),
        "patterns": list(patterns),
        "python": platform.python_version(),
        "threads": threads,
        "gain_reference_frames": gain_reference,
        "flat_dose_e_per_px_frame": FLAT_DOSE if gain_reference else None,
        "timing_note": TIMING_NOTE,
        "counters": [],
        "skipped": {},
        "doses": [],
    }
    for pattern in patterns:
        log(f"\npattern {pattern}, frames {shape[0]} x {shape[1]}")
        log(
            "dose e/px/frame  peak local  electrons  within 1 px  counter   recall  precision"
            "  RMS px  dose err  (electrons)  CPU ms/frame"
        )
        for i, dose in enumerate(doses):
            row = _measure_dose(
                shape,
                dose,
                n_frames,
                seed + 100 * PATTERNS.index(pattern) + i,
                electrons,
                emulator or {},
                pattern,
                method,
                stempy,
                data_only,
                threads,
                res,
                gain_reference,
            )
            res["doses"].append(row)
            _log_row(row, log)
    for name, why in res["skipped"].items():
        log(f"{name}: skipped: {why}")
    log(f"{TIMING_NOTE}; frames {shape[0]} x {shape[1]}, threads {threads}")
    if data_only:
        _log_data_only(res["doses"], log)
    return res


def _measure_dose(
    shape,
    dose,
    n_frames,
    seed,
    electrons,
    emulator,
    pattern,
    method,
    stempy,
    data_only,
    threads,
    res,
    gain_reference=0,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    emu = CameraEmulator(
        shape,
        dose_rate_e_per_px_s=dose * 1500,
        frame_time_s=1 / 1500,
        seed=seed,
        pattern=pattern,
        **emulator,
    )
    dark, _ = emu.dark_frames(50)
    frames, truth = emu.generate(max(n_frames, math.ceil(electrons / (dose * shape[0] * shape[1]))))
    cal = Calibration.from_dark_frames(dark, xray_threshold=XRAY_THRESHOLD)
    if gain_reference:
        flat = CameraEmulator(
            shape,
            dose_rate_e_per_px_s=FLAT_DOSE * 1500,
            frame_time_s=1 / 1500,
            seed=seed,
            **emulator,
        )
        step = 50
        cal = cal.with_gain_reference(
            flat.generate(min(step, gain_reference - i))[0] for i in range(0, gain_reference, step)
        )
    n_true = sum(len(p) for p in truth.positions)
    true_dose = n_true / (truth.n_frames * shape[0] * shape[1])
    table, skipped = counter_table(cal, method=method, threads=threads, stempy=stempy)
    counters: dict[str, Any] = {}
    for name, fn in table.items():
        if name in res["skipped"]:
            continue
        try:
            m = measure_counter(fn, frames, truth.positions)
        except (TypeError, ValueError) as exc:
            if name not in method_list(method) or res["doses"]:
                raise
            # the first call tells whether this tree's count() knows the method
            res["skipped"][name] = f"streamstore.count(..., method={name!r}) refused: {exc}"
            continue
        m["dose_error"] = _dose_error(m["dose_events"], true_dose)
        m["dose_error_electrons"] = _dose_error(m["dose_electrons"], true_dose)
        if name == "stempy":
            m["background_threshold_adu"] = fn.background_threshold_adu  # type: ignore[attr-defined]
        counters[name] = m
        if name not in res["counters"]:
            res["counters"].append(name)
    for name, why in skipped.items():
        res["skipped"].setdefault(name, why)
    base = counters["3x3"]
    row: dict[str, Any] = {
        "pattern": pattern,
        "dose_e_per_px_frame": dose,
        "peak_local_dose": float(dose * emu.pattern_map().max()),
        "frames": truth.n_frames,
        "n_true": n_true,
        "true_dose": true_dose,
        "crowded_share": crowded_share(truth.positions),
        "dark_threshold_adu": cal.background_threshold,
        # the 3 x 3 rule's figures, flat, as results files before the counter table had them
        "n_found": base["n_found"],
        "recall": base["recall"],
        "precision": base["precision"],
        "rms_error_px": base["rms_error_px"],
        "counters": counters,
    }
    if data_only:
        # no dark series: the data frames alone, refined (64 frames) and provisional (8)
        data_cal = Calibration.estimate(frames[:64], xray_threshold=XRAY_THRESHOLD)
        d = score_batch(count(frames, data_cal, subpixel=True), truth.positions)
        first_cal = Calibration.estimate(frames[:8], xray_threshold=XRAY_THRESHOLD)
        p8 = score_batch(count(frames, first_cal, subpixel=True), truth.positions)
        # the first rebuild, which counts frames 16 to 31 in ingest
        cal16 = Calibration.estimate(frames[:16], xray_threshold=XRAY_THRESHOLD)
        p16 = score_batch(count(frames, cal16, subpixel=True), truth.positions)
        row.update(
            data_only_recall=d.recall,
            data_only_precision=d.precision,
            data_only_recall_minus_dark=d.recall - base["recall"],
            data_only_threshold_adu=data_cal.background_threshold,
            first8_recall=p8.recall,
            first8_precision=p8.precision,
            first8_recall_minus_dark=p8.recall - base["recall"],
            first16_recall=p16.recall,
            first16_precision=p16.precision,
            first16_recall_minus_dark=p16.recall - base["recall"],
        )
    row["seconds"] = time.perf_counter() - t0
    return row


def _fmt(x: float | None, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-".rjust(int(spec.lstrip("+").split(".")[0]))  # keep the columns aligned
    return format(x, spec)


def _log_row(row: dict[str, Any], log) -> None:
    first = True
    for name, m in row["counters"].items():
        head = (
            f"{row['dose_e_per_px_frame']:>15g}  {row['peak_local_dose']:>10.4g}  "
            f"{row['n_true']:>9d}  {row['crowded_share']:>11.3f}"
            if first
            else " " * 51
        )
        first = False
        log(
            f"{head}  {name:<8s}  {_fmt(m['recall'], '6.4f')}  {_fmt(m['precision'], '9.4f')}"
            f"  {_fmt(m['rms_error_px'], '6.3f')}  {_fmt(m['dose_error'], '+8.4f')}"
            f"  {_fmt(m['dose_error_electrons'], '+11.4f')}"
            f"  {m['time_per_frame_s'] * 1e3:12.3f}"
        )


def _log_data_only(rows: list[dict[str, Any]], log) -> None:
    log(
        "\n3x3 without a dark series: pattern  dose e/px/frame  dark recall"
        "  | data-only: recall  precision  d-recall | first 8: recall  precision  d-recall"
        " | first 16: recall  precision  d-recall"
    )
    for r in rows:
        log(
            f"{r['pattern']:>34s}  {r['dose_e_per_px_frame']:>15g}  {r['recall']:11.4f}"
            f"  |            {r['data_only_recall']:6.4f}  {r['data_only_precision']:9.4f}"
            f"  {r['data_only_recall_minus_dark']:+8.4f}"
            f" |          {r['first8_recall']:6.4f}  {r['first8_precision']:9.4f}"
            f"  {r['first8_recall_minus_dark']:+8.4f}"
            f" |           {r['first16_recall']:6.4f}  {r['first16_precision']:9.4f}"
            f"  {r['first16_recall_minus_dark']:+8.4f}"
        )


def _doses(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        msg = f"doses must be numbers separated by commas: {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not out or any(not 0 < d < 1 for d in out):
        raise argparse.ArgumentTypeError(f"each dose must be in (0, 1) e/px/frame: {text!r}")
    return out


def _patterns(text: str) -> tuple[str, ...]:
    out = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in out if p not in PATTERNS]
    if not out or bad:
        msg = f"patterns must be some of {', '.join(PATTERNS)}, comma-separated: {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return out


def _params(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in (p for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            msg = f"emulator parameters must be name=value pairs: {part!r}"
            raise argparse.ArgumentTypeError(msg)
        try:
            out[key.strip()] = float(value)
        except ValueError:
            out[key.strip()] = value.strip()  # a name, e.g. deposit=gamma
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=parse_shape, default=(256, 384), help="HxW (256x384)")
    p.add_argument("--doses", type=_doses, default=list(DOSES), help="e/px/frame, comma-separated")
    p.add_argument(
        "--patterns",
        type=_patterns,
        default=("uniform", "disk"),
        help="illumination patterns, comma-separated (uniform,disk)",
    )
    p.add_argument("--frames", type=int, default=16, help="least frames per dose (16)")
    p.add_argument(
        "--electrons", type=int, default=15000, help="electrons each dose should expect (15000)"
    )
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument(
        "--emulator",
        type=_params,
        default={},
        help="emulator parameters, e.g. read_noise_adu=2,gain_sigma=0.1 (a sweep point)",
    )
    p.add_argument(
        "--method",
        default=",".join(NEW_METHODS),
        help=f"streamstore.count's method= of the new counters, comma separated "
        f"({','.join(NEW_METHODS)})",
    )
    p.add_argument("--threads", type=int, default=1, help="threads of streamstore.count (1)")
    p.add_argument(
        "--gain-reference",
        type=int,
        default=0,
        metavar="N",
        help=f"calibrate with the gain N flat frames at {FLAT_DOSE:g} e/px/frame measure (0: none)",
    )
    p.add_argument("--no-stempy", action="store_true", help="skip stempy's rule")
    p.add_argument(
        "--no-data-only", action="store_true", help="skip the data-only calibration columns"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    record.add_options(p)
    args = p.parse_args(argv)
    if args.frames < 1:
        p.error("--frames must be >= 1")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    log = (lambda *a, **k: None) if args.json else print
    res = run(
        args.shape,
        args.doses,
        args.frames,
        args.seed,
        max(0, args.electrons),
        log=log,
        emulator=args.emulator,
        patterns=args.patterns,
        method=args.method,
        stempy=not args.no_stempy,
        data_only=not args.no_data_only,
        threads=args.threads,
        gain_reference=max(0, args.gain_reference),
    )
    record.save("accuracy", res, args)
    if args.json:
        print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
