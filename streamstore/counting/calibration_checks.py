"""Checks of what a calibration is built from: its (H, W) maps and stacks of frames.

Shared by :mod:`~streamstore.counting.calibration` and the estimators of
:mod:`~streamstore.counting.calibration_estimate`, which build calibrations
without importing the class's module.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_map", "check_frames", "frozen"]


def as_map(name: str, value: Any, shape: tuple[int, int] | None, dtype: Any) -> np.ndarray:
    """``value`` as a frozen (H, W) map of ``dtype`` (``bool``: a mask), checked.

    Raises
    ------
    ValueError
        When it is not 2-d, not of ``shape`` (when given) or not of a fitting type.
    """
    arr = np.asarray(value)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-d (H, W) map, got shape {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected the frame shape {shape}")
    if dtype is bool:
        if arr.dtype != np.bool_:
            raise ValueError(f"{name} must be a boolean map, got dtype {arr.dtype}")
        return frozen(arr, np.bool_)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    return frozen(arr, dtype)


def frozen(arr: np.ndarray, dtype: Any) -> np.ndarray:
    """``arr`` as a read-only C-contiguous array of ``dtype`` that nobody can write to.

    What is derived from a calibration's maps is cached with it, so the maps must
    not change: an array that is read-only all the way down (another
    calibration's map) is shared, anything else is copied and the copy frozen.
    """
    out = np.ascontiguousarray(arr, dtype=dtype)
    if out is arr or out.base is not None:  # not a fresh copy made just now
        base: Any = out
        while isinstance(base, np.ndarray) and not base.flags.writeable:
            base = base.base
        if base is None or isinstance(base, bytes):
            return out
        out = out.copy()
    out.flags.writeable = False
    return out


def check_frames(name: str, frames: Any, min_frames: int) -> np.ndarray:
    """``frames`` as an (n, H, W) numeric array of at least ``min_frames`` frames.

    Raises
    ------
    ValueError
        When the stack has the wrong number of dimensions, type or size.
    """
    arr = np.asarray(frames)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{name} must be (n, H, W) or (H, W), got shape {arr.shape}")
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.shape[0] < min_frames:
        raise ValueError(f"{name} needs at least {min_frames} frames, got {arr.shape[0]}")
    if arr.shape[1] < 1 or arr.shape[2] < 1:
        raise ValueError(f"{name} frames are empty: shape {arr.shape}")
    return arr
