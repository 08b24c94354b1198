"""Sets of integer ids kept as sorted, disjoint, half-open ranges.

Missing frame ids come in runs: a jump from frame 0 to frame 10,000,000
makes 9,999,999 ids missing at once. :class:`IdRanges` keeps such a run as
one ``[start, stop)`` pair, so its memory depends on the number of runs, not
on the number of ids. Ids added in ascending order (the usual case) cost one
comparison each.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator

import numpy as np

__all__ = ["IdRanges", "ranges_of_ids", "format_ranges"]


class IdRanges:
    """A set of non-negative integer ids stored as ``[start, stop)`` ranges.

    Parameters
    ----------
    ranges : iterable of (int, int), optional
        Initial ranges (any order, may overlap or touch).

    Examples
    --------
    >>> r = IdRanges([(1, 10_000_000)])
    >>> r.add(10_000_000, 10_000_002)
    [(10000000, 10000002)]
    >>> r.n_ids, len(r), 5 in r
    (10000001, 1, True)
    """

    __slots__ = ("_starts", "_stops", "n_ids")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._stops: list[int] = []
        #: number of ids in the set
        self.n_ids = 0
        for a, b in ranges:
            self.add(a, b)

    def __len__(self) -> int:
        """Number of ranges."""
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self._starts, self._stops, strict=True)

    def __contains__(self, i: object) -> bool:
        if not isinstance(i, int | np.integer):
            return False
        k = bisect_right(self._starts, int(i)) - 1
        return k >= 0 and int(i) < self._stops[k]

    def __repr__(self) -> str:
        return f"IdRanges({format_ranges(list(self))}, n_ids={self.n_ids})"

    def overlaps(self, start: int, stop: int) -> bool:
        """True if any id of ``[start, stop)`` is in the set."""
        k = bisect_left(self._stops, start + 1)  # first range ending after start
        return k < len(self._starts) and self._starts[k] < stop

    def add(self, start: int, stop: int) -> list[tuple[int, int]]:
        """Add the ids ``[start, stop)``; return the pieces that were not in the set yet."""
        start, stop = int(start), int(stop)
        if stop <= start:
            return []
        st, sp = self._starts, self._stops
        if not st or start > sp[-1]:  # ascending: append
            st.append(start)
            sp.append(stop)
            self.n_ids += stop - start
            return [(start, stop)]
        if start >= st[-1]:  # overlaps or touches the last range only
            new = [(max(start, sp[-1]), stop)] if stop > sp[-1] else []
            if stop > sp[-1]:
                self.n_ids += stop - sp[-1]
                sp[-1] = stop
            return new
        i = bisect_left(sp, start)  # first range that ends at or after start
        j = bisect_right(st, stop)  # ranges before j start at or before stop
        new: list[tuple[int, int]] = []
        pos = start
        for k in range(i, j):
            if st[k] > pos:
                new.append((pos, min(st[k], stop)))
            pos = max(pos, sp[k])
        if pos < stop:
            new.append((pos, stop))
        if i < j:
            start, stop = min(start, st[i]), max(stop, sp[j - 1])
        st[i:j] = [start]
        sp[i:j] = [stop]
        self.n_ids += sum(b - a for a, b in new)
        return new

    def add_ids(self, ids: Iterable[int]) -> list[tuple[int, int]]:
        """Add single ids; return the new pieces (as :meth:`add`)."""
        new: list[tuple[int, int]] = []
        for a, b in ranges_of_ids(ids):
            new.extend(self.add(a, b))
        return new

    def as_array(self) -> np.ndarray:
        """The ranges as an ``(n, 2)`` int64 array of ``[start, stop)`` rows."""
        out = np.empty((len(self._starts), 2), np.int64)
        out[:, 0] = self._starts
        out[:, 1] = self._stops
        return out

    def ids(self) -> np.ndarray:
        """Every id, ascending (int64; as large as the set: mind huge ranges)."""
        if not self._starts:
            return np.zeros(0, np.int64)
        return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in self])


def ranges_of_ids(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Runs of consecutive ids as ``[start, stop)`` pairs (input sorted and deduplicated)."""
    arr = np.unique(np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, np.int64))
    if arr.size == 0:
        return []
    cut = np.flatnonzero(np.diff(arr) != 1) + 1
    starts = arr[np.r_[0, cut]]
    stops = arr[np.r_[cut - 1, arr.size - 1]] + 1
    return list(zip(starts.tolist(), stops.tolist(), strict=True))


def format_ranges(ranges: list[tuple[int, int]], limit: int = 8) -> str:
    """Compact text of ranges for log lines: ``"3, 7-9, 12"``."""
    if not ranges:
        return "none"
    parts = [f"{a}" if b == a + 1 else f"{a}-{b - 1}" for a, b in ranges[:limit]]
    if len(ranges) > limit:
        n = sum(b - a for a, b in ranges)
        parts.append(f"... ({n} ids in {len(ranges)} ranges)")
    return ", ".join(parts)
