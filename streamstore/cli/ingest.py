"""Receive frames over ZeroMQ, count the electrons, store each series as HDF5.

Each series goes to OUT/<series_id>.h5 (an existing file is never
overwritten: a numbered suffix is added and logged). A series whose start
meta says {"kind": "dark"} becomes the calibration of the following series.
SIGINT/SIGTERM drain the pipeline, close the files and exit 0.

Scale-out: --workers N (without --worker-id) makes this process a broker
that owns the camera's stream and deals it, in blocks of --block-frames, over
N worker processes on this host. --worker-id K --workers N makes this process
worker K of N: it connects to stream K, the --connect port + K (a
`streamstore fanout` broker, or a camera with one stream per worker such as
`streamstore emulate --streams N`). Workers write DIR/<series_id>/shard-K.h5
plus a manifest; streamstore.open(DIR/<id>) reads the shards as one series.
"""

from __future__ import annotations

import argparse

from streamstore.ingest.logsetup import setup_logging

__all__ = ["add_arguments", "run", "config_from_args", "setup_logging"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``streamstore ingest``."""
    from streamstore.ingest.config import K3_FRAME_BYTES

    p.add_argument("--out", required=True, metavar="DIR", help="directory of the output files")
    from streamstore.link.protocol import DEFAULT_DATA_ENDPOINT, DEFAULT_STATUS_ENDPOINT

    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--listen", metavar="ENDPOINT", help="bind a PULL socket, e.g. tcp://127.0.0.1:5555"
    )
    src.add_argument(
        "--connect",
        metavar="ENDPOINT",
        help="connect to a camera that binds its PUSH socket (the default, at "
        f"{DEFAULT_DATA_ENDPOINT}, where `streamstore emulate` binds)",
    )
    p.add_argument("--calibration", metavar="FILE", help="calibration from Calibration.save")
    p.add_argument(
        "--gain-reference",
        metavar="FILE",
        help="gain map every calibration takes (a dark series', an estimate's, a "
        "--calibration file's without one): .npy of Calibration.with_gain_reference(flats)"
        ".gain, a one-page TIFF of such factors, or a Calibration.save "
        "file with a gain map",
    )
    p.add_argument(
        "--xray-threshold",
        type=_xray_threshold,
        default="auto",
        metavar="ADU|auto|none",
        help="X-ray threshold (dark-subtracted signal, ADU) of the calibrations made from a "
        "dark series or estimated from the data; auto: 10 x the median electron peak of the "
        "data; none: saturated pixels only; a --calibration file keeps its own (default: auto)",
    )
    p.add_argument(
        "--max-buffer-mb",
        type=float,
        default=1024.0,
        metavar="N",
        help="memory for frames and events in flight; when full, back-pressure (default 1024)",
    )
    p.add_argument(
        "--status-endpoint",
        metavar="EP",
        help="publish the status as JSON on a PUB socket (read it with `streamstore status "
        f"EP`); default {DEFAULT_STATUS_ENDPOINT}, where plain `streamstore status` reads, "
        "skipped with a warning if another daemon holds it; 'none': do not publish",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="close a series with no message for S seconds as incomplete (default 30)",
    )
    p.add_argument(
        "--reorder-window",
        type=int,
        default=64,
        metavar="N",
        help="frames held back to store out-of-order frames in order (default 64)",
    )
    p.add_argument("--subpixel", action="store_true", help="store 4x4 sub-pixel positions")
    p.add_argument(
        "--threads", type=int, default=None, help="counting threads (default: all cores)"
    )
    p.add_argument(
        "--encode-threads",
        type=int,
        default=None,
        metavar="N",
        help="blosc2 compression threads (default: all cores)",
    )
    p.add_argument(
        "--max-frame-bytes",
        type=int,
        default=K3_FRAME_BYTES,
        metavar="N",
        help=f"largest frame accepted, its header not included (default {K3_FRAME_BYTES})",
    )
    p.add_argument(
        "--max-header-bytes",
        type=int,
        default=1 << 16,
        metavar="N",
        help="largest message header (JSON) accepted, bounded apart from the frame "
        f"(default {1 << 16})",
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow binding to non-loopback addresses (the port is then open to the network)",
    )
    p.add_argument(
        "--max-open-series",
        type=int,
        default=8,
        metavar="N",
        help="series open at once (each with its own idle timeout); a start beyond is "
        "refused (default 8)",
    )
    p.add_argument(
        "--calibration-from-dark-series",
        action="store_true",
        help="let a dark series replace the --calibration file for the series after it "
        "(default: the file stays in use; the dark series' calibration is only saved)",
    )
    p.add_argument(
        "--curve-keys",
        metavar="DIR",
        help="encrypt with ZeroMQ CURVE and admit only the clients authorized in DIR "
        "(make DIR with `streamstore keys DIR`)",
    )
    p.add_argument(
        "--exit-after-series",
        type=int,
        default=None,
        metavar="N",
        help="exit once N series (dark ones included) are closed",
    )
    p.add_argument(
        "--status-interval",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds between status log lines when not on a terminal (default 5)",
    )
    p.add_argument("--quiet", action="store_true", help="log warnings and errors only")
    s = p.add_argument_group("scale-out (one stream dealt over several workers)")
    s.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="without --worker-id: receive the camera here and deal it over N worker "
        "processes on this host; with --worker-id K: this is worker K of N",
    )
    s.add_argument(
        "--worker-id",
        type=int,
        default=None,
        metavar="K",
        help="this process is worker K: connects to stream K (the --connect port + K) "
        "and writes DIR/<series_id>/shard-K.h5",
    )
    s.add_argument(
        "--block-frames",
        type=int,
        default=None,
        metavar="B",
        help="with --workers N alone: consecutive frames dealt to one worker, "
        "worker = (frame_id // B) %% N (default 8)",
    )


def _xray_threshold(text: str) -> float | str | None:
    if text.lower() in ("auto", "none"):
        return None if text.lower() == "none" else "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ADU, 'auto' or 'none', got {text!r}") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be > 0 ADU, got {text!r}")
    return value


def config_from_args(args: argparse.Namespace):
    """Build an :class:`~streamstore.ingest.IngestConfig` from parsed options."""
    from streamstore.ingest.config import IngestConfig
    from streamstore.link.protocol import DEFAULT_DATA_ENDPOINT, DEFAULT_STATUS_ENDPOINT

    listen, connect = args.listen, args.connect
    if listen is None and connect is None:  # the camera binds, the receiver connects
        connect = DEFAULT_DATA_ENDPOINT
    status = args.status_endpoint
    status_default = status is None
    if status_default:
        status = DEFAULT_STATUS_ENDPOINT
    elif status.lower() == "none":
        status = None
    return IngestConfig(
        out_dir=args.out,
        listen=listen,
        calibration=args.calibration,
        gain_reference=getattr(args, "gain_reference", None),
        max_buffer_mb=args.max_buffer_mb,
        status_endpoint=status,
        status_endpoint_optional=status_default,
        idle_timeout_s=args.idle_timeout,
        reorder_window=args.reorder_window,
        subpixel=args.subpixel,
        threads=args.threads,
        encode_threads=getattr(args, "encode_threads", None),
        max_frame_bytes=args.max_frame_bytes,
        max_header_bytes=getattr(args, "max_header_bytes", 1 << 16),
        allow_remote=args.allow_remote,
        curve_keys=args.curve_keys,
        max_open_series=getattr(args, "max_open_series", 8),
        calibration_from_dark_series=getattr(args, "calibration_from_dark_series", False),
        exit_after_series=args.exit_after_series,
        status_interval_s=args.status_interval,
        xray_threshold=getattr(args, "xray_threshold", "auto"),
        **{"connect": connect, **_scale_out(args)},
    )


def _scale_out(args: argparse.Namespace) -> dict:
    """IngestConfig fields of the scale-out options (absent in older Namespaces).

    A worker (``--worker-id K``) connects to stream K: the ``--connect`` port + K.
    """
    from streamstore.errors import UserError
    from streamstore.scaleout.deal import offset_endpoint

    workers = getattr(args, "workers", None)
    worker_id = getattr(args, "worker_id", None)
    block = getattr(args, "block_frames", None)
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if worker_id is not None and worker_id < 0:
        raise UserError(f"--worker-id must be >= 0, got {worker_id}")
    if workers is not None and worker_id is not None and worker_id >= workers:
        raise UserError(f"--worker-id {worker_id} must be below --workers {workers}")
    if block is not None and (workers is None or worker_id is not None):
        raise UserError("--block-frames goes with --workers N alone (this process deals)")
    if block is not None and block < 1:
        raise UserError(f"--block-frames must be >= 1, got {block}")
    out: dict = {"worker_id": worker_id, "n_workers": workers}
    if worker_id is not None:
        connect = getattr(args, "connect", None)
        if connect is not None:
            out["connect"] = offset_endpoint(connect, worker_id)
    elif workers is not None and getattr(args, "listen", None) is not None:
        raise UserError("--workers needs --connect (this process connects to the camera)")
    return out


def run(args: argparse.Namespace) -> int:
    """Run the daemon until a signal or ``--exit-after-series``."""
    from streamstore.ingest.daemon import IngestDaemon

    cfg = config_from_args(args)
    cfg.check()
    setup_logging(args.quiet)
    workers = getattr(args, "workers", None)
    if workers is not None and getattr(args, "worker_id", None) is None:
        from streamstore.scaleout.deal import DEFAULT_BLOCK_FRAMES
        from streamstore.scaleout.local import run_local

        block = getattr(args, "block_frames", None) or DEFAULT_BLOCK_FRAMES
        return run_local(cfg, workers, block_frames=block, quiet=args.quiet)
    return IngestDaemon(cfg).run()
