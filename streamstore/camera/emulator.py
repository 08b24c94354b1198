"""A direct-detection electron camera emulator that knows the truth.

:class:`CameraEmulator` makes raw frames the way a counting camera (a Gatan K3
class sensor) sees them, and returns the ground truth of every electron it
made, so that counting accuracy, compression and throughput are measured
against known answers.

Physics, per frame (every number is a constructor parameter):

* **Arrivals.** Electrons arrive as a Poisson process per pixel with mean
  ``dose_per_frame * pattern(y, x)``; ``pattern`` has mean 1 over the whole
  frame, so ``dose_per_frame = dose_rate_e_per_px_s * frame_time_s`` is the
  frame-averaged dose (e/px/frame) for every pattern, and the expected number
  of electrons in a frame is ``dose_per_frame * H * W``. The true position is
  uniform within the hit pixel; pixel ``(r, c)`` covers ``[r, r+1) x [c, c+1)``.
  (Implemented exactly as Poisson splitting: a Poisson total, then pixels drawn
  with probability proportional to the pattern.)
* **Charge cloud.** Each electron deposits a Moyal (Landau-like) distributed
  signal, ``loc - scale * ln(Z**2)`` with ``Z ~ N(0, 1)`` (clipped at 0), or
  with ``deposit="gamma"`` a gamma distributed one of the same mean (shape
  ``deposit_shape``: no long tail, more weak deposits), so that counting is not
  judged on one deposit law only;
  spread over the neighbouring pixels by a Gaussian point spread of
  ``psf_sigma_px`` integrated over each pixel; charge falling off the sensor is
  lost.
* **Sensor.** A fixed-pattern dark offset per pixel, a per-pixel gain applied
  to the deposited charge, Gaussian read noise per pixel, a common-mode offset
  per row and frame, a few hot pixels (bright, noisy, constant positions) and
  rare X-ray hits (a single very bright pixel) while the beam is on.
* **Output.** Rounded to integers and clipped to ``[0, dtype max]``:
  saturating, never wrapping.

ADU-valued defaults are for uint16. ``adu_scale`` multiplies every ADU
parameter; its default (``None``) is 1.0 for uint16 and 0.25 for uint8, which
keeps an electron (mean about 31 ADU) far above the read noise (1 ADU) and the
dark level (25 ADU) inside 8 bits, while X-rays and hot pixels saturate at 255.

Patterns (``pattern=``):

``"uniform"``
    Flat illumination, 1 everywhere.
``"disk"``
    4D-STEM like: a bright-field disk (radius ``0.2 * min(H, W)``, soft edge)
    holding about 70 % of the electrons, three diffraction rings (15 %) and a
    diffuse Lorentzian halo (15 %). The local dose inside the disk is about
    ``0.7 / disk_area_fraction`` times the frame mean.
``"image"``
    A synthetic specimen: a smooth thickness gradient with round particles
    absorbing up to about 35 % of the beam; contrast (pattern max/min) about 1.5.

Random streams: the fixed maps (dark, gain, hot pixels, pattern) come from one
child of ``seed`` and the per-frame randomness from another, so every
:meth:`CameraEmulator.generate` call continues a deterministic stream: the same
seed and the same sequence of calls give the same frames.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from streamstore.camera.truth import Truth

__all__ = ["CameraEmulator", "PATTERNS"]

PATTERNS = ("uniform", "disk", "image")
DEPOSITS = ("moyal", "gamma")
_DTYPES = {"uint8": np.dtype("uint8"), "uint16": np.dtype("uint16")}
_EULER_GAMMA = 0.5772156649015329
# mean of the standard Moyal distribution (loc 0, scale 1)
MOYAL_MEAN = _EULER_GAMMA + math.log(2.0)


def _positive(name: str, value: float, *, allow_zero: bool = True) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: must be finite and {bound}, got {value!r}")
    return v


class CameraEmulator:
    """Emulate a counting-mode direct electron camera, with ground truth.

    Parameters
    ----------
    frame_shape : tuple of int, default (4092, 5760)
        ``(H, W)`` of a frame.
    dtype : {"uint16", "uint8"}, default "uint16"
        Output pixel type; values saturate at its maximum.
    dose_rate_e_per_px_s : float, default 15.0
        Frame-mean electron dose rate, e/px/s.
    frame_time_s : float, default 1/1500
        Frame time; ``dose_per_frame = dose_rate_e_per_px_s * frame_time_s``
        (0.01 e/px/frame with the defaults).
    pattern : {"uniform", "disk", "image"}, default "uniform"
        Illumination pattern, mean 1 over the frame (see module docstring).
    seed : int, default 0
        Seed of every random stream.
    pool_size : int, default 8
        Number of distinct frames made by :meth:`pool` for streaming.
    psf_sigma_px : float, default 0.5
        Gaussian sigma of the charge cloud, pixels (0: all charge in the hit pixel).
    electron_loc_adu : float, default 100.0
        Moyal location (most probable signal) of one electron, ADU.
    electron_scale_adu : float, default 18.0
        Moyal scale of one electron's signal, ADU.
    deposit : {"moyal", "gamma"}, default "moyal"
        Distribution of one electron's signal: Moyal (``electron_loc_adu``,
        ``electron_scale_adu``), or gamma with the Moyal's mean and shape
        ``deposit_shape``.
    deposit_shape : float, default 4.0
        Shape of the gamma deposit (relative spread ``1 / sqrt(shape)``).
    dark_mean_adu : float, default 100.0
        Mean of the fixed-pattern dark offset, ADU.
    dark_sigma_adu : float, default 5.0
        Pixel-to-pixel spread of the dark offset, ADU.
    gain_sigma : float, default 0.03
        Relative pixel-to-pixel gain spread (gain mean 1, clipped to >= 0.5).
    read_noise_adu : float, default 4.0
        Gaussian read noise per pixel and frame, ADU.
    row_noise_adu : float, default 1.0
        Common-mode offset per row and frame (Gaussian sigma), ADU.
    hot_pixel_fraction : float, default 1e-5
        Fraction of hot pixels; at least one when > 0.
    hot_level_adu : float, default 2000.0
        Mean excess of a hot pixel over its dark offset, ADU.
    hot_sigma_adu : float, default 100.0
        Frame-to-frame noise of a hot pixel, ADU.
    xray_rate_per_frame : float, default 0.5
        Mean number of X-ray hits per frame while the beam is on (any dose > 0).
    xray_signal_adu : float, default 3000.0
        Mean signal of an X-ray hit (about 24 electrons), ADU; 10 % spread.
    adu_scale : float or None, default None
        Multiplies every ``*_adu`` parameter; None means 1.0 for uint16 and
        0.25 for uint8.
    stem : STEMSpecimen, optional
        4D-STEM mode: frame ``i`` is the diffraction pattern of the probe
        position frame id ``i`` maps to (:mod:`streamstore.camera.specimen`);
        replaces ``pattern``. The specimen's truth maps come back in ``Truth.stem``.
    """

    def __init__(
        self,
        frame_shape: tuple[int, int] = (4092, 5760),
        *,
        dtype: str = "uint16",
        dose_rate_e_per_px_s: float = 15.0,
        frame_time_s: float = 1 / 1500,
        pattern: str = "uniform",
        seed: int = 0,
        pool_size: int = 8,
        psf_sigma_px: float = 0.5,
        electron_loc_adu: float = 100.0,
        electron_scale_adu: float = 18.0,
        deposit: str = "moyal",
        deposit_shape: float = 4.0,
        dark_mean_adu: float = 100.0,
        dark_sigma_adu: float = 5.0,
        gain_sigma: float = 0.03,
        read_noise_adu: float = 4.0,
        row_noise_adu: float = 1.0,
        hot_pixel_fraction: float = 1e-5,
        hot_level_adu: float = 2000.0,
        hot_sigma_adu: float = 100.0,
        xray_rate_per_frame: float = 0.5,
        xray_signal_adu: float = 3000.0,
        adu_scale: float | None = None,
        stem: Any = None,
    ) -> None:
        try:
            h, w = (int(v) for v in frame_shape)
        except (TypeError, ValueError):
            raise ValueError(f"frame_shape: expected (H, W), got {frame_shape!r}") from None
        if h < 1 or w < 1 or len(tuple(frame_shape)) != 2:
            raise ValueError(f"frame_shape: expected two positive ints (H, W), got {frame_shape!r}")
        if str(dtype) not in _DTYPES:
            raise ValueError(f"dtype: must be 'uint8' or 'uint16', got {dtype!r}")
        if pattern not in PATTERNS:
            raise ValueError(f"pattern: must be one of {PATTERNS}, got {pattern!r}")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"pool_size: expected an int >= 1, got {pool_size!r}")
        self.frame_shape: tuple[int, int] = (h, w)
        self.dtype: np.dtype = _DTYPES[str(dtype)]
        self.dose_rate_e_per_px_s = _positive("dose_rate_e_per_px_s", dose_rate_e_per_px_s)
        self.frame_time_s = _positive("frame_time_s", frame_time_s, allow_zero=False)
        self.pattern = pattern
        self.seed = int(seed)
        self.pool_size = pool_size
        self.psf_sigma_px = _positive("psf_sigma_px", psf_sigma_px)
        if adu_scale is None:
            adu_scale = 1.0 if self.dtype == np.uint16 else 0.25
        self.adu_scale = _positive("adu_scale", adu_scale, allow_zero=False)
        s = self.adu_scale
        self.electron_loc_adu = s * _positive("electron_loc_adu", electron_loc_adu)
        self.electron_scale_adu = s * _positive("electron_scale_adu", electron_scale_adu)
        if deposit not in DEPOSITS:
            raise ValueError(f"deposit: must be one of {DEPOSITS}, got {deposit!r}")
        self.deposit = deposit
        self.deposit_shape = _positive("deposit_shape", deposit_shape, allow_zero=False)
        self.dark_mean_adu = s * _positive("dark_mean_adu", dark_mean_adu)
        self.dark_sigma_adu = s * _positive("dark_sigma_adu", dark_sigma_adu)
        self.gain_sigma = _positive("gain_sigma", gain_sigma)
        self.read_noise_adu = s * _positive("read_noise_adu", read_noise_adu)
        self.row_noise_adu = s * _positive("row_noise_adu", row_noise_adu)
        self.hot_pixel_fraction = _positive("hot_pixel_fraction", hot_pixel_fraction)
        if self.hot_pixel_fraction > 1:
            raise ValueError(f"hot_pixel_fraction: must be <= 1, got {hot_pixel_fraction!r}")
        self.hot_level_adu = s * _positive("hot_level_adu", hot_level_adu)
        self.hot_sigma_adu = s * _positive("hot_sigma_adu", hot_sigma_adu)
        self.xray_rate_per_frame = _positive("xray_rate_per_frame", xray_rate_per_frame)
        self.xray_signal_adu = s * _positive("xray_signal_adu", xray_signal_adu)
        if stem is not None and tuple(getattr(stem, "frame_shape", ())) != (h, w):
            raise ValueError(f"stem: a STEMSpecimen for frames of shape {(h, w)} is needed")
        self.stem = stem

        maps_seq, frames_seq = np.random.SeedSequence(self.seed).spawn(2)
        self._map_seq = maps_seq
        self._rng = np.random.default_rng(frames_seq)
        self._next_frame_id = 0
        self._pattern_map: np.ndarray | None = None
        self._pattern_cdf: np.ndarray | None = None
        self._pool: tuple[np.ndarray, Truth] | None = None
        self._make_fixed_maps()

    # ------------------------------------------------------------------ setup
    def _make_fixed_maps(self) -> None:
        h, w = self.frame_shape
        rng = np.random.default_rng(self._map_seq.spawn(1)[0])
        dark = rng.standard_normal((h, w), dtype=np.float32)
        dark *= np.float32(self.dark_sigma_adu)
        dark += np.float32(self.dark_mean_adu)
        self.dark: np.ndarray = dark
        gain = rng.standard_normal((h, w), dtype=np.float32)
        gain *= np.float32(self.gain_sigma)
        gain += np.float32(1.0)
        np.maximum(gain, np.float32(0.5), out=gain)
        self.gain: np.ndarray = gain
        n_hot = 0
        if self.hot_pixel_fraction > 0:
            n_hot = max(1, int(round(self.hot_pixel_fraction * h * w)))
        flat = np.sort(rng.choice(h * w, size=n_hot, replace=False)) if n_hot else np.empty(0)
        self._hot_flat = flat.astype(np.int64)
        self.hot_pixels: np.ndarray = np.stack(np.divmod(self._hot_flat, w), axis=1).astype(
            np.int64
        )
        self._pattern_seed = int(rng.integers(2**63))

    @property
    def dose_per_frame(self) -> float:
        """Frame-mean dose in e/px/frame (``dose_rate_e_per_px_s * frame_time_s``)."""
        return self.dose_rate_e_per_px_s * self.frame_time_s

    @property
    def electron_adu_mean(self) -> float:
        """Mean total signal of one electron in ADU at gain 1 (Moyal mean; the gamma
        deposit has the same mean)."""
        return self.electron_loc_adu + self.electron_scale_adu * MOYAL_MEAN

    @property
    def frame_nbytes(self) -> int:
        """Bytes in one frame."""
        return self.frame_shape[0] * self.frame_shape[1] * self.dtype.itemsize

    def pattern_map(self) -> np.ndarray:
        """The illumination pattern, float32 (H, W), mean 1 over the frame (cached)."""
        if self._pattern_map is None:
            self._pattern_map = _make_pattern(self.pattern, self.frame_shape, self._pattern_seed)
        return self._pattern_map

    def params(self) -> dict[str, Any]:
        """The parameters of this emulator (ADU values after ``adu_scale``), JSON-friendly."""
        keys = (
            "dose_rate_e_per_px_s frame_time_s pattern seed pool_size psf_sigma_px "
            "electron_loc_adu electron_scale_adu deposit deposit_shape dark_mean_adu "
            "dark_sigma_adu gain_sigma "
            "read_noise_adu row_noise_adu hot_pixel_fraction hot_level_adu hot_sigma_adu "
            "xray_rate_per_frame xray_signal_adu adu_scale"
        ).split()
        out: dict[str, Any] = {k: getattr(self, k) for k in keys}
        out["frame_shape"] = list(self.frame_shape)
        out["dtype"] = self.dtype.name
        return out

    # ------------------------------------------------------------- generation
    def generate(self, n: int, *, dose: float | None = None) -> tuple[np.ndarray, Truth]:
        """Make the next ``n`` frames of the seeded stream.

        Parameters
        ----------
        n : int
            Number of frames (>= 0).
        dose : float, optional
            Frame-mean dose in e/px/frame for these frames instead of
            :attr:`dose_per_frame`; ``0`` means beam off (dark frames: no
            electrons and no X-rays).

        Returns
        -------
        frames : ndarray, shape (n, H, W), dtype :attr:`dtype`
        truth : Truth
        """
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise ValueError(f"n: expected an int >= 0, got {n!r}")
        dose_v = self.dose_per_frame if dose is None else _positive("dose", dose)
        h, w = self.frame_shape
        frames = np.empty((int(n), h, w), dtype=self.dtype)
        positions: list[np.ndarray] = []
        energies: list[np.ndarray] = []
        xrays: list[np.ndarray] = []
        buf = np.empty((h, w), dtype=np.float32)
        for i in range(int(n)):
            pos, eng, xr = self._one_frame(buf, dose_v, self._next_frame_id + i)
            frames[i] = buf  # float32 values already rounded and clipped
            positions.append(pos)
            energies.append(eng)
            xrays.append(xr)
        ids = np.arange(self._next_frame_id, self._next_frame_id + int(n), dtype=np.int64)
        self._next_frame_id += int(n)
        truth = Truth(
            frame_shape=self.frame_shape,
            frame_ids=ids,
            positions=positions,
            energies=energies,
            xray_positions=xrays,
            dark=self.dark,
            gain=self.gain,
            read_noise_adu=self.read_noise_adu,
            row_noise_adu=self.row_noise_adu,
            hot_pixels=self.hot_pixels,
            electron_adu_mean=self.electron_adu_mean,
            dose_per_frame=dose_v,
            params=self.params(),
            stem=None if self.stem is None else self.stem.truth(),
        )
        return frames, truth

    def dark_frames(self, n: int) -> tuple[np.ndarray, Truth]:
        """The next ``n`` frames with the beam off (``generate(n, dose=0)``)."""
        return self.generate(n, dose=0.0)

    def pool(self, n: int | None = None) -> tuple[np.ndarray, Truth]:
        """Distinct frames for streaming, made once and cached.

        Streaming cycles through these frames so the sender's cost is the send
        alone; frame ``i`` of a stream is ``frames[i % n]``.

        Parameters
        ----------
        n : int, optional
            Pool size; defaults to ``pool_size``. Asking for another size than
            the cached pool makes a new pool (continuing the random stream).

        Returns
        -------
        frames : ndarray, shape (n, H, W)
        truth : Truth
        """
        size = self.pool_size if n is None else n
        if self._pool is None or len(self._pool[0]) != size:
            self._pool = self.generate(size)
        return self._pool

    def _one_frame(
        self, buf: np.ndarray, dose: float, frame_id: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fill ``buf`` (float32 H x W) with one frame; return its truth."""
        rng = self._rng
        h, w = self.frame_shape
        flat = buf.reshape(-1)
        # sensor: read noise, dark, row common mode
        rng.standard_normal(out=buf, dtype=np.float32)
        buf *= np.float32(self.read_noise_adu)
        buf += self.dark
        row = rng.standard_normal(h, dtype=np.float32)
        row *= np.float32(self.row_noise_adu)
        buf += row[:, None]
        # electrons
        n_e = int(rng.poisson(dose * h * w)) if dose > 0 else 0
        if self.stem is not None:  # electrons that miss the detector are lost
            pix = self.stem.sample(rng, n_e, frame_id)
            n_e = pix.size
        elif self.pattern == "uniform":
            pix = rng.integers(0, h * w, size=n_e, dtype=np.int64)
        else:
            if self._pattern_cdf is None:
                cdf = np.cumsum(self.pattern_map().reshape(-1), dtype=np.float64)
                self._pattern_cdf = cdf / cdf[-1]
            u = rng.random(n_e)
            pix = np.searchsorted(self._pattern_cdf, u, side="right")
            np.minimum(pix, h * w - 1, out=pix)
        pix.sort()
        r, c = np.divmod(pix, w)
        frac = rng.random((n_e, 2))
        pos = np.empty((n_e, 2), dtype=np.float64)
        pos[:, 0] = r + frac[:, 0]
        pos[:, 1] = c + frac[:, 1]
        if self.deposit == "gamma":
            k = self.deposit_shape
            energy = rng.gamma(k, self.electron_adu_mean / k, n_e)
        else:
            z = rng.standard_normal(n_e)
            energy = self.electron_loc_adu - self.electron_scale_adu * np.log(
                np.maximum(z * z, 1e-300)
            )
        np.maximum(energy, 0.0, out=energy)
        if n_e:
            self._deposit(flat, r, c, frac, energy)
        # X-rays while the beam is on
        n_x = int(rng.poisson(self.xray_rate_per_frame)) if dose > 0 else 0
        xpix = rng.integers(0, h * w, size=n_x, dtype=np.int64)
        xsig = self.xray_signal_adu * (1.0 + 0.1 * rng.standard_normal(n_x))
        np.add.at(flat, xpix, np.maximum(xsig, 0.0).astype(np.float32))
        xr = np.stack(np.divmod(xpix, w), axis=1).astype(np.int64)
        # hot pixels
        if self._hot_flat.size:
            hot = self.hot_level_adu + self.hot_sigma_adu * rng.standard_normal(self._hot_flat.size)
            flat[self._hot_flat] += hot.astype(np.float32)
        # digitise: round, saturate (never wrap)
        np.rint(buf, out=buf)
        np.clip(buf, 0, np.iinfo(self.dtype).max, out=buf)
        return pos, energy.astype(np.float32), xr

    def _deposit(
        self,
        flat: np.ndarray,
        r: np.ndarray,
        c: np.ndarray,
        frac: np.ndarray,
        energy: np.ndarray,
    ) -> None:
        """Spread each electron's charge over its neighbours (Gaussian PSF) into ``flat``."""
        h, w = self.frame_shape
        sigma = self.psf_sigma_px
        if sigma == 0:
            idx = r * w + c
            np.add.at(flat, idx, (energy * self.gain.reshape(-1)[idx]).astype(np.float32))
            return
        from scipy.special import ndtr

        rad = max(1, int(math.ceil(3.0 * sigma)))
        edges = np.arange(-rad, rad + 2, dtype=np.float64)  # pixel edges relative to the hit pixel
        cdf_y = ndtr((edges[None, :] - frac[:, :1]) / sigma)
        cdf_x = ndtr((edges[None, :] - frac[:, 1:]) / sigma)
        fy = np.diff(cdf_y, axis=1) * energy[:, None]  # (n, 2 rad + 1), charge per row
        fx = np.diff(cdf_x, axis=1)
        gain = self.gain.reshape(-1)
        for dy in range(-rad, rad + 1):
            rr = r + dy
            ok_r = (rr >= 0) & (rr < h)
            for dx in range(-rad, rad + 1):
                cc = c + dx
                ok = ok_r & (cc >= 0) & (cc < w)
                idx = rr[ok] * w + cc[ok]
                q = fy[ok, dy + rad] * fx[ok, dx + rad] * gain[idx]
                np.add.at(flat, idx, q.astype(np.float32))


