"""The constants and the layout of a streamstore events file ("streamstore.events").

The layout is specified in ``docs/format.md``; :func:`create_layout` writes
the root attributes and creates every dataset of a new file, and
:class:`~streamstore.store.writer.StoreWriter` fills them. The reader checks
:data:`FORMAT_NAME` against the file.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamstore.abc import ChunkCodec
from streamstore.store.column import ChunkColumn

__all__ = [
    "NO_DOSE_MODEL",
    "check_dose_model",
    "electrons_of",
    "read_dose_model",
    "write_dose_model",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "DEFAULT_CHUNK_EVENTS",
    "DEFAULT_CHUNK_FRAMES",
    "FRAME_COLUMNS",
    "Layout",
    "create_layout",
]

FORMAT_NAME = "streamstore.events"
FORMAT_VERSION = 3

#: default events per HDF5 chunk of the event datasets (4 MiB of uint32)
DEFAULT_CHUNK_EVENTS = 1 << 20
#: default frames per HDF5 chunk of the per-frame datasets: small, because a chunk
#: published while partly filled stays uncompressed (32 bytes a frame over the four
#: columns), which a short series would otherwise pay in full
DEFAULT_CHUNK_FRAMES = 1 << 8

#: accounting keys kept as numeric root attributes (-1 = not known)
ACCOUNTING_KEYS = ("received", "stored", "missing", "duplicate", "rejected")
ACCOUNTING_JSON_BYTES = 4096
#: room of the calibration warning attribute (fixed: attributes cannot grow under SWMR)
CAL_WARNING_BYTES = 1024

#: the per-frame datasets in the order a flush writes them (frame_id last: it publishes)
FRAME_COLUMNS = ("event_offset", "event_count", "timestamp_ns", "electrons", "frame_id")
#: dtype of each per-frame dataset
FRAME_DTYPES = {name: np.dtype(np.int64) for name in FRAME_COLUMNS} | {
    "electrons": np.dtype(np.float64)
}
#: room of the dose model's name and of its parameters (JSON) on ``frames/electrons``
#: (fixed: attributes cannot grow under SWMR)
DOSE_MODEL_BYTES = 64
DOSE_PARAMETERS_BYTES = 2048
#: the dose model name a file records when its electrons are the event counts
NO_DOSE_MODEL = "none"


def jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays (and nested containers) for ``json.dumps``."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps(obj: Any) -> str:
    """``obj`` as the JSON text of a root attribute (keys sorted)."""
    return json.dumps(jsonable(obj), sort_keys=True, allow_nan=True)


@dataclass
class Layout:
    """The columns of a new file, as :func:`create_layout` made them."""

    gaps: ChunkColumn
    subpixel: ChunkColumn | None
    frames: dict[str, ChunkColumn]
    missing: ChunkColumn


def create_layout(
    f: Any,
    *,
    frame_shape: tuple[int, int],
    raw_dtype: np.dtype,
    frame_time_s: float,
    pixel_size_A: float | None,
    subpixel: bool,
    cal_summary: dict[str, Any] | None,
    cal_source: str,
    counting: dict[str, Any] | None,
    meta: dict[str, Any] | None,
    scan: Any,
    codec: ChunkCodec,
    small: ChunkCodec,
    stored: ChunkCodec,
    chunk_events: int,
    chunk_frames: int,
    checksums: bool,
    version: str,
    hdf5_filter: Any,
) -> Layout:
    """Write the root attributes and create every dataset of ``f``, then switch to SWMR.

    Parameters
    ----------
    f : h5py.File
        A new, empty file open for writing.
    codec, small, stored : ChunkCodec
        The event codec, the codec of the other columns' whole chunks, and the
        fixed-size codec of a per-frame chunk published while partly filled.
    hdf5_filter : callable
        ``codec -> dataset keyword arguments`` naming the HDF5 filter.

    Returns
    -------
    Layout
        The columns to append to.
    """
    a = f.attrs
    a["format"] = FORMAT_NAME
    a["format_version"] = np.int64(FORMAT_VERSION)
    a["frame_shape"] = np.array(frame_shape, np.int64)
    a["raw_dtype"] = raw_dtype.name
    a["frame_time_s"] = np.float64(frame_time_s)
    a["pixel_size_A"] = np.float64(np.nan if pixel_size_A is None else pixel_size_A)
    a["subpixel"] = np.int8(subpixel)
    a["calibration"] = dumps(cal_summary)
    a["calibration_source"] = cal_source
    a["counting"] = dumps(counting)
    a["meta"] = dumps(meta or {})
    a["writer"] = f"streamstore {version}"
    a["created_utc"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    for key in ACCOUNTING_KEYS:
        a[f"frames_{key}"] = np.int64(-1)
    a["series_complete"] = np.int8(-1)
    a["calibration_warning"] = np.bytes_(b"".ljust(CAL_WARNING_BYTES))
    a["accounting_json"] = np.bytes_(b"{}".ljust(ACCOUNTING_JSON_BYTES))
    if scan is not None:
        for key, val in scan.to_attrs().items():
            a[key] = val

    filt = hdf5_filter(codec)
    ev = f.create_group("events")
    fr = f.create_group("frames")

    def make(group, name, dtype, chunk, c, tail=None, **attrs):
        ds = group.create_dataset(
            name,
            shape=(0,),
            maxshape=(None,),
            chunks=(chunk,),
            dtype=dtype,
            fletcher32=checksums,
            **filt,
        )
        ds.attrs["codec"] = dumps(c.get_config())
        for k, v in attrs.items():
            ds.attrs[k] = v
        return ChunkColumn(ds, c, chunk, np.dtype(dtype), tail, checksum=checksums)

    gaps = make(
        ev,
        "gaps",
        np.uint32,
        chunk_events,
        codec,
        encoding="gaps: first event of a frame absolute, then index - previous index",
    )
    sub = None
    if subpixel:
        sub = make(ev, "subpixel", np.uint8, chunk_events, small, encoding="(qy<<2)|qx")
    cols = {
        name: make(fr, name, FRAME_DTYPES[name], chunk_frames, small, stored)
        for name in FRAME_COLUMNS
    }
    # the model that made the corrected dose: set by the writer's first append and
    # kept current at every flush (fixed-size, space-padded)
    el = cols["electrons"].ds.attrs
    el["dose_model"] = np.bytes_(b"".ljust(DOSE_MODEL_BYTES))
    el["dose_model_parameters"] = np.bytes_(b"{}".ljust(DOSE_PARAMETERS_BYTES))
    el["description"] = (
        "electrons that arrived per frame, estimated from the events and corrected for "
        "coincidence loss by the model named in dose_model (the event count where "
        f"dose_model is {NO_DOSE_MODEL!r})"
    )
    # missing ids are recorded as ranges; the id list stays (empty) for the layout
    make(f, "missing_frame_ids", np.int64, 1024, small, stored)
    missing = make(
        f,
        "missing_ranges",
        np.int64,
        1024,
        small,
        stored,
        encoding="missing frame ids: flat [start, stop) pairs, disjoint, any order",
    )
    f.swmr_mode = True
    return Layout(gaps, sub, cols, missing)


def check_dose_model(model: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``model`` if it names a model and fits the attributes, else ValueError."""
    model = dict(model)
    name = str(model.get("name", ""))
    if not name or name == NO_DOSE_MODEL:
        raise ValueError(f"dose model needs a name (not {NO_DOSE_MODEL!r}), got {model!r}")
    if len(name.encode()) > DOSE_MODEL_BYTES:
        raise ValueError(f"dose model name {name!r} is longer than {DOSE_MODEL_BYTES} bytes")
    n = len(dumps(model).encode())
    if n > DOSE_PARAMETERS_BYTES:
        raise ValueError(
            f"dose model parameters take {n} bytes as JSON, at most {DOSE_PARAMETERS_BYTES} fit"
        )
    return model


