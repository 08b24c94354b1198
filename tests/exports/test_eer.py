"""EER export, decoded by an independent decoder (tifffile + imagecodecs) page by page."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import streamstore
from streamstore import EventBatch, StoreWriter
from streamstore.exports.eer import CENTRE_CELL, encode_eer_frame, export_eer
from tests._cli_data import cli, make_store

tifffile = pytest.importorskip("tifffile")
pytest.importorskip("imagecodecs")

SHAPE = (24, 40)  # rows x cols, non-square on purpose
MISSING = (7, 8, 38)  # two inside the series, one after its last stored frame


def _subpixel_events(n_frames: int, seed: int, shape=SHAPE) -> EventBatch:
    """Seeded events with sub-pixel cells; some frames empty, one full, edge pixels hit."""
    rng = np.random.default_rng(seed)
    h, w = shape
    offsets, idx = [0], []
    for i in range(n_frames):
        p = (0.0, 0.004, 0.05, 0.4)[i % 4]
        hit = np.flatnonzero(rng.random(h * w) < p)
        if i == 5:
            hit = np.arange(h * w)  # every pixel: no run at all between events
        if i == 6:
            hit = np.array([0, 126, 127, 253, 254, 381, h * w - 1])  # runs at the escape
        idx.append(hit.astype(np.uint32))
        offsets.append(offsets[-1] + hit.size)
    indices = np.concatenate(idx)
    sub = rng.integers(0, 16, indices.size).astype(np.uint8)
    return EventBatch(np.array(offsets), indices, sub, shape)


@pytest.fixture(scope="module")
def sub_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("eer") / "sub.h5"
    n = 36
    events = _subpixel_events(n, 20261206)
    ids = np.array([i for i in range(n + 3) if i not in MISSING[:2]][:n])  # ids 0..37 without 7, 8
    with StoreWriter(path, SHAPE, frame_time_s=1e-3, pixel_size_A=0.9, subpixel=True) as w:
        w.append(events, ids, ids * 1_000_000)
        w.mark_missing(list(MISSING))
    return path


def _pages(path, superres=None):
    with tifffile.TiffFile(path, superres=superres) as tif:
        assert tif.is_eer
        return tif.asarray()


def _fine(ev: EventBatch) -> np.ndarray:
    """Frame 0 of ``ev`` on the 4 x 4 sub-pixel grid (the stored cells)."""
    h, w = ev.frame_shape
    out = np.zeros((4 * h, 4 * w), np.uint8)
    rows, cols = np.divmod(ev.indices.astype(np.int64), w)
    sub = ev.subpixel if ev.subpixel is not None else np.full(rows.size, CENTRE_CELL)
    out[4 * rows + (sub >> 2), 4 * cols + (sub & 3)] += 1
    return out


@pytest.mark.parametrize("rle_bits,compression", [(7, 65001), (8, 65002), (10, 65002)])
def test_every_page_decodes_to_the_stored_frame(sub_store, tmp_path, rle_bits, compression):
    out = tmp_path / "movie.eer"
    r = export_eer(sub_store, out, rle_bits=rle_bits, progress=False)
    assert r.compression == compression and r.subpixel and not r.notes[:0]
    with streamstore.open(sub_store) as st:
        ids = np.asarray(st.frame_ids)
        assert r.n_pages == 39 and np.array_equal(r.frame_ids, np.arange(39))
        assert r.missing_pages.tolist() == list(MISSING)
        coarse = _pages(out)
        fine = _pages(out, superres=2)
        assert coarse.shape == (39, *SHAPE)
        assert fine.shape == (39, 4 * SHAPE[0], 4 * SHAPE[1])
        for i in range(st.n_frames):
            page = int(ids[i])
            np.testing.assert_array_equal(coarse[page], st.frames(i, i + 1)[0], f"page {page}")
            np.testing.assert_array_equal(fine[page], _fine(st.events(i, i + 1)), f"page {page}")
        assert not coarse[list(MISSING)].any() and not fine[list(MISSING)].any()
        assert r.page_events.sum() == st.n_events == int(coarse.sum())


def _relion_7bit(strip: bytes, n_pixels: int):
    """RELION renderEER's 7-bit loop, transcribed: (positions, symbols) or a failure."""
    bits = np.unpackbits(np.frombuffer(strip, np.uint8), bitorder="little")
    weights = 1 << np.arange(11)

    def take(at, n):
        return int(bits[at : at + n] @ weights[:n])

    pos = n_pix = 0
    positions, symbols = [], []
    while True:
        p = take(pos, 7)
        pos += 7
        n_pix += p
        if n_pix >= n_pixels:
            break
        if p == 127:
            continue
        symbols.append(take(pos, 4) ^ 0x0A)
        pos += 4
        positions.append(n_pix)
        n_pix += 1
    assert n_pix == n_pixels, "RELION skips a frame whose pixel count is not exact"
    return np.array(positions, np.int64), np.array(symbols, np.int64)


