"""How much recall the emulator's physics allows at all: an oracle bound on detection.

    python -m benchmarks.detection_bound   # default physics, three doses (--json: one object)
    python -m benchmarks.detection_bound --doses 0.001 --emulator psf_sigma_px=0.8 \\
        --emulator deposit=gamma,read_noise_adu=6   # two parameter points

For each emulator parameter point (``--emulator key=value,...``, repeatable,
the names of :class:`streamstore.camera.emulator.CameraEmulator`) and dose, a
seeded emulator makes frames of ``--shape`` with truth (enough for
``--electrons`` electrons), 50 dark frames for the calibration
(``Calibration.from_dark_frames``, as the counters have it: no gain map) and
further dark frames (``--null-frames``, or as many as the dose's false-alarm
level needs) that hold no electron. It measures:

Isolated-electron detectability
    For every electron with no other electron within 3 px, no X-ray hit within
    4 px, its 5 x 5 window inside the frame and unmasked: a statistic of the
    dark-subtracted charge around its true position, divided by its noise
    (the calibration's per-pixel noise, pixels taken as independent).
    ``matched``: the point spread's pixel-integrated weights at the electron's
    true sub-pixel position over 5 x 5 (weights p / noise**2: the best linear
    statistic for a known position under independent Gaussian noise);
    ``box3``: the 3 x 3 sum around the hit pixel; ``quad2``: the 2 x 2 sum of
    the quadrant the true position points to. The same statistic, with a fixed
    template (a random sub-pixel offset per frame), is computed at every
    electron-free position (no electron within 4 px, no X-ray within 4 px) of
    the beam frames and at every position of the extra dark frames: the null.
    A detector that searches the frame has a trial at each pixel; the false
    events precision 0.999 allows are ``0.001 / 0.999 x`` the true dose per
    pixel, so the threshold is the level the null's local maxima (3 x 3)
    exceed at that rate per trial (every trial counted: ``*_every_trial``,
    a little higher). The share of isolated electrons above it bounds the
    recall of any detector whose decision is a threshold on a linear
    statistic, for lone electrons: it knows the position, which no detector
    does, and counts a noise cluster once. ``matched_noise_free`` is the share
    whose noise-free statistic (deposit x gain x weights) is above the
    threshold: ``1 -`` it is lost to faint deposits alone, the rest to noise.
Coincidence
    Per distance d in 1, 1.5, 2 px: the share of electrons with another within
    d (same frame) and ``groups / electrons`` with groups the clusters of
    electrons linked at < d: the recall of a detector that finds every group
    once and cannot separate closer electrons.
Combined bound
    Per d: ``(singles x matched bound + multi-electron groups) / electrons``,
    singles the electrons with no other within d: every group found, every
    lone electron found as often as the oracle finds isolated ones.
    ``matched`` alone is the bound with perfect separation.
Measured
    ``streamstore.count(frames, cal, method=...)`` for "peak" (the default
    rule) and those ``--methods`` names ("resolve" unless told), sub-pixel on,
    one thread, scored against the truth
    (:func:`streamstore.counting.accuracy.score_batch`, events matched within
    1 px): recall, precision, and recall on the isolated electrons above.

``--row-correct``: the oracle's frames less each row's mean over the pixels
the truth says hold no charge, and its noise map less the row offset's share
measured on the dark series. Not a speed benchmark.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from scipy.special import ndtr

from benchmarks import record
from benchmarks.accuracy import _doses, _params
from streamstore import Calibration, count
from streamstore.camera.emulator import CameraEmulator
from streamstore.counting.accuracy import matched_electrons, score_batch
from streamstore.shapes import parse_shape

DOSES = (0.001, 0.01, 0.05)
#: The counting issue's recall targets per dose (e/px/frame), at precision >= PRECISION.
TARGETS = {0.001: 0.99, 0.01: 0.95, 0.05: 0.85}
PRECISION = 0.999
XRAY_THRESHOLD = 1000.0  # ADU, as benchmarks/accuracy.py
STATS = ("matched", "box3", "quad2")
METHODS = ("peak", "resolve")
HALF = 2  # the matched window is (2 HALF + 1) squared
ISOLATION_PX = 3.0  # no other electron within this of an isolated one
NULL_PX = 4.0  # no electron nor X-ray within this of a null position
SEPARATIONS = (1.0, 1.5, 2.0)
NULL_FLOOR = 1.5  # null values kept for the tail (the thresholds lie far above)
NULL_EXCEEDANCES = 50  # null local maxima above the threshold the extra dark frames aim at
CHUNK = 32  # frames per block of work (memory)


def psf_weights(frac: np.ndarray, sigma: float, half: int = HALF) -> np.ndarray:
    """The point spread integrated over each pixel of a window around the hit pixel.

    Parameters
    ----------
    frac : ndarray, shape (n, 2)
        Sub-pixel position ``(y, x)`` in ``[0, 1)`` within the hit pixel.
    sigma : float
        Gaussian sigma of the charge cloud, pixels (0: all in the hit pixel).
    half : int, default 2
        The window is ``(2 half + 1)`` pixels square, the hit pixel at its centre.

    Returns
    -------
    ndarray, shape (n, 2 half + 1, 2 half + 1)
        Share of the charge in each pixel, as the emulator spreads it.
    """
    frac = np.asarray(frac, np.float64).reshape(-1, 2)
    size = 2 * half + 1
    if sigma == 0:
        out = np.zeros((len(frac), size, size))
        out[:, half, half] = 1.0
        return out
    edges = np.arange(-half, half + 2, dtype=np.float64)
    fy = np.diff(ndtr((edges[None, :] - frac[:, :1]) / sigma), axis=1)
    fx = np.diff(ndtr((edges[None, :] - frac[:, 1:]) / sigma), axis=1)
    return fy[:, :, None] * fx[:, None, :]


def _patches(img: np.ndarray, f: np.ndarray, r: np.ndarray, c: np.ndarray, half: int):
    """``img[f, r-half : r+half+1, c-half : c+half+1]`` for each (f, r, c): (n, s, s)."""
    d = np.arange(-half, half + 1)
    if img.ndim == 2:
        return img[(r[:, None] + d)[:, :, None], (c[:, None] + d)[:, None, :]]
    return img[f[:, None, None], (r[:, None] + d)[:, :, None], (c[:, None] + d)[:, None, :]]


def electron_stats(
    sig: np.ndarray,
    var: np.ndarray,
    f: np.ndarray,
    pos: np.ndarray,
    sigma: float,
) -> dict[str, np.ndarray]:
    """Each statistic of :data:`STATS` at the electrons' true positions.

    Parameters
    ----------
    sig : ndarray, shape (n, H, W)
        Dark-subtracted frames (gain 1, as the dark-series calibration has it).
    var : ndarray, shape (H, W)
        Per-pixel noise variance; ``inf`` on masked pixels (weight 0).
    f, pos : ndarray
        Frame index (k,) and true position ``(y, x)`` (k, 2) of each electron;
        its 5 x 5 window must lie inside the frame.
    sigma : float
        The point spread's sigma (pixels).

    Returns
    -------
    dict
        Statistic name -> (k,) values, each in units of its noise.
    """
    pix = np.floor(pos).astype(np.int64)
    r, c = pix[:, 0], pix[:, 1]
    frac = pos - pix
    x = _patches(sig, f, r, c, HALF)
    v = _patches(var, f, r, c, HALF)
    p = psf_weights(frac, sigma)
    w = p / v
    out = {"matched": (w * x).sum((1, 2)) / np.sqrt((w * p).sum((1, 2)))}
    box = np.s_[:, HALF - 1 : HALF + 2, HALF - 1 : HALF + 2]
    out["box3"] = _ratio(x[box].sum((1, 2)), v[box].sum((1, 2)))
    # the quadrant the true position points to: up / left of the hit pixel when below 0.5
    qy = HALF - (frac[:, 0] < 0.5)
    qx = HALF - (frac[:, 1] < 0.5)
    k = np.arange(len(f))
    qx_sum = sum(x[k, qy + a, qx + b] for a in (0, 1) for b in (0, 1))
    qv_sum = sum(v[k, qy + a, qx + b] for a in (0, 1) for b in (0, 1))
    out["quad2"] = _ratio(qx_sum, qv_sum)
    return out


def _ratio(total: np.ndarray, var: np.ndarray) -> np.ndarray:
    # a masked pixel (variance inf) leaves the sum meaningless: -inf, never above a threshold
    with np.errstate(invalid="ignore"):
        out = total / np.sqrt(var)
    return np.where(np.isfinite(var), out, -np.inf)


def null_maps(sig: np.ndarray, var: np.ndarray, frac: np.ndarray, sigma: float):
    """Each statistic of :data:`STATS` with a fixed template at every position of a frame.

    Parameters
    ----------
    sig : ndarray, shape (H, W)
        One dark-subtracted frame.
    var : ndarray, shape (H, W)
        Per-pixel noise variance, ``inf`` where masked.
    frac : ndarray, shape (2,)
        The template's sub-pixel position.
    sigma : float
        The point spread's sigma.

    Returns
    -------
    dict
        Name -> (H, W) map; ``quad2`` at ``(r, c)`` is the 2 x 2 sum with top
        left ``(r, c)`` (last row and column -inf). Positions whose window
        leaves the frame or holds a masked pixel are -inf.
    """
    inv = np.where(np.isfinite(var), 1.0 / var, 0.0)
    # the point spread's pixel weights are a product of a row and a column profile
    p = psf_weights(frac[None, :], sigma)[0]
    py, px = p[:, HALF] / p[HALF, HALF], p[HALF]
    out = {}
    num = _separable(sig * inv, py, px)
    den = _separable(inv, py * py, px * px)
    out["matched"] = num / np.sqrt(np.maximum(den, 1e-30))
    ones = np.ones(3)
    out["box3"] = _ratio(_separable(sig, ones, ones), _separable(var, ones, ones))
    q = np.full(sig.shape, -np.inf)
    qs = sig[:-1, :-1] + sig[1:, :-1] + sig[:-1, 1:] + sig[1:, 1:]
    qv = var[:-1, :-1] + var[1:, :-1] + var[:-1, 1:] + var[1:, 1:]
    q[:-1, :-1] = _ratio(qs, qv)
    out["quad2"] = q
    bad = ndimage.binary_dilation(~np.isfinite(var), np.ones((2 * HALF + 1,) * 2))
    bad[:HALF] = bad[-HALF:] = True
    bad[:, :HALF] = bad[:, -HALF:] = True
    for m in out.values():
        m[bad] = -np.inf
    return out


def _separable(img: np.ndarray, wy: np.ndarray, wx: np.ndarray) -> np.ndarray:
    """``img`` correlated with the outer product of ``wy`` and ``wx`` (zero outside)."""
    tmp = ndimage.correlate1d(img, wy, axis=0, mode="constant")
    return ndimage.correlate1d(tmp, wx, axis=1, mode="constant")


def _signal(frame: np.ndarray, cal: Calibration, free: np.ndarray | None) -> np.ndarray:
    """One dark-subtracted frame; with ``free`` (bool (H, W): pixels without charge)
    also less each row's mean over its free pixels: the row's common-mode offset,
    as an oracle that knows where no charge fell estimates it."""
    sig = frame.astype(np.float64) - cal.dark
    if free is not None:
        n = free.sum(1)
        sig -= (np.where(free, sig, 0.0).sum(1) / np.maximum(n, 1))[:, None]
    return sig


def _near(shape: tuple[int, int], rc: np.ndarray, disc: np.ndarray) -> np.ndarray:
    """The pixels ``disc`` (a footprint) reaches from the pixels ``rc`` (k, 2)."""
    out = np.zeros(shape, bool)
    out[rc[:, 0], rc[:, 1]] = True
    return ndimage.binary_dilation(out, disc)


def _disc(radius: float) -> np.ndarray:
    n = int(math.ceil(radius))
    y, x = np.mgrid[-n : n + 1, -n : n + 1]
    return y * y + x * x <= radius * radius


class NullTail:
    """The null's trials and its values above :data:`NULL_FLOOR`, per statistic:
    every trial, and the local maxima (a noise cluster found once)."""

    def __init__(self) -> None:
        self.trials = 0
        self.moments = {s: np.zeros(2) for s in STATS}  # sum, sum of squares
        self.every: dict[str, list[np.ndarray]] = {s: [] for s in STATS}
        self.peaks: dict[str, list[np.ndarray]] = {s: [] for s in STATS}

    def add(self, maps: dict[str, np.ndarray], allowed: np.ndarray) -> None:
        """Add one frame's maps at its ``allowed`` positions (bool (H, W))."""
        allowed = allowed & np.isfinite(maps["matched"])
        self.trials += int(allowed.sum())
        for s in STATS:
            m = maps[s]
            a = m[allowed]
            self.moments[s] += (a.sum(), (a * a).sum())
            top = allowed & (m > NULL_FLOOR)
            self.every[s].append(m[top].astype(np.float32))
            peak = ndimage.maximum_filter(m, size=3, mode="constant", cval=-np.inf) == m
            self.peaks[s].append(m[top & peak].astype(np.float32))

    def std(self, stat: str) -> float:
        """The statistic's standard deviation over the trials (1 for independent noise)."""
        s, ss = self.moments[stat]
        return float(math.sqrt(max(ss / self.trials - (s / self.trials) ** 2, 0.0)))

    def threshold(self, stat: str, rate: float, *, every: bool = False) -> tuple[float, int]:
        """The level exceeded at ``rate`` per trial (the ``k + 1``-th largest value,
        ``k = floor(rate x trials)``), and ``k``: with ``k`` small it is uncertain."""
        vals = np.concatenate((self.every if every else self.peaks)[stat])
        k = int(math.floor(rate * self.trials))
        if k >= len(vals):  # the level lies below the floor: never at this module's rates
            return NULL_FLOOR, len(vals)
        return float(-np.partition(-vals, k)[k]), k


