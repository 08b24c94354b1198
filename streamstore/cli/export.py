"""Export a stored series to stempy, LiberTEM's raw_csr, a dose-fractionated TIFF, EER, or npy.

Examples::

    # 4D-STEM: stempy's sparse HDF5 (version 3)
    streamstore export run1.h5 --format stempy run1_stempy.h5
    # 4D-STEM: LiberTEM's raw_csr (scan.toml + scan.{indptr,indices,data}.raw)
    streamstore export scan.h5 --format libertem scan.toml

    # cryo-EM: one TIFF page per 1 e/A^2 fraction, plus run1_dose.txt (the
    # value RELION wants) and run1_fmint.txt (MotionCor2 -FmIntFile)
    streamstore export run1.h5 --format tiff --dose-per-fraction 1 --unit e/A2 run1.tif

    # cryo-EM, fractionation chosen later: one EER page per frame with its
    # sub-pixel positions, plus run1_dose.txt (RELION --eer_grouping for
    # 1 e/A^2 per fraction), run1_fmint.txt and a flat run1_gain.tif
    streamstore export run1.h5 run1.eer --format eer --dose-per-fraction 1 --unit e/A2

    # a window of dense frames (optionally a region of interest) as .npy
    streamstore export run1.h5 --format npy --start 0 --stop 100 --roi 0,128,0,128 win.npy

Frames after the last full dose fraction (the remainder) are reported; by
default they are left out of the TIFF as RELION does, ``--remainder keep``
writes them as a last, lighter page.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``streamstore export`` arguments to ``parser``."""
    parser.add_argument("path", help="streamstore HDF5 file")
    parser.add_argument("out", help="output file")
    parser.add_argument(
        "--format",
        "-f",
        required=True,
        choices=("stempy", "libertem", "tiff", "eer", "npy"),
        help="output format",
    )
    t = parser.add_argument_group("tiff (dose fractions) and eer")
    t.add_argument(
        "--dose-per-fraction",
        type=float,
        default=None,
        help="dose of one TIFF page, or (eer, optional) of one fraction at processing, in --unit",
    )
    t.add_argument(
        "--unit",
        choices=("e/px", "e/A2", "events"),
        default="e/px",
        help="unit of --dose-per-fraction (default e/px; e/A2 needs the pixel size)",
    )
    t.add_argument(
        "--remainder",
        choices=("drop", "keep"),
        default="drop",
        help="frames after the last full fraction: leave out (default) or add as a last page",
    )
    n = parser.add_argument_group("npy (dense frames) and tiff page dtype")
    n.add_argument("--start", type=int, default=None, help="first frame (npy, stempy; default 0)")
    n.add_argument(
        "--stop", type=int, default=None, help="frame after the last (npy, stempy; default end)"
    )
    n.add_argument("--roi", default=None, metavar="R0,R1,C0,C1", help="region of interest (npy)")
    n.add_argument(
        "--dtype",
        default=None,
        choices=("uint8", "uint16", "uint32"),
        help="integer dtype (npy default uint16; tiff default: smallest that holds every page)",
    )
    e = parser.add_argument_group("eer (one page per frame)")
    e.add_argument(
        "--rle-bits",
        type=int,
        default=None,
        help="run-length bits: 7 (default: compression 65001, as the Falcon 4 writes) "
        "or 4-12 (65002, read by imagecodecs, not RELION)",
    )
    st = parser.add_argument_group("stempy (4D-STEM)")
    st.add_argument(
        "--scan-shape",
        default=None,
        metavar="ROWSxCOLS",
        help="scan shape whose size divides the exported frames (default 1xN)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _check_unused(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    from streamstore.errors import UserError

    for name in names:
        if getattr(args, name) not in (None, False):
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} does not apply to --format {args.format}")


