"""The wire protocol between a camera (or the emulator) and the ingest daemon.

ZeroMQ multipart messages; the first part is a UTF-8 JSON object with an
``"htype"`` key (the full description is in ``docs/protocol.md``):

``start`` (1 part)
    ``series_id``, ``frame_shape`` ``[H, W]``, ``dtype`` (``"uint8"`` or
    ``"uint16"``), ``frame_time_s`` (> 0); optional ``pixel_size_A``,
    ``n_frames``, ``detector`` and a free ``meta`` object.
``image`` (2 parts)
    ``series_id``, ``frame_id`` (int >= 0), ``timestamp_ns`` (int); the second
    part is the raw frame, C order, little endian, exactly ``H * W * itemsize``
    bytes.
``end`` (1 part)
    ``series_id``, ``n_frames`` (the number of images the sender sent).

:func:`parse` turns received parts into :class:`Start`, :class:`Image` or
:class:`End`, or raises :class:`ProtocolError` whose message names the field
and the problem. Unknown header keys are kept in ``extra``. The encoders never
copy a frame: :func:`encode_image` returns ``[header, frame]`` for
``send_multipart(..., copy=False)``, and :class:`Image` keeps the received
buffer (a memoryview of the ``zmq.Frame``) for :meth:`Image.as_array`.

The sockets that speak it are in :mod:`streamstore.link.sockets`.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamstore.errors import StreamstoreError

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "DTYPES",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_DEPTH",
    "MAX_PARTS",
    "End",
    "Image",
    "Message",
    "ProtocolError",
    "Start",
    "encode_end",
    "encode_image",
    "encode_start",
    "parse",
    "validate_series_id",
]

#: Largest frame a parser accepts unless told otherwise (1 GiB; a K3 frame is 47 MB).
DEFAULT_MAX_FRAME_BYTES = 1 << 30
#: Where a camera (and ``streamstore emulate``) binds its PUSH socket by default, and
#: where ``streamstore ingest`` connects by default: the camera binds, the receiver
#: connects.
DEFAULT_DATA_ENDPOINT = "tcp://127.0.0.1:5555"
#: Where the ingest daemon publishes its status by default (``streamstore status``).
DEFAULT_STATUS_ENDPOINT = "tcp://127.0.0.1:5558"
#: Largest JSON header accepted unless told otherwise, bytes (``max_header_bytes``).
MAX_HEADER_BYTES = 1 << 16
#: Deepest nesting of arrays and objects a header may have (the header object is
#: level 1). ``json.loads`` accepts about 1000 levels, but recursive serialisers
#: downstream (the file's JSON attributes) fail from about 500: refuse at parse time.
MAX_HEADER_DEPTH = 64
#: Most parts a message may have (an image: header and frame).
MAX_PARTS = 2
#: Pixel types on the wire, with their little-endian numpy dtypes.
DTYPES: dict[str, np.dtype] = {"uint8": np.dtype("<u1"), "uint16": np.dtype("<u2")}

_SERIES_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
_START_KEYS = frozenset(
    {
        "htype",
        "series_id",
        "frame_shape",
        "dtype",
        "frame_time_s",
        "pixel_size_A",
        "n_frames",
        "detector",
        "meta",
        "scan_shape",
        "frames_per_position",
        "scan_flyback",
    }
)
_IMAGE_KEYS = frozenset({"htype", "series_id", "frame_id", "timestamp_ns"})
_END_KEYS = frozenset({"htype", "series_id", "n_frames"})
_MAX_DETECTOR_CHARS = 256


class ProtocolError(StreamstoreError, ValueError):
    """A message that does not follow the wire protocol; the text names the field."""


# ---------------------------------------------------------------- validators
def validate_series_id(series_id: object) -> str:
    """Return ``series_id`` if it is a valid series id, else raise :class:`ProtocolError`.

    A series id is 1-64 characters of ``[A-Za-z0-9_.-]`` not starting with
    ``.``; it is safe to use as a file name.
    """
    if not isinstance(series_id, str):
        raise ProtocolError(f"series_id: expected a string, got {type(series_id).__name__}")
    if not _SERIES_ID.fullmatch(series_id):
        raise ProtocolError(
            f"series_id: {series_id[:80]!r} is not 1-64 characters of [A-Za-z0-9_.-] "
            "not starting with '.'"
        )
    return series_id


def _int(value: object, name: str, *, minimum: int | None = 0) -> int:
    # bool is an int subclass in Python, but not on the wire
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ProtocolError(f"{name}: expected an integer, got {_show(value)}")
    v = int(value)
    if minimum is not None and v < minimum:
        raise ProtocolError(f"{name}: must be >= {minimum}, got {v}")
    if not -(2**63) <= v < 2**63:
        raise ProtocolError(f"{name}: {v} does not fit in a signed 64-bit integer")
    return v


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ProtocolError(f"{name}: expected a number, got {_show(value)}")
    try:
        v = float(value)
    except OverflowError:
        raise ProtocolError(f"{name}: {value} is too large") from None
    if not math.isfinite(v) or v <= 0:
        raise ProtocolError(f"{name}: must be a finite number > 0, got {value!r}")
    return v


def _show(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _check_shape(value: object, dtype: str, max_frame_bytes: int) -> tuple[int, int]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ProtocolError(f"frame_shape: expected [H, W], got {_show(value)}")
    h = _int(value[0], "frame_shape[0]", minimum=1)
    w = _int(value[1], "frame_shape[1]", minimum=1)
    nbytes = h * w * DTYPES[dtype].itemsize
    if nbytes > max_frame_bytes:
        raise ProtocolError(
            f"frame_shape: {h} x {w} {dtype} is {nbytes} bytes, more than "
            f"max_frame_bytes={max_frame_bytes}"
        )
    return h, w


def _check_scan_shape(value: object) -> tuple[int, int]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ProtocolError(f"scan_shape: expected [rows, cols], got {_show(value)}")
    return (
        _int(value[0], "scan_shape[0]", minimum=1),
        _int(value[1], "scan_shape[1]", minimum=1),
    )


def _check_dtype(value: object) -> str:
    if not isinstance(value, str) or value not in DTYPES:
        raise ProtocolError(f"dtype: must be 'uint8' or 'uint16', got {_show(value)}")
    return value


# ------------------------------------------------------------------ messages
@dataclass(frozen=True)
class Start:
    """Start of a series: what every following image of ``series_id`` looks like.

    Parameters
    ----------
    series_id : str
        1-64 characters of ``[A-Za-z0-9_.-]``, not starting with ``.``.
    frame_shape : tuple of int
        ``(H, W)``.
    dtype : {"uint8", "uint16"}
        Pixel type; frames are little endian.
    frame_time_s : float
        Frame time, > 0.
    pixel_size_A : float, optional
        Pixel size at the specimen, Angstrom (> 0).
    n_frames : int, optional
        Number of frames the sender intends to send.
    detector : str, optional
        Detector name.
    meta : dict, default {}
        Free JSON object (e.g. ``{"kind": "dark"}`` for a dark reference).
    scan_shape : (rows, cols), optional
        A scanned (4D-STEM) series: probe positions kept per scan.
    frames_per_position : int, optional
        Consecutive frames per probe position (default 1 when ``scan_shape`` is given).
    scan_flyback : int, optional
        Positions recorded at the end of each scan row and dropped (default 0).
    extra : dict, default {}
        Header keys the protocol does not define, kept as received.
    """

    series_id: str
    frame_shape: tuple[int, int]
    dtype: str
    frame_time_s: float
    pixel_size_A: float | None = None
    n_frames: int | None = None
    detector: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    scan_shape: tuple[int, int] | None = None
    frames_per_position: int | None = None
    scan_flyback: int | None = None

    def __post_init__(self) -> None:
        validate_series_id(self.series_id)
        if self.scan_shape is not None:
            object.__setattr__(self, "scan_shape", _check_scan_shape(self.scan_shape))
        for key, low in (("frames_per_position", 1), ("scan_flyback", 0)):
            if getattr(self, key) is not None:
                if self.scan_shape is None:
                    raise ProtocolError(f"{key}: given without scan_shape")
                object.__setattr__(self, key, _int(getattr(self, key), key, minimum=low))
        dtype = _check_dtype(self.dtype)
        shape = _check_shape(self.frame_shape, dtype, sys.maxsize)
        object.__setattr__(self, "frame_shape", shape)
        object.__setattr__(self, "frame_time_s", _number(self.frame_time_s, "frame_time_s"))
        if self.pixel_size_A is not None:
            object.__setattr__(self, "pixel_size_A", _number(self.pixel_size_A, "pixel_size_A"))
        if self.n_frames is not None:
            object.__setattr__(self, "n_frames", _int(self.n_frames, "n_frames"))
        if self.detector is not None:
            if not isinstance(self.detector, str):
                raise ProtocolError(f"detector: expected a string, got {_show(self.detector)}")
            if len(self.detector) > _MAX_DETECTOR_CHARS:
                raise ProtocolError(f"detector: longer than {_MAX_DETECTOR_CHARS} characters")
        if not isinstance(self.meta, Mapping):
            raise ProtocolError(f"meta: expected a JSON object, got {_show(self.meta)}")
        if not isinstance(self.extra, Mapping):
            raise ProtocolError(f"extra: expected a mapping, got {_show(self.extra)}")
        clash = _START_KEYS.intersection(self.extra)
        if clash:
            raise ProtocolError(f"extra: keys {sorted(clash)} are protocol fields")

    @property
    def np_dtype(self) -> np.dtype:
        """The little-endian numpy dtype of a pixel."""
        return DTYPES[self.dtype]

    @property
    def frame_nbytes(self) -> int:
        """Bytes in one frame payload (``H * W * itemsize``)."""
        h, w = self.frame_shape
        return h * w * self.np_dtype.itemsize


@dataclass(frozen=True)
class Image:
    """One frame of a series.

    ``payload`` is the received buffer, not a copy (a memoryview of the
    ``zmq.Frame`` when parsed from ZeroMQ); :meth:`as_array` views it as
    ``(H, W)`` once the series' :class:`Start` is known.
    """

    series_id: str
    frame_id: int
    timestamp_ns: int
    payload: Any = field(repr=False, compare=False)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Length of the payload in bytes."""
        return memoryview(self.payload).nbytes

    def as_array(self, start: Start) -> np.ndarray:
        """View the payload as a read-only ``(H, W)`` array described by ``start``.

        Raises
        ------
        ProtocolError
            If the image belongs to another series or the payload has the
            wrong size ("payload" is named in the message).
        """
        if start.series_id != self.series_id:
            raise ProtocolError(
                f"payload: image of series {self.series_id!r} read with the start of "
                f"series {start.series_id!r}"
            )
        n = self.nbytes
        if n != start.frame_nbytes:
            h, w = start.frame_shape
            raise ProtocolError(
                f"payload: frame {self.frame_id} has {n} bytes, expected {start.frame_nbytes} "
                f"({h} x {w} {start.dtype})"
            )
        return np.frombuffer(self.payload, dtype=start.np_dtype).reshape(start.frame_shape)


