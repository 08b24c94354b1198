"""benchmarks/accuracy.py runs end to end on small frames, prints one JSON object and
writes it with the machine's description to a results file."""

from __future__ import annotations

import inspect
import json
import math

import numpy as np
import pytest

from benchmarks import accuracy as bench
from streamstore import count
from streamstore.events import EventBatch

try:
    import stempy.image  # noqa: F401

    HAVE_STEMPY = True
except ImportError:
    HAVE_STEMPY = False


def test_accuracy_benchmark_json(capsys, tmp_path):
    args = ["--shape", "64x96", "--doses", "0.002,0.08", "--frames", "4", "--electrons", "1500"]
    args += ["--patterns", "uniform", "--no-stempy"]
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
    assert low["pattern"] == high["pattern"] == "uniform"
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


def test_counter_table_side_by_side(capsys):
    # tiny: 48 x 64 frames, both patterns, two doses; every counter on the same frames
    args = ["--shape", "48x64", "--doses", "0.002,0.06", "--frames", "4", "--electrons", "300"]
    assert bench.main([*args, "--no-data-only", "--json", "--no-save"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["frame_shape"] == [48, 64] and out["patterns"] == ["uniform", "disk"]
    assert "process CPU time" in out["timing_note"]
    rows = out["doses"]
    assert [(r["pattern"], r["dose_e_per_px_frame"]) for r in rows] == [
        ("uniform", 0.002),
        ("uniform", 0.06),
        ("disk", 0.002),
        ("disk", 0.06),
    ]
    expected = ["3x3"]
    for method in bench.NEW_METHODS:
        if "method" in inspect.signature(count).parameters:
            # this tree's count() takes a method: it is measured, or its refusal is named
            if method in out["counters"]:
                expected.append(method)
            else:
                assert "refused" in out["skipped"][method]
        else:
            assert "no method=" in out["skipped"][method]
    if HAVE_STEMPY:
        expected.append("stempy")
    else:
        assert "not installed" in out["skipped"]["stempy"]
    assert out["counters"] == expected
    for r in rows:
        assert "data_only_recall" not in r  # --no-data-only
        assert r["n_true"] > 200 and r["true_dose"] == pytest.approx(
            r["n_true"] / (r["frames"] * 48 * 64)
        )
        assert list(r["counters"]) == expected
        for name, m in r["counters"].items():
            assert 0 < m["recall"] <= 1 and 0 < m["precision"] <= 1, name
            assert 0 < m["rms_error_px"] < 0.6, name
            assert m["time_per_frame_s"] > 0, name
            # the events' dose against the truth's
            assert m["dose_error"] == pytest.approx(m["n_found"] / r["n_true"] - 1), name
            assert m["dose_events"] == pytest.approx(m["n_found"] / (r["frames"] * 48 * 64))
            if m["dose_electrons"] is None:
                assert m["dose_error_electrons"] is None
            else:
                assert m["dose_error_electrons"] == pytest.approx(
                    m["dose_electrons"] / r["true_dose"] - 1
                )
        # the 3 x 3 rule's figures are also the row's flat ones
        assert r["recall"] == r["counters"]["3x3"]["recall"]
        if HAVE_STEMPY:
            # stempy reports pixel centres: about 0.41 px for an electron uniform in its pixel
            assert 0.3 < r["counters"]["stempy"]["rms_error_px"] < 0.5
            assert r["counters"]["stempy"]["background_threshold_adu"] > 0
    by = {(r["pattern"], r["dose_e_per_px_frame"]): r for r in rows}
    # the disk's local dose is many times the frame mean, and its events are lost sooner
    assert by["disk", 0.002]["peak_local_dose"] > 5 * 0.002
    assert by["uniform", 0.002]["peak_local_dose"] == pytest.approx(0.002)
    for name in expected:
        low = by["uniform", 0.002]["counters"][name]
        assert abs(low["dose_error"]) < 0.1, name
        assert by["uniform", 0.06]["counters"][name]["dose_error"] < low["dose_error"] - 0.1
        assert (
            by["disk", 0.06]["counters"][name]["recall"]
            < by["uniform", 0.06]["counters"][name]["recall"]
        )


class _WithElectrons:
    """A batch that carries coincidence-corrected electrons per frame."""

    def __init__(self, electrons):
        self.electrons = electrons


def test_batch_electrons_is_read_when_the_batch_has_it():
    plain = EventBatch(np.array([0, 1]), np.array([3], np.uint32), None, (4, 4))
    assert bench.batch_electrons(plain) is None
    assert bench.batch_electrons(_WithElectrons(np.array([1.5, 2.0]))) == 3.5
    assert bench.batch_electrons(_WithElectrons(None)) is None
    assert math.isclose(bench.batch_electrons(_WithElectrons(lambda: [1, 2])), 3.0)


@pytest.mark.parametrize("patterns", ["", "ring", "uniform,ring"])
def test_bad_patterns_are_refused_by_name(patterns, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--patterns", patterns, "--no-save"])
    assert "patterns" in capsys.readouterr().err


class _Corrected(EventBatch):
    """The 3 x 3 rule's events with an ``electrons`` total per frame, as a counter
    that separates coincident electrons reports them."""

    __slots__ = ("electrons",)


def test_a_count_with_the_new_method_is_measured_and_a_refusal_skipped(monkeypatch):
    # the benchmark finds the new counter at run time: here a count() that takes
    # method= (the real 3 x 3 rule under the new name, 10 % more electrons than events)
    real = bench.count

    def count_with_method(frames, cal, *, subpixel=False, threads=None, method="3x3"):
        b = real(frames, cal, subpixel=subpixel, threads=threads)
        if method == "3x3":
            return b
        if method != "resolve":
            raise ValueError(f"unknown method {method!r}")
        out = _Corrected(b.offsets, b.indices, b.subpixel, b.frame_shape)
        out.electrons = 1.1 * b.counts
        return out

    monkeypatch.setattr(bench, "count", count_with_method)
    kw = dict(shape=(48, 64), doses=[0.002], n_frames=4, seed=7, electrons=300, log=lambda *a: 0)
    res = bench.run(**kw, stempy=False, data_only=False)
    assert res["counters"] == ["3x3", "resolve"] and "resolve" not in res["skipped"]
    assert "unknown method 'fit'" in res["skipped"]["fit"]
    (row,) = res["doses"]
    new, old = row["counters"]["resolve"], row["counters"]["3x3"]
    assert new["recall"] == old["recall"] and new["dose_error"] == old["dose_error"]
    # count() fills the coincidence-corrected electrons: never fewer than the events
    assert old["dose_electrons"] >= old["dose_events"] > 0
    assert new["dose_electrons"] == pytest.approx(1.1 * new["dose_events"])
    assert new["dose_error_electrons"] == pytest.approx(1.1 * (1 + new["dose_error"]) - 1)

    res = bench.run(**kw, method="unheard-of", stempy=False, data_only=False)
    assert res["counters"] == ["3x3"]
    assert "unknown method 'unheard-of'" in res["skipped"]["unheard-of"]
