"""The documentation runs: README's Python example and every block of docs/api.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests._cli_data import make_store

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    """The ```python blocks of a Markdown file, in order."""
    return FENCE.findall(path.read_text(encoding="utf-8"))


def run_blocks(blocks: list[str], name: str) -> dict:
    ns: dict = {"__name__": "__docs__"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{name}[block {i}]", "exec"), ns)
        except Exception as exc:
            raise AssertionError(f"{name}, python block {i} failed: {exc!r}\n{code}") from exc
    return ns


def test_api_md_examples_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tifffile")
    pytest.importorskip("matplotlib")
    pytest.importorskip("imagecodecs")
    blocks = python_blocks(ROOT / "docs" / "api.md")
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)
    ns = run_blocks(blocks, "docs/api.md")
    out = capsys.readouterr().out
    assert "RELION" in out and "UserError:" in out
    for name in (
        "run1.h5",
        "movie.tif",
        "movie_dose.txt",
        "movie_fmint.txt",
        "window.npy",
        "window.json",
        "run1.eer",
        "run1_dose.txt",
        "run1_fmint.txt",
        "run1_gain.tif",
        "view.png",
    ):
        assert (tmp_path / name).is_file(), name
    assert ns["store"].n_frames == 400


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(ROOT / "README.md")
    assert len(blocks) == 1, "README has one Python example"
    code = blocks[0]
    assert len(code.strip().splitlines()) <= 12
    # the file the example opens: about 30 e/px, so its dose window (1, 15) cuts both ends
    make_store(tmp_path / "run1.h5", 300, p=0.09)
    monkeypatch.chdir(tmp_path)
    ns = run_blocks(blocks, "README.md")
    assert capsys.readouterr().out.strip()
    store, keep = ns["store"], ns["keep"]
    cum = store.dose(unit="e/px").cumsum()
    assert 15 < cum[-1] < 80 and 0 < keep.size < store.n_frames
    assert keep[0] > 0 and keep[-1] < store.n_frames - 1
    assert len(ns["fractions"]) == int(cum[-1] / 0.5) + 1  # full fractions + the remainder


def test_readme_setup_lines_untouched():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "```bash\npip install -e . && streamstore demo\n```" in text
    assert "```bash\npip install -e '.[test]' && python -m pytest -q\n```" in text
