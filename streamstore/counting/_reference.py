"""Plain numpy reference of the counting kernel: readable, whole-frame, slow.

This is the specification the numba kernel (``_kernels.py``) and the C twin
(``native_ref/count.c``) must match bit for bit. All three take the same
inputs: frames ``(n, H, W)`` and the output of
:meth:`streamstore.Calibration.threshold_maps` (``lo``, ``dark``, ``gain``,
``xray_level``), plus the X-ray exclusion radius.

For each pixel ``p = (r, c)`` of a frame, with ``TMAX`` the largest value of
the frame type:

1. ``p`` is a *candidate* when ``raw[p] > lo[p]`` (one comparison in the frame
   type; masked pixels have ``lo = TMAX`` and never are);
2. its *signal* is ``s[p] = (raw[p] - dark[p]) * gain[p]`` in int64 (gain 1
   without a gain map); every candidate has ``s >= 1``;
3. a candidate is an *X-ray hit* when ``raw[p] == TMAX`` (saturated) or
   ``s[p] > xray_level``;
4. a candidate is a *local maximum* when, against every in-frame 8-neighbour
   ``q`` that is also a candidate, its key ``(s[p], -flat_index(p))`` is the
   greater: ``s[p] > s[q]`` for neighbours earlier in raster order (rows above,
   left in the same row), ``s[p] >= s[q]`` for later ones. Pixels that are
   not candidates never compete. So of two or more equal adjacent maxima the
   raster-first one wins;
5. *plateaus*: a local maximum with a candidate 8-neighbour of equal signal
   belongs to a plateau, all candidates joined to it through 8-adjacent
   candidates of that same signal; it stays only when it is the plateau's
   raster-first pixel and no candidate next to the plateau has a larger signal.
   So every plateau of equal maxima, whatever its shape, gives exactly one
   event, and a plateau beside a brighter pixel gives none;
6. an *event* is such a local maximum with no X-ray hit within Chebyshev distance
   ``radius`` (``max(|dr|, |dc|) <= radius``, the pixel itself included);
7. events are listed in ascending flat index ``r * W + c``.

Sub-pixel: weights ``w[q] = max(s[q], 0)`` over the in-frame 3 x 3 around the
event (every pixel, candidate or not; masked pixels have ``s <= 0``),
``S = sum(w)``, ``Ty = sum(dr * w)``, ``Tx = sum(dc * w)``;
``qy = clamp(floor((2 S + 4 Ty) / S), 0, 3)``, ``qx`` likewise; the value is
``(qy << 2) | qx``. Integer arithmetic throughout, so the three forms agree
bit for bit.
"""

from __future__ import annotations

import numpy as np

__all__ = ["count_reference", "count_frame_reference"]

_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def _shifted(a: np.ndarray, dy: int, dx: int, fill: object) -> np.ndarray:
    """``out[r, c] = a[r + dy, c + dx]``, ``fill`` outside the frame."""
    h, w = a.shape
    out = np.full_like(a, fill)
    r0, r1 = max(0, -dy), min(h, h - dy)
    c0, c1 = max(0, -dx), min(w, w - dx)
    if r0 < r1 and c0 < c1:
        out[r0:r1, c0:c1] = a[r0 + dy : r1 + dy, c0 + dx : c1 + dx]
    return out


def _plateau_wins(p: int, s: np.ndarray, cand: np.ndarray, h: int, w: int) -> bool:
    """Rule 5: may the local maximum ``p`` stand for its plateau of equal signals?

    The plateau is every candidate joined to ``p`` through 8-adjacent candidates
    of the same signal. ``p`` wins when it is the plateau's raster-first pixel and
    no candidate next to the plateau has a larger signal (no equal neighbour: it wins).
    """
    value = s.flat[p]
    todo, seen = [p], {p}
    while todo:
        q = todo.pop()
        r, c = divmod(q, w)
        for dy, dx in _NEIGHBOURS:
            rr, cc = r + dy, c + dx
            if not (0 <= rr < h and 0 <= cc < w) or not cand[rr, cc]:
                continue
            t = rr * w + cc
            if s[rr, cc] > value or (s[rr, cc] == value and t < p):
                return False
            if s[rr, cc] == value and t not in seen:
                seen.add(t)
                todo.append(t)
    return True


def _quantise(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    q = np.where(num < 0, 0, num // np.maximum(den, 1))
    return np.minimum(q, 3).astype(np.uint8)


def count_frame_reference(
    raw: np.ndarray,
    lo: np.ndarray,
    dark: np.ndarray,
    gain: np.ndarray | None,
    xray_level: int,
    radius: int,
    subpixel: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Events of one frame: ``(indices uint32, subpixel uint8 or None)``."""
    w = raw.shape[1]
    top = np.iinfo(raw.dtype).max
    s = raw.astype(np.int64) - dark.astype(np.int64)
    if gain is not None:
        s *= gain.astype(np.int64)
    cand = raw > lo
    xray = cand & ((raw == top) | (s > xray_level))
    lowest = np.iinfo(np.int64).min
    s_cand = np.where(cand, s, lowest)  # non-candidates never compete
    event = cand.copy()
    for dy, dx in _NEIGHBOURS:
        nb = _shifted(s_cand, dy, dx, lowest)
        earlier = dy < 0 or (dy == 0 and dx < 0)
        event &= (s > nb) if earlier else (s >= nb)
    near_xray = np.zeros_like(xray)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            near_xray |= _shifted(xray, dy, dx, False)
    event &= ~near_xray
    h = raw.shape[0]
    for p in np.flatnonzero(event):
        if not _plateau_wins(int(p), s, cand, h, w):
            event.flat[p] = False
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
    dark: np.ndarray,
    gain: np.ndarray | None,
    xray_level: int,
    radius: int,
    subpixel: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Count ``frames (n, H, W)``: ``(offsets int64, indices uint32, subpixel uint8 or None)``."""
    offsets = np.zeros(frames.shape[0] + 1, np.int64)
    idx_parts: list[np.ndarray] = []
    sub_parts: list[np.ndarray] = []
    for i, raw in enumerate(frames):
        idx, sub = count_frame_reference(raw, lo, dark, gain, xray_level, radius, subpixel)
        offsets[i + 1] = offsets[i] + idx.size
        idx_parts.append(idx)
        if sub is not None:
            sub_parts.append(sub)
    indices = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.uint32)
    sub_all = None
    if subpixel:
        sub_all = np.concatenate(sub_parts) if sub_parts else np.zeros(0, np.uint8)
    return offsets, indices, sub_all
