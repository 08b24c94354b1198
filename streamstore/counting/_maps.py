"""The maps the counting kernels stream, and the row type and variant a calibration leads to.

:func:`kernel_maps` narrows a calibration's threshold and dark maps to the form
the kernels of :mod:`._kernels` read, :func:`frame_only_maps` to single values
where every pixel shares one dark level and one threshold (frames the camera
dark-subtracted: the kernel then streams only the frame); :func:`row_type`
picks the signal-row type
(:func:`wide_rows_pay` says when 16-bit rows beat bytes); :data:`VARIANTS`
lists every combination, which :mod:`streamstore.counting.warmup` compiles.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from streamstore._numba_cache import serialize_saves
from streamstore.counting._kernels import BAND_ROWS
from streamstore.counting._simd import BYTE_TOP

__all__ = [
    "VARIANTS",
    "as_unsigned",
    "frame_only_maps",
    "item_capacity",
    "kernel_maps",
    "row_type",
    "unsigned_bits",
    "wide_rows_pay",
]

_OPTS = {"nogil": True, "cache": True, "error_model": "numpy", "boundscheck": False}
#: sha256 (first 16 hex digits) of _simd.py. numba's on-disk cache is keyed on
#: this file only: njit code here that inlined an intrinsic of _simd.py would run
#: stale machine code after an edit there, unless this file changes too
#: (tests/test_counting.py checks every module that imports _simd.py).
SIMD_SOURCE_SHA = "e48df65a4c5eb3ec"


def item_capacity(w: int) -> int:
    """Most events one item can hold: no two events are 8-adjacent."""
    return ((BAND_ROWS + 1) // 2) * ((w + 1) // 2)


def as_unsigned(a: np.ndarray) -> np.ndarray:
    """Signed integers (wrapped frames and their maps) as the kernel counts them: ``a +
    2**(bits - 1)`` in the unsigned type of the same width, that is the sign bit
    flipped. Order, differences and the type's maximum are kept (a saturated pixel
    stays saturated, a masked one masked), so the events are those of the signed
    values, and no kernel variant is compiled for signed frames. Unsigned ``a`` is
    returned as it is."""
    if a.dtype.kind != "i":
        return a
    bits, half = unsigned_bits(np.ascontiguousarray(a))
    return bits ^ bits.dtype.type(half)


def unsigned_bits(a: np.ndarray, signed: bool = False) -> tuple[np.ndarray, int]:
    """``a`` as kernels compiled for unsigned frames only read it: ``(bits, half)``.

    ``bits`` is ``a``, or its unsigned view where its type is signed. ``half`` is
    the sign bit, ``2**(bits - 1)``, where the values are signed (a signed type,
    or ``signed``: unsigned frames whose values wrapped below zero), else 0. The
    value is then ``bits - 2 half`` at and above ``half`` and ``bits`` below it,
    and ``bits ^ half`` orders as the values do (:func:`as_unsigned` is that flip,
    made): exact, so a kernel reading ``bits`` gives what a signed overload would.
    """
    if a.dtype.kind == "i":
        a = a.view(np.dtype(f"u{a.itemsize}"))
        signed = True
    return a, (1 << (8 * a.itemsize - 1)) if signed else 0


def kernel_maps(lo: np.ndarray, dark: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The maps the kernel streams: ``(dmap, dbase, tmap)``, as narrow as is exact.

    A pixel is a candidate when ``raw > lo``, that is when ``raw - dark > t`` with
    ``t = lo - dark``, never negative in
    :meth:`~streamstore.Calibration.threshold_maps`. Two forms, the first that
    holds:

    * *compact* (16-bit frames whose dark levels span less than 256 within each
      row, thresholds below 255 ADU): ``dmap = dark - dbase[row]`` and ``tmap = t``
      as one byte each, ``tmap = 255`` where ``lo = dark = TMAX`` (masked: never a
      candidate, signal ``raw - TMAX``). The kernel streams 4 bytes per pixel
      instead of 5;
    * ``dmap = dark`` and ``t`` in the unsigned type of the frames' width (masked
      pixels have ``lo = dark = TMAX``: ``t = 0`` and ``raw - dark <= 0``, never
      candidates). One threshold type per frame type, so one compiled variant
      fewer per row type (a one-byte ``t`` for 16-bit frames would save a byte
      per pixel, only on calibrations the compact form does not fit).

    Costs a few passes over the maps, so it is cached with the calibration.

    Raises
    ------
    ValueError
        Where ``lo < dark`` (not a calibration's maps).
    """
    h, w = lo.shape
    zero = np.zeros(h, np.int64)
    if lo.dtype == np.uint16:
        dmap = np.empty((h, w), np.uint8)
        tmap = np.empty((h, w), np.uint8)
        base = np.empty(h, np.int64)
        if _compact_maps(lo, dark, np.uint16(65535), dmap, tmap, base):
            return dmap, base, tmap
    t = lo.astype(np.int64) - dark.astype(np.int64)
    if int(t.min(initial=0)) < 0:
        raise ValueError("threshold map below the dark map: not a calibration's maps")
    return dark, zero, t.astype(f"u{lo.itemsize}")  # lo - dark fits the frame's width


