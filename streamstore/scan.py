"""Scan geometry of a 4D-STEM series: which stored frame belongs to which probe position.

A scanned series rasters the probe row after row. Each row acquires
``cols + flyback`` positions (the last ``flyback`` are taken while the beam
flies back and are dropped), each position ``frames_per_position``
consecutive frames. The mapping uses the camera *frame id*, not the storage
position, so a lost frame leaves its position short of counts instead of
shifting every later position::

    p   = (frame_id - first_frame_id) // frames_per_position
    row = p // (cols + flyback)
    col = p %  (cols + flyback)        # col >= cols: flyback, dropped

Frames before ``first_frame_id`` or after the last row map to no position
(-1) and are left out of every scan analysis; :func:`scan_coverage` counts
the frames each position got, so nothing is dropped without a count.

In the file the geometry is four root attributes (``docs/format.md``, "Scan
geometry"); a file without them has no scan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from streamstore.errors import UserError

__all__ = ["ScanGeometry", "scan_positions"]

_ATTRS = ("scan_shape", "scan_frames_per_position", "scan_flyback", "scan_first_frame_id")


def _pos_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class ScanGeometry:
    """Where each frame of a scanned series was taken.

    Parameters
    ----------
    scan_shape : (rows, cols)
        Probe positions kept per scan (flyback positions excluded).
    frames_per_position : int, default 1
        Consecutive frames recorded at each position.
    flyback : int, default 0
        Positions at the end of every scan row that are recorded but dropped.
    first_frame_id : int or None, default None
        Frame id of the first frame of the scan. None: the lowest frame id of
        the series, stored or missing (resolved when a store is read).

    Raises
    ------
    UserError
        On a non-positive shape or count, or a negative flyback.
    """

    scan_shape: tuple[int, int]
    frames_per_position: int = 1
    flyback: int = 0
    first_frame_id: int | None = None

    def __post_init__(self) -> None:
        try:
            rows, cols = self.scan_shape
        except (TypeError, ValueError):
            raise UserError(f"scan_shape must be (rows, cols), got {self.scan_shape!r}") from None
        shape = (_pos_int("scan rows", rows, 1), _pos_int("scan cols", cols, 1))
        object.__setattr__(self, "scan_shape", shape)
        object.__setattr__(
            self,
            "frames_per_position",
            _pos_int("frames_per_position", self.frames_per_position, 1),
        )
        object.__setattr__(self, "flyback", _pos_int("flyback", self.flyback, 0))
        if self.first_frame_id is not None:
            object.__setattr__(
                self, "first_frame_id", _pos_int("first_frame_id", self.first_frame_id, 0)
            )

    @property
    def n_positions(self) -> int:
        """Positions kept (``rows * cols``)."""
        return self.scan_shape[0] * self.scan_shape[1]

    @property
    def n_frames(self) -> int:
        """Frames the whole scan records, flyback included."""
        rows, cols = self.scan_shape
        return rows * (cols + self.flyback) * self.frames_per_position

    def to_attrs(self) -> dict[str, Any]:
        """The root attributes that store this geometry in a streamstore file."""
        first = -1 if self.first_frame_id is None else self.first_frame_id
        return {
            "scan_shape": np.array(self.scan_shape, np.int64),
            "scan_frames_per_position": np.int64(self.frames_per_position),
            "scan_flyback": np.int64(self.flyback),
            "scan_first_frame_id": np.int64(first),
        }

    @classmethod
    def from_attrs(cls, attrs: Any) -> ScanGeometry | None:
        """The geometry in a file's root attributes, or None for a file without a scan."""
        if "scan_shape" not in attrs:
            return None
        first = int(attrs.get("scan_first_frame_id", -1))
        return cls(
            tuple(int(v) for v in attrs["scan_shape"]),  # type: ignore[arg-type]
            int(attrs.get("scan_frames_per_position", 1)),
            int(attrs.get("scan_flyback", 0)),
            None if first < 0 else first,
        )

    @classmethod
    def parse(cls, value: Any) -> ScanGeometry | None:
        """A geometry from a ScanGeometry, a dict of its fields, or None."""
        if value is None or isinstance(value, ScanGeometry):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {
                "scan_shape",
                "frames_per_position",
                "flyback",
                "first_frame_id",
            }
            if unknown:
                raise UserError(f"scan: unknown keys {sorted(unknown)}")
            return cls(**value)
        raise UserError(f"scan must be a ScanGeometry, a dict or None, got {type(value).__name__}")

    def resolved(self, frame_ids: np.ndarray, missing_ids: np.ndarray) -> ScanGeometry:
        """This geometry with ``first_frame_id`` fixed from a store's ids when it was None."""
        if self.first_frame_id is not None:
            return self
        lows = [int(a.min()) for a in (frame_ids, missing_ids) if a.size]
        first = min(lows, default=0)
        return ScanGeometry(self.scan_shape, self.frames_per_position, self.flyback, first)


def scan_positions(geometry: ScanGeometry, frame_ids: np.ndarray) -> np.ndarray:
    """Flat scan position (``row * cols + col``) of each frame id, -1 where none.

    ``geometry.first_frame_id`` must be resolved (see :meth:`ScanGeometry.resolved`).
    """
    if geometry.first_frame_id is None:
        raise UserError("scan_positions needs a resolved first_frame_id")
    rows, cols = geometry.scan_shape
    rel = np.asarray(frame_ids, np.int64) - geometry.first_frame_id
    p = rel // geometry.frames_per_position
    row = p // (cols + geometry.flyback)
    col = p - row * (cols + geometry.flyback)
    ok = (rel >= 0) & (row < rows) & (col < cols)
    return np.where(ok, row * cols + col, -1).astype(np.int64)
