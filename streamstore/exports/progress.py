"""Progress bars for long loops: a bar in a terminal, silence off one.

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

The bar is drawn only when the stream (stderr by default) is a terminal, so
logs, pipes and CI stay clean. It is drawn with ``rich`` when that is
installed, else ``tqdm``, else a plain one-line ``\\r`` counter that needs
nothing. Set ``STREAMSTORE_PROGRESS=0`` to silence bars everywhere, ``=1`` to
force them on (with the plain renderer when the stream is not a terminal).
Nothing is imported until a bar is shown.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

__all__ = ["Progress", "track", "progress_enabled", "BACKENDS"]

T = TypeVar("T")

#: renderers in order of preference; ``plain`` needs no package
BACKENDS = ("rich", "tqdm", "plain")

_ENV = "STREAMSTORE_PROGRESS"


def progress_enabled(stream: IO[str] | None = None) -> bool:
    """Whether bars are drawn on ``stream`` (default: ``sys.stderr``).

    ``STREAMSTORE_PROGRESS=0`` turns bars off, ``=1`` forces them on;
    otherwise they are drawn only when ``stream`` is a terminal.
    """
    env = os.environ.get(_ENV, "").strip().lower()
    if env in {"0", "false", "no", "off"}:
        return False
    if env in {"1", "true", "yes", "on"}:
        return True
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or odd stream
        return False


def _pick_backend(requested: str | None, is_tty: bool) -> str:
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"progress backend must be one of {BACKENDS}, got {requested!r}")
        return requested
    if not is_tty:  # forced on, off a terminal: fancy renderers would emit escapes
        return "plain"
    for name in ("rich", "tqdm"):
        try:
            __import__(name)
        except ImportError:
            continue
        return name
    return "plain"


def _fmt_count(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{suffix}"
    return f"{x:.0f}"


class _Plain:
    """A dependency-free one-line renderer (``\\r`` updates, throttled)."""

    def __init__(self, total: int | None, desc: str, unit: str, stream: IO[str]) -> None:
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.n = 0
        self.t0 = time.perf_counter()
        self._last = 0.0
        self._width = 0
        self._draw(force=True)

    def update(self, n: int) -> None:
        self.n += n
        self._draw()

    def _draw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        dt = max(now - self.t0, 1e-9)
        rate = self.n / dt
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            frac = min(self.n / self.total, 1.0)
            filled = int(round(20 * frac))
            bar = "#" * filled + "-" * (20 - filled)
            eta = (self.total - self.n) / rate if rate > 0 else float("nan")
            eta_s = f" eta {eta:4.0f}s" if eta == eta and self.n < self.total else ""
            text = (
                f"{head}[{bar}] {100 * frac:3.0f}% {_fmt_count(self.n)}/{_fmt_count(self.total)}"
                f" {self.unit} ({_fmt_count(rate)} {self.unit}/s){eta_s}"
            )
        else:
            text = f"{head}{_fmt_count(self.n)} {self.unit} ({_fmt_count(rate)} {self.unit}/s)"
        pad = " " * max(self._width - len(text), 0)
        self._width = len(text)
        self.stream.write("\r" + text + pad)
        self.stream.flush()

    def close(self) -> None:
        self._draw(force=True)
        self.stream.write("\n")
        self.stream.flush()


class _Rich:
    def __init__(self, total: int | None, desc: str, unit: str, stream: IO[str]) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._p = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(file=stream),
            transient=False,
        )
        self._p.start()
        self._task = self._p.add_task(desc or "", total=total)

    def update(self, n: int) -> None:
        self._p.advance(self._task, n)

    def close(self) -> None:
        self._p.stop()


class _Tqdm:
    def __init__(self, total: int | None, desc: str, unit: str, stream: IO[str]) -> None:
        from tqdm import tqdm

        self._t = tqdm(total=total, desc=desc or None, unit=unit, file=stream, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self._t.update(n)

    def close(self) -> None:
        self._t.close()


_RENDERERS: dict[str, Any] = {"plain": _Plain, "rich": _Rich, "tqdm": _Tqdm}


class Progress:
    """A progress bar that is a no-op off a terminal.

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
    backend : {"rich", "tqdm", "plain"} or None, default None
        Renderer; None picks the first installed one on a terminal and
        ``"plain"`` elsewhere.

    Notes
    -----
    Use it as a context manager, or call :meth:`close` yourself.
    """

    def __init__(
        self,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        *,
        enabled: bool | None = None,
        stream: IO[str] | None = None,
        backend: str | None = None,
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.enabled = progress_enabled(self.stream) if enabled is None else bool(enabled)
        self.n = 0
        self.total = None if total is None else int(total)
        self.backend: str | None = None
        self._r: Any = None
        if self.enabled:
            try:
                is_tty = bool(self.stream.isatty())
            except (AttributeError, ValueError):
                is_tty = False
            self.backend = _pick_backend(backend, is_tty)
            self._r = _RENDERERS[self.backend](self.total, desc, unit, self.stream)

    def update(self, n: int = 1) -> None:
        """Advance the bar by ``n`` units."""
        self.n += n
        if self._r is not None:
            self._r.update(n)

    def close(self) -> None:
        """Finish the bar (idempotent)."""
        if self._r is not None:
            r, self._r = self._r, None
            r.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(
    iterable: Iterable[T],
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool | None = None,
    stream: IO[str] | None = None,
    backend: str | None = None,
) -> Iterator[T]:
    """Yield the items of ``iterable`` while advancing a :class:`Progress` bar.

    Parameters
    ----------
    iterable : iterable
        The loop to wrap.
    total : int or None, default None
        Number of items; None tries ``len(iterable)``.
    desc, unit, enabled, stream, backend
        As for :class:`Progress`.

    Yields
    ------
    object
        The items of ``iterable``, unchanged.
    """
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(total, desc, unit, enabled=enabled, stream=stream, backend=backend) as bar:
        for item in iterable:
            yield item
            bar.update(1)
