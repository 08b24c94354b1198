"""The daemon compiles or loads its counting kernels before it listens, and says so."""

from __future__ import annotations

import streamstore
from tests._ingest_harness import Series, h5_files


def test_the_daemon_listens_once_its_kernels_are_ready_and_says_what_it_does(
    tmp_path, start_daemon, pusher
):
    series = Series(tmp_path)
    out = tmp_path / "out"
    d = start_daemon(out, calibration=series.calibration_path, ready=False)
    # a camera may connect before the daemon listens: its frames wait for the bind
    s = pusher(d.listen)
    s.send_multipart(series.start("early", 6))
    for i in range(6):
        s.send_multipart(series.image("early", i), copy=False)
    s.send_multipart(series.end("early", 6))
    st = d.wait_ready()
    assert st["state"] == "ready"
    before = d.statuses[:-1]
    assert all(b["ready"] is False and b["state"] != "ready" for b in before)
    assert all("counting kernels" in b["state"] for b in before)
    st = d.wait_until(lambda st: st["series_closed"] >= 1, 120, "the series")
    s.close(0)
    assert d.stop() == 0
    log = d.log()
    # the kernels were ready before the data socket was bound
    assert log.index("counting kernels ready") < log.index("listening on")
    assert "compiled)" in log
    [path] = h5_files(out)
    with streamstore.open(path) as store:
        assert store.n_frames == 6 and store.accounting["complete"] is True
        assert series.check_store(store) == 6
