"""Plain numpy reference of the counting kernel: readable, whole-frame, slow.

This is the specification the numba kernel (``_kernels.py``) and the C twin
(``native_ref/count.c``) must match bit for bit. All three take the same
inputs: frames ``(n, H, W)`` and the per-pixel maps of
:meth:`streamstore.Calibration.threshold_maps`.

For each pixel ``p = (r, c)`` of a frame:

1. signal ``s[p] = (raw[p] - dark[p]) * gain[p]`` in int64 (``gain`` is Q16
   fixed point, 0 on masked pixels so their signal is 0);
2. ``p`` is a candidate when ``raw[p] > lo[p]`` (one comparison in the frame type);
3. ``p`` is a local maximum when its key ``(s[p], -flat_index(p))`` is greater
   than the key of each in-frame 8-neighbour: strictly greater signal than
   neighbours earlier in raster order, greater or equal than later ones
   (the raster-first pixel of equal adjacent maxima wins);
4. ``p`` is an X-ray hit when ``raw[p] > xr[p]``; a candidate within
   Chebyshev distance ``radius`` of any hit is dropped;
5. events are candidates that are local maxima and not dropped, in
   ascending flat index ``r * W + c``.

Sub-pixel: with weights ``w = max(s, 0)`` over the in-frame 3 x 3
neighbourhood (out-of-frame weight 0), ``S = sum(w)``, ``Ty = sum(dy * w)``,
``Tx = sum(dx * w)``; ``qy = clamp(floor((2 S + 4 Ty) / S), 0, 3)``, likewise
``qx``; subpixel ``= (qy << 2) | qx``. All integer arithmetic.
"""

from __future__ import annotations

import numpy as np

__all__ = ["count_reference"]

_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def _shifted(a: np.ndarray, dy: int, dx: int, fill: int) -> np.ndarray:
    """``out[r, c] = a[r + dy, c + dx]``, ``fill`` outside the frame."""
    h, w = a.shape
    out = np.full_like(a, fill)
    r0, r1 = max(0, -dy), min(h, h - dy)
    c0, c1 = max(0, -dx), min(w, w - dx)
    if r0 < r1 and c0 < c1:
        out[r0:r1, c0:c1] = a[r0 + dy : r1 + dy, c0 + dx : c1 + dx]
    return out


def _quantise(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    q = np.where(num < 0, 0, num // np.maximum(den, 1))
    return np.minimum(q, 3).astype(np.uint8)


def count_frame_reference(
    raw: np.ndarray,
    lo: np.ndarray,
    xr: np.ndarray,
    dark: np.ndarray,
    gain: np.ndarray,
    radius: int,
    subpixel: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Events of one frame: ``(indices uint32, subpixel uint8 or None)``."""
    h, w = raw.shape
    s = (raw.astype(np.int64) - dark.astype(np.int64)) * gain.astype(np.int64)
    event = raw > lo
    lowest = np.iinfo(np.int64).min
    for dy, dx in _NEIGHBOURS:
        nb = _shifted(s, dy, dx, lowest)
        earlier = dy < 0 or (dy == 0 and dx < 0)
        event &= (s > nb) if earlier else (s >= nb)
    hit = raw > xr
    near_hit = np.zeros_like(hit)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            near_hit |= _shifted(hit, dy, dx, False)
    event &= ~near_hit
    flat = np.flatnonzero(event)
    indices = flat.astype(np.uint32)
    if not subpixel:
        return indices, None
    weight = np.maximum(s, 0)
    rows, cols = flat // w, flat % w
    total = np.zeros(flat.size, np.int64)
    ty = np.zeros(flat.size, np.int64)
    tx = np.zeros(flat.size, np.int64)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            wv = _shifted(weight, dy, dx, 0)[rows, cols]
            total += wv
            ty += dy * wv
            tx += dx * wv
    qy = _quantise(2 * total + 4 * ty, total)
    qx = _quantise(2 * total + 4 * tx, total)
    return indices, (qy << 2) | qx


def count_reference(
    frames: np.ndarray,
    lo: np.ndarray,
    xr: np.ndarray,
    dark: np.ndarray,
    gain: np.ndarray,
    radius: int,
    subpixel: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Count ``frames (n, H, W)``: ``(offsets int64, indices uint32, subpixel uint8 or None)``."""
    offsets = np.zeros(frames.shape[0] + 1, np.int64)
    idx_parts: list[np.ndarray] = []
    sub_parts: list[np.ndarray] = []
    for i, raw in enumerate(frames):
        idx, sub = count_frame_reference(raw, lo, xr, dark, gain, radius, subpixel)
        offsets[i + 1] = offsets[i] + idx.size
        idx_parts.append(idx)
        if sub is not None:
            sub_parts.append(sub)
    indices = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.uint32)
    sub_all = None
    if subpixel:
        sub_all = np.concatenate(sub_parts) if sub_parts else np.zeros(0, np.uint8)
    return offsets, indices, sub_all