def run(args: argparse.Namespace) -> int:
    """Run ``streamstore export``; return the exit status (errors for people raise UserError)."""
    from pathlib import Path

    import streamstore
    from streamstore.errors import UserError

    if args.format == "tiff" and args.dose_per_fraction is None:
        raise UserError("--format tiff needs --dose-per-fraction (the dose of one TIFF page)")
    if args.format != "eer":
        _check_unused(args, ("rle_bits",))
    if args.format == "libertem":
        return _libertem(args)
    if args.format == "stempy":
        _check_unused(args, ("dose_per_fraction", "roi", "dtype"))
    elif args.format == "tiff":
        _check_unused(args, ("start", "stop", "roi", "scan_shape"))
    elif args.format == "eer":
        _check_unused(args, ("start", "stop", "roi", "scan_shape", "dtype"))
        if args.remainder != "drop":
            raise UserError("--remainder does not apply to --format eer (RELION drops it)")
    else:
        _check_unused(args, ("dose_per_fraction", "scan_shape"))
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; choose another name or pass --overwrite")

    if args.format == "stempy":
        from streamstore.store.selection import check_window

        scan = _scan_shape(args.scan_shape)
        store = streamstore.open(args.path)  # errors for people before the export starts
        try:
            a, b = check_window(
                store.n_frames, args.start, args.stop, empty_ok=False, need_frames=True
            )
            if out.exists():
                out.unlink()
            try:
                streamstore.export_stempy(store, out, start=a, stop=b, scan_shape=scan)
            except BaseException:
                out.unlink(missing_ok=True)  # no half-written file
                raise
        finally:
            _close(store)
        if scan is None and store.scan is not None:
            scan = store.scan.scan_shape
        shape = f"scan {scan[0]}x{scan[1]}" if scan else f"scan 1x{b - a}"
        print(f"wrote {out}: stempy sparse HDF5 (version 3), frames {a}:{b}, {shape}")
        return 0

    if args.format == "eer":
        return _run_eer(args, out)

    from streamstore.exports.images import export_npy, export_tiff

    store = streamstore.open(args.path)
    try:
        if args.format == "tiff":
            r = export_tiff(
                store,
                out,
                args.dose_per_fraction,
                unit=args.unit,
                remainder=args.remainder,
                dtype=args.dtype,
                overwrite=args.overwrite,
                source=str(args.path),
            )
            sizes = [f.stop - f.start for f in r.fractions]
            print(
                f"wrote {r.path}: {r.n_pages} pages ({r.dtype.name}), "
                f"{min(sizes)}-{max(sizes)} frames per page, "
                f"{r.page_dose.mean():.4g} {r.unit} per page on average "
                f"({getattr(store, 'dose_label', 'dose: counted events')})"
            )
            if r.remainder is None:
                print("remainder: none")
            else:
                n_rem = r.remainder.stop - r.remainder.start
                what = (
                    "written as the last page"
                    if r.remainder_exported
                    else "not exported (--remainder keep adds them as a last page)"
                )
                print(
                    f"remainder: {n_rem} frames ({r.remainder.start}:{r.remainder.stop}, "
                    f"{r.remainder_dose:.4g} {r.unit}) {what}"
                )
            print(f"wrote {r.dose_path} (dose per page; the header gives RELION's value)")
            if r.fmint_path is not None:
                print(f"wrote {r.fmint_path} (MotionCor2 -FmIntFile, e/A^2 per page)")
            else:
                print("no pixel size recorded: MotionCor2 -FmIntFile not written (needs e/A^2)")
        else:
            r = export_npy(
                store,
                out,
                args.start,
                args.stop,
                roi=args.roi,
                dtype=args.dtype or "uint16",
                overwrite=args.overwrite,
                source=str(args.path),
            )
            print(f"wrote {r.path}: shape {r.shape}, {r.dtype.name}; metadata in {r.meta_path}")
    finally:
        _close(store)
    return 0


def _run_eer(args: argparse.Namespace, out: object) -> int:
    import streamstore

    store = streamstore.open(args.path)
    try:
        r = streamstore.export_eer(
            store,
            out,
            dose_per_fraction=args.dose_per_fraction,
            unit=args.unit,
            rle_bits=7 if args.rle_bits is None else args.rle_bits,
            overwrite=args.overwrite,
            source=str(args.path),
        )
    finally:
        _close(store)
    print(
        f"wrote {r.path}: {r.n_pages} EER pages (compression {r.compression}), "
        f"{r.eer_bits_per_event:.3g} bits/event (store: {r.store_bits_per_event:.3g})"
    )
    if r.missing_pages.size:
        print(
            f"missing frames: {r.missing_pages.size} written as empty pages"
            " (listed in the dose file)"
        )
    for note in r.notes:
        print(f"note: {note}")
    if r.grouping is not None:
        print(
            f"RELION --eer_grouping {r.grouping}: {r.n_pages // r.grouping} fractions of "
            f"{r.fraction_dose:.4g} {r.unit}, {r.dropped_frames} frames dropped"
        )
    print(f"wrote {r.dose_path} (dose per raw frame, grouping, missing frames)")
    if r.fmint_path is not None:
        print(f"wrote {r.fmint_path} (MotionCor2 -FmIntFile, e/A^2 per raw frame)")
    print(f"wrote {r.gain_path} (flat gain reference)")
    return 0


def _scan_shape(text: str | None) -> tuple[int, int] | None:
    from streamstore.errors import UserError

    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        rows, cols = (int(p) for p in parts)
    except ValueError:
        raise UserError(f"--scan-shape must be ROWSxCOLS, e.g. 32x48, got {text!r}") from None
    if rows < 1 or cols < 1:
        raise UserError(f"--scan-shape must be positive, got {text!r}")
    return rows, cols


def _close(store: object) -> None:
    close = getattr(store, "close", None)
    if close is not None:
        close()


def _libertem(args: argparse.Namespace) -> int:
    """``--format libertem``: the whole scan (or movie) as LiberTEM's raw_csr dataset."""
    from pathlib import Path

    import streamstore
    from streamstore.exports.libertem_io import export_raw_csr

    _check_unused(args, ("dose_per_fraction", "roi", "dtype", "start", "stop", "scan_shape"))
    toml = Path(args.out)
    if toml.suffix != ".toml":
        toml = toml.with_name(toml.name + ".toml")
    outs = [toml] + [toml.parent / f"{toml.stem}.{k}.raw" for k in ("indptr", "indices", "data")]
    if args.overwrite:
        for p in outs:
            p.unlink(missing_ok=True)
    store = streamstore.open(args.path)
    try:
        try:
            export_raw_csr(store, toml)
        except FileExistsError:
            from streamstore.errors import UserError

            have = ", ".join(str(p) for p in outs if p.exists())
            raise UserError(f"{have} exists; choose another name or pass --overwrite") from None
        except BaseException:
            for p in outs:
                p.unlink(missing_ok=True)
            raise
        nav = store.scan.scan_shape if store.scan is not None else (1, store.n_frames)
    finally:
        _close(store)
    print(f"wrote {toml}: LiberTEM raw_csr, nav {nav[0]}x{nav[1]}")
    return 0
