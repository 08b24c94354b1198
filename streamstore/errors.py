"""Exceptions shared across streamstore.

:class:`UserError` is for problems a person can fix (a wrong path, a range
outside the series, a missing pixel size): the CLI prints its message as one
sentence and exits with status 2.
"""

from __future__ import annotations

__all__ = ["StreamstoreError", "UserError", "FormatError", "CorruptDataError"]


class StreamstoreError(Exception):
    """Base class of streamstore's own errors."""


class UserError(StreamstoreError, ValueError):
    """A request that cannot be served as asked; the message says why."""


class FormatError(StreamstoreError, ValueError):
    """A file that is not a (readable) streamstore file."""


class CorruptDataError(StreamstoreError):
    """Stored data that fails its checksum or does not decode: never returned as events.

    Parameters
    ----------
    message : str
        What is damaged and where; names the frames.
    frames : list of (int, int)
        The damaged frames touched by the read, as half-open ranges
        ``(start, stop)`` of stored-frame indices, ascending.
    path : str, optional
        The file (or series) read.
    """

    def __init__(self, message: str, frames: list[tuple[int, int]], path: str = "") -> None:
        super().__init__(message)
        self.frames = [(int(a), int(b)) for a, b in frames]
        self.path = path

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
