"""Event store benchmark: size vs the entropy bound, write and sum throughput, vs stempy.

For 4092 x 5760 frames, densities p in {0.001, 0.01, 0.05} and two patterns
(``uniform``: every pixel independently with probability p; ``disk``: the same
number of events confined to a central disk, as a bright-field disk in
4D-STEM), it measures in one run:

* bits/event of the stored event data (``Store.bits_per_event``) and, for
  uniform events, the ratio to the information bound H(p)/p;
* write throughput, M events/s: ``StoreWriter.append`` (gap encoding, blosc2
  compression, HDF5 direct chunk writes) + close, with 1 blosc2 thread (the
  per-core figure) and with 2;
* read throughput of ``Store.sum`` over the whole series, 1 and 2 threads;
* side by side: stempy's sparse HDF5 file of the same events (bits/event) and
  ``stempy.io.SparseArray.from_hdf5`` + sum over all frames;
* a small series (40 frames of 1024 x 1536 at 1 %): the whole file's size
  against the entropy bound (limit 1.10 x the bound + 48 KiB), written once
  at close and with a flush every 5 frames (as a streaming writer publishes).

With ``--checksums`` each case is also written and read without chunk
checksums, interleaved with the default (checksummed) file in the same run, on
one thread: write, ``Store.events`` and ``Store.sum`` throughput with and
without, and the cost in percent.

Run ``python -m benchmarks.store`` (table) or ``--json`` (one JSON object);
``--quick`` for a short run while developing. Fixed seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import record

FRAME_SHAPE = (4092, 5760)
DENSITIES = (0.001, 0.01, 0.05)
PATTERNS = ("uniform", "disk")


def entropy_bound(p: float) -> float:
    """H(p)/p: bits per event needed for independent Bernoulli(p) pixels."""
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) / p


def bernoulli_indices(rng: np.random.Generator, p: float, n_pix: int) -> np.ndarray:
    """Sorted indices of a Bernoulli(p) process on n_pix pixels (geometric gaps)."""
    m = int(n_pix * p + 6 * math.sqrt(n_pix * p) + 16)
    pos = np.cumsum(rng.geometric(p, size=m)) - 1
    while pos[-1] < n_pix:  # pragma: no cover - astronomically rare
        more = np.cumsum(rng.geometric(p, size=m)) + pos[-1]
        pos = np.concatenate([pos, more])
    return pos[pos < n_pix].astype(np.uint32)


def make_frames(pattern: str, p: float, n_frames: int, seed: int):
    """EventBatch of ``n_frames`` frames, plus the per-pixel density inside the support."""
    from streamstore import EventBatch

    h, w = FRAME_SHAPE
    rng = np.random.default_rng(seed)
    if pattern == "uniform":
        support = None
        p_in = p
    else:
        r = min(h, w) * 0.35
        yy, xx = np.ogrid[:h, :w]
        support = np.flatnonzero(((yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= r * r).ravel())
        p_in = min(p * h * w / support.size, 0.5)
    frames = []
    for _ in range(n_frames):
        if support is None:
            frames.append(bernoulli_indices(rng, p, h * w))
        else:
            frames.append(support[bernoulli_indices(rng, p_in, support.size)].astype(np.uint32))
    counts = np.array([f.size for f in frames], np.int64)
    offsets = np.zeros(n_frames + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    batch = EventBatch(offsets, np.concatenate(frames), None, FRAME_SHAPE, validate=False)
    return batch, p_in


def bench_write(
    path: Path, batch, nthreads: int, frames_per_append: int, checksums: bool = True
) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of writing ``batch``."""
    from streamstore import StoreWriter

    c0 = time.process_time()
    t0 = time.perf_counter()
    with StoreWriter(
        path,
        FRAME_SHAPE,
        frame_time_s=1 / 1500,
        nthreads=nthreads,
        flush_interval_s=1e9,
        checksums=checksums,
    ) as w:
        for a in range(0, batch.n_frames, frames_per_append):
            b = min(a + frames_per_append, batch.n_frames)
            w.append(batch.slice(a, b), np.arange(a, b), np.arange(a, b) * 666_667)
    return time.perf_counter() - t0, time.process_time() - c0


def bench_sum(path: Path, nthreads: int, repeats: int) -> tuple[float, float, np.ndarray]:
    """Best (wall seconds, process CPU seconds) of ``Store.sum()`` and the image."""
    import streamstore

    best = cpu = float("inf")
    img = None
    for _ in range(repeats):
        with streamstore.open(path, nthreads=nthreads) as s:
            c0 = time.process_time()
            t0 = time.perf_counter()
            img = s.sum()
            best = min(best, time.perf_counter() - t0)
            cpu = min(cpu, time.process_time() - c0)
    return best, cpu, img


