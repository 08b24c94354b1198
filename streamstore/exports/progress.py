"""Progress bars for long loops: a tqdm bar in a terminal, silence off one.

Any loop that can take more than a couple of seconds (export, ``show`` on a
large store, the demo, benchmarks) wraps its iterable in :func:`track` or
drives a :class:`Progress` by hand::

    from streamstore.exports.progress import Progress, track

    for page in track(pages, desc="tiff", unit="page"):
        ...

    with Progress(total=n_events, desc="sum", unit="ev") as bar:
        for chunk in chunks:
            ...
            bar.update(len(chunk))

Bars are drawn by ``tqdm``, only when the stream (stderr by default) is a
terminal, so logs, pipes and CI stay clean. Set ``STREAMSTORE_PROGRESS=0`` to
silence bars everywhere, ``=1`` to draw them on any stream.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

from tqdm import tqdm

__all__ = ["Progress", "track", "progress_enabled"]

T = TypeVar("T")

_ENV = "STREAMSTORE_PROGRESS"
_OFF = {"0", "false", "no", "off"}
_ON = {"1", "true", "yes", "on"}
_FALLBACK_SIZE = (80, 24)  # columns, rows


def _env_switch() -> bool | None:
    """``STREAMSTORE_PROGRESS`` as True (force on), False (off) or None (unset)."""
    env = os.environ.get(_ENV, "").strip().lower()
    if env in _OFF:
        return False
    if env in _ON:
        return True
    return None


def progress_enabled(stream: IO[str] | None = None) -> bool:
    """Whether bars are drawn on ``stream`` (default: ``sys.stderr``).

    Parameters
    ----------
    stream : file-like or None, default None
        The stream a bar would be drawn on; None means ``sys.stderr``.

    Returns
    -------
    bool
        False when ``STREAMSTORE_PROGRESS=0``, True when ``=1``; otherwise
        whether ``stream`` is a terminal.
    """
    switch = _env_switch()
    if switch is not None:
        return switch
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or odd stream
        return False


def _terminal_width(stream: IO[str]) -> int:
    """Columns of the terminal behind ``stream``; 0 when it has none or says none."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):  # not a file, not a terminal, closed
        return 0


class Progress(tqdm):
    """A tqdm bar that is silent off a terminal.

    Parameters
    ----------
    total : int or None
        Expected number of units, or None when unknown (a counter is shown).
    desc : str, default ""
        Short label in front of the bar.
    unit : str, default "it"
        Name of one unit (``"frame"``, ``"page"``, ``"ev"``).
    enabled : bool or None, default None
        Draw the bar; None decides with :func:`progress_enabled`.
    stream : file-like or None, default None
        Where to draw; None means ``sys.stderr``.
    iterable : iterable or None, default None
        A loop to wrap, as for ``tqdm`` (see :func:`track`).

    Notes
    -----
    Use it as a context manager, or call :meth:`close` yourself. A disabled
    bar does not count (its ``n`` stays at 0), as with ``tqdm(disable=True)``.
    """

    def __init__(
        self,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        *,
        enabled: bool | None = None,
        stream: IO[str] | None = None,
        iterable: Iterable[object] | None = None,
    ) -> None:
        if enabled is None:
            switch = _env_switch()
            # None lets tqdm draw only when the stream is a terminal
            disable = None if switch is None else not switch
        else:
            disable = not enabled
        stream = sys.stderr if stream is None else stream
        # a terminal that reports no size (a fresh pseudo-terminal, some CI
        # runners) would get a bar trimmed to nothing, or none at all since
        # tqdm puts bars past the last row out of sight: assume 80x24 there
        follow_width = _terminal_width(stream) > 0
        super().__init__(
            iterable,
            total=None if total is None else int(total),
            desc=desc or None,
            unit=unit,
            file=stream,
            disable=disable,
            dynamic_ncols=follow_width,
            ncols=None if follow_width else _FALLBACK_SIZE[0],
            nrows=None if follow_width else _FALLBACK_SIZE[1],
        )


def track(
    iterable: Iterable[T],
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool | None = None,
    stream: IO[str] | None = None,
) -> Iterator[T]:
    """Yield the items of ``iterable`` while advancing a :class:`Progress` bar.

    Parameters
    ----------
    iterable : iterable
        The loop to wrap.
    total : int or None, default None
        Number of items; None tries ``len(iterable)``.
    desc, unit, enabled, stream
        As for :class:`Progress`.

    Yields
    ------
    object
        The items of ``iterable``, unchanged.
    """
    with Progress(total, desc, unit, enabled=enabled, stream=stream, iterable=iterable) as bar:
        yield from bar