def write_dose_model(ds: Any, corrected: bool, model: dict[str, Any] | None) -> None:
    """Set the dose model attributes of ``frames/electrons`` in place (SWMR-safe).

    Electrons without a recorded model are still the batches' electrons: the name
    says ``"unrecorded"`` rather than pass them for event counts; a series without
    electrons says :data:`NO_DOSE_MODEL`.
    """
    if not corrected:
        model, name = {}, NO_DOSE_MODEL
    else:
        model = model if model is not None else {"name": "unrecorded"}
        name = str(model["name"])
    ds.attrs.modify("dose_model", np.bytes_(name.encode().ljust(DOSE_MODEL_BYTES)))
    text = dumps(model).encode().ljust(DOSE_PARAMETERS_BYTES)
    ds.attrs.modify("dose_model_parameters", np.bytes_(text))


def read_dose_model(ds: Any | None) -> dict[str, Any] | None:
    """The dose model of ``frames/electrons`` (``name`` plus its parameters), or None
    when the file records no correction (no dataset, :data:`NO_DOSE_MODEL`, or empty)."""
    if ds is None:
        return None
    name = bytes(ds.attrs.get("dose_model", b"")).rstrip(b" \x00").decode()
    if not name or name == NO_DOSE_MODEL:
        return None
    raw = bytes(ds.attrs.get("dose_model_parameters", b"{}")).rstrip(b" \x00").decode()
    try:
        params = json.loads(raw)
    except ValueError:
        params = {}
    model = dict(params) if isinstance(params, dict) else {}
    model["name"] = name
    return model


def electrons_of(events: Any, corrected: bool | None) -> tuple[np.ndarray, bool]:
    """``(frames/electrons values, whether the batch carries electrons)`` of a batch.

    A batch without electrons stores its event counts. ``corrected``: what the
    series' first batch did (None before it); a batch that differs is refused
    (ValueError), as are electrons that are not finite.
    """
    has = events.electrons is not None
    if corrected is not None and has != corrected:
        first = "did not" if has else "did"
        raise ValueError(
            f"events carry {'' if has else 'no '}electrons but the series' first frames {first}"
        )
    if has and not np.all(np.isfinite(events.electrons)):
        raise ValueError("events.electrons must be finite")
    return (events.electrons if has else events.counts.astype(np.float64)), has