def _libtiff_strips(path) -> list[bytes] | None:
    """Each page's raw strip, read the way RELION does (libtiff), or None without libtiff."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("tiff")
    if name is None:
        return None
    lib = ctypes.CDLL(name)
    handle, u32, i64 = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int64
    lib.TIFFOpen.restype, lib.TIFFOpen.argtypes = handle, [ctypes.c_char_p, ctypes.c_char_p]
    lib.TIFFNumberOfDirectories.restype, lib.TIFFNumberOfDirectories.argtypes = u32, [handle]
    lib.TIFFSetDirectory.argtypes = [handle, u32]
    lib.TIFFNumberOfStrips.restype, lib.TIFFNumberOfStrips.argtypes = u32, [handle]
    lib.TIFFRawStripSize.restype, lib.TIFFRawStripSize.argtypes = i64, [handle, u32]
    lib.TIFFReadRawStrip.restype = i64
    lib.TIFFReadRawStrip.argtypes = [handle, u32, ctypes.c_void_p, i64]
    lib.TIFFClose.argtypes = [handle]
    tif = lib.TIFFOpen(str(path).encode(), b"r")
    assert tif, "libtiff cannot open the export"
    strips = []
    try:
        for d in range(lib.TIFFNumberOfDirectories(tif)):
            assert lib.TIFFSetDirectory(tif, d) == 1 and lib.TIFFNumberOfStrips(tif) == 1
            size = lib.TIFFRawStripSize(tif, 0)
            buf = ctypes.create_string_buffer(size)
            assert lib.TIFFReadRawStrip(tif, 0, buf, size) == size
            strips.append(buf.raw)
    finally:
        lib.TIFFClose(tif)
    return strips


def test_relion_loop_reads_the_strips(sub_store, tmp_path):
    """libtiff + RELION's 7-bit loop (as RELION reads EER) give back the stored events."""
    out = tmp_path / "movie.eer"
    export_eer(sub_store, out, progress=False)
    strips = _libtiff_strips(out)
    if strips is None:  # no libtiff here: the same strips through tifffile's offsets
        with tifffile.TiffFile(out) as tif:
            strips = []
            for page in tif.pages:
                tif.filehandle.seek(page.dataoffsets[0])
                strips.append(tif.filehandle.read(page.databytecounts[0]))
    h, w = SHAPE
    with streamstore.open(sub_store) as st:
        ids = np.asarray(st.frame_ids)
        assert len(strips) == 39
        for i in range(st.n_frames):
            strip = strips[int(ids[i])]
            assert len(strip) % 2 == 0
            positions, symbols = _relion_7bit(strip, h * w)
            ev = st.events(i, i + 1)
            np.testing.assert_array_equal(positions, ev.indices)
            np.testing.assert_array_equal(symbols, ev.subpixel)
        for page in MISSING:
            assert _relion_7bit(strips[page], h * w)[0].size == 0


@pytest.mark.parametrize(
    "n_pixels,indices",
    [
        (254, []),  # an empty page that is exactly two escapes
        (256, []),
        (127, [126]),  # last pixel: the page ends with a zero run
        (381, [0, 253]),  # tail of 127: ends on an escape
        (400, [127, 255, 271]),  # gaps of exactly 127 and of 127 + 0
    ],
)
def test_runs_at_the_escape_boundaries(n_pixels, indices):
    import imagecodecs

    idx = np.array(indices, np.uint32)
    sub = (np.arange(idx.size) * 5 % 16).astype(np.uint8)
    strip = encode_eer_frame(idx, sub, n_pixels)
    coarse = imagecodecs.eer_decode(strip, (1, n_pixels), 7, 2, 2)
    assert np.flatnonzero(coarse).tolist() == indices
    positions, symbols = _relion_7bit(strip, n_pixels)
    assert positions.tolist() == indices and symbols.tolist() == sub.tolist()


def test_encoder_rejects_unsorted_indices():
    with pytest.raises(ValueError, match="ascend strictly"):
        encode_eer_frame(np.array([5, 3], np.uint32), None, 100)
    with pytest.raises(ValueError, match="ascend strictly"):
        encode_eer_frame(np.array([100], np.uint32), None, 100)


def test_store_without_subpixel_exports_centre_cell(tmp_path):
    path = make_store(tmp_path / "plain.h5", 12, shape=(16, 28), p=0.05, missing=())
    r = export_eer(path, tmp_path / "plain.eer", progress=False)
    assert not r.subpixel and any("centre cell" in n for n in r.notes)
    fine = _pages(tmp_path / "plain.eer", superres=2)
    with streamstore.open(path) as st:
        for i in range(st.n_frames):
            np.testing.assert_array_equal(fine[i], _fine(st.events(i, i + 1)))
            assert fine[i].reshape(16, 4, 28, 4)[:, [0, 1, 3]].sum() == 0  # only row 2 of 4
    assert "centre cell (2, 2)" in (tmp_path / "plain_dose.txt").read_text()


