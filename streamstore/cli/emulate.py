"""Stream emulated camera frames over ZeroMQ (PUSH), like a camera would.

Frames come from a pool of --pool distinct frames made before sending, so the
send rate is the cost of the send alone; image i of the series is pool frame
i % pool. With --dark-frames N, N distinct beam-off frames are sent first as
their own series <series-id>_dark (start meta {"kind": "dark"}). To reproduce
the frames: CameraEmulator(shape, seed=...), dark_frames(N), then
generate(pool). With --curve-keys DIR the link is encrypted and authenticated
with ZeroMQ CURVE, as camera key pair --curve-client NAME of DIR (see
`streamstore keys` and docs/reliability.md). With --streams N the emulator
is a multi-stream camera: N PUSH sockets on consecutive ports (the --endpoint
port + k), each with its own start and end, images dealt in blocks of
--block-frames, stream = (frame_id // B) % N; ingest worker K connects to
stream K (`ingest --connect ENDPOINT --worker-id K --workers N`).
"""

from __future__ import annotations

import argparse
from typing import Any

from streamstore.shapes import parse_shape

DETECTOR = "streamstore-emulator"


def _non_negative(kind: type) -> Any:
    def convert(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not v >= 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
        return v

    return convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``emulate`` options to ``parser``."""
    from streamstore.link.protocol import DEFAULT_DATA_ENDPOINT

    parser.add_argument(
        "--endpoint",
        default=DEFAULT_DATA_ENDPOINT,
        help="ZeroMQ endpoint to bind (PUSH), as a camera does; `streamstore ingest` "
        "connects there by default (default: %(default)s)",
    )
    parser.add_argument(
        "--connect",
        metavar="ENDPOINT",
        default=None,
        help="connect to ENDPOINT instead of binding --endpoint",
    )
    parser.add_argument(
        "--shape", type=parse_shape, default=(4092, 5760), help="frame HxW (default: 4092x5760)"
    )
    parser.add_argument("--dtype", choices=("uint16", "uint8"), default="uint16")
    parser.add_argument(
        "--fps",
        type=_non_negative(float),
        default=0.0,
        help="send rate in frames/s; 0 = as fast as possible (default: %(default)s)",
    )
    parser.add_argument(
        "--frames", type=_non_negative(int), default=100, help="images to send (default: 100)"
    )
    parser.add_argument(
        "--dose-rate",
        type=_non_negative(float),
        default=15.0,
        help="frame-mean dose rate, e/px/s (default: %(default)s, i.e. 0.01 e/px/frame "
        "at the default --frame-time)",
    )
    parser.add_argument(
        "--frame-time",
        type=_non_negative(float),
        default=1 / 1500,
        help="camera frame time, s; sets the dose per frame, not the send rate (default: 1/1500)",
    )
    parser.add_argument("--pattern", choices=("uniform", "disk", "image"), default="uniform")
    parser.add_argument("--seed", type=_non_negative(int), default=0)
    parser.add_argument("--series-id", default="emulated", help="(default: %(default)s)")
    parser.add_argument("--pixel-size", type=float, default=None, help="pixel size, Angstrom")
    parser.add_argument(
        "--truth",
        metavar="FILE",
        default=None,
        help="write the ground truth of every image (HDF5, about 20 bytes per electron)",
    )
    parser.add_argument(
        "--dark-frames",
        type=_non_negative(int),
        default=0,
        metavar="N",
        help="send N beam-off frames first, as series <series-id>_dark",
    )
    parser.add_argument(
        "--pool", type=_non_negative(int), default=8, help="distinct frames to cycle (default: 8)"
    )
    parser.add_argument(
        "--timeout",
        type=_non_negative(float),
        default=60.0,
        help="seconds to wait for a receiver to take a message, and to deliver "
        "the last ones at exit; 0 = wait forever (default: %(default)s)",
    )
    parser.add_argument(
        "--hwm", type=_non_negative(int), default=4, help="send high-water mark (default: 4)"
    )
    parser.add_argument(
        "--streams",
        type=_non_negative(int),
        default=1,
        metavar="N",
        help="multi-stream camera: N PUSH sockets on consecutive ports, each with its own "
        "start and end, images dealt in blocks (default: 1)",
    )
    parser.add_argument(
        "--block-frames",
        type=_non_negative(int),
        default=8,
        metavar="B",
        help="with --streams: consecutive frames sent on one stream (default: %(default)s)",
    )
    parser.add_argument(
        "--curve-keys",
        metavar="DIR",
        default=None,
        help="encrypt with ZeroMQ CURVE as camera key pair --curve-client of DIR "
        "(made by `streamstore keys DIR`; needs DIR/NAME.key_secret and DIR/server.key), "
        "for a daemon started with `ingest --curve-keys`",
    )
    parser.add_argument(
        "--curve-client",
        metavar="NAME",
        default=None,
        help="name of the camera key pair in --curve-keys DIR (default: client)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    """Run ``streamstore emulate``."""
    import json
    import time

    import numpy as np

    from streamstore.camera.emulator import CameraEmulator
    from streamstore.errors import UserError
    from streamstore.link.protocol import ProtocolError, Start, validate_series_id
    from streamstore.link.sockets import Sender

    try:
        series_id = validate_series_id(args.series_id)
        dark_id = validate_series_id(f"{series_id}_dark") if args.dark_frames else None
    except ProtocolError as exc:
        raise UserError(f"--series-id: {exc}") from None
    if args.pixel_size is not None and not args.pixel_size > 0:
        raise UserError(f"--pixel-size: must be > 0, got {args.pixel_size}")
    if args.frame_time <= 0:
        raise UserError(f"--frame-time: must be > 0, got {args.frame_time}")
    if args.pool < 1:
        raise UserError("--pool: must be >= 1")
    curve_keys = getattr(args, "curve_keys", None)
    curve_name = getattr(args, "curve_client", None)
    if curve_name is not None and curve_keys is None:
        raise UserError("--curve-client needs --curve-keys DIR")
    n_streams = getattr(args, "streams", 1)
    block = getattr(args, "block_frames", 8)
    if n_streams < 1 or block < 1:
        raise UserError("--streams and --block-frames must be >= 1")
    setup_socket: Any = None
    if curve_keys is not None:
        import functools

        from streamstore.link.security import DEFAULT_CLIENT_NAME, curve_client

        name = curve_name or DEFAULT_CLIENT_NAME
        setup_socket = functools.partial(curve_client, directory=curve_keys, name=name)
    try:
        emu = CameraEmulator(
            args.shape,
            dtype=args.dtype,
            dose_rate_e_per_px_s=args.dose_rate,
            frame_time_s=args.frame_time,
            pattern=args.pattern,
            seed=args.seed,
            pool_size=max(1, min(args.pool, args.frames)),
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None

    import zmq

    from streamstore.scaleout.deal import stream_endpoints

    bind = args.connect is None
    endpoint = args.endpoint if bind else args.connect
    timeout = args.timeout if args.timeout > 0 else None
    ctx = zmq.Context()
    senders: list[Any] = []
    try:
        endpoints = stream_endpoints(endpoint, n_streams) if n_streams > 1 else [endpoint]
        for ep in endpoints:
            senders.append(
                Sender(
                    ep,
                    bind=bind,
                    sndhwm=max(1, args.hwm),
                    send_timeout_s=timeout,
                    linger_s=timeout,
                    context=ctx,
                    setup_socket=setup_socket,
                )
            )
    except (OSError, UserError) as exc:  # UserError: a missing or unreadable key
        for tx in senders:
            tx.close(linger_s=0)
        ctx.term()
        raise UserError(str(exc)) from None
    sender = _Streams(senders, block)

    def start_of(sid: str, n: int, meta: dict[str, Any]) -> Start:
        return Start(
            series_id=sid,
            frame_shape=emu.frame_shape,
            dtype=emu.dtype.name,
            frame_time_s=emu.frame_time_s,
            pixel_size_A=args.pixel_size,
            n_frames=n,
            detector=DETECTOR,
            meta=meta,
        )

    summary: dict[str, Any] = {"endpoint": sender.endpoint, "series_id": series_id}
    if n_streams > 1:
        summary["streams"] = [tx.endpoint for tx in senders]
    summary["curve"] = curve_keys is not None
    delivered = False
    try:
        if dark_id is not None:
            sender.send_start(start_of(dark_id, args.dark_frames, {"kind": "dark"}))
            for i in range(args.dark_frames):
                frame, _ = emu.dark_frames(1)
                sender.send_image(dark_id, i, frame[0])
            sender.send_end(dark_id, args.dark_frames)
            summary["dark_series_id"] = dark_id
            summary["dark_frames"] = args.dark_frames

        pool, pool_truth = emu.pool()
        n_pool = len(pool)
        if args.truth:
            ids = np.arange(args.frames, dtype=np.int64)
            pool_truth.take(ids % n_pool, frame_ids=ids).save(args.truth)
        meta = {"kind": "data", "emulator": emu.params(), "dose_per_frame": emu.dose_per_frame}
        sender.send_start(start_of(series_id, args.frames, meta))
        period = 1.0 / args.fps if args.fps > 0 else 0.0
        t0 = time.perf_counter()
        for i in range(args.frames):
            if period:
                delay = t0 + i * period - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            sender.send_image(series_id, i, pool[i % n_pool])
        sender.send_end(series_id, args.frames)
        delivered = True
    except TimeoutError as exc:
        raise UserError(str(exc)) from None
    finally:
        # linger: queued messages still go out (up to --timeout) before the
        # context terminates, unless sending failed
        for tx in senders:
            tx.close(linger_s=None if delivered else 0)
        ctx.term()
    elapsed = time.perf_counter() - t0

    nbytes = args.frames * emu.frame_nbytes
    rate = args.frames / elapsed if elapsed > 0 else 0.0
    summary.update(
        frames=args.frames,
        frame_shape=list(emu.frame_shape),
        dtype=emu.dtype.name,
        seconds=elapsed,
        fps=rate,
        gb_per_s=nbytes / 1e9 / elapsed if elapsed > 0 else 0.0,
        bytes=nbytes,
        pool=n_pool,
        dose_per_frame=emu.dose_per_frame,
        truth=args.truth,
    )
    if args.json:
        print(json.dumps(summary))
    else:
        h, w = emu.frame_shape
        print(
            f"sent {args.frames} frames {h}x{w} {emu.dtype.name} of series {series_id!r} "
            f"to {summary['endpoint']} in {elapsed:.3f} s: {rate:.1f} fps, "
            f"{summary['gb_per_s']:.3f} GB/s"
        )
    return 0


class _Streams:
    """One or more PUSH streams as one sender: start and end on every stream, images
    in blocks of ``block`` frames, stream = (frame_id // block) % N."""

    def __init__(self, senders: list[Any], block: int) -> None:
        self.senders = senders
        self.block = block
        self.endpoint = senders[0].endpoint

    def send_start(self, start: Any) -> None:
        for tx in self.senders:
            tx.send_start(start)

    def send_image(self, series_id: str, frame_id: int, frame: Any) -> None:
        from streamstore.scaleout.deal import worker_of

        k = worker_of(frame_id, len(self.senders), self.block)
        self.senders[k].send_image(series_id, frame_id, frame)

    def send_end(self, series_id: str, n_frames: int) -> None:
        for tx in self.senders:
            tx.send_end(series_id, n_frames)
