"""The daemon's memory stays within its budget plus a constant, whatever senders claim.

Closed series keep only their summary (missing ids as ranges), calibrations
are freed with their series, and a message of too many parts is refused and its
memory given back: 1,000 start/end pairs each claiming 10**13 frames, a message
of 601 parts (150 MB) and 100 series with estimated calibrations leave the
daemon's RSS within ``--max-buffer-mb`` plus :data:`RSS_CONSTANT_MB` of its
warmed-up size (docs/reliability.md).
"""

from __future__ import annotations

import numpy as np

#: RSS a warmed-up daemon may grow by beyond its memory budget (documented constant).
RSS_CONSTANT_MB = 48.0
BUDGET_MB = 8.0
#: frames of the estimated-calibration series: big enough that a calibration kept
#: per series (about 1.5 MB here) would show after 100 series
EST_SHAPE = (256, 384)
#: frames per estimated series: the daemon estimates from a series' first 8 frames
EST_FRAMES = 8


def _start(sid: str, shape, n_frames):
    from streamstore.link import protocol

    return protocol.encode_start(
        protocol.Start(
            series_id=sid, frame_shape=shape, dtype="uint16", frame_time_s=1e-3, n_frames=n_frames
        )
    )


def _claims(sock, first: int, n: int) -> None:
    from streamstore.link import protocol

    for k in range(first, first + n):
        sock.send_multipart(_start(f"claim{k:04d}", (8, 8), None))
        sock.send_multipart(protocol.encode_end(f"claim{k:04d}", 10**13))


def _estimated(sock, frames: np.ndarray, first: int, n: int) -> None:
    from streamstore.link import protocol

    for k in range(first, first + n):
        sid = f"est{k:03d}"
        sock.send_multipart(_start(sid, EST_SHAPE, EST_FRAMES))
        for i in range(EST_FRAMES):
            sock.send_multipart(protocol.encode_image(sid, i, i, frames[(k + i) % len(frames)]))
        sock.send_multipart(protocol.encode_end(sid, EST_FRAMES))


def _many_parts(sock, n_parts: int = 601, part_bytes: int = 1 << 18) -> None:
    """One message of ``n_parts`` parts, 150 MB in all (refused; never held in the budget)."""
    from streamstore.link import protocol

    head = protocol.encode_image("est000", 0, 0, np.zeros(EST_SHAPE, np.uint16))
    blob = bytes(part_bytes)  # one buffer sent 599 times (zero-copy on this side)
    sock.send_multipart([*head, *([blob] * (n_parts - len(head)))], copy=False)


def test_rss_stays_within_the_budget_through_claims_many_parts_and_estimates(
    tmp_path, capsys, start_daemon, pusher
):
    from streamstore.camera.emulator import CameraEmulator

    emu = CameraEmulator(EST_SHAPE, seed=11, dose_rate_e_per_px_s=30.0, frame_time_s=1e-3)
    frames, _ = emu.generate(8)
    out = tmp_path / "out"
    d = start_daemon(
        out,
        args=("--max-buffer-mb", str(BUDGET_MB)),
    )
    s = pusher(d.listen)
    # warm up: kernels compiled, HDF5 and blosc2 buffers allocated
    _claims(s, 0, 20)
    _estimated(s, frames, 0, 10)
    d.wait_until(lambda st: st["series_closed"] >= 30, 300, "the warm-up series")
    rss0 = d.rss_bytes()
    _claims(s, 20, 980)
    _many_parts(s)
    _estimated(s, frames, 10, 90)
    st = d.wait_until(lambda st: st["series_closed"] >= 1100, 600, "1,100 series")
    rss1 = d.rss_bytes()
    s.close(0)
    assert d.stop() == 0
    assert st["missing"] == 1000 * (10**13)
    assert st["rejected_by_reason"] == {"too_many_parts": 1}
    assert st["frames_stored"] == 100 * EST_FRAMES
    growth_mb = (rss1 - rss0) / 2**20
    with capsys.disabled():
        print(
            f"\ndaemon RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MB (+{growth_mb:.1f} MB) "
            f"through 1,000 claims, a 601-part message and 100 estimated series"
        )
    assert growth_mb < BUDGET_MB + RSS_CONSTANT_MB, (
        f"daemon RSS grew by {growth_mb:.0f} MB ({rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MB) "
        f"through 1,000 claims and 100 estimated calibrations; allowed {BUDGET_MB} MB budget "
        f"+ {RSS_CONSTANT_MB} MB"
    )
