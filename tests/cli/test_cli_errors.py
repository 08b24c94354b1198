"""Errors for people: one sentence on stderr, no traceback, exit status 2."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from tests._cli_data import cli, cli_here, make_store


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("errors")
    make_store(d / "run1.h5", 40)
    make_store(d / "nopx.h5", 40, pixel_size_A=None)
    (d / "notes.txt").write_text("not an HDF5 file\n")
    with h5py.File(d / "other.h5", "w") as f:  # HDF5, but not a streamstore file
        f["data"] = np.arange(10)
        f.attrs["format"] = "something else"
    with h5py.File(d / "bare.h5", "w") as f:  # HDF5 without any attributes
        f["x"] = np.zeros(3)
    with h5py.File(d / "hollow.h5", "w") as f:  # says streamstore, holds nothing
        f.attrs["format"] = "streamstore.events"
        f.attrs["format_version"] = 1
    # a copy cut short (an interrupted transfer): must fail fast, not hang in an SWMR retry
    (d / "cut.h5").write_bytes((d / "run1.h5").read_bytes()[:5000])
    return d


CASES = {
    "wrong path (info)": (("info", "{d}/nope.h5"), "nope.h5"),
    "wrong path (show)": (("show", "{d}/nope.h5", "--out", "{d}/v.png"), "nope.h5"),
    "wrong path (export)": (("export", "{d}/nope.h5", "{d}/o.npy", "-f", "npy"), "nope.h5"),
    "a directory": (("info", "{d}"), "directory"),
    "not HDF5": (("info", "{d}/notes.txt"), "notes.txt"),
    "HDF5 of another kind": (("info", "{d}/other.h5"), "not a streamstore"),
    "HDF5 without attributes": (("show", "{d}/bare.h5", "--out", "{d}/v.png"), "not a streamstore"),
    "streamstore attributes, no data": (("info", "{d}/hollow.h5"), "not a complete streamstore"),
    "truncated file": (("info", "{d}/cut.h5"), "cut.h5"),
    "show range past the end": (("show", "{d}/run1.h5", "--stop", "999"), "outside the series"),
    "show empty range": (("show", "{d}/run1.h5", "--start", "9", "--stop", "9"), "outside"),
    "npy range past the end": (
        ("export", "{d}/run1.h5", "{d}/w.npy", "-f", "npy", "--start", "30", "--stop", "41"),
        "outside the series",
    ),
    "negative start": (
        ("export", "{d}/run1.h5", "{d}/w.npy", "-f", "npy", "--start", "-3"),
        "outside the series",
    ),
    "roi outside the frame": (
        ("show", "{d}/run1.h5", "--out", "{d}/v.png", "--roi", "0,300,0,10"),
        "not inside the 256 x 384 frame",
    ),
    "roi malformed": (("show", "{d}/run1.h5", "--roi", "1,2,x,4"), "--roi must be four integers"),
    "e/A2 without pixel size (tiff)": (
        (
            "export",
            "{d}/nopx.h5",
            "{d}/o.tif",
            "-f",
            "tiff",
            "--dose-per-fraction",
            "1",
            "--unit",
            "e/A2",
        ),
        "pixel size",
    ),
    "e/A2 without pixel size (show)": (
        ("show", "{d}/nopx.h5", "--out", "{d}/v.png", "--unit", "e/A2"),
        "pixel size",
    ),
    "tiff without dose per fraction": (
        ("export", "{d}/run1.h5", "{d}/o.tif", "-f", "tiff"),
        "--dose-per-fraction",
    ),
    "fraction larger than the series": (
        ("export", "{d}/run1.h5", "{d}/o.tif", "-f", "tiff", "--dose-per-fraction", "1e6"),
        "more than the whole series",
    ),
    "output exists": (("export", "{d}/run1.h5", "{d}/notes.txt", "-f", "npy"), "exists"),
    "output folder missing": (
        ("show", "{d}/run1.h5", "--out", "{d}/no/such/dir/v.png"),
        "does not exist",
    ),
}


#: the cases run as a real ``python -m streamstore`` (the interpreter's exit status,
#: nothing else on stderr): one per command and the truncated file (HDF5's own error
#: path); the others call the command in this process, with its output captured
IN_A_PROCESS = {"wrong path (info)", "wrong path (show)", "wrong path (export)", "truncated file"}


@pytest.mark.parametrize("case", list(CASES))
def test_error_is_one_sentence_exit_2(files, case):
    argv, needle = CASES[case]
    run = cli if case in IN_A_PROCESS else cli_here
    out = run(*(a.format(d=files) for a in argv), cwd=files)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"streamstore {argv[0]}: error: ")
    assert needle in lines[0]
    assert "None" not in lines[0]


def test_failed_export_leaves_no_partial_file(files):
    out = cli_here("export", files / "run1.h5", files / "late.npy", "-f", "npy", "--stop", "99")
    assert out.returncode == 2
    assert not (files / "late.npy").exists()
    assert not list(files.glob("late*"))


def test_export_larger_than_the_free_disk_is_refused(tmp_path):
    import shutil

    from streamstore import EventBatch, StoreWriter

    shape = (4092, 5760)
    per_frame = shape[0] * shape[1] * 4  # uint32
    n = shutil.disk_usage(tmp_path).free // per_frame + 2  # one frame more than fits
    with StoreWriter(tmp_path / "big.h5", shape, frame_time_s=1e-3) as w:
        w.append(EventBatch.empty(int(n), shape), np.arange(n), np.arange(n) * 10**6)
    out = cli_here(
        "export",
        tmp_path / "big.h5",
        tmp_path / "all.npy",
        "-f",
        "npy",
        "--dtype",
        "uint32",
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "GB are free" in lines[0]
    assert not list(tmp_path.glob("all*"))
