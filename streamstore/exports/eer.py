"""Export a stored series as an EER movie (Electron Event Representation).

One EER page per camera frame, in the BigTIFF container and run-length /
sub-pixel bitstream that RELION's ``renderEER``, MotionCor2 and tifffile +
imagecodecs decode. The fractionation is then chosen at processing time
(RELION ``--eer_grouping``), and the 4 x 4 sub-pixel positions survive.

What is written (docs/api.md has the full description)
------------------------------------------------------
- Compression 65001 by default: a little-endian, least-significant-bit-first
  bitstream of codes ``run (7 bits) | x (2 bits) | y (2 bits)``. ``run`` is
  the number of empty pixels (row-major, ``row * W + col``) before the
  electron; a run of 127 is an escape (127 more empty pixels, no electron and
  no sub-pixel bits). A last run brings the pixel count to exactly ``H * W``.
  The sub-pixel bits are stored with the top bit of each flipped (raw symbol
  ``((qy << 2) | qx) ^ 0b1010``), which is what both decoders undo.
- Other run widths (4-12) write compression 65002 with the widths in tags
  65007-65009: imagecodecs reads them, RELION refuses them (it takes 65002
  only with 7-bit runs and 1-bit sub-pixel fields), so no reader misreads
  them. Compression 65000 (8-bit runs) is never written: RELION reads its
  escapes (run 255) as 12-bit codes, imagecodecs as 8-bit ones, so a page
  with a run of 255 empty pixels cannot satisfy both.
- Tag 65001 of the first page holds ``<metadata>`` XML (tifffile's test for
  an EER file), the strip byte count is even and at least ``run + 4`` bits
  follow the last code (imagecodecs needs both).

Missing frames (ids the store records as never received) become empty pages
in frame-id order, so the dose and time of the pages stay right; they are
listed in the dose file. Ids neither stored nor recorded missing (another
worker's frames in a sharded series) get no page.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from streamstore.errors import UserError
from streamstore.exports.images import _check_space, _check_unit, _free_out
from streamstore.exports.progress import Progress

__all__ = ["EerExport", "export_eer", "encode_eer_frame", "eer_compression", "CENTRE_CELL"]

#: sub-pixel cell ``(qy << 2) | qx`` written for events stored without one:
#: cell (2, 2), whose raw EER symbol is 0 (the zero offset)
CENTRE_CELL = 0b1010

_SUB_FLIP = 0b1010  # top bit of each 2-bit sub-pixel coordinate is stored flipped
_SUB_BITS = 4  # 2 horizontal + 2 vertical sub-pixel bits (a 4 x 4 grid)


def eer_compression(rle_bits: int) -> int:
    """TIFF compression code for a run-length width: 65001 for 7 bits, else 65002."""
    if not isinstance(rle_bits, (int, np.integer)) or not 4 <= int(rle_bits) <= 12:
        raise UserError(f"rle_bits must be 4-12 (7 is what Falcon 4 writes), got {rle_bits!r}")
    return 65001 if int(rle_bits) == 7 else 65002


def encode_eer_frame(
    indices: np.ndarray, subpixel: np.ndarray | None, n_pixels: int, rle_bits: int = 7
) -> bytes:
    """Encode one frame's events as an EER strip.

    Parameters
    ----------
    indices : ndarray of uint32
        Flat pixel indices ``row * W + col``, strictly ascending, ``< n_pixels``.
    subpixel : ndarray of uint8 or None
        Cell ``(qy << 2) | qx`` of each event; None writes :data:`CENTRE_CELL`.
    n_pixels : int
        ``H * W``.
    rle_bits : int, default 7
        Width of the run-length field.

    Returns
    -------
    bytes
        The strip, an even number of bytes.

    Raises
    ------
    ValueError
        Indices not strictly ascending or outside the frame.
    """
    rle = int(rle_bits)
    esc = (1 << rle) - 1  # an all-ones run is an escape
    width = rle + _SUB_BITS
    idx = np.asarray(indices, dtype=np.int64)
    n = idx.size
    if n and (idx[0] < 0 or idx[-1] >= n_pixels or np.any(np.diff(idx) <= 0)):
        raise ValueError(f"event indices must ascend strictly within 0..{n_pixels - 1}")
    gap = np.diff(idx, prepend=-1) - 1
    n_esc = gap // esc
    code_end = np.cumsum(n_esc * rle + width)
    tail = n_pixels - (int(idx[-1]) + 1 if n else 0)
    tail_esc, tail_rem = divmod(tail, esc)
    end = int(code_end[-1]) if n else 0
    total = end + tail_esc * rle + rle
    # imagecodecs decodes only while more than one full code remains and wants
    # an even byte count; RELION reads 32-bit words past the last code
    nbytes = (total + width + 1 + 7) // 8
    nbytes += nbytes & 1
    # Build the complement of the stream: escapes (all ones) become zeros, so
    # only the event codes and the last run are placed. Codes never overlap, so
    # adding their bytes is OR-ing them; each code spans at most three bytes.
    if n:
        sym = np.full(n, CENTRE_CELL) if subpixel is None else subpixel
        sym = np.asarray(sym, np.uint32) & 0xF
        val = (gap - n_esc * esc).astype(np.uint32) | ((sym ^ _SUB_FLIP) << rle)
        inv = np.append(~val & ((1 << width) - 1), ~tail_rem & esc).astype(np.uint32)
        start = np.append(code_end - width, total - rle)
    else:
        inv = np.array([~tail_rem & esc], np.uint32)
        start = np.array([total - rle], np.int64)
    shifted = inv << (start & 7).astype(np.uint32)
    first = start >> 3
    acc = np.zeros(nbytes + 3)
    for k in range(3):
        acc += np.bincount(first + k, weights=(shifted >> (8 * k)) & 0xFF, minlength=nbytes + 3)
    out = ~acc[:nbytes].astype(np.uint8)
    out[total >> 3] &= (1 << (total & 7)) - 1  # padding after the last run is zero
    out[(total >> 3) + 1 :] = 0
    return out.tobytes()


# -- BigTIFF container ----------------------------------------------------
_SHORT, _LONG, _UNDEFINED, _LONG8 = 3, 4, 7, 16


class _EerPages:
    """Append EER pages to a BigTIFF file one at a time (never the whole movie)."""

    def __init__(self, fh: IO[bytes], shape: tuple[int, int], rle_bits: int, xml: bytes) -> None:
        self.fh = fh
        self.h, self.w = shape
        self.rle = rle_bits
        self.compression = eer_compression(rle_bits)
        self.xml = xml
        self.strip_bytes = 0
        fh.write(b"II" + struct.pack("<HHHQ", 43, 8, 0, 0))
        self._link = 8  # where the offset of the next IFD goes

    def _pad(self) -> int:
        pos = self.fh.tell()
        if pos % 8:
            self.fh.write(b"\0" * (8 - pos % 8))
            pos += 8 - pos % 8
        return pos

    def add(self, strip: bytes) -> None:
        """Write one page: its strip, then its IFD, then link it from the last."""
        fh = self.fh
        entries: list[tuple[int, int, int, bytes]] = []
        if self.xml:  # first page only: tifffile takes the first page's tags
            xml_at = self._pad()
            fh.write(self.xml)
            entries.append((65001, _UNDEFINED, len(self.xml), struct.pack("<Q", xml_at)))
            self.xml = b""
        strip_at = self._pad()
        fh.write(strip)
        self.strip_bytes += len(strip)

        def short(tag: int, v: int) -> tuple[int, int, int, bytes]:
            return (tag, _SHORT, 1, struct.pack("<H6x", v))

        def long(tag: int, v: int) -> tuple[int, int, int, bytes]:
            return (tag, _LONG, 1, struct.pack("<I4x", v))

        entries += [
            long(256, self.w),
            long(257, self.h),
            short(258, 8),  # bits per sample of the decoded counts
            short(259, self.compression),
            short(262, 1),  # min-is-black
            (273, _LONG8, 1, struct.pack("<Q", strip_at)),
            short(277, 1),
            long(278, self.h),  # one strip per page
            (279, _LONG8, 1, struct.pack("<Q", len(strip))),
            short(284, 1),
        ]
        if self.compression == 65002:
            entries += [short(65007, self.rle), short(65008, 2), short(65009, 2)]
        entries.sort()
        ifd_at = self._pad()
        fh.write(struct.pack("<Q", len(entries)))
        for tag, typ, count, value in entries:
            fh.write(struct.pack("<HHQ", tag, typ, count) + value)
        fh.write(struct.pack("<Q", 0))
        fh.seek(self._link)
        fh.write(struct.pack("<Q", ifd_at))
        fh.seek(0, os.SEEK_END)
        self._link = ifd_at + 8 + 20 * len(entries)


def _xml(items: list[tuple[str, Any, str | None]]) -> bytes:
    from xml.sax.saxutils import escape, quoteattr

    parts = ["<metadata>"]
    for name, value, unit in items:
        u = f" unit={quoteattr(unit)}" if unit else ""
        parts.append(f"<item name={quoteattr(name)}{u}>{escape(str(value))}</item>")
    parts.append("</metadata>")
    return "".join(parts).encode()


# -- export ----------------------------------------------------------------
@dataclass
class EerExport:
    """What :func:`export_eer` wrote.

    Attributes
    ----------
    path : Path
        The EER movie (BigTIFF, one page per frame id).
    dose_path : Path
        Dose per raw frame (one line per page) with the RELION grouping.
    fmint_path : Path or None
        MotionCor2 ``-FmIntFile``; None without a pixel size or a requested
        dose per fraction.
    gain_path : Path
        Flat gain reference (float32 TIFF of ones, ``(H, W)``).
    frame_ids : ndarray of int64
        Camera frame id of each page.
    missing_pages : ndarray of int64
        Pages that are empty because their frame never arrived.
    page_events : ndarray of int64
        Events on each page.
    compression : int
        TIFF compression code written (65001 or 65002).
    rle_bits : int
        Run-length width.
    subpixel : bool
        Whether sub-pixel cells came from the store (False: centre cell).
    eer_bits_per_event : float
        Strip bits / events (nan without events).
    store_bits_per_event : float
        The store's event datasets, bits / event.
    file_bits_per_event : float
        Whole EER file (with container) bits / event.
    grouping : int or None
        ``--eer_grouping`` for the requested dose per fraction.
    dropped_frames : int
        Pages RELION leaves out with that grouping (the remainder).
    fraction_dose : float or None
        Mean dose of one fraction with that grouping, in ``unit``.
    unit : str
        Unit of the requested and reported dose.
    notes : list of str
        Things a user should know (no sub-pixel positions, RELION's 4K limit).
    """

    path: Path
    dose_path: Path
    fmint_path: Path | None
    gain_path: Path
    frame_ids: np.ndarray
    missing_pages: np.ndarray
    page_events: np.ndarray
    compression: int
    rle_bits: int
    subpixel: bool
    eer_bits_per_event: float
    store_bits_per_event: float
    file_bits_per_event: float
    grouping: int | None
    dropped_frames: int
    fraction_dose: float | None
    unit: str
    notes: list[str] = field(default_factory=list)

    @property
    def n_pages(self) -> int:
        """Number of pages written."""
        return int(self.frame_ids.size)


def sidecar_paths(out: Path) -> tuple[Path, Path, Path]:
    """``(<stem>_dose.txt, <stem>_fmint.txt, <stem>_gain.tif)`` beside an ``.eer`` file."""
    stem = out.with_suffix("") if out.suffix.lower() == ".eer" else out
    return Path(f"{stem}_dose.txt"), Path(f"{stem}_fmint.txt"), Path(f"{stem}_gain.tif")


def eer_grouping(page_dose: np.ndarray, dose_per_fraction: float) -> tuple[int, int, float]:
    """RELION ``--eer_grouping`` for a dose per fraction: ``(grouping, dropped, dose)``.

    ``grouping`` raw frames per fraction (at least 1) is the nearest to the
    requested dose with the mean dose per page; RELION renders
    ``n_pages // grouping`` fractions and drops the ``dropped`` pages after
    them; ``dose`` is the mean dose of one rendered fraction.
    """
    n = int(page_dose.size)
    mean = float(page_dose.sum()) / n if n else 0.0
    if mean <= 0:
        raise UserError("the series has no dose, so no grouping gives a dose per fraction")
    g = int(min(max(1, round(dose_per_fraction / mean)), n))
    kept = (n // g) * g
    return g, n - kept, float(page_dose[:kept].sum()) / (n // g)


def export_eer(
    store: Any,
    out: str | Path,
    *,
    dose_per_fraction: float | None = None,
    unit: str = "e/px",
    rle_bits: int = 7,
    overwrite: bool = False,
    source: str | None = None,
    progress: bool | None = None,
) -> EerExport:
    """Write a stored series as an EER movie, one page per frame, plus sidecars.

    Parameters
    ----------
    store : Store or str or Path
        An open store (:func:`streamstore.open`) or the path of one.
    out : str or Path
        The ``.eer`` path. Beside it go ``<stem>_dose.txt`` (dose per raw
        frame, the RELION grouping, missing frames), ``<stem>_fmint.txt``
        (MotionCor2 ``-FmIntFile``; needs the pixel size and
        ``dose_per_fraction``) and ``<stem>_gain.tif`` (flat gain reference).
    dose_per_fraction : float or None, default None
        Dose of one fraction wanted at processing, in ``unit``: gives the
        ``--eer_grouping`` and how many frames RELION then drops.
    unit : {"e/px", "e/A2", "events"}, default "e/px"
        Unit of ``dose_per_fraction``.
    rle_bits : int, default 7
        Run-length width: 7 writes compression 65001 (Falcon 4, read by
        RELION, MotionCor2, imagecodecs); other widths 4-12 write 65002
        (imagecodecs only).
    overwrite : bool, default False
        Replace existing output files.
    source : str or None, default None
        Source path recorded in the metadata and the dose file.
    progress : bool or None, default None
        Progress bar (None: only on a terminal).

    Returns
    -------
    EerExport
        Paths, pages, missing pages, bits per event and the grouping.

    Raises
    ------
    UserError
        Bad unit, dose or ``rle_bits``; ``e/A2`` without a pixel size; an
        empty series; existing output without ``overwrite``.
    """
    if isinstance(store, (str, os.PathLike)):
        from streamstore.store.open import open as open_store

        with open_store(store) as st:
            return export_eer(
                st,
                out,
                dose_per_fraction=dose_per_fraction,
                unit=unit,
                rle_bits=rle_bits,
                overwrite=overwrite,
                source=source or str(store),
                progress=progress,
            )
    try:
        import tifffile  # noqa: F401  the gain reference is a TIFF
    except ImportError:  # pragma: no cover - optional extra
        raise UserError("EER export needs tifffile: pip install 'streamstore[tiff]'") from None
    out = Path(out)
    compression = eer_compression(rle_bits)
    pixel = store.pixel_size_A
    _check_unit(unit, pixel)
    x = None
    if dose_per_fraction is not None:
        x = float(dose_per_fraction)
        if not np.isfinite(x) or x <= 0:
            raise UserError(
                f"dose per fraction must be a positive number, got {dose_per_fraction!r}"
            )
    if store.n_frames == 0:
        raise UserError("the series holds no frames yet")
    dose_path, fmint_path, gain_path = sidecar_paths(out)
    for p in (out, dose_path, fmint_path, gain_path):
        _free_out(p, overwrite)
    h, w = (int(v) for v in store.frame_shape)
    stored_ids = np.asarray(store.frame_ids, np.int64)
    counts = np.asarray(store.event_counts, np.int64)
    page_ids = np.union1d(stored_ids, np.asarray(store.missing_frame_ids, np.int64))
    stored_page = np.searchsorted(page_ids, stored_ids)  # page of each stored frame
    page_events = np.zeros(page_ids.size, np.int64)
    page_events[stored_page] = counts
    missing_pages = np.setdiff1d(np.arange(page_ids.size), stored_page)
    esc = (1 << int(rle_bits)) - 1  # an empty page is H * W / esc escapes of rle_bits bits
    page_bytes = (h * w // esc + 1) * int(rle_bits) // 8 + 64
    _check_space(out.parent, page_ids.size * page_bytes + int(counts.sum()) * 2)

    # dose per page in every unit, from store.dose() (missing pages: zero)
    conv = {}
    for u in ("events", "e/px") + (("e/A2",) if pixel else ()):
        conv[u] = np.zeros(page_ids.size, np.float64)
        conv[u][stored_page] = store.dose(u)
    group = dropped = None
    frac_dose = None
    if x is not None:
        group, dropped, frac_dose = eer_grouping(conv[unit], x)

    notes: list[str] = []
    if not store.subpixel:
        notes.append(
            "the store has no sub-pixel positions: every event is written at the centre "
            "cell (2, 2) of the 4 x 4 grid, so super-resolution rendering adds no detail"
        )
    if (h, w) not in ((4096, 4096), (2048, 2048)):
        notes.append(
            f"frames are {h} x {w}: tifffile/imagecodecs read them, RELION renders "
            "only 4096 x 4096 (and, since version 5, 2048 x 2048) EER movies"
        )
    if compression == 65002:
        notes.append(
            f"compression 65002 with {rle_bits}-bit runs: imagecodecs reads it, RELION does not"
        )
    meta = [
        ("numberOfFrames", page_ids.size, None),
        ("sensorImageWidth", w, "pixel"),
        ("sensorImageHeight", h, "pixel"),
        ("streamstore.source", source or str(getattr(store, "path", "") or "?"), None),
        ("streamstore.firstFrameId", int(page_ids[0]), None),
        ("streamstore.missingFrames", missing_pages.size, None),
        ("streamstore.subpixel", "Yes" if store.subpixel else "No", None),
    ]
    dt = getattr(store, "frame_time_s", None)
    if dt and np.isfinite(dt):
        meta += [("frameTime", dt, "s"), ("exposureTime", dt * page_ids.size, "s")]
    if pixel:
        meta += [
            ("sensorPixelSize.width", pixel * 1e-10, "m"),
            ("sensorPixelSize.height", pixel * 1e-10, "m"),
        ]
    tmp = out.with_name(out.name + ".part")
    try:
        with open(tmp, "wb") as fh:
            pages = _EerPages(fh, (h, w), int(rle_bits), _xml(meta))
            _write_pages(store, pages, page_ids.size, stored_page, h * w, progress)
            strip_bytes = pages.strip_bytes
        tmp.replace(out)
    finally:
        if tmp.exists():
            tmp.unlink()

    n_ev = int(counts.sum())
    dose_unit = "e/A2" if pixel else "e/px"
    result = EerExport(
        path=out,
        dose_path=dose_path,
        fmint_path=fmint_path if (pixel and group) else None,
        gain_path=gain_path,
        frame_ids=page_ids,
        missing_pages=missing_pages,
        page_events=page_events,
        compression=compression,
        rle_bits=int(rle_bits),
        subpixel=bool(store.subpixel),
        eer_bits_per_event=strip_bytes * 8 / n_ev if n_ev else float("nan"),
        store_bits_per_event=float(store.bits_per_event),
        file_bits_per_event=out.stat().st_size * 8 / n_ev if n_ev else float("nan"),
        grouping=group,
        dropped_frames=int(dropped or 0),
        fraction_dose=frac_dose,
        unit=unit,
        notes=notes,
    )
    if result.fmint_path is None and overwrite:
        fmint_path.unlink(missing_ok=True)  # not one from an earlier export beside this one
    _write_sidecars(store, result, conv, dose_unit, x, source)
    return result


def _write_pages(
    store: Any,
    pages: _EerPages,
    n_pages: int,
    stored_page: np.ndarray,
    n_pixels: int,
    progress: bool | None,
) -> None:
    """Encode and append every page in order, reading one stored frame at a time."""
    empty = encode_eer_frame(np.zeros(0, np.uint32), None, n_pixels, pages.rle)
    page = 0
    with Progress(n_pages, "eer", "frame", enabled=progress) as bar:
        for i, target in enumerate(stored_page.tolist()):
            for _ in range(target - page):  # frames that never arrived: empty pages
                pages.add(empty)
            ev = store.events(i, i + 1)
            pages.add(encode_eer_frame(ev.indices, ev.subpixel, n_pixels, pages.rle))
            bar.update(target + 1 - page)
            page = target + 1
        pages_left = n_pages - page
        for _ in range(pages_left):
            pages.add(empty)
        bar.update(pages_left)


# -- sidecars ----------------------------------------------------------------
def _gain_note(store: Any) -> str:
    cal = getattr(store, "calibration_summary", None) or {}
    if cal.get("has_gain"):
        return (
            "flat (all 1): the calibration's gain map was applied to the signal before "
            "counting, so the counts are already gain-corrected"
        )
    return (
        "flat (all 1): each counted event is one electron and no gain map was recorded, "
        "so the counts are used as they are (a flat reference leaves them unchanged)"
    )


def _write_sidecars(
    store: Any, r: EerExport, conv: dict, main_unit: str, x: float | None, source: str | None
) -> None:
    """Dose table, MotionCor2 ``-FmIntFile`` and flat gain reference beside the movie."""
    import tifffile

    h, w = (int(v) for v in store.frame_shape)
    pixel = store.pixel_size_A
    per_page = conv[main_unit]
    n, mean = r.n_pages, float(per_page.sum()) / r.n_pages
    codes = {65001: "7-bit runs", 65002: f"{r.rle_bits}-bit runs"}
    lines = [
        "# streamstore EER movie: one line per page (= one raw camera frame)",
        f"# eer: {r.path.name}   source: {source or getattr(store, 'path', '?')}",
        f"# frame shape (H, W): {h} x {w}   pixel size: {f'{pixel:g} A' if pixel else 'unknown'}",
        f"# pages: {n} (frame ids {int(r.frame_ids[0])}..{int(r.frame_ids[-1])}); compression "
        f"{r.compression} ({codes[r.compression]}, 4 x 4 sub-pixel cells "
        + ("from the store)" if r.subpixel else "absent: centre cell (2, 2) written)"),
        f"# bits per event: EER strips {r.eer_bits_per_event:.4g}, EER file "
        f"{r.file_bits_per_event:.4g}, streamstore file {r.store_bits_per_event:.4g}",
        f"# missing frames (never received, written as empty pages, zero dose): "
        f"{r.missing_pages.size}"
        + (
            " at pages "
            + ",".join(str(int(p)) for p in r.missing_pages[:50])
            + (" ..." if r.missing_pages.size > 50 else "")
            if r.missing_pages.size
            else ""
        ),
        f"# {getattr(store, 'dose_label', 'dose: counted events')} (the e_per_* columns)",
        f"# dose per raw frame (Store.dose; mean over pages): {mean:.6g} {main_unit}",
    ]
    if x is None or r.grouping is None:
        lines.append(
            "# no dose per fraction requested: pass dose_per_fraction (--dose-per-fraction)"
            " for the RELION grouping and the MotionCor2 -FmIntFile"
        )
    else:
        g, k = r.grouping, n // r.grouping
        frac_main = float(per_page[: k * g].sum()) / k
        lines += [
            f"# requested dose per fraction: {x:g} {r.unit} -> {g} raw frames per fraction "
            f"(mean {r.fraction_dose:.6g} {r.unit})",
            f"# RELION: --eer_grouping {g}; it renders {k} fractions and drops the last "
            f"{r.dropped_frames} frames"
            + (f" (pages {k * g}..{n - 1})" if r.dropped_frames else ""),
            f'#   RELION "Dose per frame" means per fraction here: {frac_main:.6g} {main_unit}',
            f"# cryoSPARC: EER number of fractions {k}",
        ]
        if r.fmint_path is not None:
            lines.append(
                f"# MotionCor2: -InEer {r.path.name} -FmIntFile {r.fmint_path.name} "
                "(lines '<raw frames> <group> <dose per raw frame, e/A^2>')"
            )
        else:
            lines.append("# no pixel size: MotionCor2 wants e/A^2, the -FmIntFile was not written")
    lines.append(f"# gain reference {r.gain_path.name}: {_gain_note(store)}")
    cols = ["page", "frame_id", "stored", "events", "e_per_px"]
    cols += ["e_per_A2", "cumulative_e_per_A2"] if pixel else ["cumulative_e_per_px"]
    lines += ["#", "# " + "\t".join(cols)]
    stored = np.ones(n, bool)
    stored[r.missing_pages] = False
    cum = np.cumsum(per_page)
    with open(r.dose_path, "w") as fh:  # row by row: 10,000-frame movies stay small
        fh.write("\n".join(lines) + "\n")
        for p in range(n):
            row = f"{p}\t{int(r.frame_ids[p])}\t{int(stored[p])}\t{int(r.page_events[p])}"
            row += f"\t{conv['e/px'][p]:.9g}"
            if pixel:
                row += f"\t{conv['e/A2'][p]:.9g}"
            fh.write(f"{row}\t{cum[p]:.9g}\n")
    if r.fmint_path is not None and r.grouping:
        # one line per fraction with its own mean dose per raw frame (exact when
        # the dose rate drifts); the remainder RELION drops is the last line
        g = r.grouping
        e = conv["e/A2"]
        with open(r.fmint_path, "w") as fh:
            for a in range(0, n, g):
                k = min(g, n - a)
                fh.write(f"{k} {k} {float(e[a : a + g].mean()):.6g}\n")
    tifffile.imwrite(r.gain_path, np.ones((h, w), np.float32), photometric="minisblack")
