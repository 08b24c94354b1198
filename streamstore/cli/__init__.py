"""The ``streamstore`` command line.

Each subcommand lives in ``streamstore/cli/<name>.py`` and provides
``add_arguments(parser)`` and ``run(args) -> int``. Those modules import their
heavy dependencies inside ``run`` so that ``streamstore --help`` stays fast.

Errors a person can fix (:class:`streamstore.errors.UserError`, missing files)
are printed as one line on stderr with exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> one-line help; the module is streamstore.cli.<name>
COMMANDS: dict[str, str] = {
    "demo": "emulate a camera, ingest it and summarise the stored series",
    "emulate": "run the camera emulator: stream frames over ZeroMQ",
    "ingest": "receive frames over ZeroMQ, count electrons, store HDF5",
    "fanout": "deal one camera stream over ingest workers on other hosts",
    "status": "print the live status an ingest daemon publishes",
    "info": "summarise a stored series",
    "show": "draw a summary figure (summed image, dose per frame) to PNG",
    "export": "export a stored series to stempy, TIFF, EER or npy",
    "keys": "make CURVE key pairs for authenticated camera links",
    "verify": "check every chunk's checksum and the frame totals; list damaged frames",
}


def parse_shape(text: str) -> tuple[int, int]:
    """Parse a frame shape written ``HxW`` (e.g. ``4092x5760``); an argparse ``type=``.

    Raises
    ------
    argparse.ArgumentTypeError
        When the text is not two positive integers joined by ``x``.
    """
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 4092x5760, got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"expected positive HxW, got {text!r}")
    return h, w


def free_tcp_endpoint() -> str:
    """``tcp://127.0.0.1:<port>`` on a loopback port that is free right now.

    For the demo, benchmarks and tests that start a daemon and a sender on one
    host (another process may take the port before it is bound: fine for those).
    """
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every available subcommand."""
    from streamstore import __version__

    parser = argparse.ArgumentParser(
        prog="streamstore",
        description="Keep up with a direct-detection electron camera.",
    )
    parser.add_argument("--version", action="version", version=f"streamstore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_text in COMMANDS.items():
        try:
            module = importlib.import_module(f"streamstore.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"streamstore.cli.{name}":
                raise
            continue  # subcommand not built yet
        p = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``streamstore`` console script."""
    from streamstore.errors import CorruptDataError, FormatError, UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (UserError, FormatError, FileNotFoundError, FileExistsError, IsADirectoryError) as exc:
        if isinstance(exc, OSError) and exc.strerror:
            msg = f"{exc.strerror}: {exc.filename}"
        else:  # also OSErrors raised with a message only, e.g. FileNotFoundError("no such file")
            msg = str(exc)
        print(f"streamstore {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except CorruptDataError as exc:  # damaged data is not bad input: the verify status
        print(f"streamstore {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` & co. that stopped reading
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
