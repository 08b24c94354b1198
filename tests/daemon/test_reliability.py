"""Reliability of the ingest daemon: stale and aborted series, a slow disk, a full disk.

Real daemon subprocesses, real sockets, real HDF5 files. The full disk is a
real 4 MiB tmpfs mounted in a private mount namespace (``unshare --mount``)
for the daemon alone and filled by this test (real ENOSPC; skipped where it
cannot be mounted), and, everywhere on Linux, the daemon's file-size limit
(RLIMIT_FSIZE) lowered to its file's size while it runs (EFBIG).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

import streamstore
from streamstore.errors import FormatError
from tests._ingest_harness import Series, h5_files, send_series


# ------------------------------------------------------- stale and aborted --
def test_stale_messages_are_dropped_and_a_silent_series_is_incomplete(
    tmp_path, series, start_daemon, pusher
):
    out = tmp_path / "out"
    d = start_daemon(out, calibration=series.calibration_path, args=("--idle-timeout", "2"))
    s = pusher(d.listen)
    # A and B interleave: the start of B leaves A open, A's end closes it complete
    send_series(s, series, "A", range(20), start=40)
    send_series(s, series, "B", range(10), start=20)
    send_series(s, series, "A", range(20, 40), end=40)
    send_series(s, series, "B", range(10, 20), end=20)
    send_series(s, series, "B", [5, 19])  # stale: B is closed
    send_series(s, series, "A", [3], end=40)  # stale image and end: A is closed
    # C goes silent: closed after the idle timeout, marked incomplete
    send_series(s, series, "C", range(12), start=50)
    st = d.wait_until(lambda st: st["series_closed"] >= 3, 60, "three closed series")
    assert st["rejected_by_reason"].get("stale") == 4
    assert st["rejected"] == 4
    # the daemon carries on: a fourth series after all that
    send_series(s, series, "D", range(5), start=5, end=5)
    st = d.wait_until(lambda st: st["series_closed"] >= 4, 60, "series D")
    s.close(0)
    assert d.stop() == 0
    log = d.log()
    assert "no message for 2 s" in log
    assert [p.name for p in h5_files(out)] == ["A.h5", "B.h5", "C.h5", "D.h5"]
    expect = {"A": (40, True), "B": (20, True), "C": (12, False), "D": (5, True)}
    for sid, (n, complete) in expect.items():
        with streamstore.open(out / f"{sid}.h5") as store:
            assert store.frame_ids.tolist() == list(range(n))
            assert series.check_store(store) == n
            acc = store.accounting
            assert acc["complete"] is complete, (sid, acc)
            assert acc["received"] == n


# ------------------------------------------------------------------ slow disk --
def test_slow_writer_keeps_memory_bounded_and_pushes_back_on_the_sender(
    tmp_path, capsys, start_daemon, pusher
):
    big = Series(tmp_path, shape=(256, 384), pool=8, seed=11)
    n = 600
    budget_mb = 1.0
    again = 0
    first_again_at = None
    fills = []
    rss = []
    d = start_daemon(
        tmp_path / "out",
        calibration=big.calibration_path,
        args=(
            "--max-buffer-mb",
            str(budget_mb),
            "--max-frame-bytes",
            str(big.frame_nbytes),
        ),
        env={"STREAMSTORE_TEST_WRITE_DELAY_S": "0.01"},
    )
    s = pusher(d.listen, sndhwm=2)
    s.send_multipart(big.start("slow", n))
    # warm up (kernel loaded, file open) before taking the baseline RSS
    for i in range(4):
        s.send_multipart(big.image("slow", i), copy=False)
    d.wait_until(lambda st: st["frames_stored"] >= 4, 60, "the first frames")
    rss.append(d.rss_bytes())
    i = 4
    while i < n:
        try:
            s.send_multipart(big.image("slow", i), flags=zmq.NOBLOCK, copy=False)
            i += 1
        except zmq.Again:  # the high-water mark: the daemon pushes back
            again += 1
            if first_again_at is None:
                first_again_at = i
            s.poll(200, zmq.POLLOUT)
            if d._take(0):
                fills.append(d.last["queue_fill"])
            if again % 20 == 0:
                rss.append(d.rss_bytes())
    s.send_multipart(big.end("slow", n))
    st = d.wait_until(lambda st: st["series_closed"] >= 1, 120, "the slow series")
    fills += [x["queue_fill"] for x in d.statuses]
    rss.append(d.rss_bytes())
    s.close(0)
    assert d.stop() == 0
    summary = d.final_summary()
    capacity = int(budget_mb * 1024 * 1024)
    peak = st.get("budget_peak", summary["peak_buffer_mb"] * 1e6)
    assert st["frames_stored"] == n and st["missing"] == 0
    with streamstore.open(tmp_path / "out" / "slow.h5") as store:
        assert big.check_store(store) == n
    assert again > 0, "the sender never met back-pressure"
    assert max(fills) >= 0.9, "the memory budget never filled"
    # bounded: the receiver reads only while the budget has room, so the peak is the
    # budget plus the message read last and the events of a batch being counted
    assert peak <= capacity + 2 * big.frame_nbytes
    growth = max(rss) - rss[0]
    sent_mb = n * big.frame_nbytes / 1e6
    assert growth < n * big.frame_nbytes / 2, "daemon memory grew with the data sent"
    with capsys.disabled():
        print(
            f"\nslow disk: {n} frames of {big.frame_nbytes / 1e3:.0f} kB ({sent_mb:.0f} MB) with "
            f"the writer slowed to 10 ms/frame; budget {capacity / 1e6:.2f} MB, peak "
            f"{peak / 1e6:.2f} MB; sender blocked {again} times (first after {first_again_at} "
            f"frames); daemon RSS {rss[0] / 1e6:.0f} -> max {max(rss) / 1e6:.0f} MB "
            f"(growth {growth / 1e6:.1f} MB); stored {st['frames_stored']}, missing 0"
        )


# ------------------------------------------------------------------ full disk --
def _private_tmpfs_prefix(mountpoint: Path, size: str) -> tuple[str, ...]:
    script = f'mount -t tmpfs -o size={size},mode=0755 tmpfs "{mountpoint}" || exit 97; exec "$@"'
    return ("sh", "-c", script, "sh")


def _unshare() -> tuple[str, ...] | None:
    """A command prefix giving a private mount namespace, or None if none works here."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (("unshare", "--mount"), ("unshare", "--user", "--map-root-user", "--mount")):
        r = subprocess.run(
            [*prefix, "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d"],
            capture_output=True,
            timeout=30,
        )
        if r.returncode == 0:
            return prefix
    return None


