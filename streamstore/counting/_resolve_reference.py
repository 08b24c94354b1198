"""Plain numpy reference of the "resolve" counting rule: readable, whole-frame, slow.

The specification that the numba kernel (``_resolve_kernels.py``) and the C
twin (``native_ref/resolve.c``) match bit for bit. Inputs: frames ``(n, H,
W)``, and :func:`streamstore.counting.resolve.resolve_maps` of a calibration:
``lo`` (the peak threshold map of :meth:`~streamstore.Calibration.threshold_maps`),
``lo_c`` (the same at a lower number of sigmas: the candidate threshold),
``dark``, ``gain``, ``qthr`` (int64 charge thresholds of the 2 x 2 quadrants),
the X-ray level and radius, and the split parameters: ``e_unit`` (one
electron's charge, signal units), ``pair16``, ``any16`` (charges in sixteenths
of ``e_unit``) and ``spread16`` (an anisotropy, sixteenths of a square pixel).

For each pixel ``p = (r, c)`` of a frame, ``TMAX`` the largest value of the
frame type:

1. *masked*: ``lo_c[p] == TMAX``; *signal* ``s[p] = (raw[p] - dark[p]) *
   gain[p]`` in int64 (gain 1 without a map), 0 on masked pixels; ``s = 0``
   outside the frame for every sum below;
2. *candidate*: ``raw[p] > lo_c[p]`` (one compare in the frame type); an
   *X-ray hit* is a candidate with ``raw == TMAX`` or ``s > xray_level``;
3. *local maximum*: a candidate whose key ``(s[p], -flat_index(p))`` beats every
   candidate 8-neighbour's (``s[p] > s[q]`` for neighbours earlier in raster
   order, ``>=`` for later ones). The key is a total order, so no two local
   maxima are 8-adjacent (no plateau walk: a plateau may give more than one);
4. *accepted*: a local maximum with ``raw[p] > lo[p]`` (the peak rule), or one
   of its in-frame 2 x 2 quadrants ``Q`` (top-left corners ``(r-1..r,
   c-1..c)``) with ``sum(s over Q) > qthr[top-left of Q]``: the charge rule,
   which finds electrons whose charge is spread so that no pixel passes the
   peak threshold; and no X-ray hit within Chebyshev distance ``radius``;
5. *split*: the partner ``q`` of an accepted ``p`` is its 8-neighbour of largest
   key ``(s, -flat_index)`` among in-frame unmasked ones (none: no split). ``W``
   is the set of in-frame pixels within Chebyshev distance 1 of ``p`` or of
   ``q``, ``S = sum(s over W)``; with ``e = q - p`` and, for ``x`` in ``W``, ``d
   = x - p``, ``u = 2 (d . e) - |e|^2`` (along the axis ``p``-``q``, from its
   midpoint) and ``v = 2 (d_y e_x - d_x e_y)`` (across it), both ``2 |e|`` times
   the distance: ``Su = sum(s u)``, ``Suu = sum(s u^2)``, ``Sv``, ``Svv`` alike,
   all int64. ``a = S Suu - Su^2``, ``b = S Svv - Sv^2`` and the test
   ``16 (a - b) >= 4 spread16 |e|^2 S^2`` are evaluated in float64 in exactly
   this order (each int64 converted first): the variance of the charge along
   the axis exceeds the variance across it by ``spread16 / 16`` square pixels.
   A single electron's cloud is round, so this anisotropy is near 0 whatever
   the point spread; two electrons ``d`` apart add ``d^2 / 4``. ``p`` splits in
   two electrons when ``16 S >= any16 * e_unit`` (charge alone), or ``16 S >=
   pair16 * e_unit`` and the anisotropy test holds (charge and shape), and
   ``p``'s key beats every candidate at Chebyshev distance 2, none of which is a
   local maximum (rule 3): another electron that close lends ``W`` its charge
   and is an event of its own. A split reports a second event at
   ``q``; where several accepted pixels split to the same ``q``, the one of
   lowest flat index reports it;
6. events are listed in ascending flat index ``r * W + c`` (so at most one per
   pixel, as :class:`~streamstore.EventBatch` needs).

Sub-pixel: as the peak rule (``_reference.py``): weights ``w = max(s, 0)`` over the
in-frame 3 x 3 around the event, ``qy = clamp(floor((2 S + 4 Ty) / S), 0, 3)``,
likewise ``qx``, value ``(qy << 2) | qx``; for the two events of a split the
weight of each pixel ``x`` of the 3 x 3 around the event ``a`` (partner ``b``)
is doubled when ``|x - a|^2 < |x - b|^2``, kept when equal, 0 when larger: each
event takes the centre of mass of its own side.
"""