def frame_only_maps(
    maps: tuple[np.ndarray, np.ndarray, np.ndarray], frame_dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """What the kernel's vector pass reads instead of :func:`kernel_maps`' ``maps``
    where every unmasked pixel shares one dark level and one threshold:
    ``(vdmap, vtmap, mptr, mcols)``, or None where they do not or the maps are
    not the compact ones of 16-bit frames (the frames dark-subtracted cameras
    send; 8-bit frames keep their maps, which spares the warm-up a variant).

    ``vdmap`` and ``vtmap`` have the maps' shape and type but are one value each,
    read-only with zero strides: the kernel broadcasts them and streams nothing
    but the frame (:mod:`._simd`). The masked pixels are listed instead, row
    ``r``'s columns ascending in ``mcols[mptr[r]:mptr[r + 1]]``; the kernel makes
    them SKIP after the vector pass, and its scalar paths still read ``maps``, so
    the events are those of ``maps`` bit for bit. ``dbase``, the compact maps'
    dark level per row, is read as before: it is the same on every row with an
    unmasked pixel, and the rows without one are listed whole.
    """
    dmap, dbase, tmap = maps
    fdt = np.dtype(frame_dtype)
    if fdt != np.uint16 or dmap.dtype != np.uint8:  # compact: one-byte maps
        return None
    h, w = dmap.shape
    masked = tmap == 255  # the compact maps' mark of a masked pixel
    good = ~masked
    rows = good.any(axis=1)
    if not rows.any():
        return None
    first = np.argmax(good.ravel())
    d0, t0 = dmap.flat[first], tmap.flat[first]
    b0 = dbase[first // w]
    if np.any(dmap[good] != d0) or np.any(tmap[good] != t0) or np.any(dbase[rows] != b0):
        return None
    r, c = np.nonzero(masked)  # row-major: each row's columns ascending
    mptr = np.zeros(h + 1, np.int64)
    np.cumsum(np.bincount(r, minlength=h), out=mptr[1:])
    one = np.lib.stride_tricks.as_strided
    vd = one(np.array([d0], np.uint8), (h, w), (0, 0), writeable=False)
    vt = one(np.array([t0], np.uint8), (h, w), (0, 0), writeable=False)
    return vd, vt, mptr, c.astype(np.int64)


@njit(**_OPTS)
def _compact_maps(lo, dark, top, dmap, tmap, base):
    """Fill the compact maps of :func:`kernel_maps`; False when they do not hold."""
    h, w = lo.shape
    for r in range(h):
        b = np.int64(1) << 40
        for c in range(w):
            if lo[r, c] != top:
                b = min(b, np.int64(dark[r, c]))
        b = 0 if b == np.int64(1) << 40 else b
        base[r] = b
        for c in range(w):
            if lo[r, c] == top:  # t = 255 stands for dark = TMAX: masked
                if dark[r, c] != top:
                    return False
                dmap[r, c] = 0
                tmap[r, c] = 255
            else:
                delta = np.int64(dark[r, c]) - b
                t = np.int64(lo[r, c]) - np.int64(dark[r, c])
                if delta > 255 or t < 0 or t > 254:
                    return False
                dmap[r, c] = delta
                tmap[r, c] = t
    return True


def row_type(frame_dtype, dmap_dtype, has_gain: bool, wide_rows: bool = False) -> tuple[type, int]:
    """Signal-row type and ceiling of the kernel: ``(np.uint8, 255)``, ``(np.uint16,
    65535)`` or ``(np.int32, 2**31 - 1)``.

    Byte rows (the narrow path, :mod:`._simd`) serve unsigned frames without a
    gain map: a candidate's signal (at least 1) is stored as ``min(s, 255)``, 0
    marks a pixel that is not a candidate. The 3 x 3 test on them is exact for
    every centre below 255 (a neighbour of 255 or more still beats it); the rare
    centre stored as 255 is tested again from the frame. X-ray hits, plateau walks
    and sub-pixel positions are taken from the frame. ``wide_rows`` asks for
    16-bit rows instead, the same code at twice the bytes, for 16-bit frames
    with compact maps whose signals are often 255 or more (:func:`wide_rows_pay`;
    8-bit frames keep bytes: their signals are below 256). Everything else
    (a gain map, 16-bit frames with a two-byte dark map) uses exact int32 rows: one
    compiled variant per map form serves all of them (``has_gain`` is a run-time
    flag), where narrow rows would add one per form.
    """
    fdt, ddt = np.dtype(frame_dtype), np.dtype(dmap_dtype)
    compact = ddt.itemsize < fdt.itemsize
    if fdt.kind == "u" and not has_gain and (compact or fdt.itemsize == 1):
        return (np.uint16, 65535) if wide_rows and compact else (np.uint8, BYTE_TOP)
    return np.int32, 2**31 - 1


#: Every kernel variant a calibration can lead to, as ``(frame dtype, dmap dtype,
#: row dtype)`` (the threshold map's type follows the dark map's): what
#: :mod:`streamstore.counting.warmup` compiles. ``gain`` marks the variants only
#: a gain map leads to, ``frame_only`` the one that reads one dark level and one
#: threshold for every pixel (:func:`frame_only_maps`). Wrapped (signed) frames
#: are counted as unsigned ones (:func:`as_unsigned`): no variant of their own.
VARIANTS = (
    {"frames": "uint16", "dmap": "uint8", "rows": "uint8", "gain": False},
    {"frames": "uint16", "dmap": "uint8", "rows": "uint8", "gain": False, "frame_only": True},
    {"frames": "uint16", "dmap": "uint8", "rows": "uint16", "gain": False},
    {"frames": "uint16", "dmap": "uint16", "rows": "int32", "gain": False},
    {"frames": "uint8", "dmap": "uint8", "rows": "uint8", "gain": False},
    {"frames": "uint16", "dmap": "uint8", "rows": "int32", "gain": True},
    {"frames": "uint8", "dmap": "uint8", "rows": "int32", "gain": True},
)


#: Share of candidates with a signal of BYTE_TOP or more above which 16-bit rows pay.
WIDE_ROWS_SHARE = 0.01


def wide_rows_pay(frame: np.ndarray, lo: np.ndarray, dark: np.ndarray, rows: int = 256) -> bool:
    """Whether counting frames like ``frame`` is faster with 16-bit rows than bytes.

    Byte rows send every candidate whose signal reaches BYTE_TOP through an exact
    scalar test; where that is more than WIDE_ROWS_SHARE of the candidates (a
    camera with several hundred ADU per electron), the 16-bit rows cost less. Looks
    at the first ``rows`` rows of one frame; either choice gives the same events.
    Frames of less than one work item (BAND_ROWS rows) keep bytes: their time is
    the call's, and one kernel variant fewer is compiled.
    """
    if frame.shape[0] < BAND_ROWS:
        return False
    f = np.asarray(frame[:rows], np.int64)
    cand = f > lo[:rows]
    n = int(np.count_nonzero(cand))
    if n == 0:
        return False
    high = np.count_nonzero(cand & (f - dark[:rows] >= BYTE_TOP))
    return bool(high > WIDE_ROWS_SHARE * n)


# the start-up compiles variants in several processes at once (streamstore._numba_cache)
serialize_saves(_compact_maps)