def coincidence(positions: list[np.ndarray], distances=SEPARATIONS) -> dict[str, Any]:
    """Per distance d: the share of electrons with another within d, the groups
    (electrons linked at < d) per electron, and which electrons have none.

    Returns ``"d=1"`` etc. -> ``{"share_with_neighbour", "groups_per_electron",
    "multi_groups"`` (groups of two or more) ``, "single"`` (bool per electron)``}``.
    """
    out: dict[str, Any] = {}
    n = sum(len(p) for p in positions)
    for d in distances:
        single, groups, multi = [], 0, 0
        for p in positions:
            if (k := len(p)) == 0:
                continue
            pairs = cKDTree(p).query_pairs(d, output_type="ndarray")
            s = np.ones(k, bool)
            s[pairs.ravel()] = False
            single.append(s)
            g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(k, k))
            n_groups, _ = connected_components(g, directed=False)
            groups += n_groups
            multi += n_groups - int(s.sum())
        single_all = np.concatenate(single) if single else np.zeros(0, bool)
        out[f"d={d:g}"] = {
            "share_with_neighbour": float(1 - single_all.mean()) if n else math.nan,
            "groups_per_electron": groups / n if n else math.nan,
            "multi_groups": multi,
            "single": single_all,
        }
    return out


def run_point(
    shape: tuple[int, int],
    dose: float,
    params: dict[str, Any],
    seed: int,
    *,
    electrons: int = 15000,
    min_frames: int = 16,
    null_frames: int | None = None,
    methods: tuple[str, ...] = METHODS,
    row_correct: bool = False,
    log=print,
) -> dict[str, Any]:
    """Measure one parameter point at one dose (see the module docstring); ``null_frames``
    None: enough extra dark frames for about NULL_EXCEEDANCES null values above the
    threshold (at most 2000)."""
    t0 = time.perf_counter()
    h, w = shape
    emu = CameraEmulator(
        shape, dose_rate_e_per_px_s=dose * 1500, frame_time_s=1 / 1500, seed=seed, **params
    )
    sigma = emu.psf_sigma_px
    dark, _ = emu.dark_frames(50)
    cal = Calibration.from_dark_frames(dark, xray_threshold=XRAY_THRESHOLD)
    n_frames = max(min_frames, math.ceil(electrons / (dose * h * w)))
    frames, truth = emu.generate(n_frames)
    n_true = sum(len(p) for p in truth.positions)
    true_dose = n_true / (n_frames * h * w)
    rate = (1 - PRECISION) / PRECISION * true_dose  # false events allowed per pixel
    good = np.ones(shape, bool) if cal.mask is None else ~cal.mask
    var = np.where(good, cal.noise.astype(np.float64) ** 2, np.inf)
    if row_correct:  # what the row offset adds to each pixel's noise, from the dark series
        row_mean = (dark.astype(np.float64) - cal.dark).mean(axis=2)
        row_var = row_mean.var(axis=0, ddof=1).mean() - np.mean(var[good]) / w
        var = np.maximum(var - max(row_var, 0.0), 0.05 * var)
    rng = np.random.default_rng(seed + 7919)
    tail = NullTail()
    near, near_row = _disc(NULL_PX + 1), _disc(3.5)  # pixel index distances
    iso = []
    sig_all = np.empty(frames.shape, np.float32)
    for i in range(n_frames):
        pos, xr = truth.positions[i], truth.xray_positions[i]
        # null positions: no electron nor X-ray within NULL_PX (a pixel holds its
        # electron anywhere: one pixel more of margin)
        pix = np.floor(pos).astype(np.int64)
        xbusy = _near(shape, xr, near)
        busy = xbusy | _near(shape, pix, near)
        free = None
        if row_correct:  # charge-free: nothing within 3.5 px of an electron's pixel
            free = good & ~xbusy & ~_near(shape, pix, near_row)
        sig = sig_all[i] = _signal(frames[i], cal, free)
        tail.add(null_maps(sig, var, rng.random(2), sigma), ~busy)
        iso.append(_isolated(pos, xr, shape, good))
    # the isolated electrons: frame, position, deposit, index among all the electrons
    iso_index = np.flatnonzero(np.concatenate(iso))
    f = np.repeat(np.arange(n_frames), [len(p) for p in truth.positions])[iso_index]
    pos = np.concatenate(truth.positions)[iso_index]
    energy = np.concatenate(truth.energies)[iso_index].astype(np.float64)
    stats = electron_stats(sig_all, var, f, pos, sigma)
    del sig_all
    # the extra dark frames: enough null trials for the tail at this dose's rate
    if null_frames is None:
        null_frames = min(2000, math.ceil(NULL_EXCEEDANCES / (rate * h * w * 0.9)))
    done, free = 0, good if row_correct else None
    while done < null_frames:
        block, _ = emu.dark_frames(min(CHUNK, null_frames - done))
        for fr in block:
            tail.add(null_maps(_signal(fr, cal, free), var, rng.random(2), sigma), good)
        done += len(block)
    row: dict[str, Any] = {
        "dose_e_per_px_frame": dose,
        "emulator": dict(params),
        "seed": seed,
        "frames": n_frames,
        "n_true": n_true,
        "true_dose": true_dose,
        "target_recall": TARGETS.get(dose),
        "false_rate_per_trial": rate,
        "null_frames": null_frames,
        "null_trials": tail.trials,
        "n_isolated": len(f),
        "row_correct": row_correct,
    }
    bounds: dict[str, Any] = {}
    for s in STATS:
        thr, k = tail.threshold(s, rate)
        thr_all, k_all = tail.threshold(s, rate, every=True)
        bounds[s] = {
            "threshold": thr,
            "null_std": tail.std(s),
            "null_above": k,
            "bound": float(np.mean(stats[s] > thr)),
            "threshold_every_trial": thr_all,
            "bound_every_trial": float(np.mean(stats[s] > thr_all)),
        }
    # noise-free: the deposit through the gain and the weights, without noise
    pix = np.floor(pos).astype(np.int64)
    p = psf_weights(pos - pix, sigma)
    v = _patches(var, f, pix[:, 0], pix[:, 1], HALF)
    g = _patches(truth.gain.astype(np.float64), f, pix[:, 0], pix[:, 1], HALF)
    t0_free = energy * (p * p * g / v).sum((1, 2)) / np.sqrt((p * p / v).sum((1, 2)))
    bounds["matched_noise_free"] = float(np.mean(t0_free > bounds["matched"]["threshold"]))
    row["isolated"] = bounds
    co = coincidence(truth.positions)
    combined = {}
    for key, c in co.items():
        single = c.pop("single")
        combined[key] = (single.sum() * bounds["matched"]["bound"] + c["multi_groups"]) / n_true
    row["coincidence"] = co
    row["combined_bound"] = combined
    row["measured"] = {}
    for method in methods:
        batch = count(frames, cal, subpixel=True, threads=1, method=method)
        sc = score_batch(batch, truth.positions)
        hit = matched_electrons(batch, truth.positions)
        row["measured"][method] = {
            "recall": sc.recall,
            "precision": sc.precision,
            "recall_isolated": float(hit[iso_index].mean()) if len(iso_index) else math.nan,
        }
    row["seconds"] = time.perf_counter() - t0
    _log_row(row, log)
    return row


