"""Export a stored series to the files cryo-EM and 4D-STEM tools read.

- :func:`export_tiff`: a multi-page integer TIFF of dose fractions (each page
  is :meth:`Store.sum` over one fraction of consecutive frames) for RELION,
  MotionCor2 and cryoSPARC, plus two text files: a dose table that says
  which value RELION wants, and a MotionCor2 ``-FmIntFile``.
- :func:`export_npy`: dense count frames of a window (optionally a region
  of interest) as a ``.npy`` file, written in chunks so the window never has
  to fit in memory twice, with a JSON sidecar that keeps the metadata.

stempy's sparse HDF5 is written by :func:`streamstore.export_stempy`.

Dose conventions (the ones people mix up)
-----------------------------------------
- RELION's "dose per frame" (``--dose_per_frame``) is the dose of one movie
  frame *as RELION reads it*, i.e. of one page of the exported TIFF (one dose
  fraction), in e/A^2. For EER, RELION groups ``--eer_grouping`` raw frames
  per fraction and drops the remainder.
- MotionCor2's ``-FmIntFile`` has lines ``<n_frames> <group> <dose>``: the
  number of frames of the input file the line covers, how many of them to sum
  into one rendered frame, and the dose of *each input frame* in e/A^2. For
  our TIFF the input frames are the pages (fractions), so we write one line
  per page, ``1 1 <dose of that page>``, which is exact even when fractions
  differ slightly in dose.
- Both need the pixel size. Without it the tables are in e/px and the
  MotionCor2 file is not written (the result says so).

Orientation: page row ``r`` is camera row ``r`` and page column ``c`` camera
column ``c`` (shape ``(H, W)``); no flip or rotation is applied, so a gain
reference in camera orientation applies unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamstore.errors import UserError
from streamstore.exports.progress import Progress, track
from streamstore.store.selection import UNITS, check_roi, check_window, unit_scale

__all__ = [
    "TiffExport",
    "NpyExport",
    "export_tiff",
    "export_npy",
    "tiff_page_dtype",
    "UNITS",
]


_INT_DTYPES = (np.uint8, np.uint16, np.uint32)


@dataclass
class TiffExport:
    """What :func:`export_tiff` wrote.

    Attributes
    ----------
    path : Path
        The multi-page TIFF.
    dose_path : Path
        The dose table (one line per page, comments say which tool wants what).
    fmint_path : Path or None
        The MotionCor2 ``-FmIntFile``; None without a pixel size.
    fractions : list of slice
        Stored-frame range of each page, in page order.
    page_events : ndarray of int64
        Electron events on each page.
    page_dose : ndarray of float64
        Dose of each page in ``unit``.
    unit : str
        Unit of ``page_dose`` and of the requested dose per fraction.
    dtype : numpy dtype
        Integer dtype of the pages.
    remainder : slice or None
        Frames after the last full fraction (less than one fraction of dose),
        None when the series divides exactly.
    remainder_exported : bool
        Whether ``remainder`` was written as a last, lighter page.
    remainder_dose : float
        Dose of the remainder frames in ``unit`` (0 when there are none).
    """

    path: Path
    dose_path: Path
    fmint_path: Path | None
    fractions: list[slice]
    page_events: np.ndarray
    page_dose: np.ndarray
    unit: str
    dtype: np.dtype
    remainder: slice | None
    remainder_exported: bool
    remainder_dose: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def n_pages(self) -> int:
        """Number of pages written."""
        return len(self.fractions)


@dataclass
class NpyExport:
    """What :func:`export_npy` wrote.

    Attributes
    ----------
    path : Path
        The ``.npy`` file, shape ``(n, h, w)``.
    meta_path : Path
        JSON sidecar: source, window, ROI, frame ids, timestamps, pixel size.
    shape : tuple of int
        Shape of the array written.
    dtype : numpy dtype
        Its dtype.
    """

    path: Path
    meta_path: Path
    shape: tuple[int, ...]
    dtype: np.dtype


# -- validation -----------------------------------------------------------
def _check_unit(unit: str, pixel_size_A: float | None) -> None:
    """Refuse a dose unit this series cannot give (the store's rule: :func:`unit_scale`)."""
    unit_scale(unit, (1, 1), pixel_size_A)


def _check_space(folder: Path, nbytes: int) -> None:
    """Refuse an export that cannot fit on the disk, before writing anything."""
    import shutil

    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise UserError(
            f"the export needs {nbytes / 1e9:.3g} GB but only {free / 1e9:.3g} GB are free in "
            f"{folder}; choose a smaller window or ROI, or another disk"
        )


def _free_out(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists; choose another name or pass overwrite (--overwrite)")
    if not path.parent.exists():
        raise UserError(f"the folder {path.parent} does not exist")


# -- TIFF -----------------------------------------------------------------
def tiff_page_dtype(max_frames_per_page: int) -> np.dtype:
    """Smallest unsigned dtype that holds any page of that many frames.

    A pixel records at most one event per frame (indices are strictly
    ascending within a frame), so a page summing ``n`` frames never exceeds
    ``n`` counts in a pixel.
    """
    for dt in _INT_DTYPES:
        if max_frames_per_page <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def _sidecar_paths(out: Path) -> tuple[Path, Path]:
    stem = out.with_suffix("") if out.suffix.lower() in {".tif", ".tiff"} else out
    return Path(f"{stem}_dose.txt"), Path(f"{stem}_fmint.txt")


def export_tiff(
    store: Any,
    out: str | Path,
    dose_per_fraction: float,
    *,
    unit: str = "e/px",
    remainder: str = "drop",
    dtype: str | np.dtype | None = None,
    overwrite: bool = False,
    source: str | None = None,
    progress: bool | None = None,
) -> TiffExport:
    """Write dose fractions of a series as a multi-page integer TIFF.

    Consecutive stored frames are grouped by :meth:`Store.fractions` so that
    each fraction carries ``dose_per_fraction``; page ``k`` is
    ``store.sum(f.start, f.stop)`` for fraction ``k``.

    Parameters
    ----------
    store : Store
        An open store (:func:`streamstore.open`).
    out : str or Path
        TIFF path. Beside it go ``<stem>_dose.txt`` (dose table; the header
        says the RELION value) and ``<stem>_fmint.txt`` (MotionCor2
        ``-FmIntFile``, only when the pixel size is known).
    dose_per_fraction : float
        Target dose of one fraction, in ``unit``.
    unit : {"e/px", "e/A2", "events"}, default "e/px"
        Unit of ``dose_per_fraction`` and of the page dose in the result.
    remainder : {"drop", "keep"}, default "drop"
        What to do with the frames after the last full fraction: ``"drop"``
        leaves them out as RELION does for EER (they are reported in the
        result and the dose file), ``"keep"`` writes them as a last, lighter
        page.
    dtype : str or dtype or None, default None
        Page dtype (uint8, uint16, uint32). None picks the smallest that can
        hold any page; an explicit dtype is checked page by page and a page
        that would overflow raises UserError.
    overwrite : bool, default False
        Replace existing output files.
    source : str or None, default None
        Source path recorded in the TIFF description and the dose file.
    progress : bool or None, default None
        Progress bar (None: only on a terminal).

    Returns
    -------
    TiffExport
        Paths, fractions, per-page dose and the remainder.

    Raises
    ------
    UserError
        Bad dose, unit, dtype or remainder option; ``e/A2`` without a pixel
        size; a dose per fraction larger than the whole series; existing
        output without ``overwrite``.
    """
    try:
        import tifffile
    except ImportError:  # pragma: no cover - optional extra
        raise UserError("TIFF export needs tifffile: pip install 'streamstore[tiff]'") from None
    out = Path(out)
    dose_path, fmint_path = _sidecar_paths(out)
    pixel = store.pixel_size_A
    _check_unit(unit, pixel)
    if remainder not in ("drop", "keep"):
        raise UserError(f"remainder must be 'drop' or 'keep', got {remainder!r}")
    x = float(dose_per_fraction)
    if not np.isfinite(x) or x <= 0:
        raise UserError(f"dose per fraction must be a positive number, got {dose_per_fraction!r}")
    for p in (out, dose_path) + ((fmint_path,) if pixel else ()):
        _free_out(p, overwrite)
    if overwrite and not pixel and fmint_path.exists():
        fmint_path.unlink()  # a stale -FmIntFile from an earlier export would mislead
    if store.n_frames == 0:
        raise UserError("the series holds no frames yet")

    dose = np.asarray(store.dose(unit=unit), dtype=np.float64)
    total = float(dose.sum())
    if x > total:
        raise UserError(
            f"a dose per fraction of {x:g} {unit} is more than the whole series "
            f"({total:.4g} {unit} in {store.n_frames} frames)"
        )
    fracs = [slice(int(f.start), int(f.stop)) for f in store.fractions(x, unit=unit)]
    fracs = [f for f in fracs if f.stop > f.start]
    # Store.fractions puts frame i in fraction floor(D_i / x), D_i the dose before
    # frame i; the last fraction is a remainder when the series ends before the
    # running dose reaches the end of that fraction's dose interval
    rem: slice | None = None
    if fracs:
        covered = fracs[-1].stop
        if covered < store.n_frames:  # frames the Store left out: report them
            rem = slice(covered, store.n_frames)
        else:
            before_last = float(dose[: fracs[-1].start].sum())
            k_last = np.floor(before_last / x + 1e-12)
            if total < (k_last + 1) * x * (1 - 1e-9):
                rem = fracs.pop()
    if not fracs:
        raise UserError(f"no full fraction of {x:g} {unit} in this series")
    rem_dose = float(dose[rem].sum()) if rem is not None else 0.0
    pages = fracs + ([rem] if (rem is not None and remainder == "keep") else [])

    longest = max(f.stop - f.start for f in pages)
    if dtype is None:
        page_dtype = tiff_page_dtype(longest)
    else:
        try:
            page_dtype = np.dtype(dtype)
        except TypeError:
            raise UserError(f"dtype must be uint8, uint16 or uint32, got {dtype!r}") from None
        if page_dtype not in [np.dtype(d) for d in _INT_DTYPES]:
            raise UserError(f"dtype must be uint8, uint16 or uint32, got {dtype!r}")
    limit = np.iinfo(page_dtype).max

    events = np.asarray(store.event_counts, dtype=np.int64)
    page_events = np.array([int(events[f].sum()) for f in pages], dtype=np.int64)
    page_dose = np.array([float(dose[f].sum()) for f in pages], dtype=np.float64)
    description = json.dumps(
        {
            "streamstore": "dose fractions",
            "source": source or str(getattr(store, "path", "") or "") or None,
            "frame_shape": list(store.frame_shape),
            "pixel_size_A": pixel,
            "dose_per_fraction": x,
            "unit": unit,
            "fractions": [[f.start, f.stop] for f in pages],
            "page_dose": [round(v, 9) for v in page_dose.tolist()],
            "dose": str(getattr(store, "dose_label", "dose: counted events")),
            "remainder": None if rem is None else [rem.start, rem.stop],
            "remainder_exported": bool(rem is not None and remainder == "keep"),
        }
    )
    h, w = store.frame_shape
    nbytes = len(pages) * h * w * page_dtype.itemsize
    _check_space(out.parent, nbytes)
    bigtiff = nbytes > 3_900_000_000
    tmp = out.with_name(out.name + ".part")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
            for k, f in enumerate(track(pages, desc="tiff", unit="page", enabled=progress)):
                img = np.asarray(store.sum(f.start, f.stop))
                if img.size and int(img.max()) > limit:
                    raise UserError(
                        f"page {k} (frames {f.start}:{f.stop}) has a pixel with {int(img.max())}"
                        f" counts, more than {page_dtype.name} holds; use a wider dtype"
                    )
                tif.write(
                    img.astype(page_dtype, copy=False),
                    contiguous=True,
                    photometric="minisblack",
                    description=description if k == 0 else None,
                    metadata=None,
                )
        tmp.replace(out)
    finally:
        if tmp.exists():
            tmp.unlink()

    result = TiffExport(
        path=out,
        dose_path=dose_path,
        fmint_path=fmint_path if pixel else None,
        fractions=pages,
        page_events=page_events,
        page_dose=page_dose,
        unit=unit,
        dtype=page_dtype,
        remainder=rem,
        remainder_exported=bool(rem is not None and remainder == "keep"),
        remainder_dose=rem_dose,
    )
    _write_dose_files(store, result, x, source or str(getattr(store, "path", "") or "?"))
    return result


def _convert(events: np.ndarray, frame_shape: tuple[int, int], pixel: float | None) -> dict:
    npx = float(frame_shape[0] * frame_shape[1])
    out = {"events": events.astype(np.float64), "e/px": events / npx}
    if pixel:
        out["e/A2"] = events / (npx * float(pixel) ** 2)
    return out


def _write_dose_files(store: Any, r: TiffExport, x: float, source: str | None) -> None:
    pixel = store.pixel_size_A
    ids = np.asarray(store.frame_ids)
    # the dose columns are Store.dose: the corrected electrons where the file has them
    per_frame = np.asarray(store.dose("events"), dtype=np.float64)
    page_electrons = np.array([float(per_frame[f].sum()) for f in r.fractions], np.float64)
    conv = _convert(page_electrons, tuple(store.frame_shape), pixel)
    main_unit = "e/A2" if pixel else "e/px"
    per_page = conv[main_unit]
    mean_page = float(per_page.mean())
    raw = _convert(per_frame, store.frame_shape, pixel)
    mean_raw = float(raw[main_unit].mean())
    lines = [
        "# streamstore dose fractions: one line per TIFF page (= one dose fraction)",
        "# " + str(getattr(store, "dose_label", "dose: counted events")),
        f"# tiff: {r.path.name}   source: {source or '?'}",
        f"# frame shape (H, W): {store.frame_shape[0]} x {store.frame_shape[1]}   "
        f"pixel size: {f'{pixel:g} A' if pixel else 'unknown'}",
        f"# requested dose per fraction: {x:g} {r.unit}; pages: {r.n_pages}; "
        f"raw frames per page: {min(f.stop - f.start for f in r.fractions)}"
        f"-{max(f.stop - f.start for f in r.fractions)}",
    ]
    if r.remainder is None:
        lines.append("# remainder: none (the series divides into whole fractions)")
    else:
        n_rem = r.remainder.stop - r.remainder.start
        what = "written as the last page" if r.remainder_exported else "NOT in the TIFF"
        lines.append(
            f"# remainder: frames {r.remainder.start}:{r.remainder.stop} ({n_rem} frames, "
            f"{r.remainder_dose:.6g} {r.unit}) {what}"
        )
    missing = np.asarray(getattr(store, "missing_frame_ids", np.zeros(0)))
    if missing.size:
        lines.append(f"# missing frames (never received, zero dose): {missing.size}")
    fm_name = r.fmint_path.name if r.fmint_path is not None else ""
    if pixel:
        lines += [
            "#",
            f'# RELION (motion correction, "Dose per frame (e/A^2)"): {mean_page:.6g}',
            "#   RELION's 'frame' is one page of this TIFF = one dose fraction; frame grouping 1.",
            f"# MotionCor2: -FmIntFile {fm_name}"
            "   (lines '<frames> <group> <dose per frame, e/A^2>',",
            "#   its frames being the pages of this TIFF),"
            f" or -FmDose {mean_page:.6g} (e/A^2 per page).",
            f"# cryoSPARC: {r.n_pages} fractions (pages), total exposure dose"
            f" {float(per_page.sum()):.6g} e/A^2.",
            f"# dose per raw camera frame: {mean_raw:.6g} e/A^2 (mean; not what either tool"
            " wants for this TIFF)",
        ]
    else:
        lines += [
            "#",
            "# No pixel size recorded: RELION and MotionCor2 want e/A^2 = e/px / (pixel size)^2.",
            f"# Per TIFF page (= per fraction) mean: {mean_page:.6g} e/px; the MotionCor2"
            " -FmIntFile was not written.",
        ]
    cols = ["page", "first_frame", "n_frames", "first_frame_id", "last_frame_id", "events"]
    cols += ["e_per_px"] + (
        ["e_per_A2", "cumulative_e_per_A2"] if pixel else ["cumulative_e_per_px"]
    )
    lines += ["#", "# " + "\t".join(cols)]
    cum = np.cumsum(per_page)
    for k, f in enumerate(r.fractions):
        row = [
            str(k),
            str(f.start),
            str(f.stop - f.start),
            str(int(ids[f.start])),
            str(int(ids[f.stop - 1])),
            str(int(r.page_events[k])),
            f"{conv['e/px'][k]:.9g}",
        ]
        if pixel:
            row.append(f"{conv['e/A2'][k]:.9g}")
        row.append(f"{cum[k]:.9g}")
        lines.append("\t".join(row))
    r.dose_path.write_text("\n".join(lines) + "\n")
    if pixel and r.fmint_path is not None:
        # MotionCor2 reads plain numeric lines: one per page, exact per-page dose
        fm = [f"1 1 {d:.6g}" for d in conv["e/A2"]]
        r.fmint_path.write_text("\n".join(fm) + "\n")


# -- npy -----------------------------------------------------------------
def export_npy(
    store: Any,
    out: str | Path,
    start: int | None = None,
    stop: int | None = None,
    *,
    roi: Any = None,
    dtype: str | np.dtype = np.uint16,
    overwrite: bool = False,
    source: str | None = None,
    chunk_bytes: int = 256 << 20,
    progress: bool | None = None,
) -> NpyExport:
    """Write dense count frames ``start:stop`` (optionally an ROI) to ``.npy``.

    Parameters
    ----------
    store : Store
        An open store.
    out : str or Path
        The ``.npy`` path; the metadata go to ``<out without .npy>.json``.
    start, stop : int or None, default None
        Stored-frame window, ``stop`` exclusive; None means the whole series.
    roi : (row0, row1, col0, col1) or str or None, default None
        Region of interest (half-open row and column ranges).
    dtype : str or dtype, default uint16
        Dtype of the dense frames.
    overwrite : bool, default False
        Replace existing files.
    source : str or None, default None
        Source path recorded in the sidecar.
    chunk_bytes : int, default 256 MiB
        Frames are read and written in chunks of about this size.
    progress : bool or None, default None
        Progress bar (None: only on a terminal).

    Returns
    -------
    NpyExport
        Paths, shape and dtype.
    """
    out = Path(out)
    meta_path = out.with_suffix(".json") if out.suffix == ".npy" else Path(f"{out}.json")
    if out.suffix != ".npy":
        raise UserError(f"the npy output must end in .npy, got {out.name}")
    a, b = check_window(store.n_frames, start, stop, empty_ok=False, need_frames=True)
    r = check_roi(roi, tuple(store.frame_shape))
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise UserError(f"unknown dtype {dtype!r}") from None
    if dt.kind not in "uif":
        raise UserError(f"dtype must be an integer or float type, got {dt.name}")
    for p in (out, meta_path):
        _free_out(p, overwrite)
    h, w = store.frame_shape
    if r is not None:
        h, w = r[1] - r[0], r[3] - r[2]
    shape = (b - a, h, w)
    _check_space(out.parent, int(np.prod(shape)) * dt.itemsize)
    step = max(1, int(chunk_bytes // max(h * w * dt.itemsize, 1)))
    tmp = out.with_name(out.name + ".part")
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dt, shape=shape)
        try:
            with Progress(b - a, "npy", "frame", enabled=progress) as bar:
                for i in range(a, b, step):
                    j = min(i + step, b)
                    arr[i - a : j - a] = store.frames(i, j, roi=r, dtype=dt)
                    bar.update(j - i)
            arr.flush()
        finally:
            del arr
        tmp.replace(out)
    finally:
        if tmp.exists():
            tmp.unlink()
    meta = {
        "streamstore": "dense frames",
        "source": source or str(getattr(store, "path", "") or "") or None,
        "array": out.name,
        "shape": list(shape),
        "axes": ["frame", "row", "col"],
        "dtype": dt.name,
        "start": a,
        "stop": b,
        "roi": None if r is None else list(r),
        "frame_shape": list(store.frame_shape),
        "pixel_size_A": store.pixel_size_A,
        "frame_time_s": getattr(store, "frame_time_s", None),
        "frame_ids": np.asarray(store.frame_ids[a:b]).astype(np.int64).tolist(),
        "timestamps_ns": np.asarray(store.timestamps_ns[a:b]).astype(np.int64).tolist(),
    }
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return NpyExport(path=out, meta_path=meta_path, shape=shape, dtype=dt)
