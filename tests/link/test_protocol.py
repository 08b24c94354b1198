"""Wire protocol: round trips, zero-copy encoding, strict parsing, real sockets."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamstore.link.protocol import (
    End,
    Image,
    ProtocolError,
    Start,
    encode_end,
    encode_image,
    encode_start,
    parse,
    validate_series_id,
)
from streamstore.link.sockets import Receiver, Sender

SHAPE = (16, 24)  # tiny, non-square


def _start(**kw):
    base = dict(series_id="run_01", frame_shape=SHAPE, dtype="uint16", frame_time_s=1 / 1500)
    base.update(kw)
    return Start(**base)


def _frame(dtype="uint16", shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype)


# ---------------------------------------------------------------- round trips
def test_start_round_trip_with_all_fields():
    start = _start(
        pixel_size_A=0.83,
        n_frames=1000,
        detector="K3",
        meta={"kind": "dark", "nested": {"a": [1, 2]}},
        extra={"vendor_key": 7},
    )
    parts = encode_start(start)
    assert len(parts) == 1
    back = parse(parts)
    assert back == start
    assert back.np_dtype == np.dtype("<u2")
    assert back.frame_nbytes == SHAPE[0] * SHAPE[1] * 2


def test_start_round_trip_minimal_uint8():
    start = _start(dtype="uint8", frame_shape=(3, 5))
    back = parse(encode_start(start))
    assert back == start
    assert back.pixel_size_A is None and back.n_frames is None and back.detector is None
    assert back.meta == {} and back.extra == {}
    assert back.frame_nbytes == 15


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_image_round_trip_is_zero_copy(dtype):
    frame = _frame(dtype)
    parts = encode_image("run_01", 42, 1_700_000_000_000_000_000, frame)
    assert parts[1] is frame  # the frame is not copied
    back = parse(parts)
    assert isinstance(back, Image)
    assert (back.series_id, back.frame_id, back.timestamp_ns) == (
        "run_01",
        42,
        1_700_000_000_000_000_000,
    )
    arr = back.as_array(_start(dtype=dtype))
    np.testing.assert_array_equal(arr, frame)
    assert np.shares_memory(arr, frame)  # parse kept the buffer, no copy


def test_end_round_trip_keeps_extra():
    parts = encode_end("run_01", 17, extra={"reason": "done"})
    back = parse(parts)
    assert back == End("run_01", 17, {"reason": "done"})


def test_unknown_header_keys_are_kept():
    header = {
        "htype": "image",
        "series_id": "s",
        "frame_id": 0,
        "timestamp_ns": 5,
        "exposure": {"x": 1},
    }
    msg = parse([json.dumps(header).encode(), b"\0" * 4])
    assert msg.extra == {"exposure": {"x": 1}}


def test_parse_accepts_memoryview_and_bytearray():
    frame = _frame()
    h, f = encode_image("s", 1, 2, frame)
    msg = parse([bytearray(h), memoryview(frame)])
    np.testing.assert_array_equal(msg.as_array(_start(series_id="s")), frame)


# ----------------------------------------------------------- strict rejections
BAD_HEADERS = [
    (b"\xff\xfe", "header"),
    (b"{not json", "header"),
    (b"[1, 2]", "header"),
    (b'{"htype": "end", "series_id": "s", "n_frames": 1e999}', "header.*out of range"),
    (b"[" * 100000 + b"]" * 100000, "header"),
    (json.dumps({"series_id": "s"}).encode(), "htype"),
    (json.dumps({"htype": "stop", "series_id": "s"}).encode(), "htype"),
    (json.dumps({"htype": "end", "n_frames": 1}).encode(), "series_id"),
    (json.dumps({"htype": "end", "series_id": "s", "n_frames": True}).encode(), "n_frames"),
    (json.dumps({"htype": "end", "series_id": "s", "n_frames": -1}).encode(), "n_frames"),
    (json.dumps({"htype": "end", "series_id": "s", "n_frames": 1.0}).encode(), "n_frames"),
    (json.dumps({"htype": "end", "series_id": "s", "n_frames": 2**70}).encode(), "n_frames"),
    (json.dumps({"htype": "end", "series_id": ".hidden", "n_frames": 1}).encode(), "series_id"),
    (json.dumps({"htype": "end", "series_id": "a/b", "n_frames": 1}).encode(), "series_id"),
    (json.dumps({"htype": "end", "series_id": "x" * 65, "n_frames": 1}).encode(), "series_id"),
    (json.dumps({"htype": "end", "series_id": "", "n_frames": 1}).encode(), "series_id"),
    (json.dumps({"htype": "end", "series_id": 5, "n_frames": 1}).encode(), "series_id"),
]


@pytest.mark.parametrize(("header", "field"), BAD_HEADERS)
def test_malformed_headers_name_the_field(header, field):
    with pytest.raises(ProtocolError, match=field):
        parse([header])


def _start_header(**kw):
    h = {
        "htype": "start",
        "series_id": "s",
        "frame_shape": [4, 6],
        "dtype": "uint16",
        "frame_time_s": 0.001,
    }
    h.update(kw)
    return [json.dumps(h, allow_nan=True).encode()]


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"frame_shape": [4]}, "frame_shape"),
        ({"frame_shape": [4, 0]}, "frame_shape"),
        ({"frame_shape": [4, True]}, "frame_shape"),
        ({"frame_shape": "4x6"}, "frame_shape"),
        ({"frame_shape": [100000, 100000]}, "max_frame_bytes"),
        ({"dtype": "float32"}, "dtype"),
        ({"dtype": None}, "dtype"),
        ({"frame_time_s": 0}, "frame_time_s"),
        ({"frame_time_s": float("nan")}, "header: not valid JSON .NaN is not JSON"),
        ({"frame_time_s": 1e999}, "header: not valid JSON .Infinity is not JSON"),
        ({"frame_time_s": "fast"}, "frame_time_s"),
        ({"frame_time_s": False}, "frame_time_s"),
        ({"pixel_size_A": -1}, "pixel_size_A"),
        ({"pixel_size_A": 0.0}, "pixel_size_A"),
        ({"n_frames": "10"}, "n_frames"),
        ({"detector": 3}, "detector"),
        ({"meta": [1]}, "meta"),
    ],
)
def test_malformed_start_names_the_field(kw, field):
    with pytest.raises(ProtocolError, match=field):
        parse(_start_header(**kw))


def test_max_frame_bytes_is_an_argument():
    parts = _start_header(frame_shape=[4, 6])
    assert parse(parts, max_frame_bytes=48).frame_nbytes == 48
    with pytest.raises(ProtocolError, match="frame_shape.*max_frame_bytes=47"):
        parse(parts, max_frame_bytes=47)
    img = encode_image("s", 0, 0, _frame(shape=(4, 6)))
    with pytest.raises(ProtocolError, match="payload"):
        parse(img, max_frame_bytes=47)


def test_header_depth_is_bounded_at_parse_time():
    from streamstore.link.protocol import MAX_HEADER_DEPTH

    def start_with_meta(levels):  # meta: an object nesting `levels` objects, itself included
        meta = '{"m":' * (levels - 1) + "{}" + "}" * (levels - 1)
        head = _start_header()[0][:-1]  # built as text: json.dumps itself gives up near 1000
        return [head + b',"meta":' + meta.encode() + b"}"]

    # the header is level 1, so meta may nest MAX_HEADER_DEPTH - 1 levels
    assert parse(start_with_meta(MAX_HEADER_DEPTH - 1)).meta
    for levels in (MAX_HEADER_DEPTH, 600, 980):  # 600, 980: json.loads accepts them
        with pytest.raises(ProtocolError, match="^header: arrays and objects nested more than 64"):
            parse(start_with_meta(levels))
    deep_list = json.dumps({"htype": "end", "series_id": "s", "n_frames": 1, "l": [[[[[]]]]] * 2})
    assert parse([deep_list.encode()]).extra["l"][0] == [[[[]]]]
    with pytest.raises(ProtocolError, match="nested"):
        parse([b'{"htype": "end", "l": ' + b"[" * 800 + b"]" * 800 + b"}"])


def test_header_size_is_bounded_apart_from_the_frame():
    parts = _start_header(frame_shape=[4, 6], meta={"notes": "x" * 20_000})
    # a frame limit as small as the frame leaves the 20 KB header alone
    assert parse(parts, max_frame_bytes=48).meta["notes"] == "x" * 20_000
    with pytest.raises(ProtocolError, match="header: .* more than max_header_bytes=10000"):
        parse(parts, max_header_bytes=10_000)
    img = encode_image("s", 0, 0, _frame(shape=(4, 6)))
    assert parse(img, max_frame_bytes=48, max_header_bytes=256).nbytes == 48


def test_a_message_of_many_parts_is_refused_before_its_header_is_read():
    img = encode_image("s", 0, 0, _frame(shape=(4, 6)))
    with pytest.raises(ProtocolError, match="parts: 601 parts; a message has at most 2"):
        parse([img[0]] + [b"\0" * 8] * 600)
    with pytest.raises(ProtocolError, match="parts: 3 parts"):
        parse([b"not json", b"", b""])


@pytest.mark.parametrize(
    ("parts", "field"),
    [
        ([], "parts"),
        (b"{}", "parts"),
        ([encode_end("s", 1)[0], b"extra"], "parts"),
        ([encode_image("s", 0, 0, np.zeros((2, 2), np.uint8))[0]], "parts"),
        ([*encode_image("s", 0, 0, np.zeros((2, 2), np.uint8)), b""], "parts"),
        ([encode_start(_start())[0], b"x"], "parts"),
        ([12345], r"parts\[0\]"),
    ],
)
def test_wrong_parts_are_rejected(parts, field):
    with pytest.raises(ProtocolError, match=field):
        parse(parts)


def test_as_array_checks_payload_size_and_series():
    frame = _frame()
    msg = parse([encode_image("run_01", 0, 0, frame)[0], frame.tobytes()[:-2]])
    with pytest.raises(ProtocolError, match="payload.*expected 768"):
        msg.as_array(_start())
    ok = parse(encode_image("run_01", 0, 0, frame))
    with pytest.raises(ProtocolError, match="payload.*series"):
        ok.as_array(_start(series_id="other"))


def test_encode_image_rejects_frames_it_cannot_send_without_copy():
    f = _frame()
    with pytest.raises(ProtocolError, match="C-contiguous"):
        encode_image("s", 0, 0, f[:, ::2])
    with pytest.raises(ProtocolError, match="little endian"):
        encode_image("s", 0, 0, f.astype(">u2"))
    with pytest.raises(ProtocolError, match="dtype"):
        encode_image("s", 0, 0, f.astype(np.float32))
    with pytest.raises(ProtocolError, match="2-D"):
        encode_image("s", 0, 0, f[None])
    with pytest.raises(ProtocolError, match="frame_id"):
        encode_image("s", -1, 0, f)
    with pytest.raises(ProtocolError, match="series_id"):
        encode_image("../etc", 0, 0, f)


def test_start_constructor_validates():
    with pytest.raises(ProtocolError, match="series_id"):
        _start(series_id="has space")
    with pytest.raises(ProtocolError, match="extra"):
        _start(extra={"dtype": "uint8"})
    with pytest.raises(ProtocolError, match="meta"):
        encode_start(_start(meta={"x": object()}))


@pytest.mark.parametrize("good", ["a", "A.b-c_9", "-x", "x" * 64, "run.2026-11-25"])
def test_validate_series_id_accepts(good):
    assert validate_series_id(good) == good


# ------------------------------------------------- hypothesis: mutations never crash
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


def _valid_messages():
    start = encode_start(_start(pixel_size_A=1.5, n_frames=3, detector="d", meta={"k": 1}))
    image = encode_image("run_01", 3, 99, _frame())
    end = encode_end("run_01", 3)
    return [start, [image[0], image[1].tobytes()], end]


KEYS = [
    "htype",
    "series_id",
    "frame_shape",
    "dtype",
    "frame_time_s",
    "pixel_size_A",
    "n_frames",
    "detector",
    "meta",
    "frame_id",
    "timestamp_ns",
    "other",
]


def _check_meaning(msg, header):
    """A successful parse means exactly what the (mutated) header says."""
    assert type(msg).__name__.lower() == header["htype"]
    for key, value in header.items():
        if key == "htype":
            continue
        if hasattr(msg, key) and key not in ("extra", "payload"):
            got = getattr(msg, key)
            if key == "frame_shape":
                assert list(got) == value
            elif key == "meta" and value is None:
                assert got == {}
            elif isinstance(value, float) and math.isnan(value):
                raise AssertionError(f"{key}: NaN accepted")
            else:
                assert got == value and type(got) is not bool
        else:
            assert msg.extra[key] == value
    # and it survives its own round trip
    if isinstance(msg, Start):
        assert parse(encode_start(msg)) == msg
    elif isinstance(msg, End):
        assert parse(encode_end(msg.series_id, msg.n_frames, extra=msg.extra)) == msg


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.integers(0, 2),
    key=st.sampled_from(KEYS),
    value=json_values,
    delete=st.booleans(),
)
def test_header_mutations_parse_to_their_meaning_or_raise_protocol_error(which, key, value, delete):
    parts = _valid_messages()[which]
    header = json.loads(parts[0])
    if delete:
        header.pop(key, None)
    else:
        header[key] = value
    mutated = [json.dumps(header, allow_nan=True).encode(), *parts[1:]]
    try:
        msg = parse(mutated)
    except ProtocolError:
        return
    _check_meaning(msg, header)


@settings(max_examples=300, deadline=None)
@given(
    which=st.integers(0, 2),
    pos=st.integers(0, 10_000),
    new=st.binary(min_size=0, max_size=3),
    cut=st.integers(0, 3),
)
def test_byte_mutations_never_raise_anything_but_protocol_error(which, pos, new, cut):
    parts = _valid_messages()[which]
    raw = parts[0]
    pos = pos % (len(raw) + 1)
    mutated = [raw[:pos] + new + raw[pos + cut :], *parts[1:]]
    try:
        msg = parse(mutated)
    except ProtocolError:
        return
    assert isinstance(msg, Start | Image | End)


@settings(max_examples=100, deadline=None)
@given(length=st.integers(0, 2000), n_parts=st.integers(0, 4))
def test_payload_length_and_part_count_mutations(length, n_parts):
    header, frame = encode_image("run_01", 1, 2, _frame())
    parts = [header, b"\1" * length, b"\2" * 3, b"\3"][: n_parts or 0]
    start = _start()
    try:
        msg = parse(parts)
        arr = msg.as_array(start)
    except ProtocolError as exc:
        if n_parts == 2:
            assert "payload" in str(exc)
        return
    assert n_parts == 2 and length == start.frame_nbytes and arr.shape == SHAPE


# ------------------------------------------------------------- real sockets
def test_sender_receiver_over_tcp(tcp_endpoint, zmq_ctx):
    start = _start(n_frames=3, meta={"kind": "test"})
    frames = [_frame(seed=i) for i in range(3)]
    with (
        Sender(tcp_endpoint, context=zmq_ctx, send_timeout_s=10) as tx,
        Receiver(tcp_endpoint, context=zmq_ctx) as rx,
    ):
        tx.send_start(start)
        for i, f in enumerate(frames):
            tx.send_image(start.series_id, i, f, timestamp_ns=1000 + i)
        tx.send_end(start.series_id, 3)
        assert rx.recv(timeout_s=10) == start
        for i, f in enumerate(frames):
            img = rx.recv(timeout_s=10)
            assert (img.frame_id, img.timestamp_ns) == (i, 1000 + i)
            np.testing.assert_array_equal(img.as_array(start), f)
        assert rx.recv(timeout_s=10) == End(start.series_id, 3)


def test_sender_times_out_without_a_peer(tcp_endpoint, zmq_ctx):
    with Sender(tcp_endpoint, context=zmq_ctx, send_timeout_s=0.2, linger_s=0) as tx:
        with pytest.raises(TimeoutError, match="no receiver"):
            tx.send_end("s", 0)


def test_receiver_times_out_and_rejects_oversized(ipc_endpoint, zmq_ctx):
    with (
        Receiver(ipc_endpoint, bind=True, context=zmq_ctx, max_frame_bytes=100) as rx,
        Sender(ipc_endpoint, bind=False, context=zmq_ctx, send_timeout_s=10, linger_s=0) as tx,
    ):
        with pytest.raises(TimeoutError):
            rx.recv(timeout_s=0.05)
        tx.send_start(_start(frame_shape=(5, 5), dtype="uint8"))
        assert rx.recv(timeout_s=10).frame_nbytes == 25
        tx.send_start(_start(frame_shape=(50, 50), dtype="uint8"))
        with pytest.raises(ProtocolError, match="max_frame_bytes"):
            rx.recv(timeout_s=10)


def test_sender_reports_a_bad_endpoint(zmq_ctx):
    with pytest.raises(OSError, match="cannot bind"):
        Sender("nonsense://x", context=zmq_ctx)


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_transport_benchmark_delivers_every_byte(transport):
    from benchmarks.transport import measure

    pool = np.stack([_frame(seed=i) for i in range(2)])
    res = measure(transport, pool, 5)
    assert res["frames"] == 5 and res["bytes"] == 5 * pool[0].nbytes
    assert res["gb_per_s"] > 0


def test_docs_protocol_example_runs(capsys):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text("utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert blocks
    for code in blocks:
        exec(compile(code, "docs/protocol.md", "exec"), {"__name__": "__docs__"})
    assert capsys.readouterr().out.strip() == "Start 0 (64, 96)"


series_ids = st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}", fullmatch=True)
finite_pos = st.floats(min_value=1e-9, max_value=1e9, allow_nan=False)
json_objects = st.dictionaries(st.text(max_size=8), json_values.filter(
    lambda v: "nan" not in repr(v) and "inf" not in repr(v)), max_size=3)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    sid=series_ids,
    shape=st.tuples(st.integers(1, 5000), st.integers(1, 5000)),
    dtype=st.sampled_from(["uint8", "uint16"]),
    frame_time=finite_pos,
    pixel=st.none() | finite_pos,
    n=st.none() | st.integers(0, 2**63 - 1),
    detector=st.none() | st.text(max_size=30),
    meta=json_objects,
)
def test_any_valid_start_round_trips(sid, shape, dtype, frame_time, pixel, n, detector, meta):
    start = Start(sid, shape, dtype, frame_time, pixel, n, detector, meta)
    assert parse(encode_start(start)) == start


@settings(max_examples=150, deadline=None)
@given(
    sid=series_ids,
    frame_id=st.integers(0, 2**63 - 1),
    ts=st.integers(-(2**63), 2**63 - 1),
    n=st.integers(0, 2**63 - 1),
)
def test_any_valid_image_and_end_round_trip(sid, frame_id, ts, n):
    frame = np.arange(12, dtype=np.uint16).reshape(3, 4)
    img = parse(encode_image(sid, frame_id, ts, frame))
    assert (img.series_id, img.frame_id, img.timestamp_ns) == (sid, frame_id, ts)
    np.testing.assert_array_equal(img.as_array(Start(sid, (3, 4), "uint16", 1.0)), frame)
    assert parse(encode_end(sid, n)) == End(sid, n)
