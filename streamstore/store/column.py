"""ChunkColumn: one append-only 1-d HDF5 dataset written as whole Blosc2 chunks.

How the chunks of a growing dataset are written so that a file under SWMR
neither leaks space nor shows a concurrent reader torn data is described in
:mod:`streamstore.store.writer` (its "Chunk policy").
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamstore.abc import ChunkCodec

__all__ = ["ChunkColumn"]


class ChunkColumn:
    """One append-only 1-d dataset written as whole blosc2 chunks (see module doc).

    Two policies for the open (partially filled) chunk at a flush:

    * ``tail_codec is None`` (event datasets): the open chunk is compressed,
      padded with zeros and written once; the next events start at the next
      chunk boundary, leaving padding between flushes ("holes", addressed by
      ``event_offset``). Nothing is ever rewritten.
    * ``tail_codec`` given (per-frame datasets, where row ``i`` must be frame
      ``i``): the open chunk is written with ``tail_codec`` (blosc2 level 0, a
      fixed size) and overwritten in place as it fills; HDF5 reuses the space
      of a same-size chunk, so nothing leaks. A chunk written whole is
      compressed with ``codec``.
    """

    def __init__(
        self,
        ds: Any,
        codec: ChunkCodec,
        chunk_len: int,
        dtype: np.dtype,
        tail_codec: ChunkCodec | None = None,
        checksum: bool = False,
    ) -> None:
        self.ds = ds
        self.checksum = checksum  # append HDF5's Fletcher-32 (the dataset has the filter)
        self.codec = codec
        self.tail_codec = tail_codec
        self.chunk_len = chunk_len
        self.dtype = np.dtype(dtype)
        self.n_full = 0  # elements before the open chunk (chunks written or pending)
        self.buf = np.empty(chunk_len, self.dtype)  # the open chunk
        self.n_buf = 0
        self.tail_dirty = False
        self.tail_published = False  # the open chunk was written partially (in place)
        self.extent = 0  # current dataset extent
        self.pending: list[tuple[int, np.ndarray, bool]] = []  # full chunks not yet written

    @property
    def length(self) -> int:
        """Position of the next element (including holes)."""
        return self.n_full + self.n_buf

    def _write_chunk(self, start: int, block: np.ndarray, extent: int, codec: ChunkCodec) -> None:
        if extent > self.extent:
            self.ds.resize((extent,))
            self.extent = extent
        data = codec.encode(block)
        if self.checksum:
            from streamstore.store.checksum import seal

            data = seal(data)
        self.ds.id.write_direct_chunk((start,), data, filter_mask=0)

    def _close_chunk(self) -> None:
        self.n_full += self.chunk_len
        self.n_buf = 0
        self.tail_dirty = False
        self.tail_published = False

    def extend(self, values: np.ndarray, write_full: bool) -> None:
        """Append values.

        With ``write_full`` completed chunks go to the file now; otherwise they
        wait for :meth:`commit` (per-frame datasets: the extent of ``frame_id``
        publishes frames, so it may only grow in a flush).
        """
        values = np.asarray(values, self.dtype)
        pos = 0
        n = values.size
        c = self.chunk_len
        while pos < n:
            take = min(c - self.n_buf, n - pos)
            if self.n_buf == 0 and take == c and write_full:
                # a whole chunk straight from the input, no copy into buf
                self._write_chunk(self.n_full, values[pos : pos + c], self.n_full + c, self.codec)
                self._close_chunk()
                pos += c
                continue
            self.buf[self.n_buf : self.n_buf + take] = values[pos : pos + take]
            self.n_buf += take
            pos += take
            self.tail_dirty = True
            if self.n_buf == c:
                if write_full:
                    self._write_chunk(self.n_full, self.buf, self.n_full + c, self.codec)
                else:
                    self.pending.append((self.n_full, self.buf.copy(), self.tail_published))
                self._close_chunk()

    def commit(self, final: bool = False) -> None:
        """Write pending chunks and the open chunk, set the extent, flush the dataset.

        With ``final`` (at close) the extent ends at the last element, so the
        padding of the last chunk is outside the dataset.
        """
        c = self.chunk_len
        for start, block, published in self.pending:
            codec = self.tail_codec if published else self.codec
            self._write_chunk(start, block, start + c, codec)
        self.pending.clear()
        if self.tail_dirty and self.n_buf:
            block = self.buf.copy()
            block[self.n_buf :] = 0
            if self.tail_codec is None:  # events: write once, then leave a hole
                # never shrink a dataset: HDF5 would rewrite the edge chunk itself
                # through the filter (not as our cframe)
                extent = self.length if final else self.n_full + c
                self._write_chunk(self.n_full, block, extent, self.codec)
                self._close_chunk()
            else:
                # a tail never published is written once, at close, so it may be
                # compressed; a published one keeps its fixed size (a chunk of another
                # size would get new space and, under SWMR, the old would never be freed)
                codec = self.codec if final and not self.tail_published else self.tail_codec
                self._write_chunk(self.n_full, block, self.length, codec)
                self.tail_dirty = False
                self.tail_published = True
        if self.tail_codec is not None and self.extent != self.length:
            self.ds.resize((self.length,))
            self.extent = self.length
        self.ds.flush()
