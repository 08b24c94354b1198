"""The joint fit in three forms bit for bit: plain Python, numba, and C (native_ref).

Small seeded frames (non-square, so rows and columns cannot be swapped
unnoticed) of pixel-integrated Gaussian clouds with Gaussian noise: pairs 0.8-1.5
px apart given one start (so clouds split), electrons given none (so clouds are
added), a masked block (zero weight and signal), clouds at the frame's edges, and
a crowd of more clouds within reach than a group holds (with two starts given
twice: ties in distance). Every form must give the same clouds and events,
exactly; the reference's rules are counted to show the cases reach them.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import ndtr

from native_ref import joint_frame_native
from streamstore.counting import _joint_reference as ref
from streamstore.counting._joint_kernels import joint_frames
from streamstore.counting._joint_reference import joint_conf, joint_frames_reference
from streamstore.counting.fit import cloud_table

E = 100.0
WIDTH = 0.5
NOISE = 4.0


def _frame(seed, shape=(24, 32), singles=14, pairs=5, missing=4):
    """``(signal, iv, starts)``: ``singles`` electrons, ``pairs`` pairs each given one
    start (their middle), ``missing`` electrons given none; a masked 4 x 5 block."""
    rng = np.random.default_rng(seed)
    h, w = shape
    places = [rng.uniform([0.0, 0.0], [h, w]) for _ in range(singles + missing)]
    starts = [p + rng.normal(0.0, 0.15, 2) for p in places[:singles]]
    for _ in range(pairs):
        mid = rng.uniform([1.5, 1.5], [h - 1.5, w - 1.5])
        d = rng.uniform(0.8, 1.5)
        ang = rng.uniform(0.0, np.pi)
        off = 0.5 * d * np.array([np.sin(ang), np.cos(ang)])
        places += [mid + off, mid - off]
        starts.append(mid + rng.normal(0.0, 0.1, 2))
    signal = np.zeros(shape)
    rows = np.arange(h + 1.0)
    cols = np.arange(w + 1.0)
    for y, x in places:
        width = WIDTH * rng.uniform(0.9, 1.1)
        sy = np.diff(ndtr((rows - y) / width))
        sx = np.diff(ndtr((cols - x) / width))
        signal += (E * rng.uniform(0.85, 1.15)) * np.outer(sy, sx)
    signal += rng.normal(0.0, NOISE, shape)
    iv = np.full(shape, 1.0 / (NOISE * NOISE))
    iv[9:13, 20:25] = 0.0  # masked
    signal[iv == 0.0] = 0.0
    return signal, iv, np.array(starts)


def _crowd(seed, shape=(12, 15), k=10, radius=1.8):
    """``k`` electrons within ``radius`` px of the frame's middle; starts for all but
    two, the first and fourth given twice."""
    rng = np.random.default_rng(seed)
    h, w = shape
    ang = rng.uniform(0.0, 2.0 * np.pi, k)
    rad = radius * np.sqrt(rng.uniform(0.0, 1.0, k))
    places = np.c_[h / 2 + rad * np.sin(ang), w / 2 + rad * np.cos(ang)]
    signal = rng.normal(0.0, NOISE, shape)
    for y, x in places:
        sy = np.diff(ndtr((np.arange(h + 1.0) - y) / WIDTH))
        sx = np.diff(ndtr((np.arange(w + 1.0) - x) / WIDTH))
        signal += E * np.outer(sy, sx)
    starts = places[:-2] + rng.normal(0.0, 0.1, (k - 2, 2))
    return signal, np.full(shape, 1.0 / (NOISE * NOISE)), np.concatenate([starts, starts[[0, 3]]])


@pytest.fixture
def kept(monkeypatch):
    """How many clouds the reference's add and split rules kept, how many neighbour
    searches found more clouds than a group holds, and how often the clouds' arrays
    grew."""
    counts = {"add": 0, "split": 0, "capped": 0, "grown": 0}
    add, split, near, grown = ref._add, ref._split, ref._near, ref._grown

    def counted_add(n, *args):
        m = add(n, *args)
        counts["add"] += m - n
        return m

    def counted_split(n, *args):
        m = split(n, *args)
        counts["split"] += m - n
        return m

    def counted_near(y, x, cap, reach, cl, head, nxt, *args):
        k = near(y, x, cap, reach, cl, head, nxt, *args)
        within = 0
        for j in head:  # every cloud, through the grid's lists
            while j >= 0:
                dy = cl[j, 1] - y
                dx = cl[j, 2] - x
                within += dy * dy + dx * dx < reach * reach
                j = nxt[j]
        counts["capped"] += within > k
        return k

    def counted_grown(a, size):
        counts["grown"] += 1
        return grown(a, size)

    monkeypatch.setattr(ref, "_add", counted_add)
    monkeypatch.setattr(ref, "_split", counted_split)
    monkeypatch.setattr(ref, "_near", counted_near)
    monkeypatch.setattr(ref, "_grown", counted_grown)
    return counts


def _three_forms(frame, conf):
    cdf, pdf, t0, inv_h = cloud_table()
    args = (E, WIDTH, cdf, pdf, t0, inv_h, conf)
    want = joint_frames_reference(*frame, *args)
    [got] = joint_frames([frame], *args)
    native = joint_frame_native(*frame, *args)
    for form in (got, native):
        assert form[0].dtype == np.float64 and form[1].dtype == np.uint8
        np.testing.assert_array_equal(form[0], want[0])
        np.testing.assert_array_equal(form[1], want[1])
    return want


@pytest.mark.parametrize(
    ("seed", "conf"),
    [
        (1, joint_conf()),
        (2, joint_conf()),
        (5, joint_conf(drop=10.0)),
        (2, joint_conf(drop=50.0, drop_wide=5.0)),
    ],
    ids=["default-1", "default-2", "drop10", "wide"],
)
def test_three_forms_equal(seed, conf, kept):
    frame = _frame(seed)
    clouds, event = _three_forms(frame, conf)
    assert clouds.shape[0] > frame[2].shape[0]
    assert kept["add"] > 0 and kept["split"] > 0  # both rules kept clouds
    assert event.sum() > 0


def test_crowd(kept):
    """More clouds within reach than a group holds: the nearest by distance, then
    index (two clouds start on one place and fit alike; in this crowd which of the
    two a group takes changes the result)."""
    clouds, _ = _three_forms(_crowd(7, k=9, radius=1.5), joint_conf())
    assert kept["capped"] > 0
    assert clouds.shape[0] == 9
    # a start given twice is one electron: the second cloud does not earn its place
    assert (clouds[:, 0] == 0).sum() == 1


def test_edges_and_no_starts():
    """Clouds hanging off the frame's corners, and a frame without starts (every
    cloud added)."""
    signal, iv, starts = _frame(4, shape=(12, 17), singles=6, pairs=2, missing=3)
    starts = np.concatenate([starts, [[0.1, 0.2], [11.9, 16.8], [-0.4, 8.0]]])
    _three_forms((signal, iv, starts), joint_conf())
    clouds, _ = _three_forms((signal, iv, np.zeros((0, 2))), joint_conf())
    assert clouds.shape[0] > 0


def test_native_checks_conf():
    signal, iv, starts = _frame(5, shape=(8, 9), singles=1, pairs=0, missing=0)
    cdf, pdf, t0, inv_h = cloud_table()
    with pytest.raises(ValueError, match="conf"):
        joint_frame_native(signal, iv, starts, E, WIDTH, cdf, pdf, t0, inv_h, joint_conf()[:-1])


def test_clouds_outgrow_their_room(kept):
    """Few starts and many clouds added (a low bar): the clouds' arrays grow
    mid-fit."""
    frame = _frame(4, shape=(14, 18), singles=1, pairs=2, missing=12)
    clouds, _ = _three_forms(frame, joint_conf(drop=1.0, least=0.1, add=0.2, rounds=4))
    assert kept["grown"] > 0
    assert clouds.shape[0] > 5 * frame[2].shape[0]