def _make_pattern(name: str, shape: tuple[int, int], seed: int) -> np.ndarray:
    """Illumination pattern ``name``, float32, mean 1 over the frame."""
    h, w = shape
    if name == "uniform":
        return np.ones(shape, dtype=np.float32)
    yy = (np.arange(h, dtype=np.float32) + np.float32(0.5) - np.float32(h / 2))[:, None]
    xx = (np.arange(w, dtype=np.float32) + np.float32(0.5) - np.float32(w / 2))[None, :]
    if name == "disk":
        rad = 0.2 * min(h, w)
        rr = np.sqrt(yy * yy + xx * xx)
        edge = max(0.5, 0.01 * min(h, w))
        disk = 1.0 / (1.0 + np.exp((rr - np.float32(rad)) / np.float32(edge)))
        rings = np.zeros(shape, dtype=np.float32)
        for k, (rk, wk) in enumerate(((1.45, 0.03), (1.85, 0.025), (2.3, 0.02))):
            width = max(0.7, wk * min(h, w))
            rings += np.float32(0.6**k) * np.exp(-0.5 * ((rr - np.float32(rk * rad)) / width) ** 2)
        halo = 1.0 / (1.0 + (rr / np.float32(1.5 * rad)) ** 2)
        parts = [(disk, 0.70), (rings, 0.15), (halo, 0.15)]
        out = np.zeros(shape, dtype=np.float32)
        for p, share in parts:
            total = float(p.sum(dtype=np.float64))
            if total > 0:
                out += p.astype(np.float32) * np.float32(share * h * w / total)
        return out / np.float32(out.mean(dtype=np.float64))
    if name == "image":
        rng = np.random.default_rng(seed)
        gy, gx = rng.uniform(-0.15, 0.15, size=2)
        out = 1.0 + np.float32(gy) * yy / np.float32(h) + np.float32(gx) * xx / np.float32(w)
        out = np.broadcast_to(out, shape).astype(np.float32)
        scale = min(h, w)
        n_part = max(4, int(round(12 * h * w / (scale * scale))))
        for _ in range(n_part):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            rad = rng.uniform(0.02, 0.07) * scale
            depth = rng.uniform(0.15, 0.35)
            y0, y1 = max(0, int(cy - 3 * rad)), min(h, int(cy + 3 * rad) + 1)
            x0, x1 = max(0, int(cx - 3 * rad)), min(w, int(cx + 3 * rad) + 1)
            if y0 >= y1 or x0 >= x1:
                continue
            py = (np.arange(y0, y1, dtype=np.float32) + np.float32(0.5 - cy))[:, None]
            px = (np.arange(x0, x1, dtype=np.float32) + np.float32(0.5 - cx))[None, :]
            blob = np.exp(-0.5 * (py * py + px * px) / np.float32(rad * rad))
            out[y0:y1, x0:x1] *= 1.0 - np.float32(depth) * blob
        np.maximum(out, np.float32(0.05), out=out)
        return out / np.float32(out.mean(dtype=np.float64))
    raise ValueError(f"pattern: must be one of {PATTERNS}, got {name!r}")
