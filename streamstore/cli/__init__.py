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

# the library homes of two helpers the command line uses; still importable from
# here for scripts written against the command-line module
from streamstore.link.endpoints import free_tcp_endpoint
from streamstore.shapes import parse_shape

__all__ = ["COMMANDS", "build_parser", "free_tcp_endpoint", "main", "parse_shape"]

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
