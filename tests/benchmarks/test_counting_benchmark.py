"""benchmarks/counting.py runs end to end on a small frame and prints one JSON object."""

from __future__ import annotations

import json

from benchmarks import counting as bench


def test_counting_benchmark_json(capsys, tmp_path):
    args = ["--shape", "96x160", "--repeats", "1", "--dark-frames", "4", "--json",
            "--methods", "resolve"]  # fmt: skip
    assert bench.main([*args, "--results", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    (saved,) = tmp_path.glob("counting-*Z.json")
    record = json.loads(saved.read_text())
    assert record["figures"] == out and record["machine"]["packages"]["numba"]
    assert out["frame_shape"] == [96, 160]
    assert out["identical_1_2_threads"] is True
    assert out["identical_numba_native"] is True
    assert out["n_events"] > 0 and 0 < out["recall"] <= 1 and 0 < out["precision"] <= 1
    for key in ("ratio_1thread_to_copy", "speedup_2threads", "ratio_native_to_numba"):
        assert out[key] > 0
    read = out["stream_read"]  # the memory bound: frame and maps, 160 x 96 x 4 bytes
    assert read["bytes"] == 96 * 160 * 4
    assert read["read_1thread_s"] > 0 and read["read_2threads_s"] > 0
    assert read["speedup_ceiling_2threads"] > 0
    one = out["one_call"]  # count() frame after frame against the reused Counter
    assert one["first_call_identical"] is True
    for key in ("ratio_to_counter_1thread", "ratio_to_counter_2threads", "speedup_2threads"):
        assert one[key] > 0
    # a 96 x 160 frame's few events never settle the dose model: said so, not hidden
    assert one["settled"] is False and one["settle_frames"] == bench.SETTLE_FRAMES
    assert one["ratio_to_settled_counter_1thread"] > 0
    assert "stempy" in out  # measured, or None when stempy is not installed
    # the counter that resolves merged electrons (method="resolve"), timed beside it
    assert list(out["methods"]) == ["resolve"]
    res = out["methods"]["resolve"]
    assert res["identical_1_2_threads"] is True and res["n_events"] > 0
    assert res["ratio_1thread_to_copy"] > 0 and 0 < res["recall"] <= 1