from __future__ import annotations

import numpy as np

# the peak rule's reference: the same neighbours, shifts and sub-pixel quantiser
from streamstore.counting._reference import _NEIGHBOURS, _quantise, _shifted

__all__ = ["count_frame_resolve_reference", "count_resolve_reference"]

_INT64_MAX = np.iinfo(np.int64).max


def _centroid(sp: np.ndarray, ar: np.ndarray, ac: np.ndarray, br, bc) -> np.ndarray:
    """Sub-pixel cells of events ``(ar, ac)`` in the padded signal ``sp`` (pad 2);
    with partners ``(br, bc)`` (None: no partner) each takes its own side."""
    total = np.zeros(ar.size, np.int64)
    ty = np.zeros(ar.size, np.int64)
    tx = np.zeros(ar.size, np.int64)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            wv = np.maximum(sp[ar + dy + 2, ac + dx + 2], 0)
            if br is not None:
                da = dy * dy + dx * dx
                db = (ar + dy - br) ** 2 + (ac + dx - bc) ** 2
                wv = np.where(da < db, 2 * wv, np.where(da == db, wv, 0))
            total += wv
            ty += dy * wv
            tx += dx * wv
    qy = _quantise(2 * total + 4 * ty, total)
    qx = _quantise(2 * total + 4 * tx, total)
    return (qy << 2) | qx


