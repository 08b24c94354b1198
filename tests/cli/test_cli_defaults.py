"""The README's path works as written: defaults that pair, one exit status for errors,
an empty frame window treated alike by the library and the command line."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import pytest

import streamstore
from streamstore.cli import emulate as emulate_cmd
from streamstore.cli import ingest as ingest_cmd
from streamstore.cli import status as status_cmd
from streamstore.errors import UserError
from streamstore.link.endpoints import free_tcp_endpoint
from streamstore.link.protocol import DEFAULT_DATA_ENDPOINT, DEFAULT_STATUS_ENDPOINT
from tests._cli_data import cli, make_store

ROOT = Path(__file__).resolve().parents[2]


def _parse(module, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args(argv)


def test_camera_binds_and_ingest_connects_by_default(tmp_path):
    emu = _parse(emulate_cmd, [])
    assert emu.endpoint == DEFAULT_DATA_ENDPOINT and emu.connect is None  # binds there
    cfg = ingest_cmd.config_from_args(_parse(ingest_cmd, ["--out", str(tmp_path)]))
    assert cfg.connect == DEFAULT_DATA_ENDPOINT and cfg.listen is None
    cfg.check()
    # the status goes to the default endpoint, where plain `streamstore status` reads
    assert cfg.status_endpoint == DEFAULT_STATUS_ENDPOINT and cfg.status_endpoint_optional
    assert _parse(status_cmd, []).endpoint == DEFAULT_STATUS_ENDPOINT
    # --listen still works, and an explicit status endpoint must bind
    args = ["--out", str(tmp_path), "--listen", "tcp://127.0.0.1:5999"]
    cfg = ingest_cmd.config_from_args(_parse(ingest_cmd, [*args, "--status-endpoint", "none"]))
    assert cfg.listen == "tcp://127.0.0.1:5999" and cfg.connect is None
    assert cfg.status_endpoint is None
    ep = "tcp://127.0.0.1:5998"
    cfg = ingest_cmd.config_from_args(_parse(ingest_cmd, [*args, "--status-endpoint", ep]))
    assert cfg.status_endpoint == ep and not cfg.status_endpoint_optional


def test_status_without_a_daemon_is_an_error_exit_2():
    r = cli("status", free_tcp_endpoint(), "--timeout", "0.3")
    assert r.returncode == 2, r
    assert r.stderr.count("\n") == 1 and "error: no status from" in r.stderr


def test_show_and_tiff_export_need_no_extra_install():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in deps}
    assert {"matplotlib", "tifffile", "tqdm"} <= names


def test_an_empty_window_is_an_error_in_the_library_and_the_cli(tmp_path):
    path = make_store(tmp_path / "s.h5", n_frames=20, missing=())
    with streamstore.open(path) as s:
        for call in (lambda: s.sum(5, 5), lambda: s.frames(5, 5)):
            with pytest.raises(UserError, match="empty"):
                call()
        assert s.sum(5, 6).sum() == s.event_counts[5]  # one frame is fine
        assert s.events(5, 5).n_frames == 0  # a batch of no frames is still a batch
        assert int(s.sum().sum()) == int(s.event_counts.sum())  # the default: everything
    for args in (
        ("show", path, "--out", tmp_path / "x.png", "--start", "5", "--stop", "5"),
        ("export", path, "--format", "npy", "--start", "5", "--stop", "5", tmp_path / "x.npy"),
    ):
        r = cli(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr


def test_a_failing_demo_exits_2_with_one_line(tmp_path):
    # the emulator refuses the shape after the daemon started: still one line, exit 2
    r = cli("demo", "--out", tmp_path / "d", "--shape", "0x5", "--frames", "2",
            "--dark-frames", "0", "--timeout", "120")  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and "the emulator failed" in r.stderr
    assert "--shape" in r.stderr
