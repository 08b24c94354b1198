"""Deal one camera stream over N ingest workers on other hosts (the broker alone).

The broker is the camera's only receiver. It binds N PUSH sockets on
consecutive ports (--listen tcp://HOST:P gives P, P+1, ..., P+N-1), waits
until a worker is connected on each, then takes the camera's stream: start
and end go to every worker, images in blocks of --block-frames, worker =
(frame_id // B) % N. Each host runs

    streamstore ingest --connect tcp://BROKER:P --worker-id K --workers N --out DIR

(worker K connects to port P + K). A slow worker slows the camera; a worker
that disconnects is logged at ERROR, its blocks go to the others and the
series is marked incomplete. With --curve-keys DIR the camera link is
encrypted (the broker is its CURVE server, as `ingest --curve-keys`); add
--curve-client NAME to encrypt the worker links too (the broker is then a
client of the workers' `ingest --curve-keys DIR`). See docs/scaling.md.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``streamstore fanout``."""
    from streamstore.ingest.config import K3_FRAME_BYTES
    from streamstore.scaleout.deal import DEFAULT_BLOCK_FRAMES

    p.add_argument("--connect", required=True, metavar="CAMERA", help="the camera's PUSH endpoint")
    p.add_argument(
        "--listen",
        required=True,
        metavar="ENDPOINT",
        help="first worker endpoint to bind, e.g. tcp://0.0.0.0:6000 (worker K: port + K)",
    )
    p.add_argument("--workers", type=int, required=True, metavar="N", help="number of workers")
    p.add_argument(
        "--block-frames",
        type=int,
        default=DEFAULT_BLOCK_FRAMES,
        metavar="B",
        help=f"consecutive frames dealt to one worker (default {DEFAULT_BLOCK_FRAMES})",
    )
    p.add_argument(
        "--curve-keys",
        metavar="DIR",
        help="encrypt the camera link with CURVE, admitting DIR/authorized_clients",
    )
    p.add_argument(
        "--curve-client",
        metavar="NAME",
        help="encrypt the worker links too, as key pair NAME of --curve-keys DIR",
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow binding to non-loopback addresses (needed for workers on other hosts)",
    )
    p.add_argument(
        "--max-frame-bytes",
        type=int,
        default=K3_FRAME_BYTES,
        metavar="N",
        help=f"largest frame accepted (default {K3_FRAME_BYTES})",
    )
    p.add_argument("--status-endpoint", metavar="EP", help="publish the status as JSON here")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="the workers' output directory, if this host sees it: what the broker rejected "
        "after the last series (no series manifest holds it) goes to DIR/orphans.json",
    )
    p.add_argument(
        "--exit-after-series",
        type=int,
        default=None,
        metavar="N",
        help="exit once N series were passed on",
    )
    p.add_argument("--quiet", action="store_true", help="log warnings and errors only")


def run(args: argparse.Namespace) -> int:
    """Run the broker until SIGINT/SIGTERM or --exit-after-series."""
    import logging
    import signal

    from streamstore.errors import UserError
    from streamstore.ingest.logsetup import setup_logging
    from streamstore.ingest.safety import check_bind_endpoint
    from streamstore.scaleout.broker import Broker, BrokerConfig

    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.max_frame_bytes < 1:
        raise UserError(f"--max-frame-bytes must be > 0, got {args.max_frame_bytes}")
    check_bind_endpoint(args.listen, args.allow_remote, "--listen")
    if args.status_endpoint is not None:
        check_bind_endpoint(args.status_endpoint, args.allow_remote, "--status-endpoint")
    cfg = BrokerConfig.for_listen(
        args.connect,
        args.listen,
        args.workers,
        block_frames=args.block_frames,
        curve_keys=args.curve_keys,
        curve_client=args.curve_client,
        max_frame_bytes=args.max_frame_bytes,
        status_endpoint=args.status_endpoint,
        exit_after_series=args.exit_after_series,
        orphans_dir=args.out,
    )
    broker = Broker(cfg)
    setup_logging(args.quiet)
    if args.allow_remote and args.curve_client is None:
        logging.getLogger("streamstore.fanout").warning(
            "the worker links are not encrypted (no --curve-client): use them on a "
            "private network only"
        )
    old = {s: signal.signal(s, broker.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return broker.run()
    except TimeoutError as exc:
        raise UserError(str(exc)) from None
    finally:
        for s, h in old.items():
            signal.signal(s, h)
