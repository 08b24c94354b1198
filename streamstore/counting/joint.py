"""The "joint" counting rule: a frame's electron clouds fitted together where they crowd.

The fit rule (:mod:`streamstore.counting.fit`) fits each event's 5 x 5 window on
its own, beside its neighbours' clouds as they start. At 0.05 e/px/frame most
electrons have another within 2 px, and what it loses there is crowding: a
third electron beside a pair, a neighbour's cloud taken for a second electron,
a pair 1-1.5 px apart among others. Crowded-field photometry (DAOPHOT's
ALLSTAR) fits every source of a group together and looks in the residual for
the sources left. The joint rule does that with the fit rule's events:

1. each event becomes a cloud ``(a, y, x, width)`` of one model of the frame
   (a pixel-integrated Gaussian, the fit rule's profile table; the width free,
   held near the series' by the fit rule's prior);
2. each cloud is refitted with the clouds within 2.5 px, on the union of their
   5 x 5 windows, the model of every other cloud held, twice over the frame;
3. clouds are added where the residual's 3 x 3 holds half an electron, and
   heavy (over 1.3 electrons) or wide clouds tried as two, each kept where the
   chi-square of its region falls by more than 30 (20 for a cloud both heavy
   and wide: two merged electrons) with every cloud over 0.35 electrons, none
   moved 1.5 px and no two within 0.75 px; twice at most, then one more refit;
4. a cloud of less than 0.7 electrons beside another goes where the group
   fits without it within that chi-square of 30 (it must earn its place as an
   added one does), and one of 0.35 electrons or less beside another is that
   one's charge, not an electron; the others are the events, one a pixel
   (:func:`place_events`).

``_joint_reference.py`` is the fit's specification (compiled as it stands by
``_joint_kernels.py``, mirrored in ``native_ref/joint.c``). Masked pixels and the
surroundings of X-ray hits hold nothing to fit (:func:`frame_inputs`), as the
counter leaves them. A frame's fit is sequential and frames run on threads: the
events do not depend on the thread count. Costly (about 3 fits an event, of
some 30 pixels and 1-2 clouds each): for frames counted after the fact.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.ndimage import maximum_filter

from streamstore.counting._joint_reference import joint_conf
from streamstore.counting.fit import cloud_table

__all__ = ["frame_inputs", "joint_conf", "joint_events", "joint_form", "place_events"]


def joint_form(implementation: str, threads: int | None = 1) -> Any:
    """The fit of one form (``implementation``: "numba", "reference" or "native"):
    a callable of ``(frames, e, width, cdf, pdf, t0, inv_h, conf)`` where
    ``frames`` is an iterable of ``(signal, iv, starts)``, returning one ``(clouds,
    event)`` a frame."""
    if implementation == "numba":
        from functools import partial

        from streamstore.counting._joint_kernels import joint_frames

        return partial(joint_frames, threads=threads)
    if implementation == "reference":
        from streamstore.counting._joint_reference import joint_frames_reference as one
    else:
        from native_ref import joint_frame_native as one

    def each(frames, *args):
        return [one(*f, *args) for f in frames]

    return each


def frame_inputs(
    raw: np.ndarray,
    dark: np.ndarray,
    gain: np.ndarray | None,
    lo_c: np.ndarray,
    xray_level: int,
    radius: int,
    iv_map: np.ndarray,
    model_error: float,
) -> tuple[np.ndarray, np.ndarray]:
    """One frame's ``(signal, iv)`` for the fit (float64, (H, W)): the signal
    ``(raw - dark) * gain`` and the weight ``iv_map / (1 + iv_map * err^2)``, ``err
    = model_error * max(signal, 0)`` (as the fit rule's windows), both 0 where
    ``iv_map`` is 0 (masked) and within ``radius`` of an X-ray hit (a candidate,
    ``raw > lo_c``, saturated or of signal above ``xray_level``, as the resolve
    rule tells them)."""
    top = np.iinfo(raw.dtype).max
    s = raw.astype(np.int64) - dark.astype(np.int64)
    if gain is not None:
        s *= gain.astype(np.int64)
    hit = (raw > lo_c) & ((raw == top) | (s > xray_level))
    off = iv_map <= 0
    if hit.any():
        off = off | maximum_filter(hit, 2 * radius + 1, mode="constant")
    signal = np.where(off, 0.0, s.astype(np.float64))
    err = model_error * np.maximum(signal, 0.0)
    iv = np.where(off, 0.0, iv_map / (1.0 + iv_map * err * err))
    return signal, iv


def place_events(
    clouds: np.ndarray, event: np.ndarray, h: int, w: int
) -> tuple[np.ndarray, np.ndarray]:
    """One frame's events from its clouds: ``(indices uint32, sub uint8)``, in
    ascending pixel order, one a pixel.

    Each event's place is its cloud's centre (on the frame's edge where fitted
    just beyond it); ``sub`` its quarter-pixel cell ``4 * row + column``. Two in
    one pixel (about 1 in 4 000 events at 0.05 e/px/frame): the cloud of more
    charge keeps it (the first on a tie), the other goes to the pixel it leans
    towards (away from the first's centre, along the axis they lie farther apart
    on), on that pixel's near edge; where that is off the frame or held too, it
    is one electron found twice and goes.
    """

    def cell(v: np.ndarray) -> np.ndarray:  # the quarter-pixel cell along one axis
        return np.clip(np.floor(4.0 * (v - np.floor(v))), 0, 3).astype(np.int64)

    keep = np.flatnonzero(event)
    a = clouds[keep, 0]
    y = np.clip(clouds[keep, 1], 0.0, h - 1e-6)
    x = np.clip(clouds[keep, 2], 0.0, w - 1e-6)
    r, c = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    key = r * w + c
    order = np.lexsort((np.arange(keep.size), -a, key))
    first = np.ones(order.size, bool)
    first[1:] = key[order][1:] != key[order][:-1]
    taken = set(key[order][first].tolist())
    out_key = list(key[order][first])
    out_sub = list((cell(y[order][first]) << 2) | cell(x[order][first]))
    holder = {int(k): int(i) for k, i in zip(key[order][first], order[first], strict=True)}
    for i in order[~first]:
        j = holder[int(key[i])]
        dy, dx = y[i] - y[j], x[i] - x[j]
        rr, cc = int(r[i]), int(c[i])
        sy, sx = int(cell(y[i : i + 1])[0]), int(cell(x[i : i + 1])[0])
        if abs(dy) >= abs(dx):
            rr, sy = (rr - 1, 3) if dy < 0 else (rr + 1, 0)
        else:
            cc, sx = (cc - 1, 3) if dx < 0 else (cc + 1, 0)
        k = rr * w + cc
        if 0 <= rr < h and 0 <= cc < w and k not in taken:
            taken.add(k)
            out_key.append(k)
            out_sub.append((sy << 2) | sx)
    out_key_a = np.asarray(out_key, np.int64)
    s = np.argsort(out_key_a, kind="stable")
    return out_key_a[s].astype(np.uint32), np.asarray(out_sub, np.int64)[s].astype(np.uint8)


def joint_events(
    arr: np.ndarray,
    maps: tuple[np.ndarray, ...],
    radius: int,
    iv_map: np.ndarray,
    found: tuple[np.ndarray, np.ndarray, np.ndarray],
    e_unit: float,
    width: float,
    model_error: float,
    fitter: Any,
    conf: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The frames ``arr`` (n, H, W) counted by the joint rule from the fit rule's
    events ``found`` (``(offsets, indices, sub)``, sub-pixel): ``(offsets, indices,
    sub)``.

    ``maps``: the resolve rule's ``(lo, lo_c, dark, gain, qthr, xray_level)``;
    ``iv_map``: the fit's weights (:func:`~streamstore.counting.fit.fit_maps`);
    ``e_unit``: one electron's charge in signal units; ``width``: the series'
    cloud width; ``fitter``: :func:`joint_form`'s; ``conf``: :func:`joint_conf`'s
    (its defaults without).
    """
    n, h, w = arr.shape
    _, lo_c, dark, gain, _, level = maps
    offsets, indices, sub = found
    conf = joint_conf() if conf is None else conf

    def inputs(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        signal, iv = frame_inputs(arr[k], dark, gain, lo_c, level, radius, iv_map, model_error)
        pix = indices[offsets[k] : offsets[k + 1]].astype(np.int64)
        cells = sub[offsets[k] : offsets[k + 1]].astype(np.int64)
        starts = np.column_stack(
            [pix // w + ((cells >> 2) + 0.5) / 4.0, pix % w + ((cells & 3) + 0.5) / 4.0]
        )
        return signal, iv, starts

    # each frame's inputs cut as the fitter reaches it: only the frames in flight held
    fits = fitter((inputs(k) for k in range(n)), float(e_unit), float(width), *cloud_table(), conf)
    placed = [place_events(clouds, event, h, w) for clouds, event in fits]
    counts = np.array([p[0].size for p in placed], np.int64)
    new_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if not placed:
        return new_offsets, np.zeros(0, np.uint32), np.zeros(0, np.uint8)
    return (
        new_offsets,
        np.concatenate([p[0] for p in placed]).astype(np.uint32),
        np.concatenate([p[1] for p in placed]).astype(np.uint8),
    )