@dataclass(frozen=True)
class End:
    """End of a series: ``n_frames`` is the number of images the sender sent."""

    series_id: str
    n_frames: int
    extra: Mapping[str, Any] = field(default_factory=dict)


Message = Start | Image | End


# ------------------------------------------------------------------- parsing
def _as_buffer(part: object, index: int) -> memoryview:
    buf = getattr(part, "buffer", None)  # zmq.Frame
    if buf is not None and not isinstance(part, bytes | bytearray | memoryview):
        part = buf
    try:
        view = memoryview(part)  # type: ignore[arg-type]
    except TypeError:
        raise ProtocolError(
            f"parts[{index}]: expected bytes, memoryview or zmq.Frame, got {type(part).__name__}"
        ) from None
    if not view.c_contiguous:
        raise ProtocolError(f"parts[{index}]: buffer is not contiguous")
    return view.cast("B") if view.ndim != 1 or view.format != "B" else view


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text[:20]} out of range")
    return v


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


def _nesting(text: str, limit: int) -> int:
    """Deepest nesting of arrays and objects in JSON ``text``, counted up to ``limit + 1``.

    Scanned before ``json.loads``, whose recursion limit depends on the caller's
    stack, so the refusal is the same wherever the parser runs.
    """
    if text.count("[") + text.count("{") <= limit:
        return 0  # cannot be deeper than the limit (every header that is not hostile)
    depth = deepest = 0
    for m in _BRACKETS.finditer(_JSON_STRING.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                break
    return deepest


def _header(view: memoryview, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, Any]:
    if view.nbytes > max_header_bytes:
        raise ProtocolError(
            f"header: {view.nbytes} bytes, more than max_header_bytes={max_header_bytes}"
        )
    try:
        text = bytes(view).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"header: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if _nesting(text, MAX_HEADER_DEPTH) > MAX_HEADER_DEPTH:
        raise ProtocolError(
            f"header: arrays and objects nested more than {MAX_HEADER_DEPTH} levels deep"
        )
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"header: not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"header: expected a JSON object, got {type(obj).__name__}")
    return obj


def _n_parts(htype: str, parts: Sequence[Any], expected: int) -> None:
    if len(parts) != expected:
        what = "header and frame" if expected == 2 else "header only"
        raise ProtocolError(
            f"parts: {htype!r} messages have {expected} part(s) ({what}), got {len(parts)}"
        )


def parse(
    parts: Sequence[Any],
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> Message:
    """Parse one received multipart message.

    Parameters
    ----------
    parts : sequence of bytes, memoryview or zmq.Frame
        The message parts as received (``recv_multipart(copy=False)`` works).
    max_frame_bytes : int, default DEFAULT_MAX_FRAME_BYTES
        Largest frame (start ``frame_shape``) or image payload accepted.
    max_header_bytes : int, default MAX_HEADER_BYTES
        Largest JSON header accepted (bounded separately from the frame).
        Headers nested more than ``MAX_HEADER_DEPTH`` levels are refused too.

    Returns
    -------
    Start, Image or End

    Raises
    ------
    ProtocolError
        For anything malformed; the message names the field and the problem.
    """
    if isinstance(parts, bytes | bytearray | memoryview | str) or not isinstance(parts, Sequence):
        raise ProtocolError(f"parts: expected a list of message parts, got {type(parts).__name__}")
    if len(parts) == 0:
        raise ProtocolError("parts: empty message")
    if len(parts) > MAX_PARTS:
        raise ProtocolError(f"parts: {len(parts)} parts; a message has at most {MAX_PARTS}")
    header = _header(_as_buffer(parts[0], 0), max_header_bytes)
    htype = header.get("htype")
    if htype == "image":
        _n_parts("image", parts, 2)
        payload = _as_buffer(parts[1], 1)
        if payload.nbytes > max_frame_bytes:
            raise ProtocolError(
                f"payload: {payload.nbytes} bytes, more than max_frame_bytes={max_frame_bytes}"
            )
        return Image(
            series_id=validate_series_id(_required(header, "series_id")),
            frame_id=_int(_required(header, "frame_id"), "frame_id"),
            timestamp_ns=_int(_required(header, "timestamp_ns"), "timestamp_ns", minimum=None),
            payload=payload,
            extra={k: v for k, v in header.items() if k not in _IMAGE_KEYS},
        )
    if htype == "start":
        _n_parts("start", parts, 1)
        dtype = _check_dtype(_required(header, "dtype"))
        shape = _check_shape(_required(header, "frame_shape"), dtype, max_frame_bytes)
        meta = header.get("meta")
        return Start(
            series_id=_required(header, "series_id"),
            frame_shape=shape,
            dtype=dtype,
            frame_time_s=_required(header, "frame_time_s"),
            pixel_size_A=header.get("pixel_size_A"),
            n_frames=header.get("n_frames"),
            detector=header.get("detector"),
            meta={} if meta is None else meta,
            extra={k: v for k, v in header.items() if k not in _START_KEYS},
            scan_shape=header.get("scan_shape"),
            frames_per_position=header.get("frames_per_position"),
            scan_flyback=header.get("scan_flyback"),
        )
    if htype == "end":
        _n_parts("end", parts, 1)
        return End(
            series_id=validate_series_id(_required(header, "series_id")),
            n_frames=_int(_required(header, "n_frames"), "n_frames"),
            extra={k: v for k, v in header.items() if k not in _END_KEYS},
        )
    if "htype" not in header:
        raise ProtocolError("htype: missing")
    raise ProtocolError(f"htype: must be 'start', 'image' or 'end', got {_show(htype)}")


def _required(header: Mapping[str, Any], key: str) -> Any:
    try:
        return header[key]
    except KeyError:
        raise ProtocolError(f"{key}: missing from the {header.get('htype')} header") from None


# ------------------------------------------------------------------ encoding
def _dumps(obj: dict[str, Any], what: str = "header") -> bytes:
    try:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"{what}: cannot be encoded as JSON ({exc})") from None


def _merge_extra(header: dict[str, Any], extra: Mapping[str, Any], keys: frozenset[str]) -> None:
    clash = keys.intersection(extra)
    if clash:
        raise ProtocolError(f"extra: keys {sorted(clash)} are protocol fields")
    header.update(extra)


def encode_start(start: Start) -> list[bytes]:
    """Encode a :class:`Start` as message parts (one part)."""
    header: dict[str, Any] = {
        "htype": "start",
        "series_id": start.series_id,
        "frame_shape": list(start.frame_shape),
        "dtype": start.dtype,
        "frame_time_s": start.frame_time_s,
    }
    if start.pixel_size_A is not None:
        header["pixel_size_A"] = start.pixel_size_A
    if start.n_frames is not None:
        header["n_frames"] = start.n_frames
    if start.detector is not None:
        header["detector"] = start.detector
    if start.scan_shape is not None:
        header["scan_shape"] = list(start.scan_shape)
    for key in ("frames_per_position", "scan_flyback"):
        if getattr(start, key) is not None:
            header[key] = getattr(start, key)
    header["meta"] = dict(start.meta)
    _dumps(header["meta"], "meta")
    _dumps(dict(start.extra), "extra")
    _merge_extra(header, start.extra, _START_KEYS)
    return [_dumps(header)]


def encode_image(
    series_id: str,
    frame_id: int,
    timestamp_ns: int,
    frame: np.ndarray,
    *,
    extra: Mapping[str, Any] | None = None,
) -> list[Any]:
    """Encode one frame as ``[header_bytes, frame]`` without copying the frame.

    Parameters
    ----------
    series_id : str
    frame_id : int
        >= 0.
    timestamp_ns : int
        Acquisition time, ns (e.g. ``time.time_ns()``).
    frame : ndarray
        2-D, C-contiguous, uint8 or little-endian uint16.
    extra : mapping, optional
        Additional header keys.

    Returns
    -------
    list
        ``[header, frame]`` for ``socket.send_multipart(parts, copy=False)``.
    """
    if not isinstance(frame, np.ndarray):
        raise ProtocolError(f"frame: expected a numpy array, got {type(frame).__name__}")
    if frame.ndim != 2:
        raise ProtocolError(f"frame: expected a 2-D (H, W) array, got shape {frame.shape}")
    if frame.dtype.kind != "u" or frame.dtype.itemsize not in (1, 2):
        raise ProtocolError(f"frame: dtype must be uint8 or uint16, got {frame.dtype}")
    if frame.dtype.itemsize == 2 and not (
        frame.dtype.byteorder == "<" or (frame.dtype.byteorder == "=" and sys.byteorder == "little")
    ):
        raise ProtocolError("frame: uint16 frames must be little endian")
    if not frame.flags.c_contiguous:
        raise ProtocolError("frame: must be C-contiguous (use np.ascontiguousarray)")
    header: dict[str, Any] = {
        "htype": "image",
        "series_id": validate_series_id(series_id),
        "frame_id": _int(frame_id, "frame_id"),
        "timestamp_ns": _int(timestamp_ns, "timestamp_ns", minimum=None),
    }
    if extra:
        _merge_extra(header, extra, _IMAGE_KEYS)
    return [_dumps(header), frame]


def encode_end(
    series_id: str, n_frames: int, *, extra: Mapping[str, Any] | None = None
) -> list[bytes]:
    """Encode the end of a series (``n_frames`` = images sent) as message parts."""
    header: dict[str, Any] = {
        "htype": "end",
        "series_id": validate_series_id(series_id),
        "n_frames": _int(n_frames, "n_frames"),
    }
    if extra:
        _merge_extra(header, extra, _END_KEYS)
    return [_dumps(header)]
