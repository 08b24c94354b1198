"""benchmarks/joint_study.py: its clouds hold their charge and their derivatives are right,
the joint fit finds an electron hidden beside two others and adds none to a lone one, and
the study runs end to end on small frames."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import joint_study as study

WIDTH = 0.5
E = 120.0  # one electron's charge, ADU


def _frame(clouds, shape=(24, 24), noise=3.0, seed=3):
    model = np.zeros(shape)
    for cl in clouds:
        study.draw(model, np.asarray([*cl, WIDTH], np.float64))
    rng = np.random.default_rng(seed)
    return model + rng.normal(0.0, noise, shape), np.full(shape, 1.0 / noise**2)


def test_a_cloud_holds_its_charge_and_its_derivatives_are_right():
    clouds = np.array([[100.0, 5.3, 6.8, 0.5], [60.0, 6.1, 5.2, 0.7]])
    rows, cols = (g.ravel().astype(np.float64) for g in np.mgrid[0:12, 0:12])
    m, jac = study.model_at(clouds, rows, cols)
    assert m.sum() == pytest.approx(160.0, rel=1e-6)
    h = 1e-6
    for k in range(clouds.size):
        p = clouds.reshape(-1).copy()
        p[k] += h
        hi, _ = study.model_at(p.reshape(-1, 4), rows, cols)
        p[k] -= 2 * h
        lo, _ = study.model_at(p.reshape(-1, 4), rows, cols)
        assert np.allclose(jac[:, k], (hi - lo) / (2 * h), atol=1e-5)
    drawn = np.zeros((12, 12))
    for cl in clouds:
        study.draw(drawn, cl)
    assert np.allclose(drawn.ravel(), m, atol=1e-3)  # drawn: 3 px about the cloud


def test_the_joint_fit_finds_the_electron_hidden_beside_two():
    # three electrons in a row 1.8 px apart; the events know two, each between two electrons
    truth = [[E, 10.5, 8.7], [E * 1.1, 10.6, 10.5], [E * 0.9, 10.4, 12.3]]
    signal, iv = _frame(truth)
    jf = study.JointFit(signal, iv, WIDTH, E, reach=2.5, drop=30.0, least=0.35, add=0.5)
    jf.start(np.array([[10.5, 9.0], [10.5, 12.0]]))
    jf.refit(2)
    # the refit widens the first cloud over two electrons; its split finds them
    assert jf.add() + jf.split() == 1
    found, gone = jf.events()
    assert gone == 0
    assert found.shape == (3, 2)
    order = np.argsort(found[:, 1])
    assert np.allclose(found[order], np.array(truth)[:, 1:], atol=0.3)


def test_a_lone_electron_stays_one():
    signal, iv = _frame([[E * 1.8, 8.4, 12.6]])  # a bright one, from the deposit's tail
    jf = study.JointFit(signal, iv, WIDTH, E, reach=2.5, drop=30.0, least=0.35, add=0.5)
    jf.start(np.array([[8.5, 12.5]]))
    jf.refit(2)
    assert jf.add() + jf.split() == 0  # tried as two (1.8 electrons), and kept as one
    found, _ = jf.events()
    assert found == pytest.approx(np.array([[8.4, 12.6]]), abs=0.1)


def test_joint_study_json(capsys, tmp_path):
    args = ["--shape", "96x128", "--frames", "3", "--dose", "0.02", "--json"]
    assert study.main([*args, "--results", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    (saved,) = tmp_path.glob("joint_study-*Z.json")
    assert json.loads(saved.read_text())["figures"] == out
    assert out["seed"] == 2029  # benchmarks.accuracy's seed for its 0.02 row
    assert out["cloud_width_px"] == pytest.approx(0.5, abs=0.08)  # the emulator's point spread
    base, joint = out["fit_counter"], out["joint"]
    assert all(0 < s["recall"] <= 1 and 0 < s["precision"] <= 1 for s in (base, joint))
    assert out["clouds_added"] > 0
    assert joint["recall"] > base["recall"]  # the added clouds are electrons the fit missed
    assert joint["precision"] >= 0.995
