"""Crowded electrons: the fit counter's events fitted together, clouds added from the residual.

    python -m benchmarks.joint_study                        # default physics, 0.05 e/px/frame
    python -m benchmarks.joint_study --dose 0.01 --frames 8
    python -m benchmarks.joint_study --emulator psf_sigma_px=0.8 --frames 2   # a sweep point
    python -m benchmarks.joint_study --drop 20 --add-charge 0.6               # the rule's knobs
    python -m benchmarks.joint_study --mix psf_sigma_px=0.8   # half the electrons wider
    python -m benchmarks.joint_study --pattern disk --dose 0.01 --frames 8   # a bright disk

A study for the next counting rule, not a measurement of the product. The fit
counter (``method="fit"``) fits each event's 5 x 5 window on its own, beside
its neighbours' clouds, and splits it where two clouds fit better than one. At
0.05 e/px/frame most electrons have another within 2 px; what it loses there is
crowding: a third electron beside a pair, a neighbour's cloud taken as a second
electron, a pair 1-1.5 px apart among others. Crowded-field photometry (the
DAOPHOT / ALLSTAR way) fits every source of a group together and looks for
the sources left in the residual. This study asks what that gives here:

1. Seeded emulator frames (the same seeds as ``benchmarks.accuracy``), a
   50-frame dark series, one electron's charge measured on the frames (as the
   counter measures it), and the fit counter's events (sub-pixel) and
   the cloud width it measured.
2. Every event becomes a cloud ``(a, y, x, width)`` (a pixel-integrated
   Gaussian; ``a`` starts as the 3 x 3 charge, the width as the series') in one
   model of the frame. Each cloud's width is free, held near the series' by a
   prior of ``--width-spread`` px (as the fit counter's event width: electrons
   spread differently, and a wide one fitted at the series' width looks like two).
3. *Refit*, ``--sweeps`` times over the events in order: the clouds within
   ``--reach`` px of an event are fitted together (Levenberg-Marquardt, scipy)
   on the union of their 5 x 5 windows, the model of every other cloud held;
   weights 1 / (noise^2 + (0.06 x charge)^2), as the fit counter's; masked
   pixels and the surroundings of X-ray hits (the counter's X-ray radius) are
   left out, as the counter leaves them.
4. *Add*, then *split*, up to ``--rounds`` times. Add: every local maximum of
   the residual's 3 x 3 sum above ``--add-charge`` electrons, brightest first,
   is tried as a new cloud at that pixel's centre fitted with the clouds within
   reach. Split: every cloud of more than 1.3 electrons, or wider than the
   series' by two spreads (a wide cloud can take in two electrons and leave no
   residual), is tried as two clouds of the series' width, 0.6 px either side
   along each axis, beside the clouds within reach. Either stays where the
   chi-square of that region falls by more than ``--drop``, every cloud of the
   group keeps more than ``--least-charge`` electrons, none moved more than
   1.5 px and no two lie within 0.75 px.
5. Clouds of ``--least-charge`` electrons or less with another cloud within
   reach go (a neighbour took their charge); the clouds' centres are the
   events (on the frame's edge where fitted just beyond it). Both sets are
   matched to the truth within 1 px (as ``score_batch``): recall, precision,
   RMS position error.

Physics the emulator lacks: ``--mix`` renders half the electrons with other
parameters (a second, noiseless emulator added to the first one's frames):
electrons of two widths, say, where the fit assumes one.

Slow (scipy, about 3.3 fits an event): about a minute a 256 x 384 frame at
0.05 and 13 s at 0.01 on this 2-core host, two runs at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import numpy as np
from scipy.ndimage import maximum_filter, uniform_filter
from scipy.optimize import least_squares
from scipy.special import ndtr

from benchmarks import record
from benchmarks.accuracy import DOSES, XRAY_THRESHOLD, _params
from streamstore import Calibration
from streamstore.camera.emulator import PATTERNS, CameraEmulator
from streamstore.counting import Counter
from streamstore.counting.accuracy import match_positions
from streamstore.counting.resolve import (
    ResolveParams,
    quadrant_noise_factor,
    resolve_maps,
    single_electron,
)
from streamstore.shapes import parse_shape

_RAD = 3  # a cloud is drawn into the 7 x 7 pixels around its own
_SQRT_2PI = math.sqrt(2.0 * math.pi)
#: Weight of each pixel's charge in its variance, as the fit counter's ``fit_model_error``.
MODEL_ERROR = 0.06
#: A cloud may move at most this far (pixels, each axis) in one refit.
MAX_STEP = 1.5
#: Two clouds closer than this (pixels) are one electron.
MERGE_PX = 0.75
#: Clouds of more electrons than this are tried as two.
SPLIT_CHARGE = 1.3
#: The second emulator of ``--mix`` renders electrons only: the first one's sensor has the rest.
_QUIET = {"dark_mean_adu": 0.0, "dark_sigma_adu": 0.0, "read_noise_adu": 0.0,
          "row_noise_adu": 0.0, "hot_pixel_fraction": 0.0, "xray_rate_per_frame": 0.0}  # fmt: skip


def model_at(
    clouds: np.ndarray, rows: np.ndarray, cols: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The charge clouds ``(k, 4)`` of ``(a, y, x, width)`` put in pixels ``(rows,
    cols)`` (their top-left corners), and its derivatives ``(n, 4k)`` by each
    parameter."""
    a, y, x, s = clouds[:, 0], clouds[:, 1], clouds[:, 2], clouds[:, 3]
    uy0 = (rows[:, None] - y[None]) / s[None]
    ux0 = (cols[:, None] - x[None]) / s[None]
    uy1, ux1 = uy0 + 1.0 / s[None], ux0 + 1.0 / s[None]
    sy, sx = ndtr(uy1) - ndtr(uy0), ndtr(ux1) - ndtr(ux0)

    def pdf(u: np.ndarray) -> np.ndarray:
        return np.exp(-0.5 * u * u) / _SQRT_2PI

    py0, py1, px0, px1 = pdf(uy0), pdf(uy1), pdf(ux0), pdf(ux1)
    dy, dx = -(py1 - py0) / s[None], -(px1 - px0) / s[None]
    wy, wx = -(py1 * uy1 - py0 * uy0) / s[None], -(px1 * ux1 - px0 * ux0) / s[None]
    jac = np.empty((rows.size, 4 * len(clouds)))
    jac[:, 0::4] = sy * sx
    jac[:, 1::4] = a[None] * dy * sx
    jac[:, 2::4] = a[None] * sy * dx
    jac[:, 3::4] = a[None] * (wy * sx + sy * wx)
    return (a[None] * sy * sx).sum(1), jac


