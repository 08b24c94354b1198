"""Summarise a stored series: frames, timing, dose, storage, counting.

Examples::

    streamstore info run1.h5
    streamstore info run1.h5 --json | jq .dose_total

Dose is given in events, e/px (electrons per pixel, averaged over the frame)
and e/A2 (electrons per square Angstrom, when the pixel size is recorded).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run", "summary"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``streamstore info`` arguments to ``parser``."""
    parser.add_argument("path", help="streamstore HDF5 file")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")


def _num(x: Any) -> Any:
    """JSON-friendly scalar: numpy -> python, NaN -> None."""
    if x is None:
        return None
    if hasattr(x, "item"):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not hasattr(obj, "item"):
        return obj.tolist()
    if isinstance(obj, bytes):
        return obj.decode(errors="replace")
    return _num(obj)


def _json_attr(value: Any) -> Any:
    """An attribute that holds JSON text, decoded; anything else as it is."""
    if isinstance(value, str | bytes):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def summary(store: Any, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Everything ``streamstore info`` reports, as a JSON-able dict.

    Parameters
    ----------
    store : Store
        An open store (:func:`streamstore.open`).
    path : str or PathLike, optional
        The file, for its name and size.

    Returns
    -------
    dict
        Keys: ``path``, ``file_size_bytes``, ``shards`` and ``shard_errors``
        (a series written by several workers, else None), ``format``, ``format_version``,
        ``writer``, ``created_utc``, ``meta``, ``frame_shape``, ``raw_dtype``,
        ``frames_stored``, ``frames_missing``, ``frames_duplicate``,
        ``frames_received``, ``frames_rejected``, ``complete``,
        ``open_for_writing`` (the file carries a writer's mark: read in SWMR mode),
        ``first_frame_id``, ``last_frame_id``, ``frame_time_s``,
        ``frame_rate_hz``, ``measured_frame_rate_hz`` and ``timestamps_span_s``
        (from the timestamps), ``duration_s`` (frame ids spanned x frame time),
        ``n_events``, ``pixel_size_A``, ``dose_total`` and
        ``dose_per_frame`` (dicts by unit; ``dose_per_frame`` holds mean, min
        and max), ``dose_rate_per_s`` (dict by unit, over ``duration_s``): the
        corrected dose where the file records one (``"events"`` is then
        electrons), else the counted events; ``dose_corrected`` (bool),
        ``dose_model`` (name and parameters, or None) and ``dose_label`` (one
        line saying which),
        ``bits_per_event``, ``counting``, ``calibration_source``,
        ``calibration``.
    """
    import numpy as np

    attrs = dict(getattr(store, "attrs", {}) or {})
    acc = dict(getattr(store, "accounting", {}) or {})
    ids = np.asarray(store.frame_ids, dtype=np.int64)
    ts = np.asarray(store.timestamps_ns, dtype=np.int64)
    counts = np.asarray(store.event_counts, dtype=np.int64)
    missing = np.asarray(store.missing_frame_ids, dtype=np.int64)
    n = int(store.n_frames)
    h, w = (int(v) for v in store.frame_shape)
    ft = _num(getattr(store, "frame_time_s", None))
    pixel = _num(store.pixel_size_A)

    n_events = int(counts.sum())
    units = ["events", "e/px"] + (["e/A2"] if pixel else [])
    dose_total: dict[str, float] = {}
    dose_frame: dict[str, dict[str, float | None]] = {}
    for u in units:
        d = np.asarray(store.dose(unit=u), dtype=np.float64)
        dose_total[u] = float(d.sum())
        dose_frame[u] = {
            "mean": float(d.mean()) if n else None,
            "min": float(d.min()) if n else None,
            "max": float(d.max()) if n else None,
        }
    corrected = bool(getattr(store, "dose_corrected", False))
    dose_model = getattr(store, "dose_model", None)
    version = attrs.get("format_version")
    dose_label = getattr(
        store,
        "dose_label",
        f"dose: counted events, no coincidence correction recorded (format {version})",
    )
    measured = ts_span = None
    if n > 1 and ts[-1] > ts[0]:  # frame ids advance once per camera frame, missing or not
        ts_span = float(ts[-1] - ts[0]) / 1e9
        measured = float(ids[-1] - ids[0]) / ts_span
    span_ids = int(ids[-1] - ids[0] + 1) if n else 0
    duration = span_ids * ft if (ft and n) else None
    try:
        bits = _num(store.bits_per_event)
    except (AttributeError, ValueError, ZeroDivisionError):
        bits = None

    def acc_get(key: str, default: Any = None) -> Any:
        v = acc.get(key, default)
        v = _num(v)
        return None if (isinstance(v, int) and v < 0) else v

    calib = getattr(store, "calibration_summary", None)
    counting = _json_attr(attrs.get("counting"))
    meta = _json_attr(attrs.get("meta"))
    # where the calibration came from: the writer's attribute, the calibration's own
    # record, and what ingest noted (e.g. the dark series it was made from)
    sources = [
        attrs.get("calibration_source"),
        calib.get("source") if isinstance(calib, dict) else None,
        meta.get("calibration_source") if isinstance(meta, dict) else None,
    ]
    sources = list(dict.fromkeys(str(v) for v in sources if v not in (None, "")))
    # "dark_frames" says less than "dark_frames:run7_dark (40 frames)": keep the longer
    sources = [v for v in sources if not any(o != v and o.startswith(v) for o in sources)]
    cal_source = ", ".join(sources) or None

    p = Path(path) if path is not None else None
    shards = [Path(str(getattr(sh, "path", ""))) for sh in getattr(store, "shards", None) or []]
    if shards:  # a series written by several ingest workers: its size is its shards'
        size = sum(f.stat().st_size for f in shards if f.is_file())
    else:
        size = p.stat().st_size if p and p.is_file() else None
    out = {
        "path": str(p) if p else None,
        "file_size_bytes": size,
        "shards": [f.name for f in shards] or None,
        "shard_errors": dict(getattr(store, "shard_errors", None) or {}) or None,
        "format": attrs.get("format"),
        "format_version": attrs.get("format_version"),
        "writer": attrs.get("writer"),
        "created_utc": attrs.get("created_utc"),
        "meta": meta or None,
        "frame_shape": [h, w],
        "raw_dtype": str(getattr(store, "raw_dtype", attrs.get("raw_dtype")) or "") or None,
        "frames_stored": n,
        "frames_missing": int(missing.size),
        "frames_duplicate": acc_get("duplicate"),
        "frames_received": acc_get("received"),
        "frames_rejected": acc_get("rejected"),
        "complete": acc_get("complete"),
        "open_for_writing": bool(getattr(store, "swmr", False)),
        "first_frame_id": int(ids[0]) if n else None,
        "last_frame_id": int(ids[-1]) if n else None,
        "frame_time_s": ft,
        "frame_rate_hz": (1.0 / ft) if ft else None,
        "measured_frame_rate_hz": measured,
        "timestamps_span_s": ts_span,
        "duration_s": duration,
        "n_events": n_events,
        "pixel_size_A": pixel,
        "dose_total": dose_total,
        "dose_per_frame": dose_frame,
        "dose_rate_per_s": {u: v / duration for u, v in dose_total.items()} if duration else None,
        "dose_corrected": corrected,
        "dose_model": dose_model,
        "dose_label": dose_label,
        "bits_per_event": bits,
        "counting": counting or None,
        "calibration_source": cal_source or None,
        "calibration": calib or None,
        "calibration_warning": str(getattr(store, "calibration_warning", "") or "") or None,
    }
    return _jsonable(out)


def _model_line(model: dict[str, Any] | None) -> str:
    """``: hard_area 9, soft_area 2.1, ...`` for the dose line ("" without a model)."""
    if not model:
        return ""
    keys = ("hard_area", "soft_area", "charge_tiles", "efficiency", "frames_seen")
    parts = [f"{k} {model[k]:.4g}" for k in keys if isinstance(model.get(k), int | float)]
    return (": " + ", ".join(parts)) if parts else ""


def _si(x: float | None, unit: str) -> str:
    if x is None:
        return "unknown"
    for div, pre in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {pre}{unit}"
    return f"{x:.3g} {unit}"


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _dict_line(d: Any, limit: int = 6, first: tuple[str, ...] = ()) -> str:
    """``k=v, ...`` of the scalar items of ``d``, keys in ``first`` leading, wrapped."""
    import textwrap

    if not d:
        return "not recorded"
    if not isinstance(d, dict):
        return str(d)
    keys = [k for k in first if k in d] + [k for k in d if k not in first]
    items = [f"{k}={_fmt_value(d[k])}" for k in keys if not isinstance(d[k], dict | list)]
    more = len(d) - len(items[:limit])
    text = ", ".join(items[:limit]) + (f" (+{more} more in --json)" if more > 0 else "")
    return "\n".join(textwrap.wrap(text, width=100, subsequent_indent=" " * 16))


def format_summary(s: dict[str, Any]) -> str:
    """The human-readable form of :func:`summary`."""
    lines = []
    name = Path(s["path"]).name if s["path"] else "series"
    fmt = f"{s['format']} v{s['format_version']}" if s["format"] else "streamstore"
    size = _si(s["file_size_bytes"], "B") if s["file_size_bytes"] is not None else "?"
    lines.append(f"{name}: {fmt}, {size}, written by {s['writer'] or '?'} {s['created_utc'] or ''}")

    def row(key: str, value: str) -> None:
        lines.append(f"  {key:<14}{value}")

    if s["shards"]:
        text = f"{len(s['shards'])} files ({', '.join(s['shards'][:4])}"
        text += ", ...)" if len(s["shards"]) > 4 else ")"
        for name, why in (s["shard_errors"] or {}).items():
            text += f"; {name} unreadable: {why}"
        row("shards", text)
    if s["meta"]:
        row("series", _dict_line(s["meta"], first=("series_id", "series", "detector")))
    h, w = s["frame_shape"]
    row("frame shape", f"{h} x {w} px (rows x cols), raw {s['raw_dtype'] or '?'}")
    parts = [f"{s['frames_stored']:,} stored", f"{s['frames_missing']:,} missing"]
    for key in ("duplicate", "received", "rejected"):
        v = s[f"frames_{key}"]
        parts.append(f"{v:,} {key}" if v is not None else f"{key} unknown")
    ids = (
        f"ids {s['first_frame_id']}..{s['last_frame_id']}"
        if s["first_frame_id"] is not None
        else "no frames yet"
    )
    row("frames", ", ".join(parts) + f" ({ids})")
    if s["open_for_writing"]:
        row("state", "still being written, or its writer died: frames flushed so far")
    if s["complete"] is not None:
        row("series end", "complete" if s["complete"] else "INCOMPLETE (closed without its end)")
    ft = s["frame_time_s"]
    # two rates, named: the camera's frame time (exposure per frame) and the rate the
    # frames were sent at (from their timestamps); the demo and `show` print the same
    timing = (
        f"frame time {ft * 1e3:.6g} ms ({s['frame_rate_hz']:,.6g} frames/s while exposing)"
        if ft
        else "frame time unknown"
    )
    if s["duration_s"] is not None:
        timing += f", exposure {s['duration_s']:.6g} s"
    if s["measured_frame_rate_hz"] is not None:
        timing += (
            f"; sent at {s['measured_frame_rate_hz']:,.6g} frames/s"
            f" (timestamps span {s['timestamps_span_s']:.6g} s)"
        )
    row("timing", timing)
    dt, df = s["dose_total"], s["dose_per_frame"]
    px = s["pixel_size_A"]
    if s["dose_corrected"]:
        total = f"{dt['events']:,.1f} electrons ({s['n_events']:,} events counted)"
    else:
        total = f"{s['n_events']:,} events"
    total += f" = {dt['e/px']:.6g} e/px"
    if "e/A2" in dt:
        total += f" = {dt['e/A2']:.6g} e/A^2"
    rate = s["dose_rate_per_s"]
    if rate:
        ru = "e/A2" if "e/A2" in rate else "e/px"
        total += f", {rate[ru]:.4g} {'e/A^2' if ru == 'e/A2' else 'e/px'} per s"
    if "e/A2" not in dt:
        total += " (e/A^2 needs the pixel size)"
    # what the dose below is: the corrected electrons, or the counted events
    lines.append(f"  {s['dose_label']}{_model_line(s['dose_model'])}")
    row("dose total", total)
    u = "e/A2" if "e/A2" in df else "e/px"
    ulabel = "e/A^2" if u == "e/A2" else "e/px"
    if df[u]["mean"] is not None:
        row(
            "dose / frame",
            f"mean {df[u]['mean']:.4g} {ulabel} (min {df[u]['min']:.4g}, max {df[u]['max']:.4g});"
            f" {df['events']['mean']:,.1f} {'electrons' if s['dose_corrected'] else 'events'}",
        )
    row("pixel size", f"{px:g} A" if px else "not recorded")
    bits = s["bits_per_event"]
    row("storage", (f"{bits:.2f} bits/event" if bits is not None else "bits/event unknown"))
    counting = s["counting"]
    if not counting and isinstance(s["calibration"], dict):  # thresholds live in the calibration
        skip = {"source", "frame_shape"}
        counting = {k: v for k, v in s["calibration"].items() if k not in skip}
    row("counting", _dict_line(counting, limit=8))
    row("calibration", s["calibration_source"] or "source not recorded")
    if s.get("calibration_warning"):
        lines.append(f"  WARNING: {s['calibration_warning']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``streamstore info``; return the exit status (errors for people raise UserError)."""
    import streamstore

    store = streamstore.open(args.path)
    try:
        s = summary(store, args.path)
    finally:
        close = getattr(store, "close", None)
        if close is not None:
            close()
    if args.json:
        print(json.dumps(s, indent=1, sort_keys=False, allow_nan=False))
    else:
        print(format_summary(s))
    return 0
