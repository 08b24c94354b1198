"""Small real stores for the CLI, export and docs tests (seeded, 256 x 384 frames)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from streamstore import EventBatch, StoreWriter

SHAPE = (256, 384)  # rows x cols, non-square on purpose
FRAME_TIME_S = 1e-3
PIXEL_SIZE_A = 0.83
MISSING = (5, 6, 100)
COUNTING = {"method": "local maximum 3x3", "background_sigma": 4.0, "xray_sigma": 10.0}
CALIBRATION = {"source": "dark_20261125.h5 (200 frames)", "dark_mean": 101.5}


def disk_events(
    n_frames: int, seed: int, p: float = 0.003, shape: tuple[int, int] = SHAPE
) -> EventBatch:
    """Seeded events: a bright disk on a faint background, dose varying over time."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    disk = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (0.4 * h) ** 2
    prob = np.where(disk, 3 * p, 0.3 * p).ravel()
    offsets = [0]
    chunks = []
    for i in range(n_frames):
        hit = np.flatnonzero(rng.random(h * w) < prob * (1 + 0.3 * np.sin(i / 30)))
        chunks.append(hit.astype(np.uint32))
        offsets.append(offsets[-1] + hit.size)
    return EventBatch(np.array(offsets), np.concatenate(chunks), None, shape)


def make_store(
    path: Path,
    n_frames: int = 300,
    *,
    seed: int = 20261125,
    pixel_size_A: float | None = PIXEL_SIZE_A,
    missing: tuple[int, ...] = MISSING,
    p: float = 0.003,
    batch: int = 64,
    shape: tuple[int, int] = SHAPE,
    **writer_kw: Any,
) -> Path:
    """Write a store of ``n_frames`` frames with ``missing`` frame ids absent.

    ``writer_kw`` goes to :class:`StoreWriter` (chunk sizes, for instance).
    """
    events = disk_events(n_frames, seed, p, shape)
    ids = np.array([i for i in range(n_frames + len(missing)) if i not in missing][:n_frames])
    ts = ids * int(FRAME_TIME_S * 1e9) + 1_000
    with StoreWriter(
        path,
        shape,
        frame_time_s=FRAME_TIME_S,
        pixel_size_A=pixel_size_A,
        calibration=CALIBRATION,
        counting=COUNTING,
        meta={"series": "cli-test"},
        **writer_kw,
    ) as w:
        for a in range(0, n_frames, batch):
            b = min(a + batch, n_frames)
            w.append(events.slice(a, b), ids[a:b], ts[a:b])
        if missing:
            w.mark_missing(list(missing))
        w.update_accounting(received=n_frames, duplicate=2, rejected=0, complete=True)
    return path


def cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m streamstore ARGS`` as a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "streamstore", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=240,
    )


def cli_here(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``streamstore ARGS`` through :func:`streamstore.cli.main` in this process.

    For checks of what a command prints, writes and returns, at a fraction of a new
    interpreter's cost (numpy, h5py, numba and matplotlib are imported once per test
    process). What reaches file descriptors 1 and 2 (C libraries, HDF5) is captured
    too. :func:`cli` keeps the process boundary: each command's exit-status contract
    is also checked there, in a real ``python -m streamstore``.
    """
    import contextlib
    import io
    import os
    import tempfile

    from streamstore.cli import main

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    sys.stdout.flush()
    sys.stderr.flush()
    with (
        tempfile.TemporaryFile() as fd_out,
        tempfile.TemporaryFile() as fd_err,
        contextlib.chdir(cwd if cwd is not None else os.getcwd()),
    ):
        saved = os.dup(1), os.dup(2)
        os.dup2(fd_out.fileno(), 1)
        os.dup2(fd_err.fileno(), 2)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(argv)
                except SystemExit as exc:  # argparse: usage errors exit 2
                    code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        fd_out.seek(0)
        fd_err.seek(0)
        stdout = out.getvalue() + fd_out.read().decode(errors="replace")
        stderr = err.getvalue() + fd_err.read().decode(errors="replace")
    return subprocess.CompletedProcess(["streamstore", *argv], code, stdout, stderr)


def make_sharded(directory: Path, n_frames: int = 120, n_shards: int = 2, lost=(10, 11)) -> Path:
    """A series as several ingest workers write it: ``shard-<k>.h5`` dealt round-robin."""
    directory.mkdir()
    events = disk_events(n_frames, seed=99)
    for k in range(n_shards):
        ids = np.array([i for i in range(n_frames) if i % n_shards == k and i not in lost])
        parts = [events.slice(int(i), int(i) + 1) for i in ids]
        with StoreWriter(
            directory / f"shard-{k}.h5", SHAPE, frame_time_s=FRAME_TIME_S, pixel_size_A=1.0
        ) as w:
            w.append(EventBatch.concatenate(parts), ids, ids * 10**6)
            w.update_accounting(received=int(ids.size), duplicate=0, rejected=0, complete=True)
    return directory
