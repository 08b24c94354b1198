"""Counting accuracy against the emulator's truth, as the dose rises.

    python -m benchmarks.accuracy                  # table: recall, precision, RMS error per dose
    python -m benchmarks.accuracy --json           # one JSON object
    python -m benchmarks.accuracy --doses 0.001,0.01 --frames 4   # a quick run
    python -m benchmarks.accuracy --emulator read_noise_adu=2,gain_sigma=0.1   # a sweep point

For each dose (electrons per pixel per frame, uniform illumination), a seeded
emulator makes ``--frames`` frames of ``--shape`` (more at low doses, so that
each dose expects at least ``--electrons`` true electrons) with default physics and 50
dark frames for the calibration; ``streamstore.count`` (sub-pixel on) is
matched one-to-one to the true electrons within 1 px. Reported per dose:
recall, precision, sub-pixel RMS position error, and the share of electrons
that have another electron within one pixel (Chebyshev distance <= 1, the 3 x 3
neighbourhood) in the same frame: two such electrons form one local maximum,
so ``1 - recall`` follows that share. It tells a microscopist which dose a
counting camera can take, where the beam is: what matters is the local dose,
not the frame mean (a bright-field disk is many times the mean; see
``docs/counting.md``).

Beside the dark-series calibration, each dose is counted with a calibration
estimated from the data frames alone (no dark series: ``Calibration.estimate``
on the first 64 frames, a per-pixel dark map, as ingest has it once refined;
and on the first 8, the provisional one ingest starts with): recall and
precision of each, and the recall difference to the dark series.

Not a speed benchmark: the figures are the same on any machine.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from typing import Any

import numpy as np

from benchmarks import record
from streamstore import Calibration, count
from streamstore.camera.emulator import CameraEmulator
from streamstore.counting.accuracy import score_batch
from streamstore.shapes import parse_shape

DOSES = (0.001, 0.003, 0.01, 0.02, 0.05, 0.1)
XRAY_THRESHOLD = 1000.0  # ADU, as in tests/counting/test_counting_accuracy.py


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


def run(
    shape: tuple[int, int],
    doses: list[float],
    n_frames: int,
    seed: int,
    electrons: int = 0,
    log=print,
    emulator: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Measure every dose; return the results as a dict."""
    res: dict[str, Any] = {
        "frame_shape": list(shape),
        "min_frames_per_dose": n_frames,
        "min_electrons_per_dose": electrons,
        "seed": seed,
        "emulator": dict(emulator or {}),
        "python": platform.python_version(),
        "doses": [],
    }
    log(
        "dose e/px/frame   electrons   recall   precision   RMS px   within 1 px of another"
        "   | data-only: recall  precision  d-recall | first 8: recall  precision"
    )
    for i, dose in enumerate(doses):
        t0 = time.perf_counter()
        emu = CameraEmulator(
            shape,
            dose_rate_e_per_px_s=dose * 1500,
            frame_time_s=1 / 1500,
            seed=seed + i,
            **(emulator or {}),
        )
        dark, _ = emu.dark_frames(50)
        frames, truth = emu.generate(
            max(n_frames, math.ceil(electrons / (dose * shape[0] * shape[1])))
        )
        cal = Calibration.from_dark_frames(dark, xray_threshold=XRAY_THRESHOLD)
        s = score_batch(count(frames, cal, subpixel=True), truth.positions)
        crowded = crowded_share(truth.positions)
        # no dark series: the data frames alone, refined (64 frames) and provisional (8)
        data_cal = Calibration.estimate(frames[:64], xray_threshold=XRAY_THRESHOLD)
        d = score_batch(count(frames, data_cal, subpixel=True), truth.positions)
        first_cal = Calibration.estimate(frames[:8], xray_threshold=XRAY_THRESHOLD)
        p8 = score_batch(count(frames, first_cal, subpixel=True), truth.positions)
        row = {
            "dose_e_per_px_frame": dose,
            "frames": truth.n_frames,
            "n_true": s.n_true,
            "n_found": s.n_found,
            "recall": s.recall,
            "precision": s.precision,
            "rms_error_px": s.rms_error_px,
            "crowded_share": crowded,
            "data_only_recall": d.recall,
            "data_only_precision": d.precision,
            "data_only_recall_minus_dark": d.recall - s.recall,
            "data_only_threshold_adu": data_cal.background_threshold,
            "dark_threshold_adu": cal.background_threshold,
            "first8_recall": p8.recall,
            "first8_precision": p8.precision,
            "seconds": time.perf_counter() - t0,
        }
        res["doses"].append(row)
        log(
            f"{dose:>15g}   {s.n_true:>9d}   {s.recall:6.4f}   {s.precision:9.4f}   "
            f"{s.rms_error_px:6.3f}   {crowded:6.3f}                 "
            f"|            {d.recall:6.4f}  {d.precision:9.4f}  {d.recall - s.recall:+8.4f} "
            f"|          {p8.recall:6.4f}  {p8.precision:9.4f}"
        )
    return res


def _doses(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        msg = f"doses must be numbers separated by commas: {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not out or any(not 0 < d < 1 for d in out):
        raise argparse.ArgumentTypeError(f"each dose must be in (0, 1) e/px/frame: {text!r}")
    return out


def _params(text: str) -> dict[str, float]:
    out = {}
    for part in (p for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            msg = f"emulator parameters must be name=number pairs: {part!r}"
            raise argparse.ArgumentTypeError(msg)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=parse_shape, default=(256, 384), help="HxW (256x384)")
    p.add_argument("--doses", type=_doses, default=list(DOSES), help="e/px/frame, comma-separated")
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
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    record.add_options(p)
    args = p.parse_args(argv)
    if args.frames < 1:
        p.error("--frames must be >= 1")
    log = (lambda *a, **k: None) if args.json else print
    res = run(
        args.shape,
        args.doses,
        args.frames,
        args.seed,
        max(0, args.electrons),
        log=log,
        emulator=args.emulator,
    )
    record.save("accuracy", res, args)
    if args.json:
        print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
