"""4D-STEM benchmark: virtual BF/ADF images and centre of mass, streamstore vs stempy.

A synthetic scan of ``--scan`` x ``--scan`` positions of ``--frame`` x
``--frame`` frames (default 256 x 256 positions of 576 x 576 frames, the 4D
Camera's frame), about ``--events`` events per frame (70 % in a bright-field
disk whose centre wanders over the scan, 30 % spread over the frame), is
written once as a streamstore file with its scan geometry and once as
stempy's sparse HDF5 (``streamstore.export_stempy``). Then, in the same run:

* **streamstore**: ``store.virtual_images_and_com`` (BF disk, ADF annulus
  and centre of mass from one pass over the events) straight from the file,
  with 1 thread (the per-core figure) and with all cores; ``virtual_images``
  (both detectors in one call, as stempy's) and ``center_of_mass`` are also
  timed alone;
* **stempy**: ``SparseArray.from_hdf5`` (load), ``create_stem_images`` (both
  detectors in one call) and ``com_sparse`` on the loaded array.

Each side's figure is the best of ``--repeats`` of the whole task (BF + ADF +
CoM); "per core" compares CPU seconds (``time.process_time``), so a side that
used several threads is charged for all of them. The ratios are printed with
and without stempy's load. The results are also checked equal (counts exact,
centre of mass to 1e-6 relative).

Run ``python -m benchmarks.stem`` (table) or ``--json``; ``--quick`` for a
32 x 32 scan of 128 x 128 frames while developing. Fixed seeds.
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

BATCH_FRAMES = 4096


def make_scan(path: Path, scan: int, frame: int, events: float, seed: int) -> dict:
    """Write the synthetic scan; return its parameters (disk radius, centre, counts)."""
    import streamstore
    from streamstore.events import EventBatch
    from streamstore.scan import ScanGeometry

    rng = np.random.default_rng(seed)
    n = scan * scan
    npix = frame * frame
    radius = 0.1 * frame
    c0 = (frame - 1) / 2
    geom = ScanGeometry((scan, scan), 1, 0)
    n_events = 0
    with streamstore.StoreWriter(path, (frame, frame), frame_time_s=1 / 87_000, scan=geom) as w:
        for a in range(0, n, BATCH_FRAMES):
            b = min(n, a + BATCH_FRAMES)
            k = rng.poisson(events, b - a)
            fid = np.repeat(np.arange(a, b), k)
            m = fid.size
            in_disk = rng.random(m) < 0.7
            # the disk wanders with the scan position (a deflection to measure)
            pr, pc = divmod(fid, scan)
            cy = c0 + 0.05 * radius * np.sin(2 * np.pi * pr / scan)
            cx = c0 + 0.05 * radius * np.cos(2 * np.pi * pc / scan)
            rad = radius * np.sqrt(rng.random(m))
            ang = rng.uniform(0, 2 * np.pi, m)
            y = np.where(in_disk, cy + rad * np.sin(ang), rng.uniform(0, frame, m))
            x = np.where(in_disk, cx + rad * np.cos(ang), rng.uniform(0, frame, m))
            pix = np.clip(y.astype(np.int64), 0, frame - 1) * frame + np.clip(
                x.astype(np.int64), 0, frame - 1
            )
            key = np.unique((fid - a) * npix + pix)  # sorted, one event per pixel and frame
            f_of = key // npix
            counts = np.bincount(f_of, minlength=b - a)
            offs = np.zeros(b - a + 1, np.int64)
            np.cumsum(counts, out=offs[1:])
            batch = EventBatch(offs, (key % npix).astype(np.uint32), None, (frame, frame))
            ids = np.arange(a, b, dtype=np.int64)
            w.append(batch, ids, ids * 11_494)
            n_events += int(key.size)
    return {"radius": radius, "center": (c0, c0), "n_events": n_events, "n_frames": n}


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """Best wall and best CPU seconds of ``repeats`` calls, and the last result."""
    best_wall = best_cpu = float("inf")
    out = None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        best_wall = min(best_wall, time.perf_counter() - w0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best_wall, best_cpu, out


def run(args: argparse.Namespace) -> dict:
    import streamstore

    tmp = Path(tempfile.mkdtemp(prefix="stem-bench-", dir=args.tmp))
    path = tmp / "scan.h5"
    t0 = time.perf_counter()
    info = make_scan(path, args.scan, args.frame, args.events, args.seed)
    t_make = time.perf_counter() - t0
    sp_path = tmp / "scan_stempy.h5"
    t0 = time.perf_counter()
    streamstore.export_stempy(path, sp_path)
    t_export = time.perf_counter() - t0
    r = info["radius"]
    adf = (int(round(1.5 * r)), int(round(3 * r)))
    bf = int(round(r))
    center = info["center"]

    def ours(nthreads: int):
        def task():
            with streamstore.open(path, nthreads=nthreads) as st:
                (bf_img, adf_img), com = st.virtual_images_and_com([(0, bf), adf], center)
                return bf_img, adf_img, com

        return task

    ours(1)()  # compile the kernels (numba cache) outside the timing
    res: dict = {
        "scan": [args.scan, args.scan],
        "frame": [args.frame, args.frame],
        "n_events": info["n_events"],
        "events_per_frame": info["n_events"] / info["n_frames"],
        "make_s": t_make,
        "export_stempy_s": t_export,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    w1, c1, out1 = timed(ours(1), args.repeats)
    cores = os.cpu_count() or 1
    wn, cn, _ = timed(ours(cores), args.repeats)
    res["ours_1thread"] = {"wall_s": w1, "cpu_s": c1}

    def our_images():  # a fresh store each time: no decoded chunk cached from the last call
        with streamstore.open(path, nthreads=1) as st:
            return tuple(st.virtual_images([(0, bf), adf], center))

    def com_only():
        with streamstore.open(path, nthreads=1) as st:
            return st.center_of_mass()

    wbi, cbi, _ = timed(our_images, args.repeats)
    wco, cco, _ = timed(com_only, args.repeats)
    res["ours_1thread_images"] = {"wall_s": wbi, "cpu_s": cbi}
    res["ours_1thread_com"] = {"wall_s": wco, "cpu_s": cco}
    res["ours_all"] = {"threads": cores, "wall_s": wn, "cpu_s": cn}
    if args.no_stempy:
        return res
    from stempy import image as si
    from stempy import io as sio

    wl, cl, sa = timed(lambda: sio.SparseArray.from_hdf5(str(sp_path)), args.repeats)

    def images():
        return si.create_stem_images(sa, [0, adf[0]], [bf, adf[1]], center=(center[1], center[0]))

    wi, ci, imgs = timed(images, args.repeats)
    wc, cc, com = timed(lambda: si.com_sparse(sa, replace_nans=False), args.repeats)
    ws, cs = wi + wc, ci + cc
    same_counts = bool(
        np.array_equal(out1[0], imgs[0] // 0xFFFF) and np.array_equal(out1[1], imgs[1] // 0xFFFF)
    )
    ok = np.isfinite(com[0])
    same_com = bool(
        np.allclose(out1[2][0][ok], com[1][ok], rtol=1e-6)
        and np.allclose(out1[2][1][ok], com[0][ok], rtol=1e-6)
    )
    res["stempy_load"] = {"wall_s": wl, "cpu_s": cl}
    res["stempy_compute"] = {"wall_s": ws, "cpu_s": cs}
    res["stempy_create_stem_images"] = {"wall_s": wi, "cpu_s": ci}
    res["stempy_com_sparse"] = {"wall_s": wc, "cpu_s": cc}
    res["same_counts"] = same_counts
    res["same_com_1e-6"] = same_com
    res["per_core_speedup_with_load"] = (cl + cs) / c1
    res["per_core_speedup_in_memory"] = cs / c1
    res["per_core_speedup_images_in_memory"] = ci / cbi
    res["per_core_speedup_com_in_memory"] = cc / cco
    res["wall_speedup_all_threads"] = (wl + ws) / wn
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description="4D-STEM analysis: streamstore vs stempy")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    record.add_options(ap)
    ap.add_argument("--quick", action="store_true", help="32 x 32 scan of 128 x 128 frames")
    ap.add_argument("--scan", type=int, default=256, help="scan rows = cols (default 256)")
    ap.add_argument("--frame", type=int, default=576, help="frame rows = cols (default 576)")
    ap.add_argument("--events", type=float, default=200.0, help="mean events per frame")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-stempy", action="store_true", help="time streamstore only")
    ap.add_argument("--tmp", default=None, help="folder for the files (default: system temp)")
    args = ap.parse_args()
    if args.quick:
        args.scan, args.frame, args.repeats = 32, 128, 1
    res = run(args)
    record.save("stem", res, args)
    if args.json:
        json.dump(res, sys.stdout, indent=1)
        print()
        return 0
    print(
        f"scan {args.scan} x {args.scan} of {args.frame} x {args.frame} frames, "
        f"{res['events_per_frame']:.0f} events/frame ({res['n_events'] / 1e6:.1f} M events)"
    )
    print(f"{'task: BF + ADF + CoM':34s} {'wall s':>9s} {'CPU s':>9s}")
    rows = [
        ("streamstore, 1 thread", res["ours_1thread"]),
        ("  of which BF+ADF images", res["ours_1thread_images"]),
        ("  of which centre of mass", res["ours_1thread_com"]),
    ]
    rows.append((f"streamstore, {res['ours_all']['threads']} threads", res["ours_all"]))
    if "stempy_load" in res:
        rows += [
            ("stempy from_hdf5 (load)", res["stempy_load"]),
            ("stempy create_stem_images (BF+ADF)", res["stempy_create_stem_images"]),
            ("stempy com_sparse", res["stempy_com_sparse"]),
        ]
    for name, r in rows:
        print(f"{name:34s} {r['wall_s']:9.3f} {r['cpu_s']:9.3f}")
    if "stempy_load" in res:
        print(
            f"per core (CPU s): {res['per_core_speedup_with_load']:.1f} x stempy incl. load, "
            f"{res['per_core_speedup_in_memory']:.1f} x stempy in memory "
            f"(images {res['per_core_speedup_images_in_memory']:.2f} x, "
            f"centre of mass {res['per_core_speedup_com_in_memory']:.1f} x); "
            f"same counts: {res['same_counts']}, same CoM (1e-6): {res['same_com_1e-6']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
