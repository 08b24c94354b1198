"""A synthetic specimen under a scanned probe: the 4D-STEM mode of the camera emulator.

:class:`STEMSpecimen` rasters a convergent probe over a made-up specimen and
says where each electron of a frame lands on the detector. Pass it to
:class:`streamstore.CameraEmulator` (``stem=``) and every generated frame is the
diffraction pattern of the position its frame id maps to (the same raster as
:mod:`streamstore.scan`: ``frames_per_position`` frames per position, rows of
``cols + flyback`` positions). The truth maps come back with the frames
(``Truth.stem``).

Model, per probe position ``(row, col)`` (all maps smooth, seeded):

* **Thickness** ``t`` in mean free paths: a gentle gradient plus a few round
  particles. A fraction ``exp(-t)`` of the electrons stays unscattered in the
  bright-field disk (radius ``disk_radius``); the rest is scattered into an
  annulus from ``adf_inner`` to ``adf_outer`` disk radii (where an annular
  dark-field detector sits). So virtual BF falls and ADF rises with thickness.
* **Phase gradient**: the specimen's projected potential deflects the beam; the
  whole pattern shifts by ``shift = max_shift_px * grad(phase) / max|grad(phase)|``
  pixels, which the centre of mass measures (differential phase contrast).
* A fraction ``background`` of the electrons lands uniformly on the detector.

Electrons are placed uniformly within the disk or the annulus (by area);
those falling off the detector are lost, as on a real camera.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamstore.scan import ScanGeometry

__all__ = ["STEMSpecimen"]


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], n_waves: int) -> np.ndarray:
    """A smooth random field in [-1, 1] (a sum of a few long plane waves)."""
    rows, cols = shape
    y = np.arange(rows, dtype=np.float64)[:, None] / max(rows, 1)
    x = np.arange(cols, dtype=np.float64)[None, :] / max(cols, 1)
    f = np.zeros(shape)
    for _ in range(n_waves):
        ky, kx = rng.uniform(-2.5, 2.5, 2)
        f += np.cos(2 * np.pi * (ky * y + kx * x) + rng.uniform(0, 2 * np.pi))
    return f / max(np.abs(f).max(), 1e-12)


class STEMSpecimen:
    """A specimen and a probe raster for the emulator's 4D-STEM mode.

    Parameters
    ----------
    frame_shape : (H, W)
        Detector frame shape (must equal the emulator's).
    scan_shape : (rows, cols)
        Probe positions kept.
    frames_per_position : int, default 1
        Frames recorded at each position.
    flyback : int, default 0
        Positions recorded at the end of each row while the probe flies back
        (their frames show the row's last position).
    disk_radius : float, optional
        Bright-field disk radius in pixels; default ``0.12 * min(H, W)``.
    max_thickness : float, default 1.5
        Largest thickness, in mean free paths.
    max_shift_px : float, optional
        Largest disk shift in pixels; default ``0.15 * disk_radius``.
    adf_inner, adf_outer : float, default 1.5, 3.0
        The scattered annulus, in disk radii.
    background : float, default 0.02
        Fraction of electrons spread uniformly over the detector.
    seed : int, default 0
        Seed of the specimen maps.
    """

    def __init__(
        self,
        frame_shape: tuple[int, int],
        scan_shape: tuple[int, int],
        *,
        frames_per_position: int = 1,
        flyback: int = 0,
        disk_radius: float | None = None,
        max_thickness: float = 1.5,
        max_shift_px: float | None = None,
        adf_inner: float = 1.5,
        adf_outer: float = 3.0,
        background: float = 0.02,
        seed: int = 0,
    ) -> None:
        self.geometry = ScanGeometry(tuple(scan_shape), frames_per_position, flyback, 0)  # type: ignore[arg-type]
        h, w = (int(v) for v in frame_shape)
        if h < 1 or w < 1:
            raise ValueError(f"frame_shape: expected two positive ints, got {frame_shape!r}")
        self.frame_shape = (h, w)
        self.disk_radius = float(0.12 * min(h, w) if disk_radius is None else disk_radius)
        self.max_shift_px = float(0.15 * self.disk_radius if max_shift_px is None else max_shift_px)
        for name, val in (
            ("disk_radius", self.disk_radius),
            ("max_thickness", max_thickness),
            ("adf_inner", adf_inner),
        ):
            if not (np.isfinite(val) and val > 0):
                raise ValueError(f"{name}: must be a positive number, got {val!r}")
        if not (self.max_shift_px >= 0 and adf_outer > adf_inner and 0 <= background < 1):
            raise ValueError(
                "need max_shift_px >= 0, adf_outer > adf_inner and 0 <= background < 1"
            )
        self.max_thickness = float(max_thickness)
        self.adf_inner = float(adf_inner)
        self.adf_outer = float(adf_outer)
        self.background = float(background)
        self.center = ((h - 1) / 2.0, (w - 1) / 2.0)
        rng = np.random.default_rng(seed)
        shape = self.geometry.scan_shape
        rows, cols = shape
        yy, xx = np.mgrid[:rows, :cols].astype(np.float64)
        t = 0.3 + 0.2 * (xx / max(cols - 1, 1))  # a wedge
        for _ in range(max(2, rows * cols // 40)):  # round particles
            py, px = rng.uniform(0, rows), rng.uniform(0, cols)
            rad = rng.uniform(0.1, 0.25) * min(rows, cols) + 0.5
            t += 0.8 * np.clip(1 - ((yy - py) ** 2 + (xx - px) ** 2) / rad**2, 0, None)
        t += 0.1 * _smooth_field(rng, shape, 3)
        t = np.clip(t, 0, None)
        self.thickness = t * (self.max_thickness / max(t.max(), 1e-12))
        phase = _smooth_field(rng, shape, 4) + 0.5 * (self.thickness / self.max_thickness)
        gy, gx = np.gradient(phase) if min(rows, cols) > 1 else (phase * 0, phase * 0)
        norm = max(float(np.hypot(gy, gx).max()), 1e-12)
        self.shift = np.stack([gy, gx]) * (self.max_shift_px / norm)
        self.bf_fraction = np.exp(-self.thickness)

    def position(self, frame_id: int) -> tuple[int, int]:
        """Probe ``(row, col)`` of a frame id (flyback frames: the row's last column)."""
        g = self.geometry
        rows, cols = g.scan_shape
        p = max(int(frame_id), 0) // g.frames_per_position
        row, col = divmod(p, cols + g.flyback)
        return min(row, rows - 1), min(col, cols - 1)

    def sample(self, rng: np.random.Generator, n: int, frame_id: int) -> np.ndarray:
        """Flat pixel indices (sorted) of the electrons of frame ``frame_id`` that hit the detector.

        ``n`` electrons arrive; the specimen at the frame's probe position sends
        each into the disk, the scattered annulus or the background.
        """
        row, col = self.position(frame_id)
        h, w = self.frame_shape
        t_frac = float(self.bf_fraction[row, col])
        n_bg = int(rng.binomial(n, self.background))
        n_bf = int(rng.binomial(n - n_bg, t_frac))
        n_sc = n - n_bg - n_bf
        cy = self.center[0] + 0.5 + self.shift[0, row, col]
        cx = self.center[1] + 0.5 + self.shift[1, row, col]
        r_in, r_out = self.adf_inner * self.disk_radius, self.adf_outer * self.disk_radius
        rad = np.concatenate(
            [
                self.disk_radius * np.sqrt(rng.random(n_bf)),
                np.sqrt(r_in**2 + (r_out**2 - r_in**2) * rng.random(n_sc)),
            ]
        )
        ang = rng.uniform(0, 2 * np.pi, rad.size)
        y = np.concatenate([cy + rad * np.sin(ang), rng.uniform(0, h, n_bg)])
        x = np.concatenate([cx + rad * np.cos(ang), rng.uniform(0, w, n_bg)])
        ok = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        pix = np.floor(y[ok]).astype(np.int64) * w + np.floor(x[ok]).astype(np.int64)
        pix.sort()
        return pix

    def truth(self) -> dict[str, Any]:
        """The truth maps over the scan (``(rows, cols)`` arrays, ``shift`` is ``(2, rows, cols)``).

        ``shift[0]`` is the disk shift along detector rows, ``shift[1]`` along
        columns, in pixels; ``center`` is the undeflected disk centre ``(row, col)``
        in the pixel-index convention of :meth:`streamstore.Store.center_of_mass`.
        """
        g = self.geometry
        return {
            "thickness": self.thickness.copy(),
            "bf_fraction": self.bf_fraction.copy(),
            "shift": self.shift.copy(),
            "center": np.array(self.center),
            "disk_radius": np.float64(self.disk_radius),
            "adf_radii": np.array([self.adf_inner, self.adf_outer]) * self.disk_radius,
            "scan_shape": np.array(g.scan_shape, np.int64),
            "frames_per_position": np.int64(g.frames_per_position),
            "flyback": np.int64(g.flyback),
        }