def _isolated(pos: np.ndarray, xr: np.ndarray, shape, good: np.ndarray) -> np.ndarray:
    """Electrons of one frame alone within ISOLATION_PX, no X-ray within NULL_PX, and
    with a window inside the frame free of masked pixels."""
    h, w = shape
    k = len(pos)
    keep = np.ones(k, bool)
    if k == 0:
        return keep
    pairs = cKDTree(pos).query_pairs(ISOLATION_PX, output_type="ndarray")
    keep[pairs.ravel()] = False
    if len(xr):
        dist, _ = cKDTree(xr + 0.5).query(pos)
        keep &= dist > NULL_PX
    pix = np.floor(pos).astype(np.int64)
    inside = (pix >= HALF).all(1) & (pix[:, 0] < h - HALF) & (pix[:, 1] < w - HALF)
    keep &= inside
    bad = ~ndimage.minimum_filter(good, size=2 * HALF + 1, mode="constant", cval=False)
    keep[inside] &= ~bad[pix[inside, 0], pix[inside, 1]]
    return keep


HEADER = (
    "emulator                 dose   electrons  isolated | oracle iso: matched (noise-free)"
    "  box3   quad2 | groups/e d=1  d=1.5 | bound d=1  d=1.5 | target | peak  resolve"
    " (iso)  resolve prec | other methods: recall (iso) prec"
)


