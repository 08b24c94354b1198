"""Bounds on what one message may cost the daemon: header depth and size, parts, memory.

Each test runs a real ``streamstore ingest`` process (``tests/_ingest_harness.py``)
and checks that the hostile message is refused with its reason counted, that the
daemon keeps running and that the next valid series is stored with the right events.
"""

from __future__ import annotations

import json

import pytest

import streamstore
from tests._ingest_harness import Daemon, Series, h5_files

N = 6  # frames per valid series


def _send_series(push, series: Series, sid: str, n: int = N, **start_kw) -> None:
    push.send_multipart(series.start(sid, n_frames=n, **start_kw))
    for i in range(n):
        push.send_multipart(series.image(sid, i), copy=False)
    push.send_multipart(series.end(sid, n))


def _stored(d: Daemon, sid: str, n: int = N) -> dict:
    return d.wait_until(
        lambda st: any(
            c["series_id"] == sid and c["stored"] == n for c in st.get("closed_series", [])
        ),
        60,
        f"series {sid} stored",
    )


def _check_file(d: Daemon, series: Series, sid: str, n: int = N) -> None:
    with streamstore.open(d.out_dir / f"{sid}.h5") as store:
        assert store.n_frames == n
        assert series.check_store(store) == n


def test_deeply_nested_start_meta_is_refused_before_anything_is_written(
    tmp_path, series, start_daemon, pusher
):
    out = tmp_path / "out"
    d = start_daemon(out, calibration=series.calibration_path)
    push = pusher(d.listen)
    meta: dict = {"kind": "data"}
    for _ in range(600):  # passes json.loads; too deep for the file's JSON writers
        meta = {"m": meta}
    _send_series(push, series, "deep", meta=meta)
    _send_series(push, series, "after")
    st = _stored(d, "after")
    push.close(0)
    assert st["rejected_by_reason"].get("malformed header", 0) >= 1
    assert "nested more than" in d.log()
    assert d.stop() == 0
    assert [p.name for p in h5_files(out)] == ["after.h5"]
    _check_file(d, series, "after")


def test_a_large_header_fits_beside_a_frame_of_exactly_max_frame_bytes(
    tmp_path, series, start_daemon, pusher
):
    out = tmp_path / "out"
    args = ("--max-frame-bytes", str(series.frame_nbytes))
    d = start_daemon(out, calibration=series.calibration_path, args=args)
    push = pusher(d.listen)
    notes = "x" * 20_000  # a 20 KB start header, frames of exactly --max-frame-bytes
    _send_series(push, series, "big-header", meta={"notes": notes})
    _stored(d, "big-header")
    push.close(0)
    assert d.stop() == 0
    assert [p.name for p in h5_files(out)] == ["big-header.h5"]
    _check_file(d, series, "big-header")
    with streamstore.open(out / "big-header.h5") as store:
        assert json.dumps(store.attrs["meta"]).count("x") >= 20_000


def test_headers_over_max_header_bytes_are_refused_by_name(tmp_path, series, start_daemon, pusher):
    out = tmp_path / "out"
    args = ("--max-header-bytes", "100000")
    d = start_daemon(out, calibration=series.calibration_path, args=args)
    push = pusher(d.listen)
    _send_series(push, series, "too-big", meta={"notes": "x" * 120_000})
    _send_series(push, series, "fits", meta={"notes": "x" * 90_000})
    st = _stored(d, "fits")
    push.close(0)
    assert "more than max_header_bytes=100000" in d.log()
    assert st["rejected_by_reason"].get("malformed header", 0) == 1
    assert d.stop() == 0
    assert [p.name for p in h5_files(out)] == ["fits.h5"]
    _check_file(d, series, "fits")


#: RSS a daemon may keep beyond its budget and one largest valid message, after
#: refusing a many-part message (documented in docs/ingest.md).
RSS_SLACK = 48 << 20


def test_a_601_part_message_is_refused_and_its_memory_given_back(
    tmp_path, series, start_daemon, pusher
):
    pytest.importorskip("psutil")
    out = tmp_path / "out"
    budget_mb = 8
    part = 1 << 20
    args = ("--max-buffer-mb", str(budget_mb), "--max-frame-bytes", str(part))
    d = start_daemon(out, calibration=series.calibration_path, args=args)
    push = pusher(d.listen)
    _send_series(push, series, "before")
    _stored(d, "before")
    rss0 = d.rss_bytes()
    header = json.dumps(
        {"htype": "image", "series_id": "before", "frame_id": 99, "timestamp_ns": 0}
    ).encode()
    blob = bytes(part)  # 600 parts of 1 MiB: each within MAXMSGSIZE, 600 MB in all
    push.send_multipart([header] + [blob] * 600, copy=False)
    d.wait_until(lambda st: st["rejected"] == 1, 120, "the 601-part message refused")
    _send_series(push, series, "after")
    st = _stored(d, "after")
    rss1 = d.rss_bytes()
    push.close(0)
    bound = budget_mb * (1 << 20) + part + (1 << 16) + RSS_SLACK
    grew = rss1 - rss0
    assert grew <= bound, f"RSS grew {grew / 1e6:.0f} MB (bound {bound / 1e6:.0f} MB)"
    assert st["rejected_by_reason"] == {"too_many_parts": 1}
    assert "a message of 601 parts" in d.log()
    assert d.stop() == 0
    _check_file(d, series, "after")