def draw(model: np.ndarray, cloud: np.ndarray, sign: float = 1.0) -> None:
    """Add (``sign`` 1) or take away (-1) one cloud ``(a, y, x, width)`` from a frame's model."""
    h, w = model.shape
    a, y, x, s = cloud
    r0, c0 = math.floor(y), math.floor(x)
    rows = np.arange(max(r0 - _RAD, 0), min(r0 + _RAD + 1, h))
    cols = np.arange(max(c0 - _RAD, 0), min(c0 + _RAD + 1, w))
    if rows.size and cols.size:
        sy = ndtr((rows + 1.0 - y) / s) - ndtr((rows - y) / s)
        sx = ndtr((cols + 1.0 - x) / s) - ndtr((cols - x) / s)
        model[np.ix_(rows, cols)] += sign * a * np.outer(sy, sx)


def region(clouds: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The pixels of the clouds' 5 x 5 windows (their union, in the frame)."""
    h, w = shape
    keys = set()
    for y, x in clouds[:, 1:3]:
        r0, c0 = math.floor(y), math.floor(x)
        for r in range(max(r0 - 2, 0), min(r0 + 3, h)):
            keys.update(r * w + c for c in range(max(c0 - 2, 0), min(c0 + 3, w)))
    return np.divmod(np.fromiter(sorted(keys), np.int64, len(keys)), w)


class JointFit:
    """One frame's clouds, fitted together where they crowd (module docstring).

    ``spread``: how far (pixels, one sigma) a cloud's width may stray from the
    series' ``width`` (a prior, as the fit counter's ``WIDTH_SPREAD``); 0 holds
    every cloud at the series' width."""

    def __init__(self, signal: np.ndarray, iv: np.ndarray, width: float, e_unit: float,
                 reach: float, drop: float, least: float, add: float,
                 spread: float = 0.1) -> None:  # fmt: skip
        self.signal, self.iv, self.width, self.e_unit = signal, iv, width, e_unit
        self.reach, self.drop, self.least, self.add_charge = reach, drop, least, add
        self.spread = spread
        self.model = np.zeros(signal.shape)
        self.clouds = np.zeros((0, 4))
        self.added = 0

    def start(self, places: np.ndarray) -> None:
        """Clouds at the events' places, of their 3 x 3 charge (a third of an electron
        at least) and the series' width."""
        box = uniform_filter(self.signal, 3, mode="constant") * 9.0
        r, c = np.floor(places).astype(np.int64).T
        a = np.maximum(box[r, c], 0.3 * self.e_unit)
        self.clouds = np.column_stack([a, places, np.full(len(a), self.width)]).astype(np.float64)
        for cl in self.clouds:
            draw(self.model, cl)

    def _near(self, y: float, x: float) -> np.ndarray:
        d2 = (self.clouds[:, 1] - y) ** 2 + (self.clouds[:, 2] - x) ** 2
        return np.flatnonzero(d2 < self.reach**2)

    def _fit(self, group: np.ndarray, held: np.ndarray, pix: tuple[np.ndarray, np.ndarray]):
        """Fit ``group`` (clouds, (k, 4)) on pixels ``pix``, the model less ``held``
        (clouds already drawn) beneath it; returns the fitted clouds and their
        chi-square (with the widths' prior)."""
        rows, cols = pix
        under = self.model[rows, cols]
        if len(held):
            under = under - model_at(held, rows, cols)[0]
        data = self.signal[rows, cols] - under
        wt = np.sqrt(self.iv[rows, cols])
        if len(group) == 0:
            return group, float(np.sum((data * wt) ** 2))
        k = len(group)
        free = 4 if self.spread > 0 else 3  # the width last
        cols_free = np.concatenate([np.arange(free) + 4 * i for i in range(k)])

        def clouds_of(p: np.ndarray) -> np.ndarray:
            cl = group.copy()
            cl[:, :free] = p.reshape(k, free)
            return cl

        def resid(p: np.ndarray) -> np.ndarray:
            cl = clouds_of(p)
            r = (model_at(cl, rows, cols)[0] - data) * wt
            if free == 4:
                r = np.concatenate([r, (cl[:, 3] - self.width) / self.spread])
            return r

        def jac(p: np.ndarray) -> np.ndarray:
            j = model_at(clouds_of(p), rows, cols)[1][:, cols_free] * wt[:, None]
            if free == 4:
                prior = np.zeros((k, 4 * k))
                prior[np.arange(k), 4 * np.arange(k) + 3] = 1.0 / self.spread
                j = np.vstack([j, prior])
            return j

        p0 = group[:, :free].reshape(-1)
        if rows.size <= p0.size:
            return group, float(np.sum(resid(p0) ** 2))
        res = least_squares(resid, p0, jac=jac, method="lm", max_nfev=50, xtol=1e-6, ftol=1e-6)
        cl = clouds_of(res.x)
        if not np.all((cl[:, 3] > 0.1) & (cl[:, 3] < 2.5)):
            return group, math.inf  # a width beyond any electron's: no fit
        return cl, float(2.0 * res.cost)

    def _replace(self, old: np.ndarray, new: np.ndarray) -> None:
        for cl in self.clouds[old]:
            draw(self.model, cl, -1.0)
        for cl in new:
            draw(self.model, cl)
        self.clouds = np.vstack([np.delete(self.clouds, old, 0), new])

    def refit(self, sweeps: int) -> None:
        """Each cloud with those within reach, fitted together, ``sweeps`` times over."""
        for _ in range(sweeps):
            for i in range(len(self.clouds)):
                g = self._near(*self.clouds[i, 1:3])
                old = self.clouds[g]
                new, chi = self._fit(old, old, region(old, self.signal.shape))
                moved = np.abs(new[:, 1:3] - old[:, 1:3])
                if math.isfinite(chi) and np.all(np.isfinite(new)) and np.all(moved < MAX_STEP):
                    for cl in old:
                        draw(self.model, cl, -1.0)
                    for cl in new:
                        draw(self.model, cl)
                    self.clouds[g] = new

    def add(self) -> int:
        """Clouds where the residual holds an electron (rule 4); how many stayed."""
        e, least, low = self.e_unit, self.least, self.add_charge * self.e_unit
        box = uniform_filter(self.signal - self.model, 3, mode="constant") * 9.0
        peak = (box == maximum_filter(box, 3)) & (box > low) & (self.iv > 0)
        cand = np.argwhere(peak)
        cand = cand[np.argsort(-box[peak], kind="stable")]
        added = 0
        for r, c in cand:
            if box[r, c] <= low:
                continue  # a cloud added nearby took this charge
            new = np.array([[box[r, c], r + 0.5, c + 0.5, self.width]])
            g = self._near(r + 0.5, c + 0.5)
            old = self.clouds[g]
            both = np.vstack([old, new])
            pix = region(both, self.signal.shape)
            _, chi0 = self._fit(old, old, pix)
            fitted, chi1 = self._fit(both, old, pix)
            moved = np.abs(fitted[:, 1:3] - both[:, 1:3])
            ok = (
                chi0 - chi1 > self.drop
                and bool(np.all(np.isfinite(fitted)))
                and bool(np.all(fitted[:, 0] > least * e))
                and bool(np.all(moved < MAX_STEP))
            )
            if ok and len(fitted) > 1:
                d2 = ((fitted[:, None, 1:3] - fitted[None, :, 1:3]) ** 2).sum(-1)
                ok = d2[np.triu_indices(len(fitted), 1)].min() > MERGE_PX**2
            if ok:
                self._replace(g, fitted)
                added += 1
                box = uniform_filter(self.signal - self.model, 3, mode="constant") * 9.0
        self.added += added
        return added

    def split(self) -> int:
        """Clouds of more than ``SPLIT_CHARGE`` electrons, or wider than the series'
        by two spreads, tried as two of the series' width (a wide cloud can take
        in two electrons, leaving no residual to add one at); how many split."""
        e, least = self.e_unit, self.least
        wide = self.width + 2.0 * self.spread
        heavy = (self.clouds[:, 0] > SPLIT_CHARGE * e) | (self.clouds[:, 3] > wide)
        order = np.flatnonzero(heavy)
        order = order[np.argsort(-self.clouds[order, 0], kind="stable")]
        keys = [tuple(self.clouds[i, :3]) for i in order]  # clouds move as others split
        split = 0
        for key in keys:
            at = np.flatnonzero((self.clouds[:, :3] == key).all(1))
            if at.size != 1:
                continue
            i = int(at[0])
            a, y, x, _ = self.clouds[i]
            g = self._near(y, x)
            old = self.clouds[g]
            rest = old[g != i]
            pix = region(old, self.signal.shape)
            _, chi0 = self._fit(old, old, pix)
            best, best_chi = None, math.inf
            for oy, ox in ((0.0, 0.6), (0.6, 0.0)):
                two = np.array([[a / 2, y + oy, x + ox, self.width],
                                [a / 2, y - oy, x - ox, self.width]])  # fmt: skip
                fitted, chi1 = self._fit(np.vstack([rest, two]), old, pix)
                if chi1 < best_chi:
                    best, best_chi = fitted, chi1
            if best is None or not chi0 - best_chi > self.drop:
                continue
            start = np.vstack([rest, old[g == i], old[g == i]])
            ok = (
                bool(np.all(np.isfinite(best)))
                and bool(np.all(best[:, 0] > least * e))
                and bool(np.all(np.abs(best[:, 1:3] - start[:, 1:3]) < MAX_STEP))
            )
            if ok:
                d2 = ((best[:, None, 1:3] - best[None, :, 1:3]) ** 2).sum(-1)
                ok = d2[np.triu_indices(len(best), 1)].min() > MERGE_PX**2
            if ok:
                self._replace(g, best)
                split += 1
        self.added += split
        return split

    def events(self) -> tuple[np.ndarray, int]:
        """The clouds' centres, less those of too little charge beside another
        cloud (a neighbour took their charge: one electron found twice; a lone
        faint one is an electron that left little charge); and how many went. A
        centre fitted just off the frame is put on its edge (the charge is on the
        sensor)."""
        h, w = self.signal.shape
        a, y, x = self.clouds[:, :3].T
        crowded = np.array([self._near(yy, xx).size > 1 for yy, xx in zip(y, x, strict=True)])
        keep = ~(crowded & (a <= self.least * self.e_unit))
        places = np.column_stack([np.clip(y, 0.0, h - 1e-6), np.clip(x, 0.0, w - 1e-6)])
        return places[keep], int((~keep).sum())


def _score(truth: list[np.ndarray], found: list[np.ndarray]) -> dict[str, float]:
    n_true = n_found = n_matched = 0
    sq = 0.0
    for tp, fp in zip(truth, found, strict=True):
        tp = np.asarray(tp, np.float64).reshape(-1, 2)
        ti, fi = match_positions(tp, fp, 1.0)
        n_true, n_found, n_matched = n_true + len(tp), n_found + len(fp), n_matched + ti.size
        sq += float(np.sum((tp[ti] - fp[fi]) ** 2))
    return {
        "recall": round(n_matched / n_true, 5),
        "precision": round(n_matched / n_found, 5),
        "rms_error_px": round(math.sqrt(sq / n_matched), 4) if n_matched else None,
        "events": n_found,
    }


def run(
    shape: tuple[int, int],
    dose: float,
    n_frames: int,
    params: dict[str, Any],
    seed: int,
    *,
    sweeps: int = 2,
    rounds: int = 2,
    reach: float = 2.5,
    drop: float = 30.0,
    least: float = 0.35,
    add: float = 0.5,
    mix: dict[str, Any] | None = None,
    spread: float = 0.1,
    pattern: str = "uniform",
    log=print,
) -> dict[str, Any]:
    """Emulate, count with the fit counter, refit jointly; the study's figures."""
    t0 = time.perf_counter()
    part = dose / 2 if mix else dose
    emu = CameraEmulator(shape, dose_rate_e_per_px_s=part * 1500, frame_time_s=1 / 1500,
                         seed=seed, pattern=pattern, **params)  # fmt: skip
    dark, _ = emu.dark_frames(50)
    frames, made = emu.generate(n_frames)
    truth = [np.asarray(t, np.float64).reshape(-1, 2) for t in made.positions]
    if mix:  # the other half of the electrons, of other physics, on the same sensor
        other = CameraEmulator(shape, dose_rate_e_per_px_s=part * 1500, frame_time_s=1 / 1500,
                               seed=seed + 1000, pattern=pattern,
                               **{**params, **_QUIET, **mix})  # fmt: skip
        extra, more = other.generate(n_frames)
        top = np.iinfo(frames.dtype).max
        frames = np.minimum(frames.astype(np.int64) + extra, top).astype(frames.dtype)
        truth = [np.vstack([t, np.asarray(u, np.float64).reshape(-1, 2)])
                 for t, u in zip(truth, more.positions, strict=True)]  # fmt: skip
    cal = Calibration.from_dark_frames(dark, xray_threshold=XRAY_THRESHOLD)
    # one electron's charge measured as the counter measures it on its first frames
    maps = resolve_maps(cal, frames.dtype, ResolveParams(), quadrant_noise_factor(cal, frames))
    single = single_electron(frames, maps, cal.xray_radius)
    if single is None:
        raise SystemExit("too few lone events to measure one electron's charge")
    e_unit = float(single[0])  # signal units: ADU here (no gain map), as electron_charge takes
    counter = Counter(cal, frames.dtype, subpixel=True, threads=1, method="fit",
                      electron_charge=e_unit)  # fmt: skip
    batch = counter(frames)
    if counter.cloud_width is None:
        raise SystemExit("too few lone events to measure one electron's cloud width")
    width = float(counter.cloud_width)
    noise = cal.noise.astype(np.float64)
    bad = noise <= 0 if cal.mask is None else (noise <= 0) | cal.mask
    base, joint = [], []
    added = removed = 0
    for i in range(n_frames):
        places = batch.frame(i).positions().reshape(-1, 2)
        base.append(places)
        # masked pixels and X-ray hits (and their surroundings, as the counter leaves
        # them) hold no electron to fit or to add
        hit = frames[i].astype(np.int64) - maps[2].astype(np.int64) >= maps[5]
        off = bad | maximum_filter(hit, 2 * cal.xray_radius + 1)
        signal = np.where(off, 0.0, frames[i].astype(np.float64) - cal.dark)
        with np.errstate(divide="ignore"):
            iv = np.where(off, 0.0, 1.0 / (noise**2 + (MODEL_ERROR * np.maximum(signal, 0.0)) ** 2))
        jf = JointFit(signal, iv, width, e_unit, reach, drop, least, add, spread)
        jf.start(places)
        jf.refit(sweeps)
        for _ in range(rounds):
            if not jf.add() + jf.split():
                break
        found, gone = jf.events()
        joint.append(found)
        added, removed = added + jf.added, removed + gone
    out = {
        "dose": dose,
        "pattern": pattern,
        "emulator": params,
        "seed": seed,
        "frame_shape": list(shape),
        "frames": n_frames,
        "mix": mix or {},
        "electrons": int(sum(len(t) for t in truth)),
        "cloud_width_px": width,
        "electron_charge": e_unit,
        "options": {
            "sweeps": sweeps,
            "rounds": rounds,
            "reach_px": reach,
            "drop": drop,
            "least_charge": least,
            "add_charge": add,
            "width_spread_px": spread,
        },
        "fit_counter": _score(truth, base),
        "joint": _score(truth, joint),
        "clouds_added": added,
        "clouds_removed": removed,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    log(json.dumps(out))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=parse_shape, default=(256, 384), help="HxW (256x384)")
    p.add_argument("--dose", type=float, default=0.05, help="e/px/frame (0.05)")
    p.add_argument("--frames", type=int, default=4, help="frames (4)")
    p.add_argument("--pattern", choices=PATTERNS, default="uniform", help="illumination (uniform)")
    p.add_argument("--emulator", type=_params, default={}, help="e.g. psf_sigma_px=0.8")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="emulator seed (benchmarks.accuracy's for the pattern and dose)",
    )
    p.add_argument("--sweeps", type=int, default=2, help="refits over every cloud (2)")
    p.add_argument(
        "--rounds", type=int, default=2, help="rounds of added and split clouds at most (2)"
    )
    p.add_argument("--reach", type=float, default=2.5, help="clouds fitted together, px (2.5)")
    p.add_argument(
        "--drop", type=float, default=30.0, help="chi-square an added or split cloud saves (30)"
    )
    p.add_argument(
        "--least-charge", type=float, default=0.35, help="electrons a cloud holds at least (0.35)"
    )
    p.add_argument(
        "--add-charge", type=float, default=0.5, help="electrons a residual's 3 x 3 holds (0.5)"
    )
    p.add_argument(
        "--width-spread",
        type=float,
        default=0.1,
        help="px a cloud's width strays from the series' (0.1; 0: held)",
    )
    p.add_argument(
        "--mix",
        type=_params,
        default={},
        help="half the electrons of other physics, e.g. psf_sigma_px=0.8 (none)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    record.add_options(p)
    args = p.parse_args(argv)
    seed = args.seed
    if seed is None:  # benchmarks.accuracy's seed for its row of this pattern and dose
        seed = 2026 + 100 * PATTERNS.index(args.pattern)
        seed += DOSES.index(args.dose) if args.dose in DOSES else 0
    res = run(args.shape, args.dose, args.frames, args.emulator, seed, sweeps=args.sweeps,
              rounds=args.rounds, reach=args.reach, drop=args.drop, least=args.least_charge,
              add=args.add_charge, mix=args.mix, spread=args.width_spread,
              pattern=args.pattern,
              log=(lambda *a: None) if args.json else print)  # fmt: skip
    record.save("joint_study", res, args)
    if args.json:
        print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
