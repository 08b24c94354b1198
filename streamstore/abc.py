"""Contracts between the stages of the data flow.

Implementations live in their stage's folder; these Protocols say what a stage
needs from its neighbour, so one can be swapped (another counting
implementation, another codec) without touching the others. The code's own
type hints use them, and ``tests/conformance.py`` holds the conformance tests
any implementation must pass (subclass the matching ``...Tests`` class and
provide the fixture).

* :class:`FrameCounter` -- what the ingest count stage calls on every batch
  of frames; implemented by :class:`streamstore.counting.Counter`.
* :class:`ChunkCodec` -- what the store writer compresses every chunk with
  and reads back; implemented by
  :class:`streamstore.store.codec.Blosc2ChunkCodec`.

A contract nothing in the code depends on is not kept here: the write stage
needs more of :class:`~streamstore.store.writer.StoreWriter` than any small
protocol would say, and the camera emulator is used as itself.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from streamstore.events import EventBatch

__all__ = ["ChunkCodec", "FrameCounter"]


@runtime_checkable
class FrameCounter(Protocol):
    """Turns raw frames into events: ``(H, W)`` or ``(n, H, W)`` -> one batch entry per frame."""

    def __call__(self, frames: np.ndarray) -> EventBatch: ...


@runtime_checkable
class ChunkCodec(Protocol):
    """Compresses one HDF5 chunk; its config is written into the file's attrs."""

    def encode(self, block: np.ndarray) -> bytes: ...

    def decode(
        self,
        buf: bytes,
        chunk_shape: tuple[int, ...],
        dtype: np.dtype | type,
        out: np.ndarray | None = None,
    ) -> np.ndarray: ...

    def get_config(self) -> dict[str, Any]: ...
