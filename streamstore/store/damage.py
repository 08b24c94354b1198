"""Damaged frames of a store: found when opened or read, refused by every read.

A frame whose per-frame data failed its check when the file was opened, or
whose events lie in a chunk that fails its checksum when read, is damaged:
reading it raises :class:`~streamstore.errors.CorruptDataError` naming the
frames and why, while reads that do not touch it still work.
:class:`DamageChecks` gives :class:`~streamstore.store.reader.Store` these
checks; ``streamstore verify`` (:mod:`streamstore.store.verify`) reads the
whole file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from streamstore.errors import CorruptDataError
from streamstore.store._chunkio import BadChunk, ChunkReader, format_ranges, true_ranges

__all__ = ["DamageChecks"]


class DamageChecks:
    """The damage checks of a store's reads (a mixin of the readers).

    Uses the reader's ``path``, ``n_frames``, ``_ids``, ``_starts``,
    ``_counts``, ``_damaged`` (bool per frame) and ``_damage_why``
    (``(lo, hi, reason)`` per damaged range).
    """

    path: Path
    _ids: np.ndarray
    _starts: np.ndarray
    _counts: np.ndarray
    _damaged: np.ndarray
    _damage_why: list[tuple[int, int, str]]

    @property
    def damaged_frames(self) -> list[tuple[int, int]]:
        """Frames whose per-frame data failed its check, as ``(start, stop)`` ranges.

        Found when the file is opened; reading them raises
        :class:`~streamstore.CorruptDataError` (their ``frame_ids`` read -1).
        Damage inside event chunks is found when read, or by ``streamstore verify``.
        """
        return true_ranges(self._damaged)

    def _corrupt(self, frames: np.ndarray, reasons: Sequence[str]) -> CorruptDataError:
        mask = np.zeros(self.n_frames, bool)
        mask[frames] = True
        ranges = true_ranges(mask)
        ids = self._ids[frames]
        id_text = (
            f" (frame ids {int(ids.min())}..{int(ids.max())})"
            if ids.size and ids.min() >= 0
            else ""
        )
        why = "; ".join(dict.fromkeys(reasons))
        return CorruptDataError(
            f"frames {format_ranges(ranges)}{id_text} of {self.path} are damaged ({why}); "
            "reads that do not touch them still work",
            ranges,
            str(self.path),
        )

    def _check_damaged(self, sel: np.ndarray) -> None:
        """Raise if any frame of ``sel`` has damaged per-frame data."""
        if not self._damage_why or sel.size == 0:
            return
        hit = sel[self._damaged[sel]]
        if hit.size:
            reasons = [r for lo, hi, r in self._damage_why if np.any((hit >= lo) & (hit < hi))]
            raise self._corrupt(hit, reasons)

    def _read_checked(
        self,
        reader: ChunkReader,
        a: int,
        starts: np.ndarray,
        counts: np.ndarray,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Read the slots of frames ``(a + starts, counts)``; raise if one lies in a bad chunk.

        A bad chunk that only holds slots of frames not asked for (padding, or
        frames skipped by a selection) does not stop the read.
        """
        b = int(a + starts[-1] + counts[-1]) if starts.size else a
        bad: list[BadChunk] = []
        data = reader.read(a, b, out=out, bad=bad)
        if bad:
            s_abs = starts + a
            e_abs = s_abs + counts
            hit = np.zeros(starts.size, bool)
            reasons = []
            for chunk in bad:
                m = (counts > 0) & (s_abs < chunk.hi) & (e_abs > chunk.lo)
                if m.any():
                    hit |= m
                    reasons.append(chunk.reason)
            if hit.any():
                # frames with events have distinct ends: find their indices by them
                frames = np.searchsorted(self._starts + self._counts, e_abs[hit], side="left")
                raise self._corrupt(frames, reasons)
        return data
