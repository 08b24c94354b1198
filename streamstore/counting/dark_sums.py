"""Per-pixel running sums of dark frames, for a calibration in memory independent of their number.

:class:`DarkSums` keeps two float64 maps, the sum of the values and the sum of
their squares, and folds in one frame (or one block of frames) at a time, so a
dark series of any length costs 16 bytes per pixel (377 MB at 4092 x 5760)
plus a few MB of temporaries. ``Calibration.from_dark_frames`` reads its mean
and variance from here whether it is given an array or an iterator of frames.

The sums are exact for integer frames while the sum of squares stays below
2**53 (for 16-bit frames: up to two million frames), so the calibration does
not depend on how the frames are grouped: an iterator of uint16 frames gives
exactly the calibration of the stacked array. For float frames the grouping
changes only the float64 rounding of the sums.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["DarkSums"]

#: float64 values per temporary block while folding frames in (8 MB).
_BLOCK_VALUES = 1 << 20


class DarkSums:
    """Running per-pixel sums of dark frames.

    Parameters
    ----------
    name : str, default "dark_frames"
        How error messages name the frames.

    Attributes
    ----------
    n : int
        Frames folded in so far.
    frame_shape : tuple of int or None
        ``(H, W)`` once a frame was added.
    """

    def __init__(self, name: str = "dark_frames") -> None:
        self.name = name
        self.n = 0
        self.frame_shape: tuple[int, int] | None = None
        self._s1: np.ndarray | None = None
        self._s2: np.ndarray | None = None

    @classmethod
    def of(cls, frames: Any, name: str = "dark_frames") -> DarkSums:
        """Sums of ``frames``: an ``(n, H, W)`` array, an iterable of ``(H, W)`` frames, or sums.

        Lists and tuples are stacked as arrays; any other iterable (a generator,
        an HDF5 dataset) is read one item at a time, so only one frame is held.
        """
        if isinstance(frames, DarkSums):
            return frames
        sums = cls(name)
        if isinstance(frames, np.ndarray | list | tuple) or not isinstance(frames, Iterable):
            sums.add(frames)
        else:
            for frame in frames:
                sums.add(frame)
        return sums

    @property
    def nbytes(self) -> int:
        """Bytes held by the two sum maps."""
        return 0 if self._s1 is None else 2 * self._s1.nbytes

    def add(self, frames: Any) -> None:
        """Fold in one ``(H, W)`` frame or a block ``(k, H, W)`` of frames.

        Raises
        ------
        ValueError
            A frame that is not numeric, not 2-D, empty, or of another shape
            than the frames before it (the message names its index).
        """
        arr = np.asarray(frames)
        first = self.n
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise ValueError(
                f"{self.name}[{first}] must be an (H, W) frame or an (n, H, W) block, "
                f"got shape {arr.shape}"
            )
        if arr.dtype.kind not in "iuf":
            raise ValueError(f"{self.name}[{first}] must be numeric, got dtype {arr.dtype}")
        shape = (int(arr.shape[1]), int(arr.shape[2]))
        if shape[0] < 1 or shape[1] < 1:
            raise ValueError(f"{self.name} frames are empty: shape {arr.shape}")
        if self.frame_shape is None:
            self.frame_shape = shape
            self._s1 = np.zeros(shape, np.float64)
            self._s2 = np.zeros(shape, np.float64)
        elif shape != self.frame_shape:
            raise ValueError(
                f"{self.name}[{first}] has shape {shape}, expected {self.frame_shape} "
                "like the frames before it"
            )
        s1: np.ndarray = self._s1  # type: ignore[assignment]  # set with frame_shape
        s2: np.ndarray = self._s2  # type: ignore[assignment]
        n, (h, w) = arr.shape[0], shape
        if n == 1:
            # one frame: in row blocks, so the float64 temporaries stay small
            rows = max(1, _BLOCK_VALUES // w)
            for r in range(0, h, rows):
                block = arr[0, r : r + rows].astype(np.float64)
                s1[r : r + rows] += block
                np.square(block, out=block)
                s2[r : r + rows] += block
        else:
            step = max(1, (1 << 24) // (h * w))  # float64 blocks of <= 128 MB
            for i in range(0, n, step):
                block = arr[i : i + step].astype(np.float64)
                s1 += block.sum(axis=0)
                s2 += np.square(block).sum(axis=0)
        self.n += n

    def mean_and_variance(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-pixel mean and unbiased variance (float64); uses up the sums.

        Raises
        ------
        ValueError
            With fewer than 2 frames.
        """
        if self.n < 2 or self._s1 is None or self._s2 is None:
            raise ValueError(f"{self.name} needs at least 2 frames, got {self.n}")
        n = self.n
        # in place on the sums (same values as s1 / n and s2 / n - mean**2): at full
        # frame size every temporary map is 189 MB
        mean, var = self._s1, self._s2
        self._s1 = self._s2 = None
        mean /= n
        var /= n
        var -= mean * mean
        np.maximum(var, 0.0, out=var)
        var *= n / (n - 1)
        return mean, var
