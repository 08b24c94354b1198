"""Scrub a stored series: decode every chunk, check checksums and totals, name damaged frames.

:func:`verify` reads a streamstore events file, or every shard of a series
directory, chunk by chunk:

* every chunk of every dataset is checked against its Fletcher-32 checksum
  (files written before checksums existed have none: that is reported, and the
  rest of the checks still run) and decoded;
* the per-frame totals must agree: event counts are not negative, each
  frame's slots ``event_offset : event_offset + event_count`` lie inside
  ``/events/gaps`` and do not overlap the previous frame's;
* the events must decode: within a frame every gap after the first is at
  least 1 and the last index is below ``H * W``; slots no frame addresses
  (padding between flushes) hold zeros, so an event count that shrank shows
  up as stray events;
* the accounting attributes and, for a series, the manifest's per-shard
  ``frames_stored`` and ``events`` must match what the files hold.

A damaged chunk is mapped to the frames whose data it holds; the report lists
those frames as ranges of stored-frame indices (and, for a series, of the
merged series). Nothing is repaired.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamstore.errors import FormatError
from streamstore.store._chunkio import ChunkReader, format_ranges, read_column, true_ranges

__all__ = ["FileReport", "Report", "verify"]

_FRAME_COLUMNS = ("frame_id", "timestamp_ns", "event_count", "event_offset")
# slots decoded per step of the event checks
_WINDOW_SLOTS = 1 << 23


@dataclass
class FileReport:
    """What :func:`verify` found in one events file.

    Attributes
    ----------
    path : Path
    n_frames : int
        Stored frames (rows of the per-frame datasets).
    checksums : str
        ``"present"`` (every dataset), ``"absent"`` (a file written before
        checksums) or ``"partial"``.
    chunks_checked : int
    damaged : list of (int, int, str)
        Damaged frames: ``(start, stop, reason)``, stored-frame indices.
    problems : list of str
        Damage not tied to frames (e.g. a damaged missing-ids list, accounting
        that disagrees with the file).
    """

    path: Path
    n_frames: int = 0
    checksums: str = "absent"
    chunks_checked: int = 0
    damaged: list[tuple[int, int, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def damaged_ranges(self) -> list[tuple[int, int]]:
        """The damaged frames merged into ascending ``(start, stop)`` ranges."""
        mask = np.zeros(self.n_frames, bool)
        for a, b, _ in self.damaged:
            mask[a:b] = True
        return true_ranges(mask)

    @property
    def sound(self) -> bool:
        """True when nothing is damaged."""
        return not self.damaged and not self.problems


@dataclass
class Report:
    """What :func:`verify` found in a file or a series.

    Attributes
    ----------
    path : Path
    files : list of FileReport
        One per events file (one for a file, one per shard for a series).
    series_damaged : list of (int, int) or None
        For a series: damaged frames as ranges of the merged series' frame
        indices (None for a single file).
    problems : list of str
        Series-level problems (unreadable shards, manifest totals).
    """

    path: Path
    files: list[FileReport] = field(default_factory=list)
    series_damaged: list[tuple[int, int]] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def sound(self) -> bool:
        """True when every file is sound and the series has no problems."""
        return not self.problems and all(f.sound for f in self.files)

    def lines(self) -> list[str]:
        """The report as lines of text (what ``streamstore verify`` prints)."""
        out = []
        for f in self.files:
            cs = {
                "present": "checksums present",
                "absent": "checksums absent (written before checksums): decoded and totals checked",
                "partial": "checksums on some datasets only",
            }[f.checksums]
            out.append(f"{f.path}: {f.n_frames} frames, {f.chunks_checked} chunks checked, {cs}")
            for a, b, why in f.damaged:
                out.append(f"  DAMAGED frames {a}:{b}: {why}")
            for p in f.problems:
                out.append(f"  PROBLEM: {p}")
        if self.series_damaged:
            n = sum(b - a for a, b in self.series_damaged)
            out.append(
                f"{self.path}: {n} damaged series frames: {format_ranges(self.series_damaged)}"
            )
        for p in self.problems:
            out.append(f"{self.path}: PROBLEM: {p}")
        out.append(f"{self.path}: {'sound' if self.sound else 'DAMAGED'}")
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "path": str(self.path),
            "sound": self.sound,
            "series_damaged": self.series_damaged,
            "problems": list(self.problems),
            "files": [
                {
                    "path": str(f.path),
                    "n_frames": f.n_frames,
                    "checksums": f.checksums,
                    "chunks_checked": f.chunks_checked,
                    "damaged": [list(d) for d in f.damaged],
                    "damaged_ranges": f.damaged_ranges,
                    "problems": list(f.problems),
                    "sound": f.sound,
                }
                for f in self.files
            ],
        }


def verify(path: str | os.PathLike, *, nthreads: int | None = None) -> Report:
    """Check a streamstore events file or series directory; see the module doc.

    Parameters
    ----------
    path : str or Path
        A ``.h5`` events file, a series directory, or its ``manifest.json``.
    nthreads : int, optional
        Threads blosc2 decompresses with (default: all cores).

    Returns
    -------
    Report

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    FormatError
        If it is not a streamstore file or series (bad input, not damage).
    """
    from streamstore.store.shards import is_series

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file or series: {p}")
    nt = int(nthreads or os.cpu_count() or 1)
    if p.is_dir() or p.suffix == ".json":
        if not is_series(p):
            raise FormatError(f"{p} is neither a streamstore events file nor a series directory")
        return _verify_series(p, nt)
    return Report(p, [verify_file(p, nt)])


def verify_file(path: Path, nthreads: int = 1) -> FileReport:
    """Check one events file (see :func:`verify`)."""
    from streamstore.store.reader import _h5_open

    try:
        f, swmr = _h5_open(path)
    except OSError as exc:
        raise FormatError(f"{path} is not a readable HDF5 file ({exc})") from None
    with f:
        fmt = f.attrs.get("format", b"")
        fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
        if fmt != "streamstore.events":
            raise FormatError(f"{path} is not a streamstore.events file (format={fmt!r})")
        try:
            return _check(f, path, swmr, nthreads)
        except KeyError as exc:
            raise FormatError(f"{path} is not a complete streamstore file ({exc})") from None


def _check(f: Any, path: Path, swmr: bool, nthreads: int) -> FileReport:
    import h5py

    rep = FileReport(path)
    h, w = (int(v) for v in f.attrs["frame_shape"])
    npix = h * w
    dss: list[Any] = []
    f.visititems(lambda name, obj: dss.append(obj) if isinstance(obj, h5py.Dataset) else None)
    flags = [bool(d.fletcher32) for d in dss]
    rep.checksums = "present" if all(flags) else ("absent" if not any(flags) else "partial")

    # per-frame datasets: HDF5 checks and decodes each chunk
    # format 3 adds the corrected dose, a per-frame column like the others
    names = _FRAME_COLUMNS + (("electrons",) if "electrons" in f["frames"] else ())
    cols = [f["frames"][k] for k in names]
    n = min(int(d.shape[0]) for d in cols)
    rep.n_frames = n
    damaged = np.zeros(n, bool)
    values = {}
    for name, d in zip(names, cols, strict=True):
        vals, bad = read_column(d, n, swmr, d.dtype)
        rep.chunks_checked += -(-n // int(d.chunks[0])) if n else 0
        for lo, hi, why in bad:
            damaged[lo:hi] = True
            rep.damaged.append((lo, hi, why))
        values[name] = vals
    counts, offs = values["event_count"], values["event_offset"]
    gaps_ds = f["events/gaps"]
    n_slots = int(gaps_ds.shape[0])

    # totals: counts, offsets and the events extent agree
    good = ~damaged
    ends = offs + counts
    wrong = good & ((counts < 0) | (offs < 0) | (ends > n_slots))
    g = np.flatnonzero(good & ~wrong)
    if g.size > 1:
        ov = offs[g[1:]] < ends[g[:-1]]
        wrong[g[1:][ov]] = True
        wrong[g[:-1][ov]] = True
    for a, b in true_ranges(wrong):
        rep.damaged.append((a, b, "event_offset / event_count disagree (overlap or out of range)"))
    damaged |= wrong
    if damaged.any():
        # placeholders keep the offsets ordered: a damaged frame has no known events
        counts = np.where(damaged, 0, counts)
        prev_end = np.maximum.accumulate(np.where(damaged, 0, offs + counts))
        offs = np.where(damaged, prev_end, offs)
    ids = values["frame_id"][~damaged]
    if ids.size > 1 and np.any(np.diff(ids) <= 0):
        rep.problems.append("frame ids do not ascend")

    # events: every chunk checked and decoded, frames' gaps and the padding checked
    _check_events(rep, gaps_ds, offs, counts, damaged, npix, swmr, nthreads)
    if "subpixel" in f["events"]:
        _check_chunks_only(rep, f["events/subpixel"], offs, counts, damaged, swmr, nthreads)

    # every other dataset (missing ids and anything newer): checked and decoded
    known = {f"/frames/{k}" for k in names} | {"/events/gaps", "/events/subpixel"}
    for d in dss:
        if d.name in known:
            continue
        if d.ndim == 1 and d.chunks:
            _, bad = read_column(d, int(d.shape[0]), swmr, d.dtype)
            rep.chunks_checked += -(-int(d.shape[0]) // int(d.chunks[0]))
        else:
            bad = []
            try:
                d[()]
            except (OSError, RuntimeError, ValueError) as exc:
                bad = [(0, 0, f"{d.name}: {exc}")]
        for _lo, _hi, why in bad:
            rep.problems.append(f"{why} (its contents are unreliable)")

    stored = int(f.attrs.get("frames_stored", -1))
    if stored > n:
        rep.problems.append(f"the accounting says {stored} frames were stored, the file holds {n}")
    rep.damaged.sort()
    return rep


def _frames_hit(offs, counts, ok, lo: int, hi: int) -> np.ndarray:
    """Indices of frames (where ``ok``) with events in slots ``lo:hi``."""
    return np.flatnonzero(ok & (counts > 0) & (offs < hi) & (offs + counts > lo))


def _check_events(rep, ds, offs, counts, damaged, npix, swmr, nthreads) -> None:
    reader = ChunkReader(ds, nthreads, swmr=swmr)
    c = reader.chunk
    n_slots = int(ds.shape[0])
    rep.chunks_checked += -(-n_slots // c)
    ok = ~damaged
    live = np.flatnonzero(ok & (counts > 0))  # frames whose events we check
    live_s = offs[live]
    live_e = live_s + counts[live]  # both ascending: frames do not overlap
    # a hole next to a damaged frame may hold that frame's events: not checked
    dam_before = np.cumsum(damaged)
    reasons: dict[int, str] = {}

    def flag(frames: np.ndarray, why: str) -> None:
        for i in frames.tolist():
            reasons.setdefault(int(i), why)

    step = max(_WINDOW_SLOTS // c, 1) * c
    for lo in range(0, n_slots, step):
        hi = min(n_slots, lo + step)
        bad: list = []
        data = reader.read(lo, hi, bad=bad)
        badslot = np.zeros(hi - lo, bool)
        for b in bad:
            badslot[max(b.lo, lo) - lo : min(b.hi, hi) - lo] = True
            flag(_frames_hit(offs, counts, ok, b.lo, b.hi), b.reason)
        # frames lying wholly inside this window are checked here; frames that
        # straddle a window edge are checked by _check_straddling
        j0 = int(np.searchsorted(live_e, lo, side="right"))
        j1 = int(np.searchsorted(live_s, hi, side="left"))
        win_s, win_e = live_s[j0:j1], live_e[j0:j1]
        sel = live[j0:j1][(win_s >= lo) & (win_e <= hi)]
        addressed = np.zeros(hi - lo + 1, np.int64)
        st = np.clip(win_s - lo, 0, hi - lo)
        en = np.clip(win_e - lo, 0, hi - lo)
        np.add.at(addressed, st, 1)
        np.add.at(addressed, en, -1)
        covered = np.cumsum(addressed[:-1]) > 0
        # padding holds zeros, except where a damaged frame's events may lie
        stray = np.flatnonzero(~covered & ~badslot & (data != 0))
        if stray.size:
            pos = stray + lo
            # the frames either side of each stray slot
            after = np.searchsorted(offs, pos, side="right")
            before_i = np.clip(after - 1, 0, offs.size - 1)
            after_i = np.clip(after, 0, offs.size - 1)
            near_damage = dam_before[after_i] - dam_before[before_i] + damaged[before_i] > 0
            nb = np.unique(np.concatenate([before_i[~near_damage], after_i[~near_damage]]))
            flag(nb[ok[nb]], "stray events in padding (an event count is too small)")
        if sel.size:
            s_rel = offs[sel] - lo
            e_rel = s_rel + counts[sel]
            n_bad = np.concatenate([[0], np.cumsum(badslot)])
            clean = n_bad[e_rel] == n_bad[s_rel]
            sel, s_rel, e_rel = sel[clean], s_rel[clean], e_rel[clean]
            _gap_checks(data, sel, s_rel, e_rel, npix, flag)
    _check_straddling(reader, live, offs, counts, step, n_slots, npix, flag)
    for a, b in true_ranges(np.isin(np.arange(rep.n_frames), list(reasons))):
        why = "; ".join(dict.fromkeys(reasons[i] for i in range(a, b)))
        rep.damaged.append((a, b, why))


def _gap_checks(data, sel, s_rel, e_rel, npix, flag) -> None:
    """Flag frames whose gaps (slots ``s_rel:e_rel`` of ``data``) do not decode."""
    if sel.size == 0:
        return
    g = data.astype(np.uint64)
    csum = np.concatenate([[0], np.cumsum(g)])
    last = csum[e_rel] - csum[s_rel]  # the frame's last index
    flag(sel[last >= npix], "an event index lies beyond the frame")
    zero = np.flatnonzero(data == 0)
    if zero.size:
        f = np.searchsorted(s_rel, zero, side="right") - 1
        inside = (f >= 0) & (zero > s_rel[np.maximum(f, 0)]) & (zero < e_rel[np.maximum(f, 0)])
        flag(sel[f[inside]], "a gap of 0 inside a frame (indices must ascend)")


def _check_straddling(reader, live, offs, counts, step, n_slots, npix, flag) -> None:
    """The gap checks for frames that cross a window edge (read on their own)."""
    ends = offs[live] + counts[live]
    cross = live[(offs[live] // step) != ((ends - 1) // step)]
    for i in cross.tolist():
        a, b = int(offs[i]), int(offs[i] + counts[i])
        bad: list = []
        data = reader.read(a, b, bad=bad)
        if not bad:
            _gap_checks(data, np.array([i]), np.array([0]), np.array([b - a]), npix, flag)


def _check_chunks_only(rep, ds, offs, counts, damaged, swmr, nthreads) -> None:
    """Checksum and decode every chunk of an event-aligned dataset (sub-pixel bytes)."""
    reader = ChunkReader(ds, nthreads, swmr=swmr)
    c = reader.chunk
    n_slots = int(ds.shape[0])
    rep.chunks_checked += -(-n_slots // c)
    buf = np.empty(c, ds.dtype)
    for ci in range(-(-n_slots // c)):
        bad: list = []
        reader.read(
            ci * c, min(n_slots, (ci + 1) * c), out=buf[: min(n_slots - ci * c, c)], bad=bad
        )
        for b in bad:
            for a, z in true_ranges(
                np.isin(np.arange(rep.n_frames), _frames_hit(offs, counts, ~damaged, b.lo, b.hi))
            ):
                rep.damaged.append((a, z, b.reason))


def _verify_series(p: Path, nthreads: int) -> Report:
    from streamstore.store.shards import ShardedStore, read_manifest

    d = p if p.is_dir() else p.parent
    rep = Report(p)
    manifest = read_manifest(d / "manifest.json") if (d / "manifest.json").is_file() else {}
    listed = {s["file"]: s for s in manifest.get("shards", [])}
    names = sorted(set(listed) | {f.name for f in d.glob("shard-*.h5")})
    for name in names:
        fp = d / name
        if not fp.is_file():
            rep.problems.append(f"{name} is listed in the manifest but absent")
            continue
        try:
            fr = verify_file(fp, nthreads)
        except FormatError as exc:
            rep.problems.append(f"{name} is unreadable: {exc}")
            continue
        rep.files.append(fr)
        entry = listed.get(name)
        if entry is not None:
            _manifest_totals(rep, name, entry, fp, fr)
    try:
        with ShardedStore(p, nthreads=nthreads) as s:
            hit = np.zeros(s.n_frames, bool)
            by_path = {str(sh.path): k for k, sh in enumerate(s.shards)}
            for fr in rep.files:
                k = by_path.get(str(fr.path))
                if k is None:
                    continue
                mine = np.flatnonzero(s.shard_of_frame == k)
                local = s._loc[mine]
                for a, b in fr.damaged_ranges:
                    hit[mine[(local >= a) & (local < b)]] = True
            rep.series_damaged = true_ranges(hit)
    except (FormatError, OSError) as exc:
        rep.problems.append(f"the shards do not open as one series: {exc}")
    return rep


def _manifest_totals(rep: Report, name: str, entry: dict, fp: Path, fr: FileReport) -> None:
    import h5py
    import hdf5plugin  # noqa: F401

    want = entry.get("frames_stored")
    if isinstance(want, int) and want != fr.n_frames:
        rep.problems.append(
            f"{name}: the manifest says {want} frames, the shard holds {fr.n_frames}"
        )
    want_ev = entry.get("events")
    if isinstance(want_ev, int) and not fr.damaged:
        with h5py.File(fp, "r", locking=False) as f:
            try:
                got = int(f["frames/event_count"][: fr.n_frames].sum())
            except OSError:
                return
        if got != want_ev:
            rep.problems.append(
                f"{name}: the manifest says {want_ev} events, the shard holds {got}"
            )
