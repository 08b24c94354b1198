"""Contracts between the stages of the data flow.

Implementations live in their own modules; these Protocols say what each
stage needs from the next, so a stage can be swapped (a real camera for the
emulator, another codec, a shard writer for a single-file writer) without
touching its neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from streamstore.events import EventBatch

__all__ = ["Counter", "ChunkCodec", "EventSink", "FrameSource"]


@runtime_checkable
class FrameSource(Protocol):
    """Something that makes frames: the emulator, a file, a camera SDK."""

    frame_shape: tuple[int, int]
    dtype: np.dtype

    def generate(self, n: int) -> tuple[np.ndarray, Any]:
        """Return ``(frames (n, H, W), truth or None)``."""
        ...


@runtime_checkable
class Counter(Protocol):
    """Turns raw frames into events."""

    def __call__(self, frames: np.ndarray) -> EventBatch: ...


@runtime_checkable
class ChunkCodec(Protocol):
    """Compresses one HDF5 chunk; its config is written into the file's attrs."""

    def encode(self, block: np.ndarray) -> bytes: ...

    def decode(self, buf: bytes, chunk_shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray: ...

    def get_config(self) -> dict[str, Any]: ...


@runtime_checkable
class EventSink(Protocol):
    """Where counted frames go: a store file, a shard, a network peer."""

    def append(
        self,
        events: EventBatch,
        frame_ids: Sequence[int] | np.ndarray,
        timestamps_ns: Sequence[int] | np.ndarray,
    ) -> None: ...

    def mark_missing(self, frame_ids: Sequence[int] | np.ndarray) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...
