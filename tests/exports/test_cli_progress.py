"""Progress bars: drawn in a terminal (a real pseudo-terminal), silent off one."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from streamstore.exports.progress import Progress, progress_enabled, track

LOOP = (
    "from streamstore.exports.progress import track\n"
    "total = 0\n"
    "for i in track(range(25), desc='summing', unit='frame'):\n"
    "    total += i\n"
    "print('done', total)\n"
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "STREAMSTORE_PROGRESS"}
    env.update(extra)
    return env


def test_quiet_off_a_terminal():
    out = subprocess.run(
        [sys.executable, "-c", LOOP], capture_output=True, text=True, env=_env(), timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "done 300\n"
    assert out.stderr == ""


def _run_in_pty(code: str, env: dict[str, str], size: tuple[int, int] | None = None) -> bytes:
    """Run ``code`` on a pseudo-terminal; ``size`` (rows, columns) or None leaves it unsized."""
    pty = pytest.importorskip("pty")
    master, slave = pty.openpty()
    if size is not None:
        import fcntl
        import struct
        import termios

        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=slave, stdout=slave, stderr=slave, env=env
    )
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO once the child closed its end
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        proc.wait(timeout=60)
    assert proc.returncode == 0
    return b"".join(chunks)


@pytest.mark.parametrize("size", [None, (24, 100)], ids=["unsized", "24x100"])
def test_bar_drawn_in_a_terminal(size):
    text = _run_in_pty(LOOP, _env(), size)
    assert b"summing" in text
    assert b"25/25" in text  # the final state of the bar, whichever renderer drew it
    assert b"done 300" in text


def test_export_draws_a_bar_in_a_terminal_only(tmp_path):
    from tests._cli_data import make_store

    store = make_store(tmp_path / "run1.h5", 120)
    code = (
        "import sys; from streamstore.cli import main; "
        f"sys.exit(main(['export', {str(store)!r}, {str(tmp_path / 'm.tif')!r}, '-f', 'tiff', "
        "'--dose-per-fraction', '0.05']))"
    )
    text = _run_in_pty(code, _env())
    assert b"tiff" in text and b"wrote" in text
    # every page counted by the bar: "<n>/<n>" with n the page count printed after it
    n_pages = int(text.split(b"wrote ")[1].split(b": ")[1].split(b" pages")[0])
    assert f"{n_pages}/{n_pages}".encode() in text
    # off a terminal: the same export prints its report and nothing on stderr
    out = subprocess.run(
        [sys.executable, "-c", code.replace("m.tif", "n.tif")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert out.returncode == 0 and out.stderr == ""
    assert f"{n_pages} pages" in out.stdout


def test_env_switch_silences_a_terminal():
    text = _run_in_pty(LOOP, _env(STREAMSTORE_PROGRESS="0"))
    assert b"summing" not in text
    assert b"done 300" in text


def test_forced_bar_counts_and_finishes():
    stream = io.StringIO()
    items = list(track(range(7), desc="pages", unit="page", enabled=True, stream=stream))
    assert items == list(range(7))
    text = stream.getvalue()
    assert "pages" in text
    assert "100%" in text and "7/7" in text and "page/s" in text
    assert text.endswith("\n")


def test_manual_progress_and_unknown_total():
    stream = io.StringIO()
    with Progress(None, "events", "ev", enabled=True, stream=stream) as bar:
        bar.update(1500)
        bar.update(500)
    assert bar.n == 2000
    assert "events: 2000ev" in stream.getvalue()


def test_disabled_writes_nothing_and_env_forces_on(monkeypatch):
    stream = io.StringIO()
    assert not progress_enabled(stream)
    with Progress(3, "x", enabled=False, stream=stream) as bar:
        bar.update(3)
    assert stream.getvalue() == ""
    # unset: off a terminal tqdm stays silent
    list(track(range(3), desc="quiet", stream=stream))
    assert stream.getvalue() == ""
    monkeypatch.setenv("STREAMSTORE_PROGRESS", "1")
    assert progress_enabled(stream)
    list(track(range(3), desc="forced", stream=stream))
    assert "forced" in stream.getvalue() and "3/3" in stream.getvalue()
    monkeypatch.setenv("STREAMSTORE_PROGRESS", "off")
    assert not progress_enabled(stream)
    list(track(range(3), desc="silenced", enabled=None, stream=stream))
    assert "silenced" not in stream.getvalue()