def checksum_cost(batch, frames_per_append: int, repeats: int, tmp: Path) -> dict:
    """Write and read the same events with and without chunk checksums, interleaved.

    One blosc2 thread (the per-core cost). Reads: ``Store.events`` over the
    whole series (decompression + gap decoding, where the checksum pass
    shows most) and ``Store.sum``. Best of ``repeats`` for each.
    """
    import streamstore

    ne = batch.n_events
    best: dict[str, float] = {}
    paths = {}
    for r in range(repeats):
        for ck in (True, False):  # interleaved: both see the same machine state
            path = tmp / f"ck-{ck}-{r}.h5"
            wall, _ = bench_write(path, batch, 1, frames_per_append, checksums=ck)
            best[f"write_{ck}"] = min(best.get(f"write_{ck}", float("inf")), wall)
            paths[ck] = path
    for _ in range(repeats):
        for ck in (True, False):
            with streamstore.open(paths[ck], nthreads=1) as s:
                t0 = time.perf_counter()
                ev = s.events(0, s.n_frames)
                t1 = time.perf_counter()
                s.sum()
                t2 = time.perf_counter()
            assert ev.n_events == ne
            best[f"events_{ck}"] = min(best.get(f"events_{ck}", float("inf")), t1 - t0)
            best[f"sum_{ck}"] = min(best.get(f"sum_{ck}", float("inf")), t2 - t1)
    size = {ck: paths[ck].stat().st_size for ck in (True, False)}
    out = {}
    for what in ("write", "events", "sum"):
        out[f"{what}_Mev_s_checksums"] = ne / best[f"{what}_True"] / 1e6
        out[f"{what}_Mev_s_no_checksums"] = ne / best[f"{what}_False"] / 1e6
        out[f"{what}_checksum_cost"] = best[f"{what}_True"] / best[f"{what}_False"] - 1
    out["file_bytes_checksums"] = size[True]
    out["file_bytes_no_checksums"] = size[False]
    return out


