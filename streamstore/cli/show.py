"""Draw a stored series to a PNG: summed image, dose per frame, cumulative dose.

Examples::

    streamstore show run1.h5 --out view.png
    streamstore show run1.h5 --out first100.png --start 0 --stop 100 --log
    streamstore show run1.h5 --out roi.png --roi 100,300,200,500
    streamstore show scan.h5 --virtual adf --out adf.png
    streamstore show movie.h5 --virtual com --scan 64,64 --out com.png

``--virtual bf|adf|com`` pictures a 4D-STEM scan instead: the summed
diffraction pattern with the detector drawn on it, and the virtual image (or
the two centre-of-mass components) with the scan axes labelled. Radii
(``--inner``/``--outer``, pixels) default to the bright disk found in the
pattern; ``--scan ROWS,COLS[,FRAMES[,FLYBACK]]`` gives a scan geometry to a
file that has none.

``--start``/``--stop`` pick the stored frames summed into the image (0-based
positions, stop exclusive, like Python slices); the dose panels always show
the whole series with that window shaded. ``--roi row0,row1,col0,col1`` draws
a box and reports the counts inside it. Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``streamstore show`` arguments to ``parser``."""
    parser.add_argument("path", help="streamstore HDF5 file")
    parser.add_argument(
        "--out", "-o", default=None, help="PNG to write (default: <file name>.png here)"
    )
    parser.add_argument("--start", type=int, default=None, help="first frame summed (default 0)")
    parser.add_argument(
        "--stop", type=int, default=None, help="frame after the last one summed (default: end)"
    )
    parser.add_argument(
        "--roi", default=None, metavar="R0,R1,C0,C1", help="region of interest to outline"
    )
    parser.add_argument("--log", action="store_true", help="logarithmic colour scale")
    parser.add_argument(
        "--unit",
        choices=("e/A2", "e/px", "events"),
        default=None,
        help="dose unit of the time panels (default e/A2 if the pixel size is known, else e/px)",
    )
    parser.add_argument("--dpi", type=int, default=100, help="resolution (default 100)")
    parser.add_argument(
        "--virtual", choices=("bf", "adf", "com"), default=None, help="4D-STEM virtual image"
    )
    parser.add_argument("--inner", type=float, default=None, help="detector inner radius (px)")
    parser.add_argument("--outer", type=float, default=None, help="detector outer radius (px)")
    parser.add_argument(
        "--scan", default=None, metavar="ROWS,COLS[,F[,FLYBACK]]", help="scan geometry to use"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``streamstore show``; return the exit status (errors for people raise UserError)."""
    import streamstore
    from streamstore.analysis.plotting import save_summary
    from streamstore.errors import UserError

    if args.dpi < 20 or args.dpi > 600:
        raise UserError(f"--dpi must be between 20 and 600, got {args.dpi}")
    out = Path(args.out) if args.out else Path(Path(args.path).stem + ".png")
    store = streamstore.open(args.path)
    try:
        if args.virtual is not None or args.scan is not None:
            return _virtual(store, out, args)
        save_summary(
            store,
            out,
            dpi=args.dpi,
            start=args.start,
            stop=args.stop,
            roi=args.roi,
            log=args.log,
            unit=args.unit,
            title=Path(args.path).name,
        )
    finally:
        close = getattr(store, "close", None)
        if close is not None:
            close()
    print(f"wrote {out}")
    return 0


def _virtual(store, out: Path, args: argparse.Namespace) -> int:
    from streamstore.analysis.stem_plot import save_virtual
    from streamstore.errors import UserError

    if args.virtual is None:
        raise UserError("--scan goes with --virtual bf|adf|com")
    if args.scan is not None:
        try:
            parts = [int(v) for v in args.scan.split(",")]
        except ValueError:
            raise UserError(
                f"--scan must be ROWS,COLS[,FRAMES[,FLYBACK]], got {args.scan!r}"
            ) from None
        if not 2 <= len(parts) <= 4:
            raise UserError(f"--scan must be ROWS,COLS[,FRAMES[,FLYBACK]], got {args.scan!r}")
        store = store.with_scan(tuple(parts[:2]), *parts[2:])
    save_virtual(
        store,
        out,
        args.virtual,
        inner=args.inner,
        outer=args.outer,
        dpi=args.dpi,
        title=Path(args.path).name,
    )
    print(f"wrote {out}")
    return 0
