"""The emulator's 4D-STEM mode: virtual BF, ADF and centre of mass show its specimen."""

from __future__ import annotations

import numpy as np
import pytest

import streamstore
from streamstore.camera.specimen import STEMSpecimen
from streamstore.events import EventBatch

FRAME = (64, 72)


def corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def events_from_truth(truth, frame_shape):
    """The true electron hits as events (a pixel hit twice in a frame is one event)."""
    h, w = frame_shape
    per = [
        np.unique(np.floor(p[:, 0]).astype(np.int64) * w + np.floor(p[:, 1]).astype(np.int64))
        for p in truth.positions
    ]
    offs = np.zeros(len(per) + 1, np.int64)
    np.cumsum([a.size for a in per], out=offs[1:])
    return EventBatch(offs, np.concatenate(per).astype(np.uint32), None, frame_shape)


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    spec = STEMSpecimen(
        FRAME, (8, 10), frames_per_position=2, flyback=1, disk_radius=8, max_shift_px=3, seed=4
    )
    emu = streamstore.CameraEmulator(
        FRAME, dose_rate_e_per_px_s=0.1 * 1500, frame_time_s=1 / 1500, stem=spec, seed=1
    )
    frames, truth = emu.generate(spec.geometry.n_frames)
    assert frames.shape == (8 * 11 * 2, *FRAME)
    path = tmp_path_factory.mktemp("emu") / "stem.h5"
    with streamstore.StoreWriter(path, FRAME, frame_time_s=1 / 1500, scan=spec.geometry) as wr:
        wr.append(events_from_truth(truth, FRAME), truth.frame_ids, truth.frame_ids * 666_667)
    return path, truth


def test_truth_maps_come_back(scanned, tmp_path):
    _path, truth = scanned
    t = truth.stem
    assert t["thickness"].shape == (8, 10) and t["shift"].shape == (2, 8, 10)
    assert np.all((t["bf_fraction"] > 0) & (t["bf_fraction"] <= 1))
    truth.save(tmp_path / "truth.h5")
    back = type(truth).load(tmp_path / "truth.h5")
    np.testing.assert_array_equal(back.stem["shift"], t["shift"])


def test_virtual_bf_adf_and_com_show_the_specimen(scanned):
    path, truth = scanned
    t = truth.stem
    center = tuple(t["center"])
    rad = float(t["disk_radius"])
    inner, outer = t["adf_radii"]
    with streamstore.open(path) as st:
        bf = st.virtual_image(0, rad + 1, center)
        adf = st.virtual_image(inner, outer)  # centre: centre of mass of the summed pattern
        com = st.center_of_mass()
    assert corr(bf, t["bf_fraction"]) > 0.85  # coincidences in the bright disk lower it
    assert corr(adf, 1 - t["bf_fraction"]) > 0.9
    shift = com - np.asarray(center)[:, None, None]
    for axis in (0, 1):
        assert corr(shift[axis], t["shift"][axis]) > 0.9
        slope = np.polyfit(t["shift"][axis].ravel(), shift[axis].ravel(), 1)[0]
        assert 0.7 < slope < 1.1  # the uniform background pulls towards the centre


def test_specimen_rejects_bad_parameters():
    with pytest.raises(ValueError, match="positive"):
        STEMSpecimen(FRAME, (2, 2), disk_radius=-1)
    with pytest.raises(ValueError, match="STEMSpecimen"):
        streamstore.CameraEmulator((10, 10), stem=STEMSpecimen(FRAME, (2, 2)))
