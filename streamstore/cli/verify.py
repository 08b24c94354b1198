"""Check a stored series for damage: every chunk's checksum, the decoding, the totals.

Examples::

    streamstore verify run1.h5
    streamstore verify /data/series-42/          # every shard of a series
    streamstore verify run1.h5 --json

Prints the damaged frames as ranges of stored-frame indices (``350:400`` is
frames 350 to 399). Exit status 0 when the file is sound, 1 when anything is
damaged, 2 when the path is not a streamstore file or series. Files written
before checksums existed are still decoded and their totals checked; the
report says their checksums are absent.
"""

from __future__ import annotations

import argparse
import json

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``streamstore verify`` arguments to ``parser``."""
    parser.add_argument("path", help="streamstore HDF5 file, or a series directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    parser.add_argument(
        "--threads", type=int, default=None, help="decompression threads (default: all cores)"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``streamstore verify``; return 0 (sound) or 1 (damaged)."""
    from streamstore.errors import UserError
    from streamstore.store.verify import verify

    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    report = verify(args.path, nthreads=args.threads)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print("\n".join(report.lines()))
    return 0 if report.sound else 1
