"""The ingest pipeline after the socket: count stage, write stage, memory budget.

Data flow (one thread per stage, FIFO queues between them, so a series'
control messages stay in order with its frames)::

    receive (daemon.py) --FrameItem/MissingItem/OpenItem/CloseItem--> CountStage
        --EventsItem/...--> WriteStage --> StoreWriter (HDF5, blosc2 threads)

(:data:`~streamstore.ingest.items.CountInput` and
:data:`~streamstore.ingest.items.WriteInput` name what each stage takes.)

Memory is bounded by one :class:`ByteBudget` shared by the stages: the
receiver adds the size of every raw frame it holds (zero-copy zmq buffers,
also while they wait in the reorder window), the count stage gives a frame's
bytes back once it is counted and adds the (much smaller) bytes of its events,
and the write stage gives those back once written. The receiver stops reading
from the socket while the budget is full; ZeroMQ's high-water mark then
pushes back on the sender.

Modules: :mod:`~streamstore.ingest.items` (items, budget, stage thread),
:mod:`~streamstore.ingest.count_stage`, :mod:`~streamstore.ingest.write_stage`;
this module gathers their public names.
"""

from __future__ import annotations

from streamstore.ingest.count_stage import CountStage
from streamstore.ingest.items import (
    STOP,
    WRITE_DELAY_ENV,
    ByteBudget,
    CloseItem,
    CountInput,
    EventsItem,
    FrameItem,
    MissingItem,
    OpenItem,
    SeriesInfo,
    WriteInput,
    superblock_eof,
)
from streamstore.ingest.write_stage import WriteStage

__all__ = [
    "ByteBudget",
    "SeriesInfo",
    "OpenItem",
    "FrameItem",
    "MissingItem",
    "CloseItem",
    "EventsItem",
    "CountInput",
    "WriteInput",
    "STOP",
    "CountStage",
    "WriteStage",
    "WRITE_DELAY_ENV",
    "superblock_eof",
]