def _name(params: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items()) or "default"


def _log_row(row: dict[str, Any], log) -> None:
    b, co, cb, m = row["isolated"], row["coincidence"], row["combined_bound"], row["measured"]
    res = m.get("resolve", {})
    target = row["target_recall"]
    log(
        f"{_name(row['emulator']):<22s} {row['dose_e_per_px_frame']:>6g}  {row['n_true']:>9d}"
        f"  {row['n_isolated']:>8d} |   {b['matched']['bound']:.4f} ({b['matched_noise_free']:.4f})"
        f"  {b['box3']['bound']:.4f}  {b['quad2']['bound']:.4f}"
        f" |  {co['d=1']['groups_per_electron']:.4f}  {co['d=1.5']['groups_per_electron']:.4f}"
        f" |  {cb['d=1']:.4f}  {cb['d=1.5']:.4f} | {'-' if target is None else target:>6}"
        f" | {m.get('peak', {}).get('recall', math.nan):.4f}  {res.get('recall', math.nan):.4f}"
        f" ({res.get('recall_isolated', math.nan):.4f})  {res.get('precision', math.nan):.4f}"
        + "".join(
            f" | {name} {v['recall']:.4f} ({v['recall_isolated']:.4f}) {v['precision']:.4f}"
            for name, v in m.items()
            if name not in ("peak", "resolve")
        )
    )


