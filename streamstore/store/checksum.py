"""Chunk checksums: HDF5's Fletcher-32 computed for chunks we write ourselves.

Every dataset of a streamstore file carries HDF5's own Fletcher-32 filter
(id 3) after the Blosc2 filter (id 32026). HDF5 verifies it on every read
through the filter pipeline, so plain ``h5py`` + ``hdf5plugin`` readers get an
error instead of wrong data. The writer stores chunks with
``write_direct_chunk``, which bypasses the pipeline, so it appends the
checksum itself: the 4 bytes HDF5's filter would append, the Fletcher-32 of
the compressed chunk, little-endian. The reader reads chunks with
``read_direct_chunk`` and checks them here before blosc2 decodes them (a
damaged blosc2 header is never handed to the decompressor).

The kernel exists as a plain Python reference (:func:`fletcher32_reference`)
and a numba kernel (:func:`fletcher32`); tests hold both equal to the bytes
HDF5's C filter writes.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "FLETCHER32_FILTER_ID",
    "ChecksumError",
    "fletcher32",
    "fletcher32_reference",
    "has_checksum",
    "seal",
    "unseal",
]

#: HDF5's filter id of Fletcher-32 (``H5Z_FILTER_FLETCHER32``).
FLETCHER32_FILTER_ID = 3


class ChecksumError(ValueError):
    """A chunk whose stored checksum does not match its bytes."""


def fletcher32_reference(data: bytes) -> int:
    """HDF5's ``H5_checksum_fletcher32`` in plain Python (slow; the reference).

    Big-endian 16-bit words, sums folded every 360 words; a trailing odd byte
    counts as the high byte of a last word.
    """
    data = bytes(data)
    n = len(data) // 2
    s1 = s2 = 0
    i = 0
    while n:
        t = min(n, 360)
        n -= t
        for _ in range(t):
            s1 += (data[i] << 8) | data[i + 1]
            i += 2
            s2 += s1
        s1 = (s1 & 0xFFFF) + (s1 >> 16)
        s2 = (s2 & 0xFFFF) + (s2 >> 16)
    if len(data) % 2:
        s1 += data[i] << 8
        s2 += s1
        s1 = (s1 & 0xFFFF) + (s1 >> 16)
        s2 = (s2 & 0xFFFF) + (s2 >> 16)
    s1 = (s1 & 0xFFFF) + (s1 >> 16)
    s2 = (s2 & 0xFFFF) + (s2 >> 16)
    return (s2 << 16) | s1


_kernel = None


def _get_kernel():
    """The compiled kernel (numba is imported on first use, not at import).

    HDF5 folds its sums every 360 words; each fold keeps the value modulo
    65535 and keeps a positive sum positive, and the final value lies in
    0..65535. So the result is ``0`` for all-zero data and otherwise the true
    sum modulo 65535 written in ``1..65535``. With ``N`` words ``w_k``,
    ``sum1 = sum(w_k)`` and ``sum2 = sum((N - k) * w_k)``: plain reductions with
    no chain from word to word, which the compiler vectorises (32-bit sums over
    blocks of 128 words, folded modulo 65535 into 64-bit ones).
    """
    global _kernel
    if _kernel is None:
        import numba

        @numba.njit(cache=True, nogil=True)
        def _fletcher32(words, n_total, last):  # pragma: no cover - compiled
            m = np.uint64(65535)
            s1 = np.uint64(0)
            s2 = np.uint64(0)
            seen = np.uint64(last)
            nw = words.size
            for b0 in range(0, nw, 128):
                b1 = min(b0 + 128, nw)
                # 32-bit sums (exact: 128 words x 127 x 65535 < 2**31) vectorise well
                a1 = np.uint32(0)
                a2 = np.uint32(0)
                o = np.uint32(0)
                for k in range(b0, b1):
                    v = np.uint32(words[k])
                    w = ((v >> np.uint32(8)) | (v << np.uint32(8))) & np.uint32(0xFFFF)
                    a1 += w
                    a2 += np.uint32(k - b0) * w
                    o |= w
                seen |= np.uint64(o)
                # sum over the block of (N - b0 - i) * w_i = (N - b0) * a1 - a2
                s1 = (s1 + np.uint64(a1)) % m
                weight = np.uint64(n_total - b0) % m
                s2 = (s2 + weight * np.uint64(a1) + m * m - np.uint64(a2)) % m
            s1 = (s1 + np.uint64(last)) % m  # a trailing odd byte: the last word, weight 1
            s2 = (s2 + np.uint64(last)) % m
            if seen != 0:
                if s1 == 0:
                    s1 = m
                if s2 == 0:
                    s2 = m
            return np.uint32((s2 << np.uint64(16)) | s1)

        from streamstore._numba_cache import serialize_saves

        serialize_saves(_fletcher32)  # test workers and readers may compile it at once
        _kernel = _fletcher32
    return _kernel


def fletcher32(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """HDF5's Fletcher-32 of ``data`` (numba kernel of :func:`fletcher32_reference`)."""
    arr = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8)
    arr = arr.reshape(-1)
    nw = arr.size // 2
    if arr.ctypes.data % 2 == 0:
        words = arr[: 2 * nw].view(np.uint16)
    else:  # unaligned buffer: one copy
        words = np.frombuffer(arr[: 2 * nw].tobytes(), np.uint16)
    last = int(arr[-1]) << 8 if arr.size % 2 else 0
    return int(_get_kernel()(words, nw + (arr.size % 2), last))


def seal(payload: bytes) -> bytes:
    """``payload`` followed by its checksum, as HDF5's Fletcher-32 filter stores a chunk."""
    return payload + int(fletcher32(payload)).to_bytes(4, "little")


def unseal(buf: bytes | memoryview) -> memoryview:
    """The payload of a sealed chunk, after checking its checksum.

    Raises
    ------
    ChecksumError
        If the chunk is too short or its checksum does not match.
    """
    view = memoryview(buf)
    if view.nbytes < 4:
        raise ChecksumError(f"chunk of {view.nbytes} bytes is too short to hold a checksum")
    payload = view[:-4]
    stored = int.from_bytes(view[-4:], "little")
    got = fletcher32(payload)
    # HDF5 also accepts the byte-swapped form older libraries wrote
    swapped = ((got & 0x00FF00FF) << 8) | ((got >> 8) & 0x00FF00FF)
    if stored != got and stored != swapped:
        raise ChecksumError(f"Fletcher-32 checksum mismatch (stored {stored:08x}, bytes {got:08x})")
    return payload


def has_checksum(ds) -> bool:
    """True if the h5py dataset ``ds`` carries the Fletcher-32 filter."""
    return bool(ds.fletcher32)
