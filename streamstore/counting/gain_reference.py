"""A gain reference from flat-field frames: each pixel's gain against the sensor's median.

Under a uniform beam every pixel receives the same charge on average, so a
pixel's mean dark-subtracted signal over many flat frames is its gain times a
constant. The correction a :class:`~streamstore.Calibration` multiplies the
signal by is the median pixel's mean over this pixel's mean: signals keep the
scale of a median pixel, thresholds (raw ADU against each pixel's noise) do not
change, and the sub-pixel centroids and fits no longer lean towards the pixels
that happen to amplify more.

What is kept out of the means:

* masked pixels (their gain stays 1: they are never read);
* a pixel's value in a frame where it, or a pixel within the calibration's
  ``xray_radius``, is saturated or its signal exceeds the X-ray threshold (an
  X-ray hit deposits tens of electrons' charge in a few pixels, enough to shift
  a pixel's mean by several per cent);
* the charge the frame's edge does not get: a pixel within ``edge`` of the edge
  receives no charge from electrons that land beyond it, so its mean is low for
  a reason that is not its gain. The rows (and the columns) at each distance from
  the edge are scaled by their median against the interior's before the ratio is
  taken: the deficit depends on the distance, the gain on the pixel.

The relative precision of a pixel's correction is about the coefficient of
variation of one pixel's signal in one frame over the square root of the number
of frames (measured on the emulator: 0.37 at 2 e/px/frame with a 0.5 px charge
cloud): a 2 % reference wants about 350 frames at 2 e/px/frame, which a camera
makes in a fraction of a second. Brighter flats are refused once more than 1 %
of their values reach the X-ray threshold (the cut would no longer be fair to
high-gain pixels).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.ndimage import maximum_filter

from streamstore.counting import calibration_io

if TYPE_CHECKING:
    from streamstore.counting.calibration import Calibration

__all__ = ["MAX_OVER", "MAX_RELATIVE_ERROR", "gain_from_flats", "load_gain"]

#: The largest median relative error of the corrections accepted (per pixel,
#: one standard error): above it the flats are too few or too dim to tell the
#: pixels' gains apart, and a correction would add more scatter than it removes.
MAX_RELATIVE_ERROR = 0.05
#: The largest share of unmasked pixel values that may be saturated or above the
#: X-ray threshold (X-ray hits are far rarer than this; electrons above it mean the
#: flats are too bright for the cut to leave the means proportional to the gain).
MAX_OVER = 0.01
#: :func:`load_gain`'s last file: ``((path, size, mtime_ns), map)``.
_LAST: tuple[tuple[str, int, int], np.ndarray] | None = None
#: Frames summed at a time: bounds the float64 temporaries of a large stack.
_CHUNK_PIXELS = 1 << 24


def _chunks(flats: Any, shape: tuple[int, int]) -> Iterable[np.ndarray]:
    """``flats`` (an (n, H, W) or (H, W) array, or an iterable of them) as (k, H, W) arrays."""
    items = [flats] if isinstance(flats, np.ndarray) else flats
    for item in items:
        arr = np.asarray(item)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3 or arr.shape[1:] != shape:
            raise ValueError(
                f"flat frames must be (n, H, W) or (H, W) of the calibration's frame shape "
                f"{shape}, got shape {arr.shape}"
            )
        if arr.dtype not in (np.dtype(np.uint8), np.dtype(np.uint16)):
            raise ValueError(f"flat frames must be uint8 or uint16, got dtype {arr.dtype}")
        step = max(1, _CHUNK_PIXELS // (shape[0] * shape[1]))
        for i in range(0, arr.shape[0], step):
            yield arr[i : i + step]


def _edge_scaled(mean: np.ndarray, good: np.ndarray, edge: int) -> np.ndarray:
    """``mean`` with the rows and the columns at each distance ``k < edge`` from the
    edge scaled by their median against the interior's: the charge the edge misses
    depends on that distance, not on the pixel (the two rows at distance ``k``, top
    and bottom, share one factor, as do the two columns)."""
    h, w = mean.shape
    if edge <= 0 or h <= 2 * edge or w <= 2 * edge:
        return mean
    inner = (slice(edge, h - edge), slice(edge, w - edge))
    level = float(np.median(mean[inner][good[inner]]))
    out = mean.copy()
    for k in range(edge):
        rows = [k, h - 1 - k]
        vals = mean[rows, edge : w - edge][good[rows, edge : w - edge]]
        if vals.size:
            out[rows, :] *= level / float(np.median(vals))
        cols = [k, w - 1 - k]
        vals = mean[edge : h - edge, cols][good[edge : h - edge, cols]]
        if vals.size:
            out[:, cols] *= level / float(np.median(vals))
    return out


def gain_from_flats(cal: Calibration, flats: Any, *, edge: int = 2) -> np.ndarray:
    """The gain correction map (float32, (H, W)) that flat-field frames measure.

    Parameters
    ----------
    cal : Calibration
        Gives the dark, the mask, the X-ray threshold and whether frames are wrapped.
    flats : array_like or iterable of array_like
        uint8 / uint16 frames under a uniform beam, (n, H, W) or (H, W), or an
        iterable of such arrays (a stack too large to hold at once).
    edge : int, default 2
        Rows and columns at each edge scaled by their own median first (module
        docstring); about three times the charge cloud's width.

    Returns
    -------
    ndarray of float32, shape (H, W)
        Median pixel's mean over each pixel's mean; 1 on masked pixels.

    Raises
    ------
    ValueError
        When the flats have the wrong shape or type, when more than
        :data:`MAX_OVER` of their values are saturated or above the X-ray
        threshold (too bright), when an unmasked pixel has no positive mean (no
        beam there), or when the median relative error of the corrections
        exceeds :data:`MAX_RELATIVE_ERROR` (too few or too dim flats).
    """
    if int(edge) != edge or edge < 0:
        raise ValueError(f"edge must be an integer >= 0, got {edge!r}")
    shape = cal.frame_shape
    good = np.ones(shape, bool) if cal.mask is None else ~cal.mask
    dark = cal.dark.astype(np.float64)
    level = np.inf if cal.xray_threshold is None else float(cal.xray_threshold)
    total = np.zeros(shape, np.float64)
    squares = np.zeros(shape, np.float64)
    n = np.zeros(shape, np.int64)
    over = values = 0
    for chunk in _chunks(flats, shape):
        raw = chunk.view(cal.frame_dtype(chunk.dtype))  # signed when wrapped
        s = raw.astype(np.float64) - dark
        hit = (raw == np.iinfo(raw.dtype).max) | (s > level)
        over += int(np.count_nonzero(hit[:, good]))
        values += chunk.shape[0] * int(good.sum())
        if cal.xray_radius and hit.any():
            # an X-ray hit's surroundings hold its charge below the level too
            size = 2 * cal.xray_radius + 1
            hit = maximum_filter(hit, size=(1, size, size), mode="constant")
        keep = ~hit
        s[hit] = 0.0
        total += s.sum(axis=0)
        squares += np.square(s).sum(axis=0)
        n += keep.sum(axis=0)
    if not values:
        raise ValueError("no flat frames were given")
    if over > MAX_OVER * values:
        # a cut at a fixed level takes more of a high-gain pixel's values than of a
        # low-gain one's: the means would no longer scale with the gain
        raise ValueError(
            f"{100 * over / values:.2g} % of the flat frames' pixel values are saturated or "
            f"above the X-ray threshold ({level:g}): the flats' dose is too high for a "
            "gain reference (about 2 e/px/frame keeps them below it)"
        )
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / n
        sem = np.sqrt(np.maximum(squares / n - mean**2, 0.0) / np.maximum(n - 1, 1))
    dim = good & ~(mean > 0)
    if dim.any():
        raise ValueError(
            f"{int(dim.sum())} unmasked pixels have no positive mean signal in the flat "
            "frames: flats need a uniform beam on every pixel (mask the rest)"
        )
    rel = float(np.median(sem[good] / mean[good]))
    if rel > MAX_RELATIVE_ERROR:
        raise ValueError(
            f"the flat frames measure each pixel's gain to {100 * rel:.1f} % (median), "
            f"more than {100 * MAX_RELATIVE_ERROR:.0f} %: take more flat frames or a "
            "higher dose"
        )
    mean = _edge_scaled(mean, good, int(edge))
    gain = np.ones(shape, np.float32)
    gain[good] = (float(np.median(mean[good])) / mean[good]).astype(np.float32)
    return gain


def load_gain(path: str | Path) -> np.ndarray:
    """A gain map from a file: ``.npy`` (an (H, W) array, as ``np.save`` writes
    ``cal.with_gain_reference(flats).gain``), ``.tif`` / ``.tiff`` (one 2-d
    page of the same factors: they multiply the signal) or
    a :meth:`Calibration.save` file (its ``gain``).

    The map is read-only, and the last file read is kept: the daemon's options
    check and its start both ask for it (and a broker once per worker), so a
    file of the same path, size and modification time is read once a process.

    Raises
    ------
    ValueError
        When the file cannot be read as either, holds no gain map, or the map is
        not a finite, positive (H, W) array (one sentence naming the file).
    """
    global _LAST
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"gain reference {path}: no such file")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if _LAST is not None and _LAST[0] == key:
        return _LAST[1]
    gain = _read_gain(path)
    gain.flags.writeable = False
    _LAST = (key, gain)
    return gain


def _read_gain(path: Path) -> np.ndarray:
    """:func:`load_gain`'s reading and checks of one file."""
    try:
        if path.suffix == ".npy":
            gain = np.load(path, allow_pickle=False)
        elif path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            gain = tifffile.imread(path)
        else:
            fields = calibration_io.read(path)
            gain, mask = fields["gain"], fields["mask"]
            if gain is not None and mask is not None:  # never read there: any value
                gain = np.where(mask, np.float32(1), gain)
    except Exception as exc:  # whatever a file that is neither makes the readers raise
        raise ValueError(
            f"gain reference {path}: not a .npy array, a TIFF or a calibration file ({exc})"
        ) from None
    if gain is None:
        raise ValueError(f"gain reference {path}: the calibration file holds no gain map")
    gain = np.asarray(gain)
    if gain.ndim != 2 or gain.dtype.kind not in "iuf":
        raise ValueError(
            f"gain reference {path}: expected a numeric (H, W) map, got {gain.dtype} "
            f"of shape {gain.shape}"
        )
    if not np.all(np.isfinite(gain) & (gain > 0)):
        raise ValueError(f"gain reference {path}: every value must be finite and > 0")
    return gain.astype(np.float32)
