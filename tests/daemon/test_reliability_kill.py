"""SIGKILL the ingest daemon at random moments and restart it.

Seeded trials on one output directory (five in the default run, ten marked
``slow``: ``pytest -m slow``), each against a real daemon subprocess. In trial
``t`` a sender streams series ``s<t>`` (300 small frames
at about 100 frames/s); after a random number of frames and a random extra
delay a SWMR reader in this process notes what it can see (what was flushed),
then the daemon is SIGKILLed. Then:

* every file in the directory opens with :func:`streamstore.open`;
* the killed file holds a prefix of the series, every frame the reader saw
  before the kill is still there, and every stored frame's events are correct;
* a restarted daemon receives the rest of the series and writes it to a new
  file (``s<t>-1.h5``) without touching the old one (same bytes at the end of
  the whole test, after every later trial);
* the reader reports both: the old prefix and the new rest with the frames
  never re-sent recorded as missing.

The restarted daemon of trial ``t`` is the one killed in trial ``t + 1``, so
ten kills cost eleven daemon starts (and most of the test's minute is the
sender's pace): the default run keeps the first five trials of the same seed.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest

import streamstore
from tests._ingest_harness import Series

N_FRAMES = 300
FRAME_PERIOD_S = 0.01
SEED = 7


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _send_rest(sock, series: Series, sid: str, first: int) -> None:
    sock.send_multipart(series.start(sid, N_FRAMES))
    for i in range(first, N_FRAMES):
        sock.send_multipart(series.image(sid, i), copy=False)
    sock.send_multipart(series.end(sid, N_FRAMES))


@pytest.mark.parametrize(
    "n_trials",
    [pytest.param(10, marks=pytest.mark.slow, id="10-kills"), pytest.param(5, id="5-kills")],
)
def test_sigkill_at_random_moments_then_restart(
    tmp_path, series, capsys, start_daemon, pusher, n_trials
):
    rng = np.random.default_rng(SEED)
    out = tmp_path / "out"
    old_files: dict[str, str] = {}  # path -> sha256 right after the kill
    report = []
    daemon = start_daemon(out, calibration=series.calibration_path)
    for t in range(n_trials):
        sid = f"s{t}"
        k = int(rng.integers(1, N_FRAMES))  # frames sent before the kill
        extra_s = float(rng.uniform(0.0, 0.3))
        sock = pusher(daemon.listen)
        sock.send_multipart(series.start(sid, N_FRAMES))
        for i in range(k):
            sock.send_multipart(series.image(sid, i), copy=False)
            time.sleep(FRAME_PERIOD_S)
        time.sleep(extra_s)
        path = out / f"{sid}.h5"
        seen = 0
        reader = None
        if path.exists():
            try:
                reader = streamstore.open(path)  # SWMR: the writer is still running
                seen = reader.refresh()
            except Exception:  # created a moment ago and not yet readable: nothing flushed
                seen = 0
        daemon.kill()
        if reader is not None:
            reader.close()
        sock.close(0)

        # every file in the directory opens; the killed one holds a correct prefix
        for p in sorted(out.glob("*.h5")):
            with streamstore.open(p) as store:
                series.check_store(store)
        kept = 0
        if path.exists():
            with streamstore.open(path) as store:
                ids = store.frame_ids.tolist()
                kept = len(ids)
                assert ids == list(range(kept)), f"{path}: not a prefix"
                assert kept >= seen, f"{path}: {seen} frames were visible before the kill"
                assert "complete" not in store.accounting or not store.accounting["complete"]
            old_files[str(path)] = _sha(path)
        assert kept <= k

        # restart: the rest of the series goes to a new file
        daemon = start_daemon(out, calibration=series.calibration_path)
        sock = pusher(daemon.listen)
        _send_rest(sock, series, sid, k)
        daemon.wait_until(lambda st, t=t: st["series_closed"] >= 1, 60, f"the rest of {sid}")
        sock.close(0)
        new = out / (f"{sid}-1.h5" if path.exists() else f"{sid}.h5")
        with streamstore.open(new) as store:
            assert store.frame_ids.tolist() == list(range(k, N_FRAMES))
            assert series.check_store(store) == N_FRAMES - k
            assert store.missing_frame_ids.tolist() == list(range(k))
            acc = store.accounting
            assert acc["complete"] is True and acc["received"] == N_FRAMES - k
        report.append((t, k, seen, kept, k - kept))
        # the restarted daemon also reports the series it found cut short:
        # both files are there, read side by side
        assert path.exists() or kept == 0
    assert daemon.stop() == 0

    # no later daemon touched an old file
    for p, digest in old_files.items():
        assert _sha(type(out)(p)) == digest, f"{p} changed after the kill"
    lost = sum(r[4] for r in report)
    sent = sum(r[1] for r in report)
    with capsys.disabled():
        print(
            f"\nkill: {len(report)} SIGKILLs survived; every file opened; "
            f"{sent} frames sent before the kills, {sent - lost} kept, {lost} lost "
            f"(not yet flushed); 0 frames visible before a kill were lost"
        )
        for t, k, seen, kept, nlost in report:
            print(
                f"kill: trial {t}: sent {k}, visible before kill {seen}, kept {kept}, lost {nlost}"
            )
