"""The event batch: electrons found in a run of frames, in CSR layout.

An :class:`EventBatch` is what counting produces and what the store writes and
reads. Frame ``i`` holds the events ``indices[offsets[i]:offsets[i + 1]]``;
each index is the flat pixel index ``row * W + col`` and indices ascend within
a frame. The optional ``subpixel`` array is aligned with ``indices``: bits 2-3
hold the row quarter and bits 0-1 the column quarter of the position inside
the pixel (a 4 x 4 grid, as EER does), i.e. ``subpixel = (qy << 2) | qx``.
The optional ``electrons`` array holds one float64 per frame: the electrons
estimated to have arrived, corrected for coincidence loss
(:mod:`streamstore.counting.dose`); None where no correction was made.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["EventBatch", "FrameEvents"]


@dataclass(frozen=True)
class FrameEvents:
    """The events of one frame.

    Attributes
    ----------
    indices : ndarray of uint32
        Flat pixel indices ``row * W + col``, ascending.
    subpixel : ndarray of uint8 or None
        ``(qy << 2) | qx`` per event, or None.
    frame_shape : tuple of int
        ``(H, W)``.
    """

    indices: np.ndarray
    subpixel: np.ndarray | None
    frame_shape: tuple[int, int]

    @property
    def rows(self) -> np.ndarray:
        """Row of each event (int64)."""
        return self.indices.astype(np.int64) // self.frame_shape[1]

    @property
    def cols(self) -> np.ndarray:
        """Column of each event (int64)."""
        return self.indices.astype(np.int64) % self.frame_shape[1]

    def positions(self) -> np.ndarray:
        """Event positions ``(n, 2)`` as float (y, x) in pixels.

        Pixel ``(r, c)`` covers ``[r, r + 1) x [c, c + 1)``. Without sub-pixel
        data the position is the pixel centre; with it, the centre of the
        4 x 4 sub-cell.
        """
        y = self.rows.astype(np.float64)
        x = self.cols.astype(np.float64)
        if self.subpixel is None:
            return np.stack([y + 0.5, x + 0.5], axis=1)
        qy = (self.subpixel >> 2) & 3
        qx = self.subpixel & 3
        return np.stack([y + (qy + 0.5) / 4.0, x + (qx + 0.5) / 4.0], axis=1)

    def __len__(self) -> int:
        return int(self.indices.size)


class EventBatch:
    """Electron events of ``n`` frames in compressed sparse row layout.

    Parameters
    ----------
    offsets : array_like of int64, shape (n + 1,)
        ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == len(indices)``.
    indices : array_like of uint32
        Flat pixel index ``row * W + col`` of each event, ascending within a
        frame and ``< H * W``.
    subpixel : array_like of uint8, optional
        Sub-pixel cell ``(qy << 2) | qx`` of each event (values 0-15), aligned
        with ``indices``.
    frame_shape : tuple of int
        ``(H, W)`` of the frames the events came from.
    electrons : array_like of float64, optional
        Per frame, the electrons estimated to have arrived (the event count
        corrected for coincidence loss, :mod:`streamstore.counting.dose`);
        None: no correction made.
    validate : bool, default True
        Check the invariants above (O(n_events)); internal producers that
        guarantee them may pass False.

    Raises
    ------
    ValueError
        When an invariant does not hold; the message names it.
    """

    __slots__ = ("offsets", "indices", "subpixel", "frame_shape", "electrons")

    def __init__(
        self,
        offsets: np.ndarray,
        indices: np.ndarray,
        subpixel: np.ndarray | None = None,
        frame_shape: tuple[int, int] | None = None,
        *,
        electrons: np.ndarray | None = None,
        validate: bool = True,
    ) -> None:
        if frame_shape is None:
            raise ValueError("EventBatch needs frame_shape=(H, W)")
        shape = tuple(int(s) for s in frame_shape)
        if len(shape) != 2 or shape[0] <= 0 or shape[1] <= 0:
            raise ValueError(f"frame_shape must be two positive ints (H, W), got {frame_shape!r}")
        self.frame_shape: tuple[int, int] = (shape[0], shape[1])
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        self.indices = np.ascontiguousarray(indices, dtype=np.uint32)
        self.subpixel = None if subpixel is None else np.ascontiguousarray(subpixel, np.uint8)
        self.electrons = (
            None if electrons is None else np.ascontiguousarray(electrons, dtype=np.float64)
        )
        if self.electrons is not None and self.electrons.shape != (self.offsets.size - 1,):
            raise ValueError(
                f"electrons must hold one value per frame ({self.offsets.size - 1}), "
                f"got shape {self.electrons.shape}"
            )
        if validate:
            self._validate(offsets, indices)

    def _validate(self, offsets_in: object, indices_in: object) -> None:
        off, idx = self.offsets, self.indices
        if off.ndim != 1 or off.size < 1:
            raise ValueError("offsets must be a 1-d array of n_frames + 1 values")
        if off[0] != 0:
            raise ValueError(f"offsets[0] must be 0, got {off[0]}")
        if off.size > 1 and np.any(np.diff(off) < 0):
            raise ValueError("offsets must be non-decreasing")
        if idx.ndim != 1 or off[-1] != idx.size:
            raise ValueError(
                f"offsets[-1] ({off[-1]}) must equal the number of indices ({idx.size})"
            )
        raw = np.asarray(indices_in)
        if raw.size and raw.dtype.kind in "iu" and (raw.min() < 0):
            raise ValueError("indices must be >= 0")
        npix = self.frame_shape[0] * self.frame_shape[1]
        if idx.size and int(idx.max()) >= npix:
            raise ValueError(f"indices must be < H * W = {npix}, got {int(idx.max())}")
        if idx.size > 1:
            d = np.diff(idx.astype(np.int64))
            # a decrease is allowed only where a new frame starts
            bad = np.flatnonzero(d <= 0) + 1
            if bad.size:
                starts = np.zeros(idx.size, dtype=bool)
                inner = off[1:-1]
                starts[inner[inner < idx.size]] = True
                if not np.all(starts[bad]):
                    raise ValueError("indices must be strictly ascending within each frame")
        if self.subpixel is not None:
            if self.subpixel.shape != idx.shape:
                raise ValueError("subpixel must have one value per event")
            if self.subpixel.size and int(self.subpixel.max()) > 15:
                raise ValueError("subpixel values must be in 0..15 ((qy << 2) | qx)")

    # -- shape -----------------------------------------------------------
    @property
    def n_frames(self) -> int:
        """Number of frames in the batch."""
        return int(self.offsets.size - 1)

    @property
    def n_events(self) -> int:
        """Total number of events."""
        return int(self.indices.size)

    @property
    def counts(self) -> np.ndarray:
        """Events per frame (int64, length ``n_frames``)."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return self.n_frames

    # -- access ----------------------------------------------------------
    def frame(self, i: int) -> FrameEvents:
        """Events of frame ``i`` (negative indices count from the end)."""
        n = self.n_frames
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"frame {i} out of range for a batch of {n} frames")
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        sub = None if self.subpixel is None else self.subpixel[a:b]
        return FrameEvents(self.indices[a:b], sub, self.frame_shape)

    def __getitem__(self, i: int) -> FrameEvents:
        return self.frame(i)

    def __iter__(self) -> Iterator[FrameEvents]:
        for i in range(self.n_frames):
            yield self.frame(i)

    def slice(self, start: int, stop: int) -> EventBatch:
        """A batch of frames ``start:stop`` (views, no copy of events)."""
        start, stop, _ = slice(start, stop).indices(self.n_frames)
        stop = max(stop, start)
        a, b = int(self.offsets[start]), int(self.offsets[stop])
        sub = None if self.subpixel is None else self.subpixel[a:b]
        el = None if self.electrons is None else self.electrons[start:stop]
        return EventBatch(
            self.offsets[start : stop + 1] - a,
            self.indices[a:b],
            sub,
            self.frame_shape,
            electrons=el,
            validate=False,
        )

    def with_electrons(self, electrons: np.ndarray | None) -> EventBatch:
        """The same events with ``electrons`` (one float64 per frame, or None); no copy."""
        return EventBatch(
            self.offsets,
            self.indices,
            self.subpixel,
            self.frame_shape,
            electrons=electrons,
            validate=False,
        )

    @classmethod
    def concatenate(cls, batches: list[EventBatch]) -> EventBatch:
        """Join batches of the same frame shape, frame after frame."""
        if not batches:
            raise ValueError("concatenate needs at least one batch")
        shape = batches[0].frame_shape
        if any(b.frame_shape != shape for b in batches):
            raise ValueError("cannot concatenate batches of different frame shapes")
        has_sub = [b.subpixel is not None for b in batches]
        if any(has_sub) and not all(has_sub):
            raise ValueError("cannot concatenate batches with and without sub-pixel data")
        offs = [np.zeros(1, np.int64)]
        base = 0
        for b in batches:
            offs.append(b.offsets[1:] + base)
            base += b.n_events
        sub = np.concatenate([b.subpixel for b in batches]) if all(has_sub) else None
        has_el = [b.electrons is not None for b in batches]
        if any(has_el) and not all(has_el):
            raise ValueError("cannot concatenate batches with and without electrons")
        el = np.concatenate([b.electrons for b in batches]) if all(has_el) else None
        return cls(
            np.concatenate(offs),
            np.concatenate([b.indices for b in batches]),
            sub,
            shape,
            electrons=el,
            validate=False,
        )

    @classmethod
    def empty(
        cls, n_frames: int, frame_shape: tuple[int, int], subpixel: bool = False
    ) -> EventBatch:
        """A batch of ``n_frames`` frames without events."""
        return cls(
            np.zeros(n_frames + 1, np.int64),
            np.zeros(0, np.uint32),
            np.zeros(0, np.uint8) if subpixel else None,
            frame_shape,
            validate=False,
        )

    def to_dense(self, dtype: np.dtype | type = np.uint16) -> np.ndarray:
        """Dense count frames ``(n, H, W)``."""
        h, w = self.frame_shape
        out = np.zeros((self.n_frames, h * w), dtype=dtype)
        frame_of = np.repeat(np.arange(self.n_frames), self.counts)
        np.add.at(out, (frame_of, self.indices.astype(np.intp)), 1)
        return out.reshape(self.n_frames, h, w)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EventBatch):
            return NotImplemented
        if self.frame_shape != other.frame_shape:
            return False
        if (self.subpixel is None) != (other.subpixel is None):
            return False
        same = np.array_equal(self.offsets, other.offsets) and np.array_equal(
            self.indices, other.indices
        )
        if same and self.subpixel is not None:
            same = np.array_equal(self.subpixel, other.subpixel)
        # the events only: ``electrons`` is an estimate made from them, compared apart
        return bool(same)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        sub = ", subpixel" if self.subpixel is not None else ""
        el = "" if self.electrons is None else f", electrons={float(self.electrons.sum()):.1f}"
        return (
            f"EventBatch(n_frames={self.n_frames}, n_events={self.n_events}, "
            f"frame_shape={self.frame_shape}{sub}{el})"
        )
