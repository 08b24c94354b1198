"""Per-series frame-id accounting and the reorder window.

A :class:`FrameTracker` decides, for every image of a series, whether it is
stored, held back to restore frame-id order, dropped as a duplicate, or too
late to be stored in order. It never touches frames itself: the caller hands
it opaque items and gets back the items that are ready, in ascending frame-id
order, together with the frame ids that are now known to be missing.

Rules (the same for every series):

* ids are expected from 0 upwards; ``next_id`` is the lowest id not yet
  released or declared missing;
* an id equal to ``next_id`` is released at once, with any consecutive held
  ids after it;
* a higher id is held; when more than ``window`` ids are held (or the caller
  asks, e.g. under memory pressure) the lowest held id is released and the
  gap before it is declared missing;
* an id below ``next_id`` is a duplicate if it was released before, or *late*
  if its id had been declared missing (it cannot be stored in order any more);
  an id already held is a duplicate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from streamstore.idranges import IdRanges, format_ranges

__all__ = ["Offer", "FrameTracker", "missing_ranges"]

ACCEPTED = "accepted"
DUPLICATE = "duplicate"
LATE = "late"


@dataclass
class Offer:
    """The outcome of :meth:`FrameTracker.offer`.

    Attributes
    ----------
    verdict : str
        ``"accepted"`` (released or held), ``"duplicate"`` or ``"late"``.
    ready : list of (int, object)
        Items now ready to store, ascending frame id.
    missing : list of (int, int)
        Frame ids declared missing by this call, as ascending ``[start, stop)``
        ranges (a jump of ten million ids is one pair).
    """

    verdict: str
    ready: list[tuple[int, Any]] = field(default_factory=list)
    missing: list[tuple[int, int]] = field(default_factory=list)

    @property
    def n_missing(self) -> int:
        """Number of ids in :attr:`missing`."""
        return sum(b - a for a, b in self.missing)


class FrameTracker:
    """Reorder window and frame-id accounting of one series.

    Parameters
    ----------
    window : int, default 64
        Largest number of frames held back waiting for a lower id (>= 0;
        0 stores frames in arrival order and declares any gap missing at once).

    Raises
    ------
    ValueError
        If ``window`` is negative.
    """

    def __init__(self, window: int = 64) -> None:
        if window < 0:
            raise ValueError(f"reorder window must be >= 0 frames, got {window}")
        self.window = int(window)
        self.next_id = 0
        self._held: dict[int, Any] = {}
        self._missing = IdRanges()
        self.received = 0
        self.released = 0
        self.duplicate = 0
        self.late = 0
        self.max_id = -1

    # -- state ---------------------------------------------------------------
    @property
    def n_held(self) -> int:
        """Number of frames held back in the window."""
        return len(self._held)

    @property
    def n_missing(self) -> int:
        """Number of frame ids declared missing so far."""
        return self._missing.n_ids

    @property
    def missing(self) -> IdRanges:
        """Frame ids declared missing so far (ranges; do not modify)."""
        return self._missing

    @property
    def missing_ids(self) -> list[int]:
        """Frame ids declared missing so far, ascending (expanded: mind huge gaps)."""
        return self._missing.ids().tolist()

    def held_items(self) -> list[Any]:
        """The items currently held (e.g. to release their memory)."""
        return list(self._held.values())

    # -- transitions -----------------------------------------------------------
    def offer(self, frame_id: int, item: Any) -> Offer:
        """Account for one received image.

        Parameters
        ----------
        frame_id : int
            The image's frame id (>= 0).
        item : object
            Whatever the caller wants back when the frame is ready.

        Returns
        -------
        Offer
        """
        if frame_id < 0:
            raise ValueError(f"frame_id must be >= 0, got {frame_id}")
        self.received += 1
        if frame_id < self.next_id:
            if frame_id in self._missing:
                self.late += 1
                return Offer(LATE)
            self.duplicate += 1
            return Offer(DUPLICATE)
        if frame_id in self._held:
            self.duplicate += 1
            return Offer(DUPLICATE)
        self.max_id = max(self.max_id, frame_id)
        out = Offer(ACCEPTED)
        if frame_id == self.next_id:
            out.ready.append((frame_id, item))
            self.next_id += 1
            self.released += 1
            self._release_consecutive(out)
        else:
            self._held[frame_id] = item
            while len(self._held) > self.window:
                self._release_lowest(out)
        return out

    def release_lowest(self) -> Offer:
        """Release the lowest held frame now (e.g. under memory pressure)."""
        out = Offer(ACCEPTED)
        if self._held:
            self._release_lowest(out)
        return out

    def finish(self, n_expected: int | None = None) -> Offer:
        """Release everything held and declare the remaining gaps missing.

        Parameters
        ----------
        n_expected : int, optional
            Frame ids ``0 .. n_expected - 1`` are expected (from the sender's
            ``end`` or ``start``); ids up to the highest one seen always are.

        Returns
        -------
        Offer
            The released items and every id newly declared missing.
        """
        out = Offer(ACCEPTED)
        while self._held:
            self._release_lowest(out)
        stop = max(self.next_id, int(n_expected or 0))
        if stop > self.next_id:
            out.missing.extend(self._missing.add(self.next_id, stop))
            self.next_id = stop
        return out

    # -- internals ---------------------------------------------------------------
    def _release_lowest(self, out: Offer) -> None:
        low = min(self._held)
        out.missing.extend(self._missing.add(self.next_id, low))
        out.ready.append((low, self._held.pop(low)))
        self.released += 1
        self.next_id = low + 1
        self._release_consecutive(out)

    def _release_consecutive(self, out: Offer) -> None:
        while self.next_id in self._held:
            out.ready.append((self.next_id, self._held.pop(self.next_id)))
            self.released += 1
            self.next_id += 1


def missing_ranges(ranges: list[tuple[int, int]]) -> str:
    """Compact text of ``[start, stop)`` ranges for log lines: ``"3, 7-9, 12"``."""
    return format_ranges(ranges)
