"""Exceptions shared across streamstore.

:class:`UserError` is for problems a person can fix (a wrong path, a range
outside the series, a missing pixel size): the CLI prints its message as one
sentence and exits with status 2.
"""

from __future__ import annotations

__all__ = ["StreamstoreError", "UserError", "FormatError"]


class StreamstoreError(Exception):
    """Base class of streamstore's own errors."""


class UserError(StreamstoreError, ValueError):
    """A request that cannot be served as asked; the message says why."""


class FormatError(StreamstoreError, ValueError):
    """A file that is not a (readable) streamstore file."""
