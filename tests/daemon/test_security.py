"""Security of the ingest daemon: loopback-only binds, CURVE, safe output paths.

Every test runs the real ``streamstore`` command line in subprocesses and
talks to the daemon over real ZeroMQ sockets on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth

import streamstore
from tests._ingest_harness import free_endpoint, h5_files


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamstore", *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )


# ------------------------------------------------------------------ binding --
@pytest.mark.parametrize("ep", ["tcp://0.0.0.0:{port}", "tcp://*:{port}"])
def test_remote_bind_needs_allow_remote(tmp_path, ep):
    port = free_endpoint().rsplit(":", 1)[1]
    r = _cli("ingest", "--out", str(tmp_path / "out"), "--listen", ep.format(port=port))
    assert r.returncode == 2, r.stderr
    assert "--allow-remote" in r.stderr and "other hosts" in r.stderr
    assert not (tmp_path / "out").exists()


def test_remote_status_endpoint_needs_allow_remote(tmp_path):
    r = _cli(
        "ingest",
        "--out",
        str(tmp_path / "out"),
        "--listen",
        free_endpoint(),
        "--status-endpoint",
        "tcp://0.0.0.0:5999",
    )
    assert r.returncode == 2
    assert "--status-endpoint" in r.stderr and "--allow-remote" in r.stderr


# --------------------------------------------------------------------- keys --
def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_keys_command_makes_pairs_without_overwriting(tmp_path):
    d = tmp_path / "keys"
    r = _cli("keys", str(d))
    assert r.returncode == 0, r.stderr
    assert "--curve-keys" in r.stdout
    for name in ("server", "client"):
        pub, sec = zmq.auth.load_certificate(d / f"{name}.key_secret")
        assert len(pub) == 40 and len(sec) == 40
        assert zmq.auth.load_certificate(d / f"{name}.key") == (pub, None)
        assert _mode(d / f"{name}.key_secret") == 0o600
    assert (d / "authorized_clients" / "client.key").read_text() == (d / "client.key").read_text()
    assert _mode(d) == 0o700
    server_secret = (d / "server.key_secret").read_bytes()

    again = _cli("keys", str(d))
    assert again.returncode == 2 and "never overwrites" in again.stderr
    more = _cli("keys", str(d), "--client", "cam2", "--client", "cam3")
    assert more.returncode == 0, more.stderr
    assert "kept the existing daemon key pair" in more.stdout
    assert (d / "server.key_secret").read_bytes() == server_secret
    assert sorted(p.name for p in (d / "authorized_clients").iterdir()) == [
        "cam2.key",
        "cam3.key",
        "client.key",
    ]
    # keys differ per pair
    pubs = {zmq.auth.load_certificate(d / f"{n}.key")[0] for n in ("server", "client", "cam2")}
    assert len(pubs) == 3


def test_keys_refuse_bad_names_and_readable_secrets(tmp_path):
    from streamstore.errors import UserError
    from streamstore.link.security import check_keys_dir, make_keys

    d = tmp_path / "k"
    for bad in ("../evil", "server", ".hidden", "a/b", ""):
        with pytest.raises(UserError):
            make_keys(d, [bad])
    make_keys(d, ["cam"])
    check_keys_dir(d)
    os.chmod(d / "server.key_secret", 0o644)
    with pytest.raises(UserError, match="chmod 600"):
        check_keys_dir(d)
    os.chmod(d / "server.key_secret", 0o600)
    (d / "authorized_clients" / "cam.key").unlink()
    with pytest.raises(UserError, match="no client public keys"):
        check_keys_dir(d)
    r = _cli(
        "ingest", "--out", str(tmp_path / "o"), "--listen", free_endpoint(), "--curve-keys", str(d)
    )
    assert r.returncode == 2 and "no client public keys" in r.stderr


def test_keys_never_write_through_a_symlink(tmp_path):
    from streamstore.errors import UserError
    from streamstore.link.security import make_key_pair

    d = tmp_path / "k"
    d.mkdir()
    target = tmp_path / "elsewhere"
    (d / "cam.key_secret").symlink_to(target)  # dangling: following it would create target
    with pytest.raises(UserError, match="exists already"):
        make_key_pair(d, "cam")
    assert not target.exists()
    assert not (d / "cam.key").exists()


OLD_KEYS = Path(__file__).resolve().parents[1] / "data" / "curve_keys_old_format"


def test_key_files_written_by_the_earlier_writer_still_load(tmp_path):
    """Keys made before zmq.auth wrote them (own banner, same certificate lines)."""
    from streamstore.link.security import (
        check_keys_dir,
        curve_client,
        curve_server,
        load_public_key,
        load_secret_key,
    )

    d = tmp_path / "keys"
    shutil.copytree(OLD_KEYS, d)  # git keeps no 0600: give the secrets their mode back
    for p in d.glob("*.key_secret"):
        os.chmod(p, 0o600)
    assert "Generated by streamstore keys" in (d / "camera.key_secret").read_text()
    assert [p.name for p in check_keys_dir(d)] == ["camera.key"]
    public, secret = load_secret_key(d / "camera.key_secret")
    assert public == b"T+g47}O?/a]9fRGPjWL9HdL-JMvV7y4yW30fFmcD"
    assert secret == b"@/AbUxgWW#B&(l-4)}zZLNioYbSNqzJ]Uknoq*HE"
    assert load_public_key(d / "server.key") == b"ma!E})Bjq*OI4KR=tXX4nC:Cp6caJo/zD=8F{SX+"
    assert load_public_key(d / "authorized_clients" / "camera.key") == public
    # and they still make a CURVE link: the old camera key through the old server key
    ctx = zmq.Context()
    auth = None
    try:
        server = ctx.socket(zmq.PULL)
        server.setsockopt(zmq.LINGER, 0)
        server.setsockopt(zmq.RCVTIMEO, 10_000)
        auth = curve_server(ctx, server, d)
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client = ctx.socket(zmq.PUSH)
        client.setsockopt(zmq.LINGER, 0)
        curve_client(client, d, "camera")
        client.connect(f"tcp://127.0.0.1:{port}")
        client.send(b"frame")
        assert server.recv() == b"frame"
        assert auth.key_check.refused == 0
        client.close(0)
        server.close(0)
    finally:
        if auth is not None:
            auth.stop()
        ctx.destroy(linger=0)


def test_damaged_key_files_are_named(tmp_path):
    from streamstore.errors import UserError
    from streamstore.link.security import load_public_key, load_secret_key, make_key_pair

    pair = make_key_pair(tmp_path, "cam")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cam.key", "cam.key_secret"]
    text = pair.secret.read_text()
    assert "# " in text and "curve" in text  # the ZeroMQ certificate layout
    secret = text.split('secret-key = "')[1][:40]
    bad = tmp_path / "bad.key_secret"
    for damaged in (
        text.replace(secret, "x" + secret),  # 41 characters
        text.replace(secret, secret[1:]),  # 39 characters
        "\n".join(ln for ln in text.splitlines() if "secret-key" not in ln),
        "not a certificate\n",
        "",
    ):
        bad.unlink(missing_ok=True)
        bad.write_text(damaged)
        os.chmod(bad, 0o600)
        with pytest.raises(UserError, match="holds no CURVE"):
            load_secret_key(bad)
    # 40 characters, one of them outside the Z85 alphabet
    pub = pair.public.read_text()
    key = pub.split('public-key = "')[1][:40]
    (tmp_path / "comma.key").write_text(pub.replace(key, key[:20] + "," + key[21:]))
    with pytest.raises(UserError, match="holds no CURVE public key"):
        load_public_key(tmp_path / "comma.key")
    with pytest.raises(UserError, match="not found"):
        load_public_key(tmp_path / "missing.key")


# -------------------------------------------------------------------- CURVE --
def _handshake_events(mon, timeout_s: float) -> set[int]:
    from zmq.utils.monitor import recv_monitor_message

    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if mon.poll(100):
            seen.add(int(recv_monitor_message(mon)["event"]))
        if seen & _FAILED or zmq.EVENT_HANDSHAKE_SUCCEEDED in seen:
            break
    return seen


_FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
    zmq.EVENT_HANDSHAKE_FAILED_AUTH,
}


def test_curve_refuses_unauthenticated_clients_and_admits_the_authorized(
    tmp_path, series, start_daemon, zmq_ctx
):
    from streamstore.link.security import curve_client, make_key_pair, make_keys

    keys = tmp_path / "keys"
    make_keys(keys, ["camera"])
    # an intruder who knows the server's public key but whose own key is not authorized
    rogue = tmp_path / "rogue"
    rogue.mkdir(mode=0o700)
    make_key_pair(rogue, "camera")
    (rogue / "server.key").write_text((keys / "server.key").read_text())

    n = 40
    d = start_daemon(
        tmp_path / "out",
        calibration=series.calibration_path,
        args=("--curve-keys", str(keys)),
    )
    outcomes = {}
    for name, curve in (
        ("plain", None),
        ("rogue", lambda s: curve_client(s, rogue, "camera")),
        ("authorized", lambda s: curve_client(s, keys, "camera")),
    ):
        s = zmq_ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a completed handshake
        s.setsockopt(zmq.SNDTIMEO, 1500)
        if curve is not None:
            curve(s)
        mon = s.get_monitor_socket()
        s.connect(d.listen)
        events = _handshake_events(mon, 10.0)
        sent = 0
        sid = f"from-{name}"
        try:
            s.send_multipart(series.start(sid, n))
            for i in range(n):
                s.send_multipart(series.image(sid, i), copy=False)
            s.send_multipart(series.end(sid, n))
            sent = n
        except zmq.Again:
            pass  # no peer took it: refused
        s.disable_monitor()
        mon.close(0)
        outcomes[name] = (events, sent)
    st = d.wait_until(lambda st: st["series_closed"] >= 1, 60, "the authorized series")
    assert d.stop() == 0
    plain_events, plain_sent = outcomes["plain"]
    rogue_events, rogue_sent = outcomes["rogue"]
    ok_events, ok_sent = outcomes["authorized"]
    assert plain_events & _FAILED and zmq.EVENT_HANDSHAKE_SUCCEEDED not in plain_events
    assert zmq.EVENT_HANDSHAKE_FAILED_AUTH in rogue_events
    assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in rogue_events
    assert plain_sent == 0 and rogue_sent == 0
    assert zmq.EVENT_HANDSHAKE_SUCCEEDED in ok_events and ok_sent == n
    # the daemon saw the authorized series only: not one message of the others
    assert st["messages"] == n + 2 and st["rejected"] == 0
    assert st["curve_refused"] >= 1  # the rogue key, seen by the operator too
    assert [p.name for p in h5_files(tmp_path / "out")] == ["from-authorized.h5"]
    with streamstore.open(tmp_path / "out" / "from-authorized.h5") as store:
        assert series.check_store(store) == n
        assert store.accounting["complete"] is True
    log = d.log()
    assert "CURVE" in log and "refused a CURVE client" in log


def test_curve_when_the_daemon_connects_to_a_camera_that_binds(
    tmp_path, series, start_daemon, zmq_ctx
):
    """`ingest --connect` stays the CURVE server; the binding camera is the client."""
    from streamstore.link.security import curve_client, make_keys

    keys = tmp_path / "keys"
    make_keys(keys, ["cam"])
    cam = zmq_ctx.socket(zmq.PUSH)
    cam.setsockopt(zmq.LINGER, 0)
    curve_client(cam, keys, "cam")
    port = cam.bind_to_random_port("tcp://127.0.0.1")
    mon = cam.get_monitor_socket()
    d = start_daemon(
        tmp_path / "out",
        connect=f"tcp://127.0.0.1:{port}",
        calibration=series.calibration_path,
        args=("--curve-keys", str(keys)),
    )
    assert zmq.EVENT_HANDSHAKE_SUCCEEDED in _handshake_events(mon, 20.0)
    cam.send_multipart(series.start("linked", 6))
    for i in range(6):
        cam.send_multipart(series.image("linked", i), copy=False)
    cam.send_multipart(series.end("linked", 6))
    d.wait_until(lambda st: st["series_closed"] >= 1, 60, "the series")
    assert d.stop() == 0
    cam.disable_monitor()
    mon.close(0)
    cam.close(0)
    with streamstore.open(tmp_path / "out" / "linked.h5") as store:
        assert series.check_store(store) == 6


# ------------------------------------------------------------- output paths --
ESCAPING_IDS = ["../x", "../../etc/evil", "/tmp/abs", "a/../../b", "a\x00b", "..", ".hidden"]


def test_escaping_series_ids_are_refused_and_nothing_leaves_the_output_dir(
    tmp_path, series, start_daemon, pusher
):
    root = tmp_path / "root"
    out = root / "sub" / "out"
    out.mkdir(parents=True)
    before = {p for p in tmp_path.rglob("*")}
    d = start_daemon(out, calibration=series.calibration_path, log_path=tmp_path / "d.log")
    s = pusher(d.listen)
    for sid in ESCAPING_IDS:
        # the encoders refuse these ids, so forge the JSON as a hostile sender would
        sid_json = json.dumps(sid)
        start = {"htype": "start", "frame_shape": [64, 96], "dtype": "uint16"}
        start["frame_time_s"] = 0.001
        s.send(_forge(start, sid_json))
        image = {"htype": "image", "frame_id": 0, "timestamp_ns": 0}
        s.send_multipart([_forge(image, sid_json), series.frame(0)], copy=False)
        s.send(_forge({"htype": "end", "n_frames": 1}, sid_json))
    s.send_multipart(series.start("good", 3))
    for i in range(3):
        s.send_multipart(series.image("good", i), copy=False)
    s.send_multipart(series.end("good", 3))
    n_bad = 3 * len(ESCAPING_IDS)
    st = d.wait_until(lambda st: st["series_closed"] >= 1 and st["messages"] >= n_bad + 5, 60)
    s.close(0)
    assert d.stop() == 0
    assert st["rejected"] == n_bad
    assert set(st["rejected_by_reason"]) == {"malformed series_id"}
    after = {p for p in tmp_path.rglob("*")} - before
    assert {p.relative_to(tmp_path).as_posix() for p in after} == {
        "root/sub/out/good.h5",
        "d.log",
    }


def _forge(header: dict, sid_json: str) -> bytes:
    """A header with a raw JSON series_id (bypassing the encoders' validation)."""
    text = json.dumps(header)
    return (text[:-1] + ', "series_id": ' + sid_json + "}").encode()


def test_output_symlinks_are_never_followed(tmp_path, series, start_daemon, pusher):
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_bytes(b"precious")
    (out / "run.h5").symlink_to(victim)  # points at an existing file
    (out / "run-1.h5").symlink_to(outside / "new.h5")  # dangling: following would create it
    d = start_daemon(out, calibration=series.calibration_path)
    s = pusher(d.listen)
    s.send_multipart(series.start("run", 5))
    for i in range(5):
        s.send_multipart(series.image("run", i), copy=False)
    s.send_multipart(series.end("run", 5))
    d.wait_until(lambda st: st["series_closed"] >= 1, 60)
    s.close(0)
    assert d.stop() == 0
    log = d.log()
    assert victim.read_bytes() == b"precious"
    assert not (outside / "new.h5").exists()
    assert (out / "run.h5").is_symlink() and (out / "run-1.h5").is_symlink()
    assert not (out / "run-2.h5").is_symlink()
    with streamstore.open(out / "run-2.h5") as store:
        assert series.check_store(store) == 5
    assert "writing to run-2.h5 instead" in log


@pytest.mark.parametrize("umask", [0o027, 0o077])
def test_files_are_created_with_the_process_umask(tmp_path, series, umask, start_daemon, pusher):
    out = tmp_path / "out"
    prefix = ("sh", "-c", f'umask {umask:03o}; exec "$0" "$@"')
    d = start_daemon(out, calibration=series.calibration_path, prefix=prefix)
    s = pusher(d.listen)
    s.send_multipart(series.start("masked", 2))
    for i in range(2):
        s.send_multipart(series.image("masked", i), copy=False)
    s.send_multipart(series.end("masked", 2))
    d.wait_until(lambda st: st["series_closed"] >= 1, 60)
    s.close(0)
    assert d.stop() == 0
    assert _mode(out / "masked.h5") == 0o644 & ~umask
    assert _mode(out) == 0o777 & ~umask


# ------------------------------------------------------ emulate --curve-keys --
def test_emulate_curve_keys_reach_a_curve_daemon_and_plain_emulate_is_refused(
    tmp_path, series, start_daemon
):
    """`streamstore emulate --curve-keys DIR --curve-client NAME` talks to `ingest --curve-keys`."""
    from streamstore.link.security import make_keys

    keys = tmp_path / "keys"
    make_keys(keys, ["cam"])
    n = 12
    common = ("--shape", "64x96", "--frames", str(n), "--pool", "4", "--seed", "3")
    d = start_daemon(
        tmp_path / "out", calibration=series.calibration_path, args=("--curve-keys", str(keys))
    )
    plain = _cli(
        "emulate", "--connect", d.listen, "--series-id", "plain", "--timeout", "3", *common
    )
    wrong_name = _cli("emulate", "--connect", d.listen, "--curve-keys", str(keys), *common)
    ok = _cli(
        "emulate",
        "--connect",
        d.listen,
        "--curve-keys",
        str(keys),
        "--curve-client",
        "cam",
        "--series-id",
        "secure",
        "--json",
        *common,
    )
    assert ok.returncode == 0, ok.stderr
    st = d.wait_until(lambda st: st["series_closed"] >= 1, 60, "the CURVE series")
    assert d.stop() == 0
    # plain TCP: the handshake fails, nothing is taken, the send times out
    assert plain.returncode == 2 and "no receiver took it" in plain.stderr
    # no key pair named "client" in DIR: a clear error naming the file
    assert wrong_name.returncode == 2 and "client.key_secret" in wrong_name.stderr
    assert json.loads(ok.stdout)["curve"] is True
    assert st["messages"] == n + 2 and st["rejected"] == 0
    assert [p.name for p in h5_files(tmp_path / "out")] == ["secure.h5"]
    with streamstore.open(tmp_path / "out" / "secure.h5") as store:
        assert store.n_frames == n and store.accounting["complete"] is True
        assert store.frame_shape == (64, 96)


def test_emulate_curve_options_are_checked(tmp_path):
    r = _cli("emulate", "--curve-client", "cam", "--frames", "1", "--shape", "8x8")
    assert r.returncode == 2 and "--curve-client needs --curve-keys" in r.stderr
