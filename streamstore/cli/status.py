"""Print the live status an ingest daemon publishes (default tcp://127.0.0.1:5558).

Connects a SUB socket to ENDPOINT (the daemon's --status-endpoint; by default
the endpoint the daemon publishes on by default) and prints one status (or keeps printing
with --follow): frames/s, GB/s in, events/s, bits/event, memory-queue fill,
and the counts of frames received, stored, missing, duplicate and rejected.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``streamstore status``."""
    from streamstore.link.protocol import DEFAULT_STATUS_ENDPOINT

    p.add_argument(
        "endpoint",
        metavar="ENDPOINT",
        nargs="?",
        default=DEFAULT_STATUS_ENDPOINT,
        help="the daemon's --status-endpoint (default: %(default)s, the daemon's default)",
    )
    p.add_argument("--json", action="store_true", help="print the raw JSON status")
    p.add_argument("--follow", action="store_true", help="keep printing until interrupted")
    p.add_argument(
        "--count", type=int, default=1, metavar="N", help="print N statuses, then exit (default 1)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="give up after S seconds without a status (default 10)",
    )


def run(args: argparse.Namespace) -> int:
    """Print statuses; UserError (exit 2) if none arrived within the timeout."""
    import zmq

    from streamstore.errors import UserError
    from streamstore.ingest.status import format_status

    if "://" not in args.endpoint:
        raise UserError(f"{args.endpoint!r} is not a ZeroMQ endpoint (e.g. tcp://127.0.0.1:5556)")
    if args.count < 1:
        raise UserError(f"--count must be >= 1, got {args.count}")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
    try:
        sock.connect(args.endpoint)
        shown = 0
        while args.follow or shown < args.count:
            if not sock.poll(int(args.timeout * 1000)):
                raise UserError(
                    f"no status from {args.endpoint} within {args.timeout:g} s "
                    "(is `streamstore ingest` running, publishing there?)"
                )
            raw = sock.recv()
            try:
                st = json.loads(raw)
                if args.json:
                    line = json.dumps(st)
                elif st.get("role") == "broker":  # streamstore fanout / ingest --workers N
                    from streamstore.scaleout.broker import format_broker_status

                    line = format_broker_status(st)
                else:
                    line = format_status(st)
            except (ValueError, KeyError, TypeError) as exc:
                print(f"streamstore status: unreadable status message: {exc}", file=sys.stderr)
                continue
            stamp = time.strftime("%H:%M:%S", time.localtime(st.get("time", time.time())))
            print(line if args.json else f"{stamp} {line}", flush=True)
            shown += 1
    finally:
        sock.close(0)
        ctx.term()
    return 0
