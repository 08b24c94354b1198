"""benchmarks/detection_bound.py runs end to end on tiny frames: its bounds are shares,
the oracle is never beaten by the 3 x 3 rule, and its statistic is the emulator's own
point spread at the true position."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import detection_bound as bench
from streamstore.camera.emulator import CameraEmulator

HARD = {"psf_sigma_px": 0.8, "read_noise_adu": 6.0, "deposit": "gamma"}


def test_detection_bound_json(capsys, tmp_path):
    args = ["--shape", "64x96", "--doses", "0.01", "--electrons", "1500", "--null-frames", "300"]
    args += ["--methods", "resolve,fit"]
    args += ["--emulator", "gain_sigma=0.03", "--emulator", "psf_sigma_px=0.8,read_noise_adu=6"]
    args[-1] += ",deposit=gamma"
    assert bench.main([*args, "--json", "--results", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    (saved,) = tmp_path.glob("detection_bound-*Z.json")
    assert json.loads(saved.read_text())["figures"] == out
    default, hard = out["rows"]
    assert hard["emulator"] == HARD and default["target_recall"] == 0.95
    for row in out["rows"]:
        assert row["n_true"] > 1300 and row["n_isolated"] > 0.5 * row["n_true"]
        assert list(row["measured"]) == ["peak", "resolve", "fit"]
        assert row["null_trials"] > 300 * 60 * 92 * 0.9  # the extra dark frames' inner pixels
        assert row["false_rate_per_trial"] == pytest.approx(row["true_dose"] / 999)
        iso = row["isolated"]
        shares = [iso["matched_noise_free"]]
        for s in bench.STATS:
            shares += [iso[s]["bound"], iso[s]["bound_every_trial"]]
            # the threshold lies in the null's tail: a handful of null values above it
            assert 3 < iso[s]["threshold"] < 6 and iso[s]["null_above"] >= 5
            assert 0.9 < iso[s]["null_std"] < 1.2
            assert iso[s]["threshold_every_trial"] >= iso[s]["threshold"]
        for key, c in row["coincidence"].items():
            shares += [c["share_with_neighbour"], c["groups_per_electron"]]
            shares.append(row["combined_bound"][key])
        shares += [m[k] for m in row["measured"].values() for k in m]
        assert all(0 <= x <= 1 for x in shares), shares
        co = row["coincidence"]
        assert co["d=1"]["groups_per_electron"] > co["d=2"]["groups_per_electron"]
        # no detector beats the oracle on the lone electrons; it fails if the statistic
        # is taken at a wrong position or the threshold is set too high
        assert iso["matched"]["bound"] >= row["measured"]["peak"]["recall_isolated"]
        assert iso["matched"]["bound"] >= row["measured"]["peak"]["recall"]
        assert iso["matched"]["bound"] >= iso["box3"]["bound"]
    assert default["isolated"]["matched"]["bound"] > 0.99
    # faint gamma deposits spread over more pixels, under more noise, are lost
    assert hard["isolated"]["matched"]["bound"] < 0.9
    assert hard["isolated"]["matched"]["bound"] > hard["measured"]["peak"]["recall_isolated"] + 0.1


def test_matched_statistic_is_the_emulators_point_spread():
    # no noise, no dark spread, gain 1: the frame is the deposits alone (rounded)
    quiet = dict(read_noise_adu=0, row_noise_adu=0, dark_sigma_adu=0, gain_sigma=0)
    emu = CameraEmulator((48, 64), dose_rate_e_per_px_s=3.0, seed=5, hot_pixel_fraction=0, **quiet)
    frames, truth = emu.generate(20)
    sig = frames.astype(np.float32) - np.float32(emu.dark_mean_adu)
    var = np.ones((48, 64))
    f = np.concatenate([np.full(len(p), i) for i, p in enumerate(truth.positions)])
    pos = np.concatenate(truth.positions)
    keep = np.ones(len(pos), bool)
    for i, p in enumerate(truth.positions):
        keep[f == i] = bench._isolated(p, truth.xray_positions[i], (48, 64), var > 0)
    f, pos = f[keep], pos[keep]
    energy = np.concatenate(truth.energies)[keep]
    assert len(f) > 20
    frac = pos - np.floor(pos)
    p = bench.psf_weights(frac, 0.5)
    stats = bench.electron_stats(sig, var, f, pos, 0.5)
    # charge beyond the 5 x 5 window and the rounding aside, the matched sum is E |p|
    expected = energy * np.sqrt((p * p).sum((1, 2)))
    np.testing.assert_allclose(stats["matched"], expected, rtol=0.02, atol=1.0)
    # a template half a pixel off (within the same pixel) collects less of the same charge
    off = np.floor(pos) + (frac + 0.5) % 1
    wrong = bench.electron_stats(sig, var, f, off, 0.5)["matched"]
    assert np.all(wrong < stats["matched"])
    # the 3 x 3 box holds nearly every electron's charge at sigma 0.5
    assert np.median(stats["box3"] * 3 / energy) > 0.85


@pytest.mark.parametrize("text", ["psf_sigma_px", "deposit=", "=3"])
def test_bad_emulator_points_are_refused(text, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--emulator", text, "--no-save"])
    assert "emulator" in capsys.readouterr().err


def test_unknown_emulator_parameter_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--emulator", "psf=0.8", "--no-save"])
    assert "--emulator" in capsys.readouterr().err


def test_row_correction_takes_the_common_mode_out_of_the_null():
    # a strong row common mode adds up along the template's rows unless taken out
    kw = dict(electrons=300, min_frames=4, null_frames=40, methods=("peak",), log=lambda *a: 0)
    params = {"row_noise_adu": 6.0, "read_noise_adu": 2.0, "psf_sigma_px": 0.8}
    rows = [
        bench.run_point((48, 64), 0.01, params, 3, row_correct=rc, **kw) for rc in (False, True)
    ]
    plain, corrected = (r["isolated"]["matched"] for r in rows)
    assert plain["null_std"] > 1.3 and 0.7 < corrected["null_std"] < 1.1
    assert corrected["bound"] > plain["bound"] + 0.2
    assert rows[1]["row_correct"] and rows[0]["n_true"] == rows[1]["n_true"]  # the same frames
