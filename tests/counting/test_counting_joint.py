"""The "joint" counting rule: the whole method in its three forms and at two thread
counts, its events one a pixel, and what it finds where electrons crowd.

The fit kernel's own parity (reference == numba == C on synthetic frames) is in
``test_joint_parity.py``. Accuracy: at 0.05 e/px/frame, where the fit rule
loses electrons to crowding, and at sweep points of the emulator's physics.
"""

from __future__ import annotations

import numpy as np
import pytest

from streamstore.camera.emulator import CameraEmulator
from streamstore.counting import Counter
from streamstore.counting.accuracy import score_batch
from streamstore.counting.calibration import Calibration
from streamstore.counting.joint import frame_inputs, place_events
from tests.counting.test_counting_fit import FRAME_TYPES, frame_type_case
from tests.counting.test_counting_resolve import _same

XRAY_THRESHOLD = 1000.0


def _emulated(shape, dose, n, seed, **physics):
    emu = CameraEmulator(shape, dose_rate_e_per_px_s=dose * 1500, seed=seed, **physics)
    dark, _ = emu.dark_frames(50)
    frames, truth = emu.generate(n)
    return frames, truth, Calibration.from_dark_frames(dark, xray_threshold=XRAY_THRESHOLD)


def _joint(cal, dtype=np.uint16, **kw):
    return Counter(cal, dtype, subpixel=True, method="joint", dose=False, **kw)


@pytest.mark.parametrize("case", FRAME_TYPES)
def test_three_implementations_count_alike(rng, case):
    """Dense electrons, X-rays, masked pixels, saturation (the resolve rule's parity
    frames) in each frame type the counter takes: the fit rule's events, then the
    joint fit, by each form (the plain Python reference, slow, on one type: the
    numba form compiles its very functions)."""
    frames, cal, e = frame_type_case(rng, case)
    out = []
    forms = ("reference", "numba", "native") if case == "uint16" else ("native", "numba")
    for impl in forms:
        c = _joint(cal, frames.dtype, implementation=impl, electron_charge=e)
        c.cloud_width = 0.5  # too crowded to measure: given, so that the fit runs
        out.append(c(frames))
    assert all(_same(out[0], b) for b in out[1:])
    fit = Counter(cal, frames.dtype, subpixel=True, method="fit", electron_charge=e, dose=False)
    fit.cloud_width = 0.5
    assert not _same(out[0], fit(frames))  # the joint fit changed the fit rule's events


def test_thread_count_does_not_change_the_events():
    frames, _, cal = _emulated((96, 128), 0.05, 6, 41)
    one, two = _joint(cal, threads=1), _joint(cal, threads=2)
    a, b = one(frames), two(frames)
    assert one.cloud_width == two.cloud_width
    assert _same(a, b)
    plain = Counter(cal, method="joint", dose=False, threads=2)(frames)
    assert np.array_equal(plain.indices, a.indices) and plain.subpixel is None
    assert np.array_equal(plain.offsets, a.offsets)


def test_events_are_one_a_pixel_in_order():
    """Two clouds in one pixel: the brighter keeps it, the other goes to the pixel
    it leans towards, on its near edge; where that is held or off the frame, it goes."""
    h, w = 6, 8
    clouds = np.array([
        [100.0, 2.2, 3.5, 0.5],  # A, pixel (2, 3)
        [80.0, 2.7, 3.4, 0.5],  # B, in A's pixel, below it: to (3, 3), top edge
        [90.0, 0.1, 0.1, 0.5],  # C, pixel (0, 0)
        [70.0, 0.15, -0.6, 0.5],  # D, off the edge: clipped into C's pixel, left of it
        [60.0, 5.5, 7.9, 0.5],  # E, pixel (5, 7)
        [50.0, 5.4, 7.2, 0.5],  # F, E's pixel, left of it: to (5, 6), right edge
        [40.0, 4.0, 1.0, 0.5],  # G, not an event
    ])  # fmt: skip
    event = np.array([1, 1, 1, 1, 1, 1, 0], np.uint8)
    idx, sub = place_events(clouds, event, h, w)
    assert idx.tolist() == [0, 2 * w + 3, 3 * w + 3, 5 * w + 6, 5 * w + 7]
    # B: row cell 0 (the top edge), its own column cell; F: column cell 3 (right edge)
    assert sub.tolist() == [0, (0 << 2) | 2, (0 << 2) | 1, (1 << 2) | 3, (2 << 2) | 3]
    # D went: left of C is off the frame


def test_masked_pixels_and_xray_surroundings_hold_nothing_to_fit():
    raw = np.full((9, 9), 110, np.uint16)
    raw[4, 4] = 5000  # an X-ray hit
    raw[0, 8] = 300
    dark = np.full((9, 9), 100, np.uint16)
    lo_c = np.full((9, 9), 120, np.uint16)
    iv_map = np.full((9, 9), 0.04)
    iv_map[0, 8] = 0.0  # masked
    signal, iv = frame_inputs(raw, dark, None, lo_c, 1000, 1, iv_map, 0.06)
    off = np.zeros((9, 9), bool)
    off[3:6, 3:6] = True
    off[0, 8] = True
    assert np.all(signal[off] == 0) and np.all(iv[off] == 0)
    assert np.all(signal[~off] == 10) and np.all(iv[~off] > 0)
    np.testing.assert_allclose(iv[~off], 0.04 / (1 + 0.04 * 0.6**2))


#: (physics, dose, frames, least recall, most RMS error): the targets (0.85 at 0.05,
#: 0.95 at 0.01, RMS 0.2 px) where they hold on these seeds; a 10 % gain spread the
#: dark-series calibration does not know places the events at 0.203 px (README).
ACCURACY_CASES = [
    ({}, 0.05, 4, 0.85, 0.2),
    ({"gain_sigma": 0.1}, 0.05, 4, 0.85, 0.21),
    ({"read_noise_adu": 2.0}, 0.05, 4, 0.85, 0.2),
    ({}, 0.01, 8, 0.95, 0.2),
]


@pytest.mark.parametrize(("physics", "dose", "n", "least_recall", "most_rms"), ACCURACY_CASES)
def test_joint_fit_finds_crowded_electrons(physics, dose, n, least_recall, most_rms):
    """The accuracy benchmark's seed for the dose (``benchmarks.accuracy``)."""
    seed = 2026 + {0.01: 1, 0.05: 3}[dose]
    frames, truth, cal = _emulated((256, 384), dose, n, seed, **physics)
    fit = score_batch(
        Counter(cal, subpixel=True, method="fit", dose=False)(frames), truth.positions
    )
    joint = score_batch(_joint(cal)(frames), truth.positions)
    assert joint.recall >= least_recall, (joint, fit)
    assert joint.recall > fit.recall, (joint, fit)
    assert joint.precision >= 0.999, joint
    assert joint.rms_error_px <= most_rms, joint