def bench_stempy(store_path: Path, out: Path, repeats: int) -> dict:
    try:
        import stempy.io as sio
    except ImportError:  # pragma: no cover
        return {"available": False}
    import streamstore

    streamstore.export_stempy(store_path, out)
    best = cpu = float("inf")
    img = None
    for _ in range(repeats):
        c0 = time.process_time()
        t0 = time.perf_counter()
        sa = sio.SparseArray.from_hdf5(str(out))
        img = sa.sum(axis=(0, 1))
        best = min(best, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
        del sa
    return {
        "available": True,
        "bytes": out.stat().st_size,
        "load_sum_s": best,
        "load_sum_cpu_s": cpu,
        "image": img,
    }


def run_case(
    pattern: str, p: float, n_events: float, repeats: int, tmp: Path, checksums: bool = False
) -> dict:
    import streamstore

    h, w = FRAME_SHAPE
    n_frames = max(2, int(round(n_events / (p * h * w))))
    seed = 1000 + int(p * 1e4) + (0 if pattern == "uniform" else 7)
    batch, p_in = make_frames(pattern, p, n_frames, seed)
    ne = batch.n_events
    fpa = max(1, n_frames // 8)  # a few appends, as an ingest pipeline does
    res: dict = {"pattern": pattern, "p": p, "n_frames": n_frames, "n_events": ne}
    write_s = {}
    write_cpu = {}
    for nt in (1, 2):
        times = []
        for r in range(repeats):
            path = tmp / f"{pattern}-{p}-{nt}-{r}.h5"
            times.append(bench_write(path, batch, nt, fpa))
            keep = path
        write_s[nt] = min(t[0] for t in times)
        write_cpu[nt] = min(t[1] for t in times)
    with streamstore.open(keep) as s:
        res["bits_per_event"] = s.bits_per_event
        assert s.n_events == ne
    res["bound_bits_per_event"] = entropy_bound(p_in)
    res["ratio_to_bound"] = res["bits_per_event"] / res["bound_bits_per_event"]
    res["write_Mev_s_1thread"] = ne / write_s[1] / 1e6
    res["write_Mev_s_2threads"] = ne / write_s[2] / 1e6
    res["write_Mev_per_cpu_s"] = ne / write_cpu[1] / 1e6
    sums = {}
    img = None
    for nt in (1, 2):
        t, cpu, img = bench_sum(keep, nt, repeats)
        sums[nt] = t
        res[f"sum_Mev_per_cpu_s_{nt}thread{'s' if nt > 1 else ''}"] = ne / cpu / 1e6
    truth = np.bincount(batch.indices, minlength=h * w).reshape(h, w)
    res["sum_correct"] = bool(np.array_equal(img, truth))
    res["sum_Mev_s_1thread"] = ne / sums[1] / 1e6
    res["sum_Mev_s_2threads"] = ne / sums[2] / 1e6
    if checksums:
        res["checksum"] = checksum_cost(batch, fpa, repeats, tmp)
    st = bench_stempy(keep, tmp / f"stempy-{pattern}-{p}.h5", repeats)
    if st.get("available"):
        res["stempy_bits_per_event"] = st["bytes"] * 8 / ne
        res["stempy_load_sum_Mev_s"] = ne / st["load_sum_s"] / 1e6
        res["stempy_load_sum_Mev_per_cpu_s"] = ne / st["load_sum_cpu_s"] / 1e6
        res["stempy_sum_correct"] = bool(np.array_equal(np.asarray(st["image"]), truth))
        res["sum_speedup_vs_stempy"] = res["sum_Mev_s_2threads"] / res["stempy_load_sum_Mev_s"]
        res["size_ratio_stempy_over_ours"] = res["stempy_bits_per_event"] / res["bits_per_event"]
    for f in tmp.glob("*.h5"):
        f.unlink()
    return res


SMALL_SHAPE = (1024, 1536)
SMALL_FRAMES = 40


def small_series(tmp: Path, p: float = 0.01) -> list[dict]:
    """Whole-file size of a short series against the entropy bound, closed once and
    flushed every 5 frames: what a series pays beyond its events."""
    import streamstore
    from streamstore import EventBatch, StoreWriter

    h, w = SMALL_SHAPE
    rng = np.random.default_rng(4040)
    frames = [bernoulli_indices(rng, p, h * w) for _ in range(SMALL_FRAMES)]
    offsets = np.zeros(SMALL_FRAMES + 1, np.int64)
    np.cumsum([f.size for f in frames], out=offsets[1:])
    batch = EventBatch(offsets, np.concatenate(frames), None, SMALL_SHAPE, validate=False)
    bound_bytes = entropy_bound(p) * batch.n_events / 8
    rows = []
    for mode, flush_every in (("closed once", 0), ("flush every 5", 5)):
        path = tmp / f"small-{flush_every}.h5"
        with StoreWriter(path, SMALL_SHAPE, frame_time_s=1 / 1500, flush_interval_s=1e9) as wr:
            for a in range(0, SMALL_FRAMES, 5):
                wr.append(batch.slice(a, a + 5), np.arange(a, a + 5), np.arange(a, a + 5) * 10**6)
                if flush_every:
                    wr.flush()
        size = path.stat().st_size
        with streamstore.open(path) as s:
            event_bits = s.bits_per_event
        rows.append(
            {
                "mode": mode,
                "frames": SMALL_FRAMES,
                "frame_shape": list(SMALL_SHAPE),
                "p": p,
                "n_events": batch.n_events,
                "file_bytes": size,
                "bound_bytes": bound_bytes,
                "file_bits_per_event": size * 8 / batch.n_events,
                "event_bits_per_event": event_bits,
                "bound_bits_per_event": entropy_bound(p),
                "file_ratio_to_bound": size / bound_bytes,
                "event_ratio_to_bound": event_bits / entropy_bound(p),
                "file_limit_bytes": 1.10 * bound_bytes + 48 * 1024,
                "within_limit": size <= 1.10 * bound_bytes + 48 * 1024,
            }
        )
        path.unlink()
    return rows


def print_small(rows: list[dict]) -> None:
    print(
        f"small series, {SMALL_FRAMES} frames {SMALL_SHAPE[0]}x{SMALL_SHAPE[1]} at 1 %: "
        "whole file vs entropy bound (limit 1.10 x + 48 KiB)"
    )
    print(
        f"{'mode':14} {'file KiB':>8} {'limit KiB':>9} {'file b/ev':>9} {'ratio':>6} "
        f"{'events b/ev':>11} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['mode']:14} {r['file_bytes'] / 1024:8.1f} {r['file_limit_bytes'] / 1024:9.1f} "
            f"{r['file_bits_per_event']:9.2f} {r['file_ratio_to_bound']:6.3f} "
            f"{r['event_bits_per_event']:11.2f} {r['event_ratio_to_bound']:6.3f}"
            + ("" if r["within_limit"] else "  OVER LIMIT")
        )


def warm_up(tmp: Path) -> None:
    """Load the numba kernels (cache) and blosc2 once, outside the timed runs."""
    import streamstore

    batch, _ = make_frames("uniform", 0.01, 2, 0)
    for nt in (1, 2):
        path = tmp / f"warm{nt}.h5"
        bench_write(path, batch, nt, 1)
        with streamstore.open(path, nthreads=nt) as s:
            s.sum()
        path.unlink()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="streamstore event store benchmark")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    record.add_options(ap)
    ap.add_argument("--quick", action="store_true", help="fewer events, one repeat")
    ap.add_argument("--events", type=float, default=3e7, help="events per case (default 3e7)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--density", type=float, nargs="*", default=list(DENSITIES))
    ap.add_argument("--pattern", nargs="*", default=list(PATTERNS), choices=PATTERNS)
    ap.add_argument(
        "--checksums",
        action="store_true",
        help="also write and read each case without chunk checksums (1 thread): their cost",
    )
    ap.add_argument("--small-only", action="store_true", help="only the small-series rows")
    args = ap.parse_args(argv)
    n_events = 3e6 if args.quick else args.events
    repeats = 1 if args.quick else args.repeats
    cases = []
    with tempfile.TemporaryDirectory(prefix="ss-bench-") as d:
        small = small_series(Path(d))
        if not args.json:
            print_small(small)
        if not args.small_only:
            warm_up(Path(d))
        for pattern in [] if args.small_only else args.pattern:
            for p in args.density:
                cases.append(run_case(pattern, p, n_events, repeats, Path(d), args.checksums))
                if not args.json:
                    print_case(cases[-1], header=len(cases) == 1)
        if args.checksums and not args.json:
            print_checksum_cost(cases)
    out = {
        "benchmark": "store",
        "frame_shape": list(FRAME_SHAPE),
        "events_per_case": n_events,
        "repeats": repeats,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_after": list(os.getloadavg()),  # the machine is shared: context
        },
        "cases": cases,
        "small_series": small,
    }
    record.save("store", out, args)
    if args.json:
        json.dump(out, sys.stdout, indent=1)
        print()
    else:
        la = ", ".join(f"{v:.1f}" for v in out["machine"]["loadavg_after"])
        print(f"load average after the run: {la} ({os.cpu_count()} cpus)")
    return 0


