"""The daemon's start-up: every counting kernel ready before it listens, and said so."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

__all__ = ["warm_kernels_reporting"]

log = logging.getLogger("streamstore.ingest")

#: Seconds one variant may take to load before the status says it compiles (a load
#: from numba's cache took at most 2 s here, the first of them, under heavy load).
_LOAD_S = 5.0


def warm_kernels_reporting(
    reporter: Any, calibration: Any, stop: threading.Event, gain: bool = False
) -> None:
    """Compile or load every counting kernel variant while the status says so.

    From numba's cache this takes about a second; after an install or an upgrade
    (empty cache) each variant compiles, and ``reporter.state`` (published in
    every status message) and the log say that this is what the daemon is
    doing. The gain-only variants are compiled only for a calibration with a
    gain map (dark series and estimates have none). Returns early when ``stop``
    is set; ``reporter.state`` is left for the caller to set to "ready".

    Parameters
    ----------
    reporter : StatusReporter
    calibration : Calibration or None
        The calibration given at start (a file), if any.
    stop : threading.Event
        Set when the daemon is asked to stop.
    gain : bool, default False
        A gain reference is given: every calibration may have a gain map.
    """
    from streamstore.counting.warmup import warm_kernels

    gain = gain or (calibration is not None and calibration.gain is not None)
    # with a calibration the estimator runs only for a series of another frame shape
    estimator = "background" if calibration is None else "on_use"
    done = threading.Event()
    result: dict[str, Any] = {}
    t0 = time.monotonic()

    def compiling(i: int, n: int) -> None:
        reporter.state = (
            f"compiling counting kernels, first run after install or upgrade ({i + 1} of {n})"
        )
        if not result.get("said"):
            result["said"] = True
            log.info("compiling counting kernels, first run after install or upgrade")

    def progress(i: int, n: int, variant: dict[str, Any], compiled: int) -> None:
        result["at"] = (i, n, time.monotonic())
        if compiled:
            compiling(i, n)
        else:  # everything so far came from numba's cache
            reporter.state = f"loading counting kernels ({i + 1} of {n})"

    def work() -> None:
        try:
            result.update(warm_kernels(gain=gain, progress=progress, estimator=estimator))
        except BaseException as exc:  # raised again by the calling thread
            result["error"] = exc
        finally:
            done.set()

    reporter.state = "loading counting kernels"
    threading.Thread(target=work, name="warm-kernels", daemon=True).start()
    while not done.wait(0.25):  # the status keeps going while numba compiles
        if stop.is_set():
            return
        i, n, t = result.get("at", (0, 1, t0))
        if not result.get("said") and time.monotonic() - t > _LOAD_S:
            compiling(i, n)  # a load from the cache takes well under this
        reporter.tick()
    if "error" in result:
        raise result["error"]
    log.info(
        "counting kernels ready: %d variants in %.1f s (%d compiled)",
        result["variants"] + 1,
        time.monotonic() - t0,
        result["compiled"],
    )
