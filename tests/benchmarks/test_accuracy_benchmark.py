"""benchmarks/accuracy.py runs end to end on small frames, prints one JSON object and
writes it with the machine's description to a results file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import accuracy as bench


def test_accuracy_benchmark_json(capsys, tmp_path):
    args = ["--shape", "64x96", "--doses", "0.002,0.08", "--frames", "4", "--electrons", "1500"]
    assert bench.main([*args, "--json", "--results", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    # the run's results file holds the same figures and the machine that made them
    (saved,) = tmp_path.glob("accuracy-*Z.json")
    record = json.loads(saved.read_text())
    assert record["benchmark"] == "accuracy" and record["figures"] == out
    assert record["options"]["shape"] == [64, 96] and record["options"]["frames"] == 4
    machine = record["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"] and machine["python"]
    assert machine["packages"]["numpy"] == np.__version__
    assert record["time_utc"].endswith("Z")
    low, high = out["doses"]
    assert low["dose_e_per_px_frame"] == 0.002 and high["dose_e_per_px_frame"] == 0.08
    assert low["n_true"] > 1300 and low["frames"] == 123  # ceil(1500 / (0.002 * 64 * 96))
    for row in (low, high):
        assert 0 < row["recall"] <= 1 and 0 < row["precision"] <= 1
        # the data-only (no dark series) calibration is measured beside it
        for key in ("data_only_recall", "data_only_precision", "first8_recall"):
            assert 0 < row[key] <= 1
        assert row["data_only_recall_minus_dark"] == row["data_only_recall"] - row["recall"]
    # the measure can fail: crowding, and with it the loss, grows with the dose
    assert high["crowded_share"] > 5 * low["crowded_share"]
    assert high["recall"] < low["recall"] - 0.1


def test_crowded_share_counts_electrons_within_one_pixel():
    # (0.5, 0.5) and (1.9, 1.2) are in 8-adjacent pixels; (5.5, 5.5) stands alone
    positions = [np.array([[0.5, 0.5], [1.9, 1.2], [5.5, 5.5]]), np.zeros((0, 2))]
    assert bench.crowded_share(positions) == pytest.approx(2 / 3)


@pytest.mark.parametrize("doses", ["0.01,x", "0", "1.5", ""])
def test_bad_doses_are_refused_by_name(doses, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--doses", doses, "--no-save"])
    assert "dose" in capsys.readouterr().err
