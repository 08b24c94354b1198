"""EER export benchmark: bits per event beside the store's, export speed, decode anchor.

For Falcon-4-sized frames (4096 x 4096) with uniform events at densities p
(e/px per frame) and a random 4 x 4 sub-pixel cell per event, it measures in
one run, per density:

* the store's bits/event (``Store.bits_per_event``, gaps + sub-pixel bytes);
* the EER's bits/event (strip bytes x 8 / events) for 7-bit runs
  (compression 65001, the default) and 8-bit runs (65002), beside the
  expected value for geometric gaps, ``rle + 4 + rle * q / (1 - q)`` with
  ``q = (1 - p) ** (2**rle - 1)`` (one escape per 2**rle - 1 empty pixels);
* export speed, frames/s and M events/s, of :func:`streamstore.export_eer`
  (reading each frame from the store, encoding, appending the page);
* anchors measured in the same run: reading every frame's events alone
  (``Store.events(i, i + 1)``, the export's floor) and decoding the whole
  export with tifffile + imagecodecs.

Run ``python -m benchmarks.eer`` (table) or ``--json`` (one JSON object);
``--quick`` for a short run while developing. Fixed seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import record

FRAME_SHAPE = (4096, 4096)
DENSITIES = (0.001, 0.005, 0.02)


def make_store(path: Path, shape: tuple[int, int], p: float, n_frames: int, seed: int) -> int:
    """Write a store of uniform events with sub-pixel cells; return the number of events."""
    from streamstore import EventBatch, StoreWriter

    rng = np.random.default_rng(seed)
    h, w = shape
    total = 0
    with StoreWriter(path, shape, frame_time_s=1e-3, pixel_size_A=0.8, subpixel=True) as wr:
        for a in range(0, n_frames, 10):
            offs, idx = [0], []
            for _ in range(a, min(a + 10, n_frames)):
                n = rng.binomial(h * w, p)
                hit = np.unique(rng.integers(0, h * w, n)).astype(np.uint32)
                idx.append(hit)
                offs.append(offs[-1] + hit.size)
            indices = np.concatenate(idx)
            sub = rng.integers(0, 16, indices.size).astype(np.uint8)
            ids = np.arange(a, a + len(idx))
            wr.append(EventBatch(np.array(offs), indices, sub, shape), ids, ids * 1_000_000)
            total += indices.size
    return total


def expected_bits(p: float, rle: int) -> float:
    """Mean EER bits/event for independent pixels (ignoring the per-page tail)."""
    q = (1 - p) ** ((1 << rle) - 1)
    return rle + 4 + rle * q / (1 - q)


def best(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(shape, densities, n_frames: int, repeats: int, tmp: Path) -> list[dict]:
    import tifffile

    import streamstore

    rows = []
    for k, p in enumerate(densities):
        src = tmp / f"p{p}.h5"
        n_events = make_store(src, shape, p, n_frames, seed=2026 + k)
        with streamstore.open(src) as st:
            row = {
                "p_e_per_px": p,
                "frames": n_frames,
                "events": n_events,
                "store_bits_per_event": st.bits_per_event,
            }

            def read_all(st=st):
                for i in range(st.n_frames):
                    st.events(i, i + 1)

            row["read_only_s"] = best(read_all, repeats)
            for rle in (7, 8):
                out = tmp / f"p{p}_{rle}.eer"

                def export(st=st, out=out, rle=rle):
                    streamstore.export_eer(st, out, rle_bits=rle, overwrite=True, progress=False)

                t = best(export, repeats)
                r = streamstore.export_eer(st, out, rle_bits=rle, overwrite=True, progress=False)
                row[f"eer{rle}_bits_per_event"] = r.eer_bits_per_event
                row[f"eer{rle}_expected_bits"] = expected_bits(p, rle)
                row[f"eer{rle}_file_bits_per_event"] = r.file_bits_per_event
                row[f"eer{rle}_export_s"] = t
                row[f"eer{rle}_frames_per_s"] = n_frames / t
                row[f"eer{rle}_Mevents_per_s"] = n_events / t / 1e6

            def decode(out=tmp / f"p{p}_7.eer"):
                with tifffile.TiffFile(out) as tif:
                    for page in tif.pages:
                        page.asarray()

            row["decode_s"] = best(decode, repeats)
            row["decode_frames_per_s"] = n_frames / row["decode_s"]
        for f in tmp.glob(f"p{p}*"):
            f.unlink()
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    record.add_options(ap)
    ap.add_argument("--quick", action="store_true", help="1024 x 1024, 20 frames, 1 repeat")
    ap.add_argument("--frames", type=int, default=200, help="frames per density (default 200)")
    ap.add_argument("--repeats", type=int, default=3, help="best of N (default 3)")
    ap.add_argument("--tmp", default=None, help="folder for the files (default: system temp)")
    args = ap.parse_args(argv)
    shape, frames, repeats = FRAME_SHAPE, args.frames, args.repeats
    if args.quick:
        shape, frames, repeats = (1024, 1024), 20, 1
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        rows = run(shape, DENSITIES, frames, repeats, Path(d))
    result = {
        "benchmark": "eer_export",
        "frame_shape": list(shape),
        "repeats": repeats,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "rows": rows,
    }
    record.save("eer", result, args)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"EER export, {shape[0]} x {shape[1]} frames, {frames} frames, best of {repeats}")
    hdr = (
        f"{'p e/px':>8} {'store b/ev':>10} {'EER7 b/ev':>10} {'(expect)':>9} {'EER8 b/ev':>10} "
        f"{'(expect)':>9} {'export fr/s':>11} {'Mev/s':>7} {'read fr/s':>10} {'decode fr/s':>11}"
    )
    print(hdr)
    for r in rows:
        print(
            f"{r['p_e_per_px']:>8g} {r['store_bits_per_event']:>10.2f} "
            f"{r['eer7_bits_per_event']:>10.2f} {r['eer7_expected_bits']:>9.2f} "
            f"{r['eer8_bits_per_event']:>10.2f} {r['eer8_expected_bits']:>9.2f} "
            f"{r['eer7_frames_per_s']:>11.1f} {r['eer7_Mevents_per_s']:>7.2f} "
            f"{r['frames'] / r['read_only_s']:>10.1f} {r['decode_frames_per_s']:>11.1f}"
        )
    print("export = read + encode + append one page (7-bit runs); read = Store.events per frame;")
    print("decode = tifffile + imagecodecs, every page of the export at 1 x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