def run(
    shape: tuple[int, int], doses: list[float], points: list[dict[str, Any]], seed: int, **kw
) -> dict[str, Any]:
    """Every parameter point at every dose (:func:`run_point`, ``kw`` its options); the
    row of point ``j``, dose ``i`` is seeded ``seed + 100 j + i``."""
    res: dict[str, Any] = {
        "frame_shape": list(shape),
        "seed": seed,
        "precision_target": PRECISION,
        "targets": {str(k): v for k, v in TARGETS.items()},
        "python": platform.python_version(),
        "rows": [],
    }
    kw.get("log", print)(HEADER)
    for j, params in enumerate(points):
        for i, dose in enumerate(doses):
            res["rows"].append(run_point(shape, dose, params, seed + 100 * j + i, **kw))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=parse_shape, default=(256, 384), help="HxW (256x384)")
    p.add_argument("--doses", type=_doses, default=list(DOSES), help="e/px/frame, comma-separated")
    p.add_argument(
        "--emulator",
        type=_params,
        action="append",
        help="a parameter point, e.g. psf_sigma_px=0.8,deposit=gamma; repeatable (default physics)",
    )
    p.add_argument("--electrons", type=int, default=15000, help="least electrons per row (15000)")
    p.add_argument(
        "--frames", dest="min_frames", type=int, default=16, help="least frames per row (16)"
    )
    p.add_argument(
        "--null-frames",
        type=int,
        default=None,
        help="extra dark frames for the null (default: enough for the dose's false rate)",
    )
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument(
        "--row-correct",
        action="store_true",
        help="oracle statistics on frames less each row's offset",
    )
    p.add_argument("--no-resolve", action="store_true", help="measure the default rule only")
    p.add_argument(
        "--methods",
        default=",".join(METHODS[1:]),
        help="count()'s methods measured beside the default rule, comma-separated "
        f"({','.join(METHODS[1:])}; e.g. resolve,fit,joint)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    record.add_options(p)
    args = p.parse_args(argv)
    if args.min_frames < 1 or args.electrons < 0:
        p.error("--frames must be >= 1 and --electrons >= 0")
    points = args.emulator or [{}]
    for params in points:
        try:
            CameraEmulator((8, 8), **params)
        except (TypeError, ValueError) as exc:
            p.error(f"--emulator: {exc}")
    log = (lambda *a, **k: None) if args.json else print
    extra = [m.strip() for m in args.methods.split(",") if m.strip() and m.strip() != "peak"]
    methods = ("peak",) if args.no_resolve else ("peak", *extra)
    kw = {k: getattr(args, k) for k in ("electrons", "min_frames", "null_frames", "row_correct")}
    res = run(args.shape, args.doses, points, args.seed, methods=methods, log=log, **kw)
    record.save("detection_bound", res, args)
    if args.json:
        print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
