"""Packaging contracts: cheap import, public names, the console script."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import streamstore
from streamstore import EventBatch


def test_import_is_cheap():
    code = (
        "import sys, streamstore; "
        "mods = ('numba', 'h5py', 'blosc2', 'zmq', 'hdf5plugin'); "
        "heavy = [m for m in mods if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing streamstore pulled in {out.stdout.strip()}"


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        streamstore.nope  # noqa: B018


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "streamstore", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "COMMAND" in out.stdout


def test_event_batch_roundtrip_and_validation():
    b = EventBatch(offsets=[0, 2, 2, 3], indices=[1, 5, 0], frame_shape=(2, 3))
    assert b.n_frames == 3 and len(b) == 3 and b.n_events == 3
    assert list(b.frame(0).indices) == [1, 5]
    assert len(b.frame(1)) == 0
    dense = b.to_dense()
    assert dense.shape == (3, 2, 3) and dense.sum() == 3 and dense[0, 1, 2] == 1
    joined = EventBatch.concatenate([b.slice(0, 1), b.slice(1, 3)])
    assert joined == b
    with pytest.raises(ValueError, match="ascending"):
        EventBatch(offsets=[0, 2], indices=[5, 1], frame_shape=(2, 3))
    with pytest.raises(ValueError, match="H \\* W"):
        EventBatch(offsets=[0, 1], indices=[6], frame_shape=(2, 3))
    with pytest.raises(ValueError, match="offsets\\[-1\\]"):
        EventBatch(offsets=[0, 3], indices=[1], frame_shape=(2, 3))
    with pytest.raises(ValueError, match="0..15"):
        EventBatch(offsets=[0, 1], indices=[1], subpixel=np.array([16]), frame_shape=(2, 3))
