"""Write the golden files of the current format version into tests/data/.

Run once per format version and commit the output; never regenerate an old
version's file (that is the point: tests/store/test_store_format.py decodes the
committed bytes on every run, so a reader change that breaks old files fails).

    python tools/make_golden.py [--out tests/data]

Writes ``golden_v<N>.h5`` and ``golden_v<N>_expected.json`` (the content the
file must decode to). Refuses to overwrite existing files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from streamstore import EventBatch, StoreWriter
from streamstore.store.format import FORMAT_VERSION

SHAPE = (12, 20)  # non-square: rows != cols


#: the corrected dose of the golden frames (format 3): made-up numbers, what matters
#: is that they are stored and read back exactly, beside the model that "made" them
GOLDEN_DOSE_MODEL = {"name": "tile-coincidence", "version": 1, "tile": 8, "hard_area": 9.0}


def golden_batches() -> list[EventBatch]:
    """Deterministic batches covering the corner cases of the format."""
    rng = np.random.default_rng(20261125)
    h, w = SHAPE
    npix = h * w
    frames: list[np.ndarray] = [
        np.array([0, npix - 1]),  # first and last pixel
        np.array([], dtype=np.int64),  # empty frame
        np.arange(npix),  # full frame
        np.sort(rng.choice(npix, 9, replace=False)),
        np.array([5]),
        np.sort(rng.choice(npix, 30, replace=False)),
        np.array([], dtype=np.int64),
        np.sort(rng.choice(npix, 17, replace=False)),
    ]
    counts = np.array([f.size for f in frames])
    offsets = np.zeros(len(frames) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    idx = np.concatenate(frames).astype(np.uint32)
    sub = rng.integers(0, 16, idx.size).astype(np.uint8)
    electrons = counts * 1.25 + np.arange(len(frames)) / 8.0
    batch = EventBatch(offsets, idx, sub, SHAPE, electrons=electrons)
    return [batch.slice(0, 3), batch.slice(3, 4), batch.slice(4, 8)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "tests" / "data")
    args = ap.parse_args(argv)
    v = FORMAT_VERSION
    h5 = args.out / f"golden_v{v}.h5"
    js = args.out / f"golden_v{v}_expected.json"
    if js.exists():
        raise SystemExit(f"{js} exists; golden files are never regenerated")
    batches = golden_batches()
    ids = [np.array([10, 11, 12]), np.array([14]), np.array([15, 16, 17, 20])]
    with StoreWriter(
        h5,
        SHAPE,
        frame_time_s=0.004,
        pixel_size_A=1.25,
        calibration={"n_sigma": 5.0, "source": "manual", "dark_mean": 100.0},
        meta={"sample": "golden", "voltage_kV": 300},
        counting={"method": "local-max-3x3"},
        subpixel=True,
        chunk_events=64,  # several chunks and holes in a tiny file
        chunk_frames=2,
        flush_interval_s=1e9,
        scan={"scan_shape": (2, 4), "frames_per_position": 1, "flyback": 1},
    ) as w:
        w.set_dose_model(GOLDEN_DOSE_MODEL)
        for k, (b, fid) in enumerate(zip(batches, ids, strict=True)):
            w.append(b, fid, 1_700_000_000_000_000_000 + fid * 4_000_000)
            if k == 0:
                w.flush()
        w.mark_missing([13, 18, 19])
        w.update_accounting(received=8, duplicate=1, rejected=0, complete=True)
    full = EventBatch.concatenate(batches)
    expected = {
        "format_version": v,
        "frame_shape": list(SHAPE),
        "offsets": full.offsets.tolist(),
        "indices": full.indices.tolist(),
        "subpixel": full.subpixel.tolist(),
        "frame_ids": np.concatenate(ids).tolist(),
        "timestamps_ns": (1_700_000_000_000_000_000 + np.concatenate(ids) * 4_000_000).tolist(),
        "missing_frame_ids": [13, 18, 19],
        "missing_ranges": [[13, 14], [18, 20]],
        "scan": {"scan_shape": [2, 4], "frames_per_position": 1, "flyback": 1},
        "calibration_warning": "",
        "electrons": full.electrons.tolist(),
        "dose_model": GOLDEN_DOSE_MODEL,
        "frame_time_s": 0.004,
        "pixel_size_A": 1.25,
        "calibration": {"n_sigma": 5.0, "source": "manual", "dark_mean": 100.0},
        "meta": {"sample": "golden", "voltage_kV": 300},
        "accounting": {
            "received": 8,
            "duplicate": 1,
            "rejected": 0,
            "complete": True,
            "stored": 8,
            "missing": 3,
        },
    }
    js.write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {h5} and {js}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
