"""The ground truth of emulated frames: every electron, where it landed.

:class:`Truth` is what :class:`streamstore.camera.emulator.CameraEmulator`
returns beside its frames, and what the accuracy tests and benchmarks score a
counter against; it saves to and loads from a small HDF5 file
(``docs/protocol.md``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Truth"]

_TRUTH_FORMAT = "streamstore-emulator-truth"
_TRUTH_VERSION = 1


@dataclass
class Truth:
    """Ground truth of a run of emulated frames.

    Attributes
    ----------
    frame_shape : tuple of int
        ``(H, W)``.
    frame_ids : ndarray of int64, shape (n,)
        Emulator frame index of each frame (consecutive per emulator).
    positions : list of ndarray
        Per frame, ``(k, 2)`` float64 true electron positions ``(y, x)``;
        pixel ``(r, c)`` covers ``[r, r+1) x [c, c+1)``.
    energies : list of ndarray
        Per frame, ``(k,)`` float32 total deposited signal of each electron in
        ADU before the pixel gain (charge falling off the sensor included).
    xray_positions : list of ndarray
        Per frame, ``(m, 2)`` int64 pixel ``(row, col)`` of each X-ray hit.
    dark : ndarray of float32, shape (H, W)
        Fixed-pattern dark offset used (ADU, hot-pixel excess not included).
    gain : ndarray of float32, shape (H, W)
        Per-pixel gain applied to deposited charge.
    read_noise_adu : float
        Standard deviation of the per-pixel Gaussian read noise.
    row_noise_adu : float
        Standard deviation of the per-row common-mode offset.
    hot_pixels : ndarray of int64, shape (k, 2)
        ``(row, col)`` of the hot pixels.
    electron_adu_mean : float
        Mean total signal of one electron in ADU (at gain 1).
    dose_per_frame : float
        Requested frame-mean dose, e/px/frame, of the frames with beam.
    params : dict
        The emulator parameters (JSON-serialisable).
    stem : dict or None
        4D-STEM mode only: the specimen's truth maps
        (:meth:`streamstore.camera.specimen.STEMSpecimen.truth`).
    """

    frame_shape: tuple[int, int]
    frame_ids: np.ndarray
    positions: list[np.ndarray]
    energies: list[np.ndarray]
    xray_positions: list[np.ndarray]
    dark: np.ndarray
    gain: np.ndarray
    read_noise_adu: float
    row_noise_adu: float
    hot_pixels: np.ndarray
    electron_adu_mean: float
    dose_per_frame: float
    params: dict[str, Any] = field(default_factory=dict)
    stem: dict[str, Any] | None = None

    @property
    def n_frames(self) -> int:
        """Number of frames described."""
        return len(self.positions)

    def counts(self) -> np.ndarray:
        """Number of true electrons in each frame, int64 array of shape (n,)."""
        return np.array([len(p) for p in self.positions], dtype=np.int64)

    def take(self, indices: np.ndarray | list[int], frame_ids: np.ndarray | None = None) -> Truth:
        """Truth of the frames ``indices`` (repeats allowed), without copying them.

        Parameters
        ----------
        indices : array_like of int
            Positions of the frames in this truth.
        frame_ids : array_like of int, optional
            Frame ids to record instead of the selected ones (e.g. the ids the
            frames were sent with when a pool is cycled).
        """
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < -self.n_frames or idx.max() >= self.n_frames):
            raise IndexError(f"indices: out of range for {self.n_frames} frames")
        ids = self.frame_ids[idx] if frame_ids is None else np.asarray(frame_ids, dtype=np.int64)
        if ids.shape != idx.shape:
            raise ValueError(f"frame_ids: shape {ids.shape} does not match indices {idx.shape}")
        return Truth(
            frame_shape=self.frame_shape,
            frame_ids=ids,
            positions=[self.positions[i] for i in idx],
            energies=[self.energies[i] for i in idx],
            xray_positions=[self.xray_positions[i] for i in idx],
            dark=self.dark,
            gain=self.gain,
            read_noise_adu=self.read_noise_adu,
            row_noise_adu=self.row_noise_adu,
            hot_pixels=self.hot_pixels,
            electron_adu_mean=self.electron_adu_mean,
            dose_per_frame=self.dose_per_frame,
            params=dict(self.params),
        )

    def save(self, path: str | Path) -> None:
        """Write the truth to an HDF5 file (flat CSR layout, see ``docs/protocol.md``)."""
        import h5py

        def flat(parts: list[np.ndarray], width: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
            offsets = np.zeros(len(parts) + 1, dtype=np.int64)
            offsets[1:] = np.cumsum([len(p) for p in parts])
            if parts and offsets[-1]:
                data = np.concatenate(parts).astype(dtype, copy=False)
            else:
                data = np.zeros((0, width) if width else (0,), dtype=dtype)
            return data, offsets

        pos, pos_off = flat(self.positions, 2, "float64")
        eng, _ = flat(self.energies, 0, "float32")
        xr, xr_off = flat(self.xray_positions, 2, "int64")
        with h5py.File(path, "w") as f:
            f.attrs["format"] = _TRUTH_FORMAT
            f.attrs["version"] = _TRUTH_VERSION
            f.attrs["frame_shape"] = np.asarray(self.frame_shape, dtype=np.int64)
            f.attrs["read_noise_adu"] = float(self.read_noise_adu)
            f.attrs["row_noise_adu"] = float(self.row_noise_adu)
            f.attrs["electron_adu_mean"] = float(self.electron_adu_mean)
            f.attrs["dose_per_frame"] = float(self.dose_per_frame)
            f.attrs["params"] = json.dumps(self.params)
            f["frame_ids"] = self.frame_ids
            f["positions"] = pos
            f["energies"] = eng
            f["offsets"] = pos_off
            f["xray_positions"] = xr
            f["xray_offsets"] = xr_off
            f.create_dataset("dark", data=self.dark, compression="gzip", compression_opts=1)
            f.create_dataset("gain", data=self.gain, compression="gzip", compression_opts=1)
            f["hot_pixels"] = self.hot_pixels
            if self.stem is not None:
                g = f.create_group("stem")
                for k, v in self.stem.items():
                    g[k] = v

    @classmethod
    def load(cls, path: str | Path) -> Truth:
        """Read a truth written by :meth:`save`."""
        import h5py

        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != _TRUTH_FORMAT:
                from streamstore.errors import FormatError

                raise FormatError(f"{path}: not an emulator truth file (attribute 'format')")
            pos_off = f["offsets"][()]
            xr_off = f["xray_offsets"][()]
            pos = f["positions"][()]
            eng = f["energies"][()]
            xr = f["xray_positions"][()]
            return cls(
                frame_shape=tuple(int(v) for v in f.attrs["frame_shape"]),
                frame_ids=f["frame_ids"][()],
                positions=[pos[a:b] for a, b in zip(pos_off[:-1], pos_off[1:], strict=True)],
                energies=[eng[a:b] for a, b in zip(pos_off[:-1], pos_off[1:], strict=True)],
                xray_positions=[xr[a:b] for a, b in zip(xr_off[:-1], xr_off[1:], strict=True)],
                dark=f["dark"][()],
                gain=f["gain"][()],
                read_noise_adu=float(f.attrs["read_noise_adu"]),
                row_noise_adu=float(f.attrs["row_noise_adu"]),
                hot_pixels=f["hot_pixels"][()],
                electron_adu_mean=float(f.attrs["electron_adu_mean"]),
                dose_per_frame=float(f.attrs["dose_per_frame"]),
                params=json.loads(f.attrs["params"]),
                stem={k: v[()] for k, v in f["stem"].items()} if "stem" in f else None,
            )
