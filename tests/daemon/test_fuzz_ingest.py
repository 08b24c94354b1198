"""Fuzz a running ingest daemon with malformed and hostile messages.

More than 10,000 malformed or hostile messages (truncated JSON, wrong types,
huge declared shapes, negative ids, payloads too short and too long, extra
and missing parts, binary garbage, non-UTF-8, deep nesting, NaN, valid
headers of foreign series, frame ids far ahead, duplicates of stored frames)
are sent over one socket, interleaved with a valid series, to a real
``streamstore ingest`` subprocess. Afterwards:

* the daemon is still running and exits 0 on SIGTERM;
* every valid frame is stored once, and its events equal ``streamstore.count``;
* every hostile message is counted: rejected (by reason) or dropped as duplicate,
  exactly as many as were sent.

The expected outcome of each message comes from :func:`_oracle`, which runs
the protocol parser and the daemon's series rules on it; messages a daemon
would legitimately accept (a start of another series would close the valid
one) are not sent.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streamstore
from streamstore.ingest.daemon import MAX_ID_JUMP
from streamstore.link import protocol
from tests._ingest_harness import Series, h5_files

VALID = "valid"
N_VALID = 300
N_RAW = 10_500  # seeded numpy fuzz messages
#: hypothesis examples (some are skipped by the oracle): 300 in the default run (with
#: the raw fuzz some 10,800 hostile messages; hypothesis's generation was 70 % of the test's
#: CPU time at 1,500), 1,500 under ``pytest -m slow``
N_HYPOTHESIS = 300
N_HYPOTHESIS_SLOW = 1_500
SEED = 20261125


class Oracle:
    """What the daemon must do with a message, given what was sent so far."""

    def __init__(self, frame_nbytes: int, max_frame_bytes: int) -> None:
        self.frame_nbytes = frame_nbytes
        self.max_frame_bytes = max_frame_bytes
        self.next_valid = 0  # valid frames 0 .. next_valid - 1 were sent

    def __call__(self, parts: list) -> str | None:
        """``"rejected"``, ``"duplicate"``, or None if the daemon would accept it."""
        try:
            msg = protocol.parse(parts, max_frame_bytes=self.max_frame_bytes)
        except protocol.ProtocolError:
            return "rejected"
        if isinstance(msg, protocol.Start):
            return "rejected" if msg.series_id == VALID else None  # second start / would abort
        if isinstance(msg, protocol.End):
            return None if msg.series_id == VALID else "rejected"
        if msg.series_id != VALID or msg.nbytes != self.frame_nbytes:
            return "rejected"
        if msg.frame_id - self.next_valid > MAX_ID_JUMP:
            return "rejected"  # would make every id before it missing
        return "duplicate" if msg.frame_id < self.next_valid else None


# ------------------------------------------------------------ raw fuzzing --
_WRONG = [None, True, False, "x", "", 1.5, -1, 0, 2**70, -(2**70), [], [1], {}, {"a": 1}, "NaN"]


def _headers(series: Series, rng: np.random.Generator, sid: str) -> dict:
    kind = rng.integers(3)
    if kind == 0:
        return {
            "htype": "start",
            "series_id": sid,
            "frame_shape": list(series.shape),
            "dtype": "uint16",
            "frame_time_s": 0.001,
        }
    if kind == 1:
        return {"htype": "image", "series_id": sid, "frame_id": 0, "timestamp_ns": 0}
    return {"htype": "end", "series_id": sid, "n_frames": 1}


def _raw_message(series: Series, rng: np.random.Generator, next_valid: int) -> tuple[str, list]:
    """One hostile message: (category, parts)."""
    frame = series.frame(0)
    sid = VALID if rng.random() < 0.5 else f"ghost-{rng.integers(1000)}"
    h = _headers(series, rng, sid)
    cat = int(rng.integers(17))
    if cat == 0:  # truncated JSON
        text = json.dumps(h).encode()
        return "truncated json", [text[: rng.integers(len(text))]]
    if cat == 1:  # wrong types
        key = list(h)[rng.integers(len(h))]
        h[key] = _WRONG[rng.integers(len(_WRONG))]
        parts = [json.dumps(h).encode()]
        return "wrong type", parts + ([frame] if h.get("htype") == "image" else [])
    if cat == 2:  # huge declared shapes
        h = _headers(series, np.random.default_rng(0), f"huge-{rng.integers(100)}")
        big = [int(rng.integers(1, 1 << 20)), int(rng.integers(1 << 20, 1 << 40))]
        h["frame_shape"] = big if rng.random() < 0.5 else big[::-1]
        return "huge shape", [json.dumps(h).encode()]
    if cat == 3:  # negative ids / counts
        n = -int(rng.integers(1, 1 << 40))
        if rng.random() < 0.5:
            hdr = {"htype": "image", "series_id": VALID, "frame_id": n, "timestamp_ns": 0}
            return "negative id", [json.dumps(hdr).encode(), frame]
        return "negative id", [
            json.dumps({"htype": "end", "series_id": sid, "n_frames": n}).encode()
        ]
    if cat == 4:  # payload too short or too long for the valid series
        size = int(rng.integers(0, 2 * series.frame_nbytes))
        if size == series.frame_nbytes:
            size += 2
        fid = int(rng.integers(0, 10 * N_VALID))
        hdr = {"htype": "image", "series_id": VALID, "frame_id": fid, "timestamp_ns": 0}
        return "payload size", [json.dumps(hdr).encode(), rng.bytes(size)]
    if cat == 5:  # extra parts
        parts = [json.dumps(h).encode()]
        if h["htype"] == "image":
            parts.append(frame)
        return "extra parts", parts + [rng.bytes(int(rng.integers(0, 64)))] * int(
            rng.integers(1, 3)
        )
    if cat == 6:  # missing parts: an image without its frame
        hdr = {"htype": "image", "series_id": sid, "frame_id": 1, "timestamp_ns": 0}
        return "missing part", [json.dumps(hdr).encode()]
    if cat == 7:  # binary garbage, 1-3 parts
        return "garbage", [rng.bytes(int(rng.integers(0, 300))) for _ in range(rng.integers(1, 4))]
    if cat == 8:  # not UTF-8
        return "not utf-8", [b'{"htype": "\xff\xfe' + rng.bytes(8) + b'"}']
    if cat == 9:  # JSON that is not an object, or NaN/Infinity
        texts = [b"[1, 2]", b"42", b"null", b'"start"', b"true", b"{}"]
        nan = json.dumps({**_headers(series, rng, "nan-series"), "frame_time_s": 0.0})
        texts.append(nan.replace("0.0", "NaN").encode())
        texts.append(nan.replace("0.0", "-Infinity").encode())
        return "not an object", [texts[rng.integers(len(texts))]]
    if cat == 10:  # deep nesting / huge headers
        depth = int(rng.integers(2000, 20000))
        if rng.random() < 0.5:
            return "deep nesting", [b"[" * depth + b"]" * depth]
        return "huge header", [b'{"htype": "start", "pad": "' + b"x" * 70000 + b'"}']
    if cat == 11:  # unknown or missing htype
        h["htype"] = ["stop", "IMAGE", "", 7, None][rng.integers(5)]
        if rng.random() < 0.3:
            del h["htype"]
        return "bad htype", [json.dumps(h).encode()]
    if cat == 12:  # valid image headers of a foreign series
        hdr = {"htype": "image", "series_id": f"ghost-{rng.integers(1000)}", "frame_id": 0}
        hdr["timestamp_ns"] = 0
        return "foreign series", [json.dumps(hdr).encode(), frame]
    if cat == 13:  # a valid end of a foreign series
        return "foreign series", [
            json.dumps(
                {"htype": "end", "series_id": f"ghost-{rng.integers(9)}", "n_frames": 3}
            ).encode()
        ]
    if cat == 14:  # a second start of the open series, or a duplicate of a stored frame
        if next_valid == 0 or rng.random() < 0.5:
            h = _headers(series, np.random.default_rng(0), VALID)  # kind 0: start
            return "second start", [json.dumps(h).encode()]
        fid = int(rng.integers(0, next_valid))
        return "duplicate", series.image(VALID, fid)
    if cat == 16:  # a valid image of the open series with a frame id far ahead
        fid = int(rng.integers(MAX_ID_JUMP + N_VALID + 1, 1 << 62))
        return "huge frame id", protocol.encode_image(VALID, fid, 0, frame)
    # cat 15: bad series ids (escaping paths, NUL, too long) in otherwise valid headers
    h["series_id"] = ["../x", "/abs", "a\x00b", "", "x" * 65, ".hid", "a b", "é"][rng.integers(8)]
    return "bad series_id", [json.dumps(h).encode()] + ([frame] if h["htype"] == "image" else [])


# --------------------------------------------------------- hypothesis part --
_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
_json = st.recursive(
    _json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_header_strategy = st.fixed_dictionaries(
    {"htype": st.sampled_from(["start", "image", "end", "other"])},
    optional={
        "series_id": st.sampled_from([VALID, "ghost", "../up", ""]) | _json,
        "frame_id": st.integers(min_value=-5, max_value=10 * N_VALID) | _json,
        "timestamp_ns": st.integers() | _json,
        "frame_shape": st.lists(st.integers(min_value=-2, max_value=1 << 33), max_size=3) | _json,
        "dtype": st.sampled_from(["uint16", "uint8", "float32"]) | _json,
        "frame_time_s": st.floats(allow_nan=False, allow_infinity=False) | _json,
        "n_frames": st.integers() | _json,
        "meta": _json,
    },
)


def _payload(frame_nbytes: int):
    return st.one_of(
        st.binary(max_size=64),
        st.integers(min_value=0, max_value=2 * frame_nbytes).map(lambda n: b"\x01" * n),
    )


# -------------------------------------------------------------------- test --
@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Series:
    return Series(tmp_path_factory.mktemp("fuzz-series"))


@pytest.mark.parametrize(
    "n_hypothesis",
    [
        pytest.param(N_HYPOTHESIS_SLOW, marks=pytest.mark.slow, id="1500-hypothesis"),
        pytest.param(N_HYPOTHESIS, id="300-hypothesis"),
    ],
)
def test_fuzzed_daemon_stays_up_stores_the_valid_series_and_counts_every_rejection(
    tmp_path, series, capsys, start_daemon, pusher, n_hypothesis
):
    # above the 64 KiB header limit, so oversized headers reach the parser (a part
    # above --max-frame-bytes makes ZeroMQ drop the connection, tested at the end)
    max_frame_bytes = 8 * series.frame_nbytes
    oracle = Oracle(series.frame_nbytes, max_frame_bytes)
    rng = np.random.default_rng(SEED)
    sent = Counter()  # expected outcome -> messages
    by_category = Counter()
    d = start_daemon(
        tmp_path / "out",
        calibration=series.calibration_path,
        args=("--max-frame-bytes", str(max_frame_bytes), "--max-buffer-mb", "64"),
    )
    s = pusher(d.listen, sndhwm=0)  # no limit: the fuzz goes out as fast as it can
    s.send_multipart(series.start(VALID, N_VALID))
    every = N_RAW // N_VALID

    def send_valid_frame() -> None:
        s.send_multipart(series.image(VALID, oracle.next_valid), copy=False)
        oracle.next_valid += 1

    # 1. seeded raw fuzz, one valid frame every `every` messages
    n_raw = 0
    while n_raw < N_RAW:
        cat, parts = _raw_message(series, rng, oracle.next_valid)
        outcome = oracle(parts)
        if outcome is None:  # the daemon would accept it: not hostile, do not send
            continue
        s.send_multipart(parts, copy=False)
        sent[outcome] += 1
        by_category[cat] += 1
        n_raw += 1
        if n_raw % every == 0 and oracle.next_valid < N_VALID // 2:
            send_valid_frame()

    # 2. hypothesis-made headers and parts
    n_hyp = Counter()

    @settings(
        max_examples=n_hypothesis,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        header=_header_strategy,
        payloads=st.lists(_payload(series.frame_nbytes), max_size=2),
        raw_header=st.booleans(),
        cut=st.integers(min_value=0, max_value=200),
    )
    def send_hypothesis_message(header, payloads, raw_header, cut):
        text = json.dumps(header).encode()
        if raw_header:
            text = text[:cut]
        parts = [text, *payloads]
        outcome = oracle(parts)
        if outcome is None:
            return
        s.send_multipart(parts, copy=False)
        sent[outcome] += 1
        n_hyp["sent"] += 1
        if n_hyp["sent"] % 10 == 0 and oracle.next_valid < N_VALID:
            send_valid_frame()

    send_hypothesis_message()
    by_category["hypothesis"] = n_hyp["sent"]

    # 3. the rest of the valid series and its end
    while oracle.next_valid < N_VALID:
        send_valid_frame()
    s.send_multipart(series.end(VALID, N_VALID))
    total_messages = sum(sent.values()) + N_VALID + 2
    st_ = d.wait_until(
        lambda st: st["messages"] >= total_messages and st["series_closed"] >= 1,
        180,
        f"{total_messages} messages",
    )
    # 4. a hostile connection that sends a part above the size limit is cut by
    # ZeroMQ (MAXMSGSIZE) before the daemon allocates it; the daemon carries on
    hostile = pusher(d.listen)
    hostile.send_multipart([b'{"htype":"image"}', b"\0" * (2 * max_frame_bytes)])
    s.send_multipart(series.start("after", 4))
    for i in range(4):
        s.send_multipart(series.image("after", i), copy=False)
    s.send_multipart(series.end("after", 4))
    st2 = d.wait_until(lambda st: st["series_closed"] >= 2, 60, "the series after the fuzz")
    assert d.proc.poll() is None, "the daemon died"
    hostile.close(0)
    s.close(0)
    assert d.stop() == 0

    n_fuzz = sum(sent.values())
    assert n_fuzz >= 10_000
    assert st_["messages"] == total_messages
    assert st_["rejected"] == sent["rejected"]
    assert st_["duplicate"] == sent["duplicate"]
    assert st_["frames_stored"] == N_VALID and st_["missing"] == 0
    assert st2["messages"] == total_messages + 6 and st2["rejected"] == sent["rejected"]
    files = h5_files(tmp_path / "out")
    assert [p.name for p in files] == ["after.h5", "valid.h5"]
    with streamstore.open(tmp_path / "out" / "valid.h5") as store:
        assert store.frame_ids.tolist() == list(range(N_VALID))
        assert series.check_store(store) == N_VALID
        acc = store.accounting
        assert acc["complete"] is True and acc["missing"] == 0
        assert acc["duplicate"] == sent["duplicate"]
    with streamstore.open(tmp_path / "out" / "after.h5") as store:
        assert series.check_store(store) == 4
    with capsys.disabled():
        print(
            f"\nfuzz: {n_fuzz} hostile messages ({by_category['hypothesis']} from hypothesis) "
            f"+ {N_VALID} valid frames; rejected {st_['rejected']}, duplicate {st_['duplicate']}, "
            f"valid frames stored {st_['frames_stored']}/{N_VALID}, missing {st_['missing']}"
        )
        print("fuzz: sent by category", dict(sorted(by_category.items())))
        print("fuzz: rejected by reason", dict(sorted(st_["rejected_by_reason"].items())))
