"""A calibration's file: the ``calibration`` group of an HDF5 file.

The bodies of :meth:`Calibration.save
<streamstore.counting.calibration.Calibration.save>` and
:meth:`~streamstore.counting.calibration.Calibration.load` (documented
there). :func:`load` is handed the class to build, so this module never imports
:mod:`~streamstore.counting.calibration`, which delegates here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from streamstore.counting.calibration import Calibration

__all__ = ["load", "read", "save"]

#: Version of the file layout :func:`save` writes; :func:`load` refuses newer ones.
_FORMAT_VERSION = 1


def save(cal: Calibration, path: str | Path) -> None:
    """Write ``cal`` to an HDF5 file at ``path`` (overwrites it)."""
    import h5py

    with h5py.File(path, "w") as f:
        g = f.create_group("calibration")
        g.attrs["format"] = "streamstore.counting.calibration"
        g.attrs["version"] = _FORMAT_VERSION
        g.attrs["n_sigma"] = cal.n_sigma
        g.attrs["xray_threshold"] = np.nan if cal.xray_threshold is None else cal.xray_threshold
        g.attrs["xray_radius"] = cal.xray_radius
        g.attrs["wrapped"] = cal.wrapped
        g.attrs["origin"] = cal.source
        g.create_dataset("dark", data=cal.dark, compression="gzip", shuffle=True)
        g.create_dataset("noise", data=cal.noise, compression="gzip", shuffle=True)
        if cal.gain is not None:
            g.create_dataset("gain", data=cal.gain, compression="gzip", shuffle=True)
        if cal.mask is not None:
            g.create_dataset("mask", data=cal.mask, compression="gzip")


def load(cls: type[Calibration], path: str | Path) -> Calibration:
    """Read a calibration written by :func:`save` as a ``cls`` with ``source == "file"``.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    FormatError
        When the file holds no streamstore calibration.
    """
    fields = read(path)
    return cls(fields.pop("dark"), fields.pop("noise"), **fields, source="file")


def read(path: str | Path) -> dict[str, Any]:
    """The maps and scalars of a calibration file, as ``Calibration``'s arguments
    (``dark``, ``noise``, ``gain``, ``mask``, ``n_sigma``, ...), unchecked.

    Raises
    ------
    FileNotFoundError, FormatError
        As :func:`load`.
    """
    import h5py

    from streamstore.errors import FormatError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"calibration file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise FormatError(f"{path} is not an HDF5 file: {exc}") from None
    with f:
        g = f.get("calibration")
        if g is None or g.attrs.get("format") != "streamstore.counting.calibration":
            raise FormatError(f"{path} holds no streamstore calibration")
        version = int(g.attrs["version"])
        if version > _FORMAT_VERSION:
            raise FormatError(
                f"{path}: calibration format version {version} is newer than this reader"
            )
        xt = float(g.attrs["xray_threshold"])
        return {
            "dark": g["dark"][()],
            "noise": g["noise"][()],
            "gain": g["gain"][()] if "gain" in g else None,
            "mask": g["mask"][()] if "mask" in g else None,
            "n_sigma": float(g.attrs["n_sigma"]),
            "xray_threshold": None if math.isnan(xt) else xt,
            "xray_radius": int(g.attrs["xray_radius"]),
            "wrapped": bool(g.attrs["wrapped"]),
        }
