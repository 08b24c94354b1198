"""Soak the ingest daemon: many small frames, several series, loopback.

The full soak (100,000 frames in 5 series, marked ``slow``: ``pytest -m slow``)
and a short variant in the default run (10,000 frames in 2 series) send as
fast as the daemon takes them (ZeroMQ back-pressure sets the rate), then
check that no frame is missing, every frame's events are correct, and the
daemon's RSS stays flat; RSS at the start and end is printed.
"""

from __future__ import annotations

import time

import pytest

import streamstore
from tests._ingest_harness import Series


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Series:
    return Series(tmp_path_factory.mktemp("soak-series"), shape=(32, 48), pool=32)


@pytest.mark.parametrize(
    ("n_series", "n_per_series"),
    [pytest.param(5, 20_000, marks=pytest.mark.slow, id="100k"), pytest.param(2, 5_000, id="10k")],
)
def test_soak_zero_missing_and_flat_memory(
    tmp_path, series, capsys, n_series, n_per_series, start_daemon, pusher
):
    out = tmp_path / "out"
    rss = []
    t0 = None
    d = start_daemon(out, calibration=series.calibration_path, args=("--max-buffer-mb", "64"))
    s = pusher(d.listen, sndhwm=100)
    for k in range(n_series):
        sid = f"soak{k}"
        s.send_multipart(series.start(sid, n_per_series))
        for i in range(n_per_series):
            s.send_multipart(series.image(sid, i), copy=False)
            if k == 0 and i == 2000:
                # baseline once the kernels are loaded and the first file is open
                d.wait_until(lambda st: st["frames_stored"] >= 1000, 60, "warm-up")
                rss.append(d.rss_bytes())
                t0 = time.monotonic()
            elif i % 5000 == 0 and rss:
                rss.append(d.rss_bytes())
        s.send_multipart(series.end(sid, n_per_series))
    st = d.wait_until(lambda st: st["series_closed"] >= n_series, 600, f"{n_series} closed series")
    elapsed = time.monotonic() - t0
    rss.append(d.rss_bytes())
    s.close(0)
    assert d.stop() == 0
    total = n_series * n_per_series
    assert st["frames_received"] == total
    assert st["frames_stored"] == total
    assert st["missing"] == 0 and st["duplicate"] == 0 and st["rejected"] == 0
    for k in range(n_series):
        with streamstore.open(out / f"soak{k}.h5") as store:
            assert store.frame_ids.tolist() == list(range(n_per_series))
            assert store.missing_frame_ids.size == 0
            assert series.check_store(store) == n_per_series
            assert store.accounting["complete"] is True
    growth = rss[-1] - rss[0]
    # flat: what is left after the last series is not proportional to the frames sent
    assert growth < 64e6, f"RSS grew by {growth / 1e6:.0f} MB"
    with capsys.disabled():
        fps = (total - 2000) / elapsed
        print(
            f"\nsoak: {total} frames of {series.shape[0]}x{series.shape[1]} in {n_series} series, "
            f"{fps:.0f} frames/s sustained, missing 0; daemon RSS start {rss[0] / 1e6:.0f} MB, "
            f"end {rss[-1] / 1e6:.0f} MB, max {max(rss) / 1e6:.0f} MB"
        )
