"""The file format as documented: an h5py + hdf5plugin-only reader, golden files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import streamstore
from streamstore import EventBatch, StoreWriter

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parents[1] / "data"


def recipe_source() -> str:
    """The python block under the recipe marker of docs/format.md, verbatim."""
    text = (ROOT / "docs" / "format.md").read_text()
    m = re.search(r"<!-- recipe:.*?-->\s*```python\n(.*?)```", text, re.S)
    assert m, "docs/format.md lost its recipe block"
    return m.group(1)


RUNNER = """
import sys
{recipe}
import numpy as np
assert "streamstore" not in sys.modules, "the recipe must not need streamstore"
for src, dst in zip(sys.argv[1::2], sys.argv[2::2]):
    offsets, indices, sub, shape, ids, ts = read_streamstore(src)
    extra = {{}} if sub is None else {{"subpixel": sub}}
    np.savez(dst, offsets=offsets, indices=indices, shape=np.array(shape), frame_ids=ids,
             timestamps_ns=ts, **extra)
assert "streamstore" not in sys.modules
"""


def run_recipe(tmp_path: Path, files: list[Path]) -> list[dict]:
    script = tmp_path / "recipe_reader.py"
    script.write_text(RUNNER.format(recipe=recipe_source()))
    outs = [tmp_path / f"out{i}.npz" for i in range(len(files))]
    args = [a for pair in zip(files, outs, strict=True) for a in map(str, pair)]
    # -I: isolated mode, so neither the repo nor an editable install is on sys.path
    # unless imported explicitly; the script imports only h5py, hdf5plugin, numpy
    proc = subprocess.run(
        [sys.executable, "-I", str(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    return [dict(np.load(o)) for o in outs]


def _batch(rng, n, shape, p, subpixel):
    npix = shape[0] * shape[1]
    hit = rng.random((n, npix)) < p
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(hit.sum(1), out=offsets[1:])
    idx = np.nonzero(hit)[1].astype(np.uint32)
    sub = rng.integers(0, 16, idx.size).astype(np.uint8) if subpixel else None
    return EventBatch(offsets, idx, sub, shape)


def test_h5py_hdf5plugin_only_reader_follows_the_docs(tmp_path, rng):
    shape = (48, 80)
    files, truths = [], []
    for k, subpixel in enumerate((True, False)):
        batches = [_batch(rng, n, shape, 0.03, subpixel) for n in (7, 0, 20, 3)]
        path = tmp_path / f"doc{k}.h5"
        with StoreWriter(
            path, shape, frame_time_s=1e-3, subpixel=subpixel, chunk_events=100, chunk_frames=4
        ) as w:
            nxt = 0
            for b in batches:
                ids = np.arange(nxt, nxt + b.n_frames) * 2 + 1
                w.append(b, ids, ids * 1000)
                nxt += b.n_frames
                w.flush()  # leaves holes between flushes: the recipe must handle them
        files.append(path)
        truths.append(EventBatch.concatenate(batches))
    with h5py_file(files[0]) as f:
        n_slots = f["events/gaps"].shape[0]
    assert n_slots > truths[0].n_events  # the file really has holes
    for got, truth in zip(run_recipe(tmp_path, files), truths, strict=True):
        sub = got.get("subpixel")
        assert EventBatch(got["offsets"], got["indices"], sub, tuple(got["shape"])) == truth
        np.testing.assert_array_equal(got["frame_ids"], np.arange(30) * 2 + 1)
        np.testing.assert_array_equal(got["timestamps_ns"], (np.arange(30) * 2 + 1) * 1000)


def h5py_file(path):
    import h5py
    import hdf5plugin  # noqa: F401

    return h5py.File(path, "r")


# --------------------------------------------------------------- golden ---
GOLDEN = sorted(DATA.glob("golden_v*.h5"))


def test_golden_files_exist():
    assert [p.name for p in GOLDEN] == ["golden_v1.h5", "golden_v2.h5", "golden_v3.h5"]


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.name)
def test_golden_file_decodes_to_its_expected_content(path):
    exp = json.loads(path.with_name(path.stem + "_expected.json").read_text())
    truth = EventBatch(
        np.array(exp["offsets"]),
        np.array(exp["indices"], np.uint32),
        np.array(exp["subpixel"], np.uint8),
        tuple(exp["frame_shape"]),
    )
    with streamstore.open(path) as s:
        assert s.format_version == exp["format_version"]
        assert s.events(0, s.n_frames) == truth
        np.testing.assert_array_equal(s.frame_ids, exp["frame_ids"])
        np.testing.assert_array_equal(s.timestamps_ns, exp["timestamps_ns"])
        np.testing.assert_array_equal(s.missing_frame_ids, exp["missing_frame_ids"])
        np.testing.assert_array_equal(s.frames(0, s.n_frames), truth.to_dense())
        np.testing.assert_array_equal(s.sum(), truth.to_dense().sum(0))
        assert s.frame_time_s == exp["frame_time_s"]
        assert s.pixel_size_A == exp["pixel_size_A"]
        assert s.calibration_summary == exp["calibration"]
        assert s.meta == exp["meta"]
        assert s.accounting == exp["accounting"]
        # what version 2 added; a version-1 file has none of it
        assert s.missing_ranges.tolist() == exp.get("missing_ranges", s.missing_ranges.tolist())
        scan = exp.get("scan")
        if scan is None:
            assert s.scan is None
        else:
            assert s.scan.scan_shape == tuple(scan["scan_shape"])
            assert s.scan.frames_per_position == scan["frames_per_position"]
            assert s.scan.flyback == scan["flyback"]
        assert s.calibration_warning == exp.get("calibration_warning", "")
        # what version 3 added: the corrected dose and its model; older files record
        # none, and their dose is the counted events, saying so
        counts = np.diff(exp["offsets"])
        np.testing.assert_array_equal(s.dose("events", corrected=False), counts)
        if "electrons" in exp:
            assert s.dose_corrected and s.dose_model == exp["dose_model"]
            np.testing.assert_array_equal(s.dose("events"), exp["electrons"])
            np.testing.assert_array_equal(s.events(0, s.n_frames).electrons, exp["electrons"])
            assert "coincidence-corrected" in s.dose_label
        else:
            assert not s.dose_corrected and s.dose_model is None
            assert s.dose("events").dtype == np.int64
            np.testing.assert_array_equal(s.dose("events"), counts)
            assert s.events(0, s.n_frames).electrons is None
            assert s.dose_label == (
                "dose: counted events, no coincidence correction recorded "
                f"(format {exp['format_version']})"
            )


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.name)
def test_golden_file_decodes_with_the_recipe(tmp_path, path):
    exp = json.loads(path.with_name(path.stem + "_expected.json").read_text())
    (got,) = run_recipe(tmp_path, [path])
    np.testing.assert_array_equal(got["offsets"], exp["offsets"])
    np.testing.assert_array_equal(got["indices"], exp["indices"])
    np.testing.assert_array_equal(got["subpixel"], exp["subpixel"])
    np.testing.assert_array_equal(got["frame_ids"], exp["frame_ids"])


def test_unknown_version_is_refused(tmp_path, rng):
    import h5py

    from streamstore.errors import FormatError

    path = tmp_path / "future.h5"
    with StoreWriter(path, (8, 8), frame_time_s=1e-3) as w:
        w.append(_batch(rng, 2, (8, 8), 0.1, False), [0, 1], [0, 1])
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 4
    with pytest.raises(FormatError, match="format version 4"):
        streamstore.open(path)
