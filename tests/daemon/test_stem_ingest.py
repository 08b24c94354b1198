"""A real ingest daemon writes the scan geometry announced in the start message."""

from __future__ import annotations

import numpy as np

import streamstore
from streamstore.scan import ScanGeometry
from tests.daemon import test_ingest as _ingest

# the module fixtures of the ingest tests: a real daemon subprocess and its frames
calibration_file = _ingest.calibration_file
daemon = _ingest.daemon
emulator = _ingest.emulator
frames = _ingest.frames


def test_daemon_stores_the_scan_of_the_start_message(daemon, frames):
    n0 = daemon.status()["series_closed"]
    with daemon.sender() as s:
        s.send_start(_ingest.start_msg("scan1", 28, scan_shape=(4, 6), scan_flyback=1))
        for i in range(28):
            s.send_image("scan1", i, frames[i], timestamp_ns=1000 * i)
        s.send_end("scan1", 28)
        _ingest.send_series(s, "movie1", frames, range(5))
    daemon.wait_closed(n0 + 2)
    with streamstore.open(daemon.out / "scan1.h5") as st:
        assert st.scan == ScanGeometry((4, 6), 1, 1, 0)
        counts = st.event_counts.reshape(4, 7)[:, :6]  # the flyback column dropped
        np.testing.assert_array_equal(st.virtual_image(mask=np.ones(st.frame_shape, bool)), counts)
    with streamstore.open(daemon.out / "movie1.h5") as st:
        assert st.scan is None and "scan_shape" not in st.attrs
