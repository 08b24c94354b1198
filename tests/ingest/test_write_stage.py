"""The write stage with a real HDF5 file: a refused append costs only its frames."""

from __future__ import annotations

import queue

import numpy as np

import streamstore
from streamstore.events import EventBatch
from streamstore.ingest.items import ByteBudget, CloseItem, EventsItem, SeriesInfo
from streamstore.ingest.status import Counters
from streamstore.ingest.write_stage import WriteStage
from streamstore.link.protocol import Start

SHAPE = (8, 12)


def _events(ids: list[int], rng: np.random.Generator) -> EventBatch:
    """One or two events per frame at seeded positions."""
    offsets, indices = [0], []
    for _ in ids:
        idx = np.sort(rng.choice(SHAPE[0] * SHAPE[1], size=2, replace=False)).astype(np.uint32)
        indices.extend(idx.tolist())
        offsets.append(len(indices))
    return EventBatch(np.array(offsets, np.int64), np.array(indices, np.uint32), None, SHAPE)


def _item(series: SeriesInfo, ids: list[int], rng: np.random.Generator, budget) -> EventsItem:
    budget.add(100)
    return EventsItem(series, _events(ids, rng), ids, [1000 * i for i in ids], 100)


def test_a_refused_append_costs_only_its_frames(tmp_path):
    rng = np.random.default_rng(7)
    budget = ByteBudget(1 << 20)
    counters = Counters()
    closed = []
    stage = WriteStage(queue.SimpleQueue(), budget, counters, tmp_path, on_closed=closed.append)
    series = SeriesInfo("s1", Start("s1", SHAPE, "uint16", 0.01, n_frames=9))
    # frames 3 and 4 come after 5 was stored: the writer refuses them (ids must
    # increase); 5 again (a late second copy) is refused but stays stored
    for ids in ([0, 1], [2, 5], [3, 4], [5], [6, 7, 8]):
        stage.handle(_item(series, ids, rng, budget))
    stage.handle(CloseItem(series, 10, 0, 0, True, "end"))
    assert closed == [series]
    assert counters.write_errors == 0
    assert series.stored == 7  # 0, 1, 2, 5, 6, 7, 8
    assert budget.used == 0
    assert list(series.missing) == [(3, 5)]
    assert counters.missing == 2
    with streamstore.open(series.path) as store:
        assert store.frame_ids.tolist() == [0, 1, 2, 5, 6, 7, 8]
        assert store.missing_frame_ids.tolist() == [3, 4]
