"""Which events hide two electrons: the resolve rule's split against a fit of one and two clouds.

    python -m benchmarks.split_study                       # default physics, 0.01 e/px/frame
    python -m benchmarks.split_study --emulator read_noise_adu=6 --dose 0.01
    python -m benchmarks.split_study --frames 4 --max-events 300   # a quick look
    python -m benchmarks.split_study --width 0.62   # clouds of a wrong width: the model's error

A study for the next counting rule, not a measurement of the product: it asks
how many merged electrons a test that uses the whole pixel pattern of an event
would find, beside the resolve rule's test on charge and anisotropy. Seeded
emulator frames (``--shape``, ``--frames``) and a 40-frame dark series; the
resolve kernel with its splits off gives the base events (sub-pixel
positions, as the rule's own), and the study looks at the base events with no other
event within Chebyshev distance 3 (the split rule's own precondition is
alike) whose 3 x 3 charge is at least ``--min-charge`` electrons
(:func:`~streamstore.counting.resolve.single_electron` measures the charge of
one electron and its anisotropy on the same frames, as the counter does).

For each such event the dark-subtracted 5 x 5 window is fitted, by weighted
least squares (weights 1 / the calibration's noise), with one and with two
pixel-integrated Gaussian clouds (amplitude and position free, the width the
median of one-cloud fits with free width to lone events of one electron's
charge: measured from the data, not given). The statistic is the drop in
chi-square from one cloud to two (twice the cost difference; a second cloud
under a quarter of an electron counts as none). For each threshold on it,
every candidate above it is replaced by its two fitted clouds (their centres
as the events' positions) and each frame's events are matched to the truth
within 1 px, as ``score_batch`` does: recall and precision, beside those of the
base events (no splits) and of the resolve rule itself on the same frames.

Slow (five scipy fits an event, about 0.1 s): a few thousand events take minutes.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
from scipy.optimize import least_squares
from scipy.spatial import cKDTree
from scipy.special import erf

from benchmarks import record
from benchmarks.accuracy import _params
from streamstore import Calibration
from streamstore.camera.emulator import CameraEmulator
from streamstore.counting import Counter
from streamstore.counting.accuracy import match_positions, score_batch
from streamstore.counting.resolve import ResolveParams, resolve_maps, single_electron
from streamstore.shapes import parse_shape

#: Thresholds on the chi-square drop reported.
THRESHOLDS = (10, 20, 30, 50, 80)
_EDGES = np.arange(-2.0, 3.0)  # left edges of the window's pixels, from the event's


def _cloud(amp: float, y: float, x: float, sigma: float) -> np.ndarray:
    """A Gaussian cloud integrated over the 5 x 5 window's pixels."""

    def share(mu: float) -> np.ndarray:
        s = np.sqrt(2.0) * sigma
        return 0.5 * (erf((_EDGES + 1 - mu) / s) - erf((_EDGES - mu) / s))

    return amp * np.outer(share(y), share(x))


def _fit(win: np.ndarray, weight: np.ndarray, sigma: float, starts: list[list[float]]):
    """The best least-squares fit of ``len(start) // 3`` clouds over the starts."""
    best = None
    for p0 in starts:

        def resid(p):
            model = sum(_cloud(*p[k : k + 3], sigma) for k in range(0, len(p), 3))
            return ((model - win) * weight).ravel()

        r = least_squares(resid, p0, method="lm", max_nfev=200)
        if best is None or r.cost < best.cost:
            best = r
    return best


def _width(win: np.ndarray, weight: np.ndarray) -> float:
    """One cloud's width, fitted free (a lone event of one electron's charge)."""

    def resid(p):
        return ((_cloud(*p[:3], p[3]) - win) * weight).ravel()

    r = least_squares(
        resid, [win.sum(), 0.5, 0.5, 0.6], bounds=([0, -1, -1, 0.1], [np.inf, 2, 2, 2])
    )
    return float(r.x[3])