def brightest_neighbour(
    sp: np.ndarray, okp: np.ndarray, rows: np.ndarray, cols: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The brightest unmasked 8-neighbour of each pixel ``(rows, cols)``: its offset
    ``(ey, ex)`` and whether it has one (``has``). ``sp`` and ``okp`` are the signal
    and the unmasked flags padded by 2 on every side. Neighbours are taken in raster
    order, so of equal ones the first wins."""
    best = np.zeros(rows.size, np.int64)
    ey = np.zeros(rows.size, np.int64)
    ex = np.zeros(rows.size, np.int64)
    has = np.zeros(rows.size, bool)
    for dy, dx in _NEIGHBOURS:
        v = sp[rows + dy + 2, cols + dx + 2]
        ok = okp[rows + dy + 2, cols + dx + 2] & (~has | (v > best))
        best = np.where(ok, v, best)
        ey = np.where(ok, dy, ey)
        ex = np.where(ok, dx, ex)
        has |= ok
    return ey, ex, has


def count_frame_resolve_reference(
    raw: np.ndarray,
    lo: np.ndarray,
    lo_c: np.ndarray,
    dark: np.ndarray,
    gain: np.ndarray | None,
    qthr: np.ndarray,
    xray_level: int,
    radius: int,
    subpixel: bool,
    e_unit: int,
    pair16: int,
    any16: int,
    spread16: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Events of one frame: ``(indices uint32, subpixel uint8 or None)``."""
    h, w = raw.shape
    top = np.iinfo(raw.dtype).max
    masked = lo_c == top
    s = raw.astype(np.int64) - dark.astype(np.int64)
    if gain is not None:
        s *= gain.astype(np.int64)
    s[masked] = 0
    cand = raw > lo_c
    xray = cand & ((raw == top) | (s > xray_level))
    lowest = np.iinfo(np.int64).min
    s_cand = np.where(cand, s, lowest)
    event = cand.copy()
    for dy, dx in _NEIGHBOURS:
        nb = _shifted(s_cand, dy, dx, lowest)
        earlier = dy < 0 or (dy == 0 and dx < 0)
        event &= (s > nb) if earlier else (s >= nb)
    local = event.copy()
    # rule 4: the peak rule or a quadrant's charge
    quad = s + _shifted(s, 0, 1, 0) + _shifted(s, 1, 0, 0) + _shifted(s, 1, 1, 0)
    passes = quad > qthr  # qthr is INT64_MAX where a quadrant leaves the frame
    charged = np.zeros_like(event)
    for dy in (-1, 0):
        for dx in (-1, 0):
            charged |= _shifted(passes, dy, dx, False)
    # a charge-only event must also be the maximum of its 5 x 5: one broad cloud
    # with noise on it often shows two 3 x 3 maxima two pixels apart
    wide = np.ones_like(event)
    lonely = np.ones_like(event)  # no local maximum at distance 2
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            if max(abs(dy), abs(dx)) == 2:
                nb = _shifted(s_cand, dy, dx, lowest)
                earlier = dy < 0 or (dy == 0 and dx < 0)
                wide &= (s > nb) if earlier else (s >= nb)
                lonely &= ~_shifted(local, dy, dx, False)
    event &= (raw > lo) | (charged & wide)
    near_xray = np.zeros_like(xray)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            near_xray |= _shifted(xray, dy, dx, False)
    event &= ~near_xray
    flat = np.flatnonzero(event)
    rows, cols = flat // w, flat % w
    # rule 5: partner, window charge and spread
    sp = np.zeros((h + 4, w + 4), np.int64)
    sp[2:-2, 2:-2] = s
    okp = np.zeros((h + 4, w + 4), bool)
    okp[2:-2, 2:-2] = ~masked
    ey, ex, has = brightest_neighbour(sp, okp, rows, cols)
    big = np.zeros(flat.size, np.int64)
    su = np.zeros(flat.size, np.int64)
    suu = np.zeros(flat.size, np.int64)
    sv = np.zeros(flat.size, np.int64)
    svv = np.zeros(flat.size, np.int64)
    e2 = ey * ey + ex * ex
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            inside = ((abs(dy) <= 1) & (abs(dx) <= 1)) | (
                (np.abs(dy - ey) <= 1) & (np.abs(dx - ex) <= 1)
            )
            v = np.where(inside, sp[rows + dy + 2, cols + dx + 2], 0)
            u = 2 * (dy * ey + dx * ex) - e2  # along the axis, doubled
            x = 2 * (dy * ex - dx * ey)  # across it, doubled alike
            big += v
            su += v * u
            suu += v * u * u
            sv += v * x
            svv += v * x * x
    # anisotropy: S^2 (variance along - variance across), in float64 in this order
    fs = big.astype(np.float64)
    a = fs * suu.astype(np.float64) - su.astype(np.float64) * su.astype(np.float64)
    b = fs * svv.astype(np.float64) - sv.astype(np.float64) * sv.astype(np.float64)
    elongated = 16.0 * (a - b) >= (spread16 * 4 * e2).astype(np.float64) * (fs * fs)
    e_unit = np.int64(e_unit)
    split = (
        has
        & wide[rows, cols]
        & lonely[rows, cols]
        & ((16 * big >= any16 * e_unit) | ((16 * big >= pair16 * e_unit) & elongated))
    )
    # the second events; one per pixel, from the lowest flat index
    qf = (rows + ey) * w + (cols + ex)
    order = np.lexsort((flat[split], qf[split]))
    q_sorted = qf[split][order]
    keep = np.ones(q_sorted.size, bool)
    keep[1:] = q_sorted[1:] != q_sorted[:-1]
    src = np.flatnonzero(split)[order][keep]
    all_idx = np.concatenate([flat, qf[src]])
    perm = np.argsort(all_idx, kind="stable")
    indices = all_idx[perm].astype(np.uint32)
    if not subpixel:
        return indices, None
    sub_p = np.empty(flat.size, np.uint8)
    plain = ~split
    sub_p[plain] = _centroid(sp, rows[plain], cols[plain], None, None)
    sr, sc = rows[split], cols[split]
    sub_p[split] = _centroid(sp, sr, sc, sr + ey[split], sc + ex[split])
    qr, qc = rows[src] + ey[src], cols[src] + ex[src]
    sub_q = _centroid(sp, qr, qc, rows[src], cols[src])
    return indices, np.concatenate([sub_p, sub_q])[perm]


def count_resolve_reference(
    frames: np.ndarray,
    lo: np.ndarray,
    lo_c: np.ndarray,
    dark: np.ndarray,
    gain: np.ndarray | None,
    qthr: np.ndarray,
    xray_level: int,
    radius: int,
    subpixel: bool,
    e_unit: int,
    pair16: int,
    any16: int,
    spread16: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Count ``frames (n, H, W)``: ``(offsets int64, indices uint32, subpixel uint8 or None)``."""
    offsets = np.zeros(frames.shape[0] + 1, np.int64)
    idx_parts: list[np.ndarray] = []
    sub_parts: list[np.ndarray] = []
    for i, raw in enumerate(frames):
        idx, sub = count_frame_resolve_reference(
            raw, lo, lo_c, dark, gain, qthr, xray_level, radius, subpixel,
            e_unit, pair16, any16, spread16,
        )  # fmt: skip
        offsets[i + 1] = offsets[i] + idx.size
        idx_parts.append(idx)
        if sub is not None:
            sub_parts.append(sub)
    indices = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.uint32)
    sub_all = None
    if subpixel:
        sub_all = np.concatenate(sub_parts) if sub_parts else np.zeros(0, np.uint8)
    return offsets, indices, sub_all
