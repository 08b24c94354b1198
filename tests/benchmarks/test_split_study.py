"""benchmarks/split_study.py: its clouds hold their charge, its fit tells one cloud from
two on windows made from known clouds, and it runs end to end on tiny frames."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import split_study as study


def test_a_cloud_inside_the_window_holds_its_charge():
    # pixel (0, 0) of the event is window pixel (2, 2); its centre is (0.5, 0.5)
    cloud = study._cloud(100.0, 0.5, 0.5, 0.5)
    assert cloud.sum() == pytest.approx(100.0, rel=1e-5)
    assert np.unravel_index(cloud.argmax(), cloud.shape) == (2, 2)
    assert np.allclose(cloud, cloud.T) and np.allclose(cloud, cloud[::-1, ::-1])


def test_the_fit_tells_one_cloud_from_two():
    rng = np.random.default_rng(5)
    weight = np.ones((5, 5)) / 3.0  # 3 ADU of noise
    one = study._cloud(120.0, 0.4, 0.6, 0.5) + rng.normal(0, 3.0, (5, 5))
    two = (study._cloud(110.0, 0.5, 0.0, 0.5) + study._cloud(100.0, 0.5, 1.3, 0.5)
           + rng.normal(0, 3.0, (5, 5)))  # fmt: skip
    drops = []
    for win in (one, two):
        f1 = study._fit(win, weight, 0.5, [[win.sum(), 0.5, 0.5]])
        a, y, x = f1.x
        starts = [[a / 2, y, x + 0.6, a / 2, y, x - 0.6], [a / 2, y + 0.6, x, a / 2, y - 0.6, x]]
        f2 = study._fit(win, weight, 0.5, starts)
        drops.append(2 * (f1.cost - f2.cost))
        if win is two:
            xs = sorted([f2.x[2], f2.x[5]])
            assert xs == pytest.approx([0.0, 1.3], abs=0.2)
    assert drops[0] < 12 < 100 < drops[1]


def test_split_study_json(capsys, tmp_path):
    args = ["--shape", "96x128", "--frames", "3", "--max-events", "20", "--width-events", "60"]
    args.append("--json")
    assert study.main([*args, "--results", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    (saved,) = tmp_path.glob("split_study-*Z.json")
    assert json.loads(saved.read_text())["figures"] == out
    assert 0 < out["candidates"] <= 20
    assert out["fitted_width_px"] == pytest.approx(0.5, abs=0.08)  # the emulator's point spread
    assert out["width_used_px"] == out["fitted_width_px"]
    shares = [out["no_splits"], out["resolve_rule"], *out["fit"].values()]
    assert all(0 < s["recall"] <= 1 and 0 < s["precision"] <= 1 for s in shares)
    assert set(out["fit"]) == {str(t) for t in study.THRESHOLDS}