def _table(path):
    lines = path.read_text().splitlines()
    header = [ln for ln in lines if ln.startswith("#")]
    names = header[-1].lstrip("# ").split("\t")
    rows = np.array([[float(v) for v in ln.split("\t")] for ln in lines if ln[:1] != "#"])
    return "\n".join(header), names, rows


def test_dose_sidecar_grouping_fmint_and_gain(sub_store, tmp_path):
    out = tmp_path / "movie.eer"
    x = 5.0  # e/A^2 per fraction
    r = export_eer(sub_store, out, dose_per_fraction=x, unit="e/A2", progress=False)
    header, names, rows = _table(tmp_path / "movie_dose.txt")
    with streamstore.open(sub_store) as st:
        dose = st.dose(unit="e/A2")
        per_page = np.zeros(r.n_pages)
        per_page[np.asarray(st.frame_ids)] = dose
    assert rows.shape[0] == r.n_pages
    np.testing.assert_allclose(rows[:, names.index("e_per_A2")], per_page, rtol=1e-8)
    assert rows[:, names.index("stored")].tolist() == [
        0.0 if p in MISSING else 1.0 for p in range(r.n_pages)
    ]
    mean = per_page.mean()
    g = max(1, round(x / mean))
    assert r.grouping == g and r.dropped_frames == r.n_pages % g
    assert f"--eer_grouping {g}" in header and f"drops the last {r.n_pages % g} frames" in header
    assert r.fraction_dose == pytest.approx(
        per_page[: (r.n_pages // g) * g].sum() / (r.n_pages // g)
    )
    fm = np.loadtxt(tmp_path / "movie_fmint.txt", ndmin=2)
    assert fm[:, 0].sum() == r.n_pages and (fm[:-1, 0] == g).all() and (fm[:, 1] == fm[:, 0]).all()
    np.testing.assert_allclose(fm[:, 0] @ fm[:, 2], per_page.sum(), rtol=1e-5)
    gain = tifffile.imread(tmp_path / "movie_gain.tif")
    assert gain.shape == SHAPE and gain.dtype == np.float32 and (gain == 1).all()
    assert "gain reference movie_gain.tif: flat" in header
    assert "missing frames (never received, written as empty pages, zero dose): 3" in header
    assert f"streamstore file {r.store_bits_per_event:.4g}" in header
    # again without a dose per fraction: no grouping, and no stale -FmIntFile beside it
    r2 = export_eer(sub_store, out, overwrite=True, progress=False)
    assert r2.grouping is None and r2.fmint_path is None
    assert not (tmp_path / "movie_fmint.txt").exists()
    assert "no dose per fraction requested" in (tmp_path / "movie_dose.txt").read_text()


def test_export_memory_does_not_grow_with_the_series(tmp_path):
    """Holding one page at a time: 4x the frames costs (almost) no more memory.

    Event chunks of 4096 slots (about 9 frames) make both series longer than
    the reader's small chunk cache, so the cache is full in both and only what
    the export itself keeps per frame can differ.
    """
    peaks = []
    for n in (60, 240):
        path = make_store(
            tmp_path / f"m{n}.h5", n, shape=(96, 160), p=0.03, missing=(3,), chunk_events=4096
        )
        export_eer(path, tmp_path / "warm.eer", overwrite=True, progress=False)  # imports, caches
        with streamstore.open(path) as st:
            tracemalloc.start()
            export_eer(st, tmp_path / f"m{n}.eer", dose_per_fraction=0.1, progress=False)
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
            extra_events = int(st.n_events * 3 / 4)
    # the 180 extra frames' events take extra_events * 5 bytes; a page is ~460 events
    assert peaks[1] - peaks[0] < 64 * 180 + 20_000, peaks
    assert peaks[1] - peaks[0] < extra_events * 5 / 4, (peaks, extra_events)


def test_cli_eer(sub_store, tmp_path):
    out = tmp_path / "cli.eer"
    res = cli(
        "export", sub_store, out, "--format", "eer", "--dose-per-fraction", 2, "--unit", "e/A2"
    )
    assert res.returncode == 0, res.stderr
    assert "EER pages (compression 65001)" in res.stdout and "--eer_grouping" in res.stdout
    assert "missing frames: 3 written as empty pages" in res.stdout
    assert _pages(out).shape == (39, *SHAPE)
    for args, msg in [
        (("--rle-bits", "20"), "rle_bits must be 4-12"),
        (("--dtype", "uint8"), "--dtype does not apply to --format eer"),
        (("--overwrite", "--unit", "e/A2", "--dose-per-fraction", "-1"), "positive number"),
    ]:
        res = cli("export", sub_store, tmp_path / "bad.eer", "--format", "eer", *args)
        assert res.returncode == 2 and msg in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1
    res = cli("export", sub_store, out, "--format", "eer")
    assert res.returncode == 2 and "exists" in res.stderr
