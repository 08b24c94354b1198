"""Log lines of the long-running commands (ingest, fanout) and their worker processes."""

from __future__ import annotations

import logging
import sys

__all__ = ["setup_logging"]


def setup_logging(quiet: bool = False) -> None:
    """Log lines on stderr: time, pid, level, message (warnings and errors only if ``quiet``)."""
    from streamstore.ingest.daemon import default_log_format

    logger = logging.getLogger("streamstore")
    if not logger.handlers:
        h = logging.StreamHandler(sys.stderr)
        # on a terminal, a log line first clears the live status line it interrupts
        prefix = "\r\x1b[K" if sys.stderr.isatty() else ""
        h.setFormatter(logging.Formatter(prefix + default_log_format(), "%H:%M:%S"))
        logger.addHandler(h)
        logger.propagate = False
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
