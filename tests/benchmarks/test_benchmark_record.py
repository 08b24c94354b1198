"""benchmarks/record.py: one results file per run, never overwriting another."""

from __future__ import annotations

import argparse
import json

from benchmarks import record


def _args(tmp_path, *extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=3)
    record.add_options(p)
    return p.parse_args(["--results", str(tmp_path), *extra])


def test_runs_in_the_same_second_get_their_own_files(tmp_path):
    args = _args(tmp_path)
    paths = [record.save("demo", {"run": k}, args) for k in range(3)]
    assert len(set(paths)) == 3 and all(p.parent == tmp_path for p in paths)
    runs = sorted(json.loads(p.read_text())["figures"]["run"] for p in paths)
    assert runs == [0, 1, 2]
    saved = json.loads(paths[0].read_text())
    assert saved["options"] == {"size": 3}  # where the file goes is not a figure's condition
    assert set(saved["machine"]) >= {"cpu_model", "cores", "python", "packages", "commit"}


def test_no_save_writes_nothing(tmp_path):
    assert record.save("demo", {"x": 1}, _args(tmp_path, "--no-save")) is None
    assert list(tmp_path.iterdir()) == []
