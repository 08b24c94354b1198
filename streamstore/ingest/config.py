"""What an ingest daemon is told: :class:`IngestConfig`, checked when it is made.

Picklable, so the parent of ``streamstore ingest --workers N`` hands one to
each worker process. The daemon that runs it is
:class:`streamstore.ingest.daemon.IngestDaemon`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamstore.errors import UserError
from streamstore.ingest.safety import check_bind_endpoint

__all__ = ["IngestConfig", "K3_FRAME_BYTES"]

#: Bytes of one 4092 x 5760 uint16 frame: the default largest accepted frame.
K3_FRAME_BYTES = 4092 * 5760 * 2


@dataclass
class IngestConfig:
    """Everything an :class:`IngestDaemon` needs (picklable, for worker processes).

    Parameters
    ----------
    out_dir : str
        Directory of the output files (created if missing).
    listen, connect : str, optional
        Exactly one: bind a PULL socket for senders that connect, or connect
        to a sender that binds its PUSH socket.
    calibration : str, optional
        A file written by ``Calibration.save``.
    max_buffer_mb : float, default 1024.0
        Memory the pipeline may hold (raw frames waiting, counted events
        waiting for the disk). When it is full the daemon stops reading and
        ZeroMQ's high-water mark pushes back on the sender.
    status_endpoint : str, optional
        Bind a PUB socket here and publish the status as JSON twice a second.
    status_endpoint_optional : bool, default False
        The status endpoint is the default one: if it cannot be bound (another
        daemon holds it), log a warning and run without publishing.
    idle_timeout_s : float, default 30.0
        A series whose sender sent nothing for this long is closed and marked
        incomplete (time the daemon itself did not read is not counted).
    max_open_series : int, default 8
        Series open at once; a start beyond is refused (``too_many_series``).
    gain_reference : str, optional
        A gain map (``.npy``, or a ``Calibration.save`` file's gain) that every
        calibration the daemon makes or loads takes: a dark series' and an
        estimate's, and a ``calibration`` file without a gain map of its own.
    calibration_from_dark_series : bool, default False
        Let a dark series replace the ``calibration`` file for later series
        (without it a dark series' calibration is saved but not used when a
        file was given).
    reorder_window : int, default 64
        Frames held back to restore frame-id order.
    subpixel : bool, default False
        Store sub-pixel positions.
    threads : int, optional
        Threads of the counting kernel (None: all cores).
    encode_threads : int, optional
        Threads blosc2 uses to compress (None: all cores).
    max_frame_bytes : int, default 4092 * 5760 * 2
        Largest frame accepted (the image payload alone, its header not included).
    max_header_bytes : int, default 65536
        Largest JSON header accepted, bounded separately from the frame.
        ZeroMQ's maximum message size (which it applies to each part) is the
        larger of the two.
    allow_remote : bool, default False
        Allow binding to non-loopback addresses.
    exit_after_series : int, optional
        Exit (status 0) once this many series (dark ones included) are closed.
    status_interval_s : float, default 5.0
        Seconds between status log lines when not on a terminal.
    flush_interval_s : float, default 1.0
        Longest time counted frames stay unflushed (what SIGKILL can lose).
    estimate_frames : int, default 8
        Frames used to estimate a calibration when nothing else is known.
    max_dark_frames : int, optional
        Most dark frames of a dark series used for its calibration (None: all;
        they are summed as they come, so their number costs no memory).
    rcvhwm : int, optional
        Receive high-water mark in messages; None derives it from the budget
        and ``max_frame_bytes`` (at least 2).
    curve_keys : str, optional
        Key directory from ``streamstore keys``: the socket becomes a CURVE
        server (encrypted) admitting only ``DIR/authorized_clients/*.key``
        (see :mod:`streamstore.link.security`).
    worker_id : int, optional
        Run as worker K of a stream dealt over several workers (scale-out,
        :mod:`streamstore.scaleout`): the series goes to the shard
        ``DIR/<series_id>/shard-K.h5``, listed in the series' ``manifest.json``;
        gaps in the frame ids are the other workers' frames, not missing.
        Start, images and end arrive on this worker's own stream.
    n_workers : int, optional
        Number of workers the stream is dealt over, when known (manifest).
    xray_threshold : float, "auto" or None, default "auto"
        X-ray threshold (dark-subtracted signal, ADU) of the calibrations the
        daemon makes from a dark series or estimates; "auto" derives it from
        the electron peaks of the data (see ``docs/ingest.md``); None:
        saturated pixels only.
    keep_large_buffers : bool, default True
        Make ``malloc`` reuse freed frame buffers instead of unmapping them
        (:mod:`streamstore.ingest.allocator`; saves the kernel page faults and
        zeroing of every received frame; the process keeps its peak heap).
    """

    out_dir: str
    listen: str | None = None
    connect: str | None = None
    calibration: str | None = None
    gain_reference: str | None = None
    max_buffer_mb: float = 1024.0
    status_endpoint: str | None = None
    # the default status endpoint: when another daemon holds it, go on without it
    status_endpoint_optional: bool = False
    idle_timeout_s: float = 30.0
    reorder_window: int = 64
    subpixel: bool = False
    threads: int | None = None
    encode_threads: int | None = None
    max_frame_bytes: int = K3_FRAME_BYTES
    max_header_bytes: int = 1 << 16
    allow_remote: bool = False
    exit_after_series: int | None = None
    status_interval_s: float = 5.0
    flush_interval_s: float = 1.0
    estimate_frames: int = 8
    max_dark_frames: int | None = None
    rcvhwm: int | None = None
    curve_keys: str | None = None
    max_open_series: int = 8
    calibration_from_dark_series: bool = False
    worker_id: int | None = None
    n_workers: int | None = None
    xray_threshold: float | str | None = "auto"
    keep_large_buffers: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Raise :class:`UserError` naming the first bad option."""
        if (self.listen is None) == (self.connect is None):
            raise UserError("give exactly one of --listen ENDPOINT or --connect ENDPOINT")
        if self.listen is not None:
            check_bind_endpoint(self.listen, self.allow_remote, "--listen")
        elif "://" not in self.connect:  # type: ignore[operator]
            raise UserError(f"--connect: {self.connect!r} is not a ZeroMQ endpoint")
        if self.status_endpoint is not None:
            check_bind_endpoint(self.status_endpoint, self.allow_remote, "--status-endpoint")
        if not self.max_buffer_mb > 0:
            raise UserError(f"--max-buffer-mb must be > 0, got {self.max_buffer_mb}")
        if not self.idle_timeout_s > 0:
            raise UserError(f"--idle-timeout must be > 0 s, got {self.idle_timeout_s}")
        if self.reorder_window < 0:
            raise UserError(f"--reorder-window must be >= 0 frames, got {self.reorder_window}")
        if self.max_frame_bytes <= 0:
            raise UserError(f"--max-frame-bytes must be > 0, got {self.max_frame_bytes}")
        if self.max_header_bytes < 256:
            raise UserError(f"--max-header-bytes must be >= 256, got {self.max_header_bytes}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be >= 1, got {self.threads}")
        if self.encode_threads is not None and self.encode_threads < 1:
            raise UserError(f"--encode-threads must be >= 1, got {self.encode_threads}")
        if self.max_open_series < 1:
            raise UserError(f"--max-open-series must be >= 1, got {self.max_open_series}")
        if self.exit_after_series is not None and self.exit_after_series < 1:
            raise UserError(f"--exit-after-series must be >= 1, got {self.exit_after_series}")
        if self.curve_keys is not None:
            from streamstore.link.security import check_keys_dir

            check_keys_dir(self.curve_keys)
        out = Path(self.out_dir)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} exists and is not a directory")
        if self.worker_id is not None and self.worker_id < 0:
            raise UserError(f"--worker-id must be >= 0, got {self.worker_id}")
        if self.gain_reference is not None:  # before a broker starts its workers
            from streamstore.counting.gain_reference import load_gain

            try:
                load_gain(self.gain_reference)
            except ValueError as exc:
                raise UserError(f"--gain-reference: {exc}") from None
        xt = self.xray_threshold
        if isinstance(xt, str) and xt != "auto":
            raise UserError(f"--xray-threshold must be ADU > 0, 'auto' or 'none', got {xt!r}")
        if xt is not None and not isinstance(xt, str) and not (math.isfinite(xt) and xt > 0):
            raise UserError(f"--xray-threshold must be > 0 ADU, got {xt}")

    @property
    def budget_bytes(self) -> int:
        return int(self.max_buffer_mb * 1024 * 1024)

    @property
    def max_part_bytes(self) -> int:
        """ZeroMQ's ``MAXMSGSIZE`` (per part): room for the largest frame and the largest header."""
        return int(max(self.max_frame_bytes, self.max_header_bytes))

    def derived_rcvhwm(self) -> int:
        """Receive high-water mark: a quarter of the budget in largest frames, 2..1000."""
        if self.rcvhwm is not None:
            return max(1, int(self.rcvhwm))
        return int(min(1000, max(2, self.budget_bytes // 4 // self.max_frame_bytes)))