def _fill(path: Path) -> int:
    """Write ``path`` until the file system is full; return the bytes written."""
    n = 0
    block = b"\xa5" * 65536
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                n += f.write(block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                block = block[: len(block) // 2]
                if len(block) < 512:
                    return n


class _TmpfsFull:
    """A 4 MiB tmpfs for the daemon alone, filled by this process (real ENOSPC)."""

    error = "No space left on device"

    def __init__(self, out: Path) -> None:
        prefix = _unshare()
        if prefix is None:
            pytest.skip("cannot mount a private tmpfs here (unshare --mount not permitted)")
        self.out = out
        self.prefix = prefix + _private_tmpfs_prefix(out, "4m")

    def view(self, pid: int) -> Path:
        view = Path(f"/proc/{pid}/root") / self.out.relative_to("/")  # the daemon's tmpfs
        if not view.is_dir():
            pytest.skip("cannot see the daemon's mount namespace through /proc")
        return view

    def fill(self, view: Path, pid: int) -> str:
        return f"4 MiB tmpfs filled ({_fill(view / 'filler') / 1e6:.2f} MB filler)"

    def unfill(self, view: Path, pid: int) -> None:
        (view / "filler").unlink()


class _FileSizeLimit:
    """RLIMIT_FSIZE of the daemon lowered to its file's size (EFBIG; runs anywhere on Linux)."""

    error = "File too large"
    prefix: tuple[str, ...] = ()

    def __init__(self, out: Path) -> None:
        self.out = out

    def view(self, pid: int) -> Path:
        return self.out

    def fill(self, view: Path, pid: int) -> str:
        import psutil

        size = (view / "disk.h5").stat().st_size
        proc = psutil.Process(pid)
        self.old = proc.rlimit(psutil.RLIMIT_FSIZE)
        proc.rlimit(psutil.RLIMIT_FSIZE, (size, self.old[1]))  # the soft limit only
        return f"file size limit set to {size / 1e3:.0f} kB"

    def unfill(self, view: Path, pid: int) -> None:
        import psutil

        psutil.Process(pid).rlimit(psutil.RLIMIT_FSIZE, self.old)


@pytest.mark.parametrize("disk", [_TmpfsFull, _FileSizeLimit], ids=["tmpfs-enospc", "rlimit-efbig"])
def test_full_disk_is_reported_the_file_stays_readable_and_accounting_continues(
    tmp_path, series, capsys, disk, start_daemon, pusher
):
    out = tmp_path / "out"
    out.mkdir()
    full = disk(out)
    n1, n = 200, 600
    d = start_daemon(
        out,
        calibration=series.calibration_path,
        prefix=full.prefix,
        args=("--idle-timeout", "600"),  # the series pauses while the disk fills
    )
    view = full.view(d.pid())
    s = pusher(d.listen)
    send_series(s, series, "disk", range(n1), start=n)
    d.wait_until(lambda st: st["frames_stored"] >= n1, 60, "the first frames")
    deadline = time.monotonic() + 30
    while True:  # the idle writer flushes within about a second
        with streamstore.open(view / "disk.h5") as store:
            if store.refresh() >= n1:
                break
        assert time.monotonic() < deadline, "the first frames were never flushed"
        time.sleep(0.2)
    how = full.fill(view, d.pid())
    send_series(s, series, "disk", range(n1, n), end=n)
    st = d.wait_until(lambda st: st["series_closed"] >= 1, 60, "the series on a full disk")
    saved = tmp_path / "disk.h5"
    shutil.copyfile(view / "disk.h5", saved)
    # space comes back: the daemon carries on with the next series
    full.unfill(view, d.pid())
    send_series(s, series, "next", range(30), start=30, end=30)
    st2 = d.wait_until(lambda st: st["series_closed"] >= 2, 60, "the next series")
    with streamstore.open(view / "next.h5") as store:
        assert series.check_store(store) == 30
        assert store.accounting["complete"] is True
    s.close(0)
    assert d.stop() == 0
    log = d.log()
    assert "WRITE FAILED" in log and full.error in log
    assert st["write_errors"] >= 1
    # accounting continues: every frame is stored or counted missing
    assert st["frames_received"] == n
    assert st["frames_stored"] + st["missing"] == n
    assert st["missing"] > 0
    # HDF5 rewrites its superblock in place: a failed write at the end of the file can
    # leave it pointing past the real end. The daemon then extends the file (a sparse
    # hole) so it opens; where it cannot (the file-size limit), it logs the command
    m = re.search(r"once there is room run: truncate -s (\d+) ", log)
    if m is not None:
        assert disk is _FileSizeLimit, log
        with pytest.raises(FormatError, match="truncated"):
            streamstore.open(saved)
        os.truncate(saved, int(m.group(1)))
    with streamstore.open(saved) as store:
        kept = store.frame_ids.tolist()
        assert kept == list(range(len(kept))) and len(kept) >= n1
        assert series.check_store(store) == len(kept)
        # the daemon's count of stored frames is what the file holds
        assert len(kept) == st["frames_stored"]
    assert st2["frames_stored"] == st["frames_stored"] + 30
    with capsys.disabled():
        print(
            f"\nfull disk ({full.error}): {how} after {n1} flushed frames; {n} sent, "
            f"{st['frames_stored']} in the readable file, {st['missing']} counted missing, "
            f"{st['write_errors']} write errors logged; next series stored"
        )


def test_hostile_frame_ids_and_counts_cannot_exhaust_memory(tmp_path, series, start_daemon, pusher):
    """One image 10**12 ids ahead, or an end claiming 10**13 frames, used to kill the daemon.

    Missing ids are ranges now: both cost constant memory and are recorded exactly; an
    id beyond ``MAX_ID_JUMP`` (no camera reaches it) is refused so it cannot strand the
    rest of the series as late.
    """
    from streamstore.ingest.daemon import MAX_ID_JUMP
    from streamstore.link import protocol

    out = tmp_path / "out"
    d = start_daemon(out, calibration=series.calibration_path)
    s = pusher(d.listen)
    s.send_multipart(series.start("far"))
    send_series(s, series, "far", range(5))
    far = MAX_ID_JUMP + 10
    s.send_multipart(protocol.encode_image("far", far, 0, series.frame(0)), copy=False)
    send_series(s, series, "far", range(5, 8))
    s.send_multipart(series.end("far", 10**13))
    st = d.wait_until(lambda st: st["series_closed"] >= 1, 60, "the series")
    assert d.proc.poll() is None
    s.close(0)
    assert d.stop() == 0
    assert st["rejected_by_reason"]["frame_id_range"] == 1
    assert st["missing"] == 10**13 - 8
    with streamstore.open(out / "far.h5") as store:
        assert store.frame_ids.tolist() == list(range(8))
        assert store.missing_ranges.tolist() == [[8, 10**13]]


def test_mark_missing_before_any_frame_is_stored(tmp_path):
    """Regression: a restarted daemon marks ids missing before its first frame."""
    from streamstore.events import EventBatch
    from streamstore.store.writer import StoreWriter

    with StoreWriter(tmp_path / "r.h5", (8, 8), frame_time_s=1e-3) as w:
        w.mark_missing([0, 1, 2])
        w.append(EventBatch.empty(1, (8, 8), False), [3], [0])
        with pytest.raises(ValueError, match="stored, not missing"):
            w.mark_missing([3])
    with streamstore.open(tmp_path / "r.h5") as store:
        assert store.missing_frame_ids.tolist() == [0, 1, 2]
        assert store.frame_ids.tolist() == [3]
        assert np.array_equal(store.event_counts, [0])