def run(
    shape: tuple[int, int],
    dose: float,
    n_frames: int,
    params: dict[str, Any],
    seed: int,
    min_charge: float,
    max_events: int,
    width_events: int = 300,
    width: float | None = None,
    log=print,
) -> dict[str, Any]:
    """Emulate, count, fit; the study's figures (see the module docstring)."""
    h, w = shape
    emu = CameraEmulator(shape, pattern="uniform", dose_rate_e_per_px_s=dose * 1500, seed=seed,
                         **params)  # fmt: skip
    dark, _ = emu.dark_frames(40)
    cal = Calibration.from_dark_frames(dark, xray_threshold=1000.0)
    frames, truth = emu.generate(n_frames)
    maps = resolve_maps(cal, frames.dtype, ResolveParams())
    single = single_electron(frames, maps, cal.xray_radius)
    if single is None:
        raise SystemExit("too few lone events to measure one electron's charge")
    e_unit, _ = single  # signal units: ADU here (no gain map), as electron_charge takes
    kw = {"method": "resolve", "dose": False, "electron_charge": e_unit, "subpixel": True}
    rule = Counter(cal, **kw)
    off = ResolveParams(pair_charge=64.0, any_charge=64.0, pair_spread=16.0)
    base = Counter(cal, resolve=off, **kw)(frames)
    split = rule(frames)
    signal = frames.astype(np.float64) - cal.dark.astype(np.float64)
    weight_map = 1.0 / cal.noise.astype(np.float64)
    cands: list[tuple[int, int, int]] = []
    widths: list[float] = []
    for i, fe in enumerate(base):
        r, c = fe.rows.astype(np.int64), fe.cols.astype(np.int64)
        if r.size == 0:
            continue
        rc = np.stack([r, c], 1)
        crowd = np.array([len(x) for x in cKDTree(rc).query_ball_point(rc, 3.5, p=np.inf)])
        for j in np.flatnonzero((crowd == 1) & (r >= 2) & (c >= 2) & (r < h - 2) & (c < w - 2)):
            win = signal[i, r[j] - 2 : r[j] + 3, c[j] - 2 : c[j] + 3]
            q = win[1:4, 1:4].sum() / e_unit
            if q >= min_charge:
                cands.append((i, int(r[j]), int(c[j])))
            elif 0.8 <= q < 1.5 and len(widths) < width_events:
                wt = weight_map[r[j] - 2 : r[j] + 3, c[j] - 2 : c[j] + 3]
                widths.append(_width(win, wt))
    measured = float(np.median(widths))
    sigma = measured if width is None else float(width)  # a wrong width: the model's error
    cands = cands[:max_events]
    stat = np.zeros(len(cands))
    clouds = np.zeros((len(cands), 2, 2))
    for k, (i, r, c) in enumerate(cands):
        win = signal[i, r - 2 : r + 3, c - 2 : c + 3]
        wt = weight_map[r - 2 : r + 3, c - 2 : c + 3]
        one = _fit(win, wt, sigma, [[win.sum(), 0.5, 0.5]])
        a, y0, x0 = one.x
        starts = [[a / 2, y0 + dy, x0 + dx, a / 2, y0 - dy, x0 - dx]
                  for dy, dx in ((0.6, 0.0), (0.0, 0.6), (0.45, 0.45), (0.45, -0.45))]  # fmt: skip
        two = _fit(win, wt, sigma, starts)
        p = two.x
        if min(p[0], p[3]) > 0.25 * e_unit:
            stat[k] = 2.0 * (one.cost - two.cost)
        clouds[k] = [[p[1] + r, p[2] + c], [p[4] + r, p[5] + c]]
    cand_at = {(i, r, c): k for k, (i, r, c) in enumerate(cands)}

    def score(threshold: float | None) -> dict[str, float]:
        """Recall and precision of the base events with the candidates above the
        threshold replaced by their two fitted clouds (None: the base events)."""
        n_true = n_found = n_matched = 0
        for i, (fe, tp) in enumerate(zip(base, truth.positions, strict=True)):
            found = list(fe.positions())
            if threshold is not None:
                for j, (r, c) in enumerate(zip(fe.rows.tolist(), fe.cols.tolist(), strict=True)):
                    k = cand_at.get((i, r, c))
                    if k is not None and stat[k] > threshold:
                        found[j] = clouds[k, 0]
                        found.append(clouds[k, 1])
            tp = np.asarray(tp, np.float64).reshape(-1, 2)
            ti, _ = match_positions(tp, np.asarray(found).reshape(-1, 2), 1.0)
            n_true += len(tp)
            n_found += len(found)
            n_matched += ti.size
        return {"recall": round(n_matched / n_true, 5), "precision": round(n_matched / n_found, 5)}

    ruled = score_batch(split, truth.positions)
    out = {
        "dose": dose,
        "emulator": params,
        "frames": n_frames,
        "electrons": int(sum(len(np.asarray(t).reshape(-1, 2)) for t in truth.positions)),
        "base_events": int(base.n_events),
        "electron_charge_adu": e_unit,
        "fitted_width_px": round(measured, 4),
        "width_used_px": round(sigma, 4),
        "candidates": len(cands),
        "no_splits": score(None),
        "resolve_rule": {"recall": round(ruled.recall, 5), "precision": round(ruled.precision, 5)},
        "fit": {str(t): score(float(t)) for t in THRESHOLDS},
    }
    log(json.dumps(out))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=parse_shape, default=(256, 384), help="HxW (256x384)")
    p.add_argument("--dose", type=float, default=0.01, help="e/px/frame (0.01)")
    p.add_argument("--frames", type=int, default=16, help="frames (16)")
    p.add_argument("--emulator", type=_params, default={}, help="e.g. read_noise_adu=6")
    p.add_argument("--seed", type=int, default=19)
    p.add_argument("--min-charge", type=float, default=1.2, help="electrons in 3 x 3 (1.2)")
    p.add_argument("--max-events", type=int, default=100_000, help="candidates fitted at most")
    p.add_argument(
        "--width-events", type=int, default=300, help="lone events whose width is fitted (300)"
    )
    p.add_argument(
        "--width", type=float, default=None, help="fit clouds of this width, not the measured one"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    record.add_options(p)
    args = p.parse_args(argv)
    res = run(args.shape, args.dose, args.frames, args.emulator, args.seed, args.min_charge,
              args.max_events, args.width_events, args.width,
              log=(lambda *a: None) if args.json else print)  # fmt: skip
    record.save("split_study", res, args)
    if args.json:
        print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