def print_case(r: dict, header: bool) -> None:
    if header:
        print(
            f"{'pattern':8} {'p':>6} {'Mev':>6} {'bits/ev':>7} {'H(p)/p':>6} {'ratio':>6} "
            f"{'wr1':>5} {'wr2':>5} {'wr/cpu':>6} {'sum1':>5} {'sum2':>5} {'sum/cpu':>7} "
            f"{'stempy b/ev':>11} {'st sum':>6} {'st/cpu':>6} {'x':>5}"
        )
        print(f"{'':47}(M events/s; /cpu = per CPU-second of the process)")
    print(
        f"{r['pattern']:8} {r['p']:6.3f} {r['n_events'] / 1e6:6.1f} {r['bits_per_event']:7.2f} "
        f"{r['bound_bits_per_event']:6.2f} {r['ratio_to_bound']:6.3f} "
        f"{r['write_Mev_s_1thread']:5.0f} {r['write_Mev_s_2threads']:5.0f} "
        f"{r['write_Mev_per_cpu_s']:6.0f} "
        f"{r['sum_Mev_s_1thread']:5.0f} {r['sum_Mev_s_2threads']:5.0f} "
        f"{r['sum_Mev_per_cpu_s_1thread']:7.0f} "
        f"{r.get('stempy_bits_per_event', float('nan')):11.2f} "
        f"{r.get('stempy_load_sum_Mev_s', float('nan')):6.1f} "
        f"{r.get('stempy_load_sum_Mev_per_cpu_s', float('nan')):6.1f} "
        f"{r.get('sum_speedup_vs_stempy', float('nan')):5.1f}"
        + ("" if r["sum_correct"] else "  SUM WRONG")
    )


def print_checksum_cost(cases: list[dict]) -> None:
    print("\nchunk checksums (Fletcher-32), 1 thread, M events/s with / without, cost:")
    print(
        f"{'pattern':8} {'p':>6} {'write':>15} {'cost':>6} {'events':>15} {'cost':>6} "
        f"{'sum':>15} {'cost':>6} {'bytes':>6}"
    )
    for r in cases:
        c = r["checksum"]
        cols = []
        for what in ("write", "events", "sum"):
            cols.append(
                f"{c[f'{what}_Mev_s_checksums']:7.0f}/{c[f'{what}_Mev_s_no_checksums']:<7.0f} "
                f"{100 * c[f'{what}_checksum_cost']:+5.1f}%"
            )
        extra = c["file_bytes_checksums"] / c["file_bytes_no_checksums"] - 1
        print(f"{r['pattern']:8} {r['p']:6.3f} " + " ".join(cols) + f" {100 * extra:+5.2f}%")


if __name__ == "__main__":
    raise SystemExit(main())
