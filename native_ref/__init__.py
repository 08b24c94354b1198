"""native_ref: plain C twins of streamstore's hot kernels, built on first use.

The C sources (``count.c``, the peak rule; ``resolve.c``, the resolve rule;
``fit.c``, the cloud fit of the "fit" rule and the windows and neighbours it is
given; ``joint.c``, the joint fit of a frame's clouds)
are compiled with the system C compiler (``cc -O3 -march=native -shared -fPIC
-std=c99 -ffp-contract=off``: no fused multiply-add, so the resolve rule's
float64 test rounds as numpy and numba do; ``$CC`` overrides ``cc``) into
``native_ref/build/`` the first
time it is needed, and loaded through ctypes. Nothing is built at install
time. The library name carries a hash of the source and the compiler flags,
so an edit rebuilds it, and concurrent first uses are safe (each compiles to
a private temporary name and renames atomically).

It is the correctness oracle (parity tests) and the speed anchor
(``benchmarks/counting.py``) of the numba kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

__all__ = [
    "NativeBuildError",
    "count_native",
    "count_resolve_native",
    "fit_windows_native",
    "joint_frame_native",
    "library_path",
    "neighbours_native",
    "window_pixels_native",
    "load",
]

_HERE = Path(__file__).resolve().parent
_SOURCES = ("count.c", "resolve.c", "fit.c", "joint.c")
_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c99", "-ffp-contract=off")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None

_SUFFIX = {
    np.dtype(np.uint8): "u8",
    np.dtype(np.uint16): "u16",
    np.dtype(np.int8): "i8",
    np.dtype(np.int16): "i16",
}


class NativeBuildError(RuntimeError):
    """The C compiler is missing or failed; the message holds its output."""


def _build_dir() -> Path:
    d = os.environ.get("STREAMSTORE_NATIVE_BUILD")
    if d:
        return Path(d)
    local = _HERE / "build"
    try:
        local.mkdir(exist_ok=True)
        if os.access(local, os.W_OK):
            return local
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / "streamstore-native-build"


def library_path() -> Path:
    """Where the shared library for the current sources and flags lives (or will)."""
    cc = os.environ.get("CC", "cc")
    h = hashlib.sha256(" ".join((cc, *_FLAGS)).encode())
    for name in _SOURCES:
        h.update((_HERE / name).read_bytes())
    return _build_dir() / f"libstreamstore_native_{h.hexdigest()[:16]}.so"


def _compile(target: Path) -> None:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise NativeBuildError(f"C compiler {cc!r} not found (set $CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [cc, *_FLAGS, "-o", tmp, *(str(_HERE / s) for s in _SOURCES)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise NativeBuildError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    os.replace(tmp, target)


def load() -> ctypes.CDLL:
    """Build (if needed) and load the native library."""
    global _lib
    with _lock:
        if _lib is None:
            path = library_path()
            if not path.exists():
                _compile(path)
            lib = ctypes.CDLL(str(path))
            p = ctypes.c_void_p
            i64 = ctypes.c_int64
            for suffix in _SUFFIX.values():
                fn = getattr(lib, f"count_{suffix}")
                fn.restype = i64
                fn.argtypes = [p, i64, i64, i64, p, p, p, i64, i64, ctypes.c_int32, i64, p, p, p]
                fn = getattr(lib, f"resolve_{suffix}")
                fn.restype = i64
                fn.argtypes = [p, i64, i64, i64, p, p, p, p, p, i64, i64, ctypes.c_int32,
                               i64, i64, i64, i64, p, p, p]  # fmt: skip
            d = ctypes.c_double
            lib.fit_windows.restype = i64
            lib.fit_windows.argtypes = [p, p, p, p, i64, i64, p, p, i64, d, d, d, p, p, i64, p, p]
            lib.fit_window_pixels.restype = None
            lib.fit_window_pixels.argtypes = [p, i64, i64, p, p, ctypes.c_int32, p, p, p, p, i64,
                                              d, p, p, p]  # fmt: skip
            lib.fit_neighbours.restype = None
            lib.fit_neighbours.argtypes = [p, p, p, p, i64, i64, i64, i64, i64, p, p, p, p, p]
            lib.joint_frame.restype = i64
            lib.joint_frame.argtypes = [p, p, i64, i64, p, i64, d, d, p, p, i64, d, d, p,
                                        ctypes.POINTER(p), ctypes.POINTER(p)]  # fmt: skip
            lib.joint_free.restype = None
            lib.joint_free.argtypes = [p]
            lib.joint_conf_size.restype = i64
            lib.joint_conf_size.argtypes = []
            _lib = lib
        return _lib


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def count_native(
    frames: np.ndarray,
    lo: np.ndarray,
    dark: np.ndarray,
    gain: np.ndarray | None,
    xray_level: int,
    radius: int,
    subpixel: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """C counting of ``frames (n, H, W)``; same inputs and outputs as the numba kernel.

    The inputs are those of :func:`streamstore.counting._reference.count_reference`.
    Returns ``(offsets int64, indices uint32, subpixel uint8 or None)``.
    """
    if frames.ndim != 3:
        raise ValueError(f"frames must be (n, H, W), got shape {frames.shape}")
    suffix = _SUFFIX.get(frames.dtype)
    if suffix is None:
        raise ValueError(f"frames must be uint8, uint16, int8 or int16, got {frames.dtype}")
    n, h, w = frames.shape
    frames = np.ascontiguousarray(frames)
    lo = np.ascontiguousarray(lo, dtype=frames.dtype)
    dark = np.ascontiguousarray(dark, dtype=frames.dtype)
    maps = [("lo", lo), ("dark", dark)]
    if gain is not None:
        gain = np.ascontiguousarray(gain, dtype=np.uint16)
        maps.append(("gain", gain))
    for name, m in maps:
        if m.shape != (h, w):
            raise ValueError(f"{name} has shape {m.shape}, expected {(h, w)}")
    cap = n * ((h + 1) // 2) * ((w + 1) // 2)  # no two events are 8-adjacent
    out_idx = np.empty(max(cap, 1), np.uint32)
    out_sub = np.empty(max(cap, 1) if subpixel else 1, np.uint8)
    offsets = np.zeros(n + 1, np.int64)
    fn = getattr(load(), f"count_{suffix}")
    k = fn(
        _ptr(frames), n, h, w, _ptr(lo), _ptr(dark), None if gain is None else _ptr(gain),
        int(xray_level), int(radius), int(bool(subpixel)), cap,
        _ptr(out_idx), _ptr(out_sub), _ptr(offsets),
    )  # fmt: skip
    if k == -2:
        raise MemoryError("native count: out of memory walking a plateau")
    if k < 0:
        raise RuntimeError("native count: output capacity exceeded (a bug: please report)")
    indices = out_idx[:k].copy()
    sub = out_sub[:k].copy() if subpixel else None
    return offsets, indices, sub


def count_resolve_native(
    frames: np.ndarray,
    lo: np.ndarray,
    lo_c: np.ndarray,
    dark: np.ndarray,
    gain: np.ndarray | None,
    qthr: np.ndarray,
    xray_level: int,
    radius: int,
    subpixel: bool,
    e_unit: int,
    pair16: int,
    any16: int,
    spread16: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """C form of the resolve rule (``resolve.c``); the inputs and outputs of
    :func:`streamstore.counting._resolve_reference.count_resolve_reference`."""
    if frames.ndim != 3:
        raise ValueError(f"frames must be (n, H, W), got shape {frames.shape}")
    suffix = _SUFFIX.get(frames.dtype)
    if suffix is None:
        raise ValueError(f"frames must be uint8, uint16, int8 or int16, got {frames.dtype}")
    n, h, w = frames.shape
    frames = np.ascontiguousarray(frames)
    maps = {
        "lo": np.ascontiguousarray(lo, dtype=frames.dtype),
        "lo_c": np.ascontiguousarray(lo_c, dtype=frames.dtype),
        "dark": np.ascontiguousarray(dark, dtype=frames.dtype),
        "qthr": np.ascontiguousarray(qthr, dtype=np.int64),
    }
    if gain is not None:
        maps["gain"] = np.ascontiguousarray(gain, dtype=np.uint16)
    for name, m in maps.items():
        if m.shape != (h, w):
            raise ValueError(f"{name} has shape {m.shape}, expected {(h, w)}")
    cap = max(n * h * w, 1)  # events sit on distinct pixels
    out_idx = np.empty(cap, np.uint32)
    out_sub = np.empty(cap if subpixel else 1, np.uint8)
    offsets = np.zeros(n + 1, np.int64)
    fn = getattr(load(), f"resolve_{suffix}")
    g = maps.get("gain")
    k = fn(
        _ptr(frames), n, h, w, _ptr(maps["lo"]), _ptr(maps["lo_c"]), _ptr(maps["dark"]),
        None if g is None else _ptr(g), _ptr(maps["qthr"]), min(int(xray_level), 2**62),
        int(radius), int(bool(subpixel)), int(e_unit), int(pair16), int(any16), int(spread16),
        _ptr(out_idx), _ptr(out_sub), _ptr(offsets),
    )  # fmt: skip
    if k < 0:
        raise MemoryError("native resolve: out of memory")
    indices = out_idx[:k].copy()
    sub = out_sub[:k].copy() if subpixel else None
    return offsets, indices, sub


def fit_windows_native(
    win: np.ndarray,
    iv: np.ndarray,
    nb: np.ndarray,
    nn: np.ndarray,
    cdf: np.ndarray,
    pdf: np.ndarray,
    t0: float,
    inv_h: float,
    width: float,
    drop: np.ndarray | float,
) -> np.ndarray:
    """C form of the cloud fit (``fit.c``); the inputs and output of
    :func:`streamstore.counting._fit_reference.fit_windows_reference`."""
    from streamstore.counting._fit_reference import STARTS, fit_conf, fit_inputs

    win, iv, nb, nn, cdf, pdf, drop = fit_inputs(win, iv, nb, nn, cdf, pdf, drop)
    m = win.shape[0]
    starts = np.ascontiguousarray(STARTS, np.float64)
    conf = fit_conf()
    out = np.zeros((m, 13), np.float64)
    rc = load().fit_windows(
        _ptr(win), _ptr(iv), _ptr(nb), _ptr(nn), m, nb.shape[1], _ptr(cdf), _ptr(pdf), cdf.size,
        float(t0), float(inv_h), float(width), _ptr(drop), _ptr(starts), starts.shape[0],
        _ptr(conf), _ptr(out),
    )  # fmt: skip
    if rc != 0:
        raise ValueError("native fit: more neighbours than fit.c holds (4 at most)")
    return out


def window_pixels_native(
    frames: np.ndarray,
    dark: np.ndarray,
    gain: np.ndarray | None,
    iv_map: np.ndarray,
    frame_of: np.ndarray,
    r: np.ndarray,
    c: np.ndarray,
    model_error: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """C form of the fit's windows (``fit.c``); the inputs and output of
    :func:`streamstore.counting._fit_reference.window_pixels_reference`."""
    n, h, w = frames.shape
    m = r.size
    i64 = [np.ascontiguousarray(a, np.int64) for a in (frames, dark, frame_of, r, c)]
    g = np.ascontiguousarray(np.ones((1,)) if gain is None else gain, np.int64)
    iv = np.ascontiguousarray(iv_map, np.float64)
    win = np.zeros((m, 25), np.float64)
    wiv = np.zeros((m, 25), np.float64)
    charge = np.zeros(m, np.int64)
    frames64, dark64, fo, rr, cc = i64
    load().fit_window_pixels(
        _ptr(frames64), h, w, _ptr(dark64), _ptr(g), int(gain is not None), _ptr(iv), _ptr(fo),
        _ptr(rr), _ptr(cc), m, float(model_error), _ptr(win), _ptr(wiv), _ptr(charge),
    )  # fmt: skip
    return charge, win, wiv


def neighbours_native(
    key: np.ndarray,
    r: np.ndarray,
    c: np.ndarray,
    charge: np.ndarray,
    h: int,
    w: int,
    reach: int,
    most: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """C form of the events fitted beside each event (``fit.c``); the inputs and output
    of :func:`streamstore.counting._fit_reference.neighbours_reference`."""
    key, r, c, charge = (np.ascontiguousarray(a, np.int64) for a in (key, r, c, charge))
    m = key.size
    nb = np.zeros((m, most, 3), np.float64)
    nn = np.zeros(m, np.int64)
    alone = np.zeros(m, np.uint8)
    room = (2 * reach + 1) * (reach + 1)
    ck = np.zeros(room, np.int64)
    ci = np.zeros(room, np.int64)
    load().fit_neighbours(
        _ptr(key), _ptr(r), _ptr(c), _ptr(charge), m, int(h), int(w), int(reach), int(most),
        _ptr(nb), _ptr(nn), _ptr(alone), _ptr(ck), _ptr(ci),
    )  # fmt: skip
    return nb, nn, alone.astype(bool)


def joint_frame_native(
    signal: np.ndarray,
    iv: np.ndarray,
    starts: np.ndarray,
    e: float,
    width: float,
    cdf: np.ndarray,
    pdf: np.ndarray,
    t0: float,
    inv_h: float,
    conf: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """C form of one frame's joint fit (``joint.c``); the inputs and output of
    :func:`streamstore.counting._joint_reference.joint_frames_reference`:
    ``(clouds (n', 4) float64, event (n',) uint8)``."""
    from streamstore.counting._joint_reference import joint_inputs

    signal, iv, starts, cdf, pdf = joint_inputs(signal, iv, starts, cdf, pdf)
    conf = np.ascontiguousarray(conf, np.float64)
    lib = load()
    if conf.shape != (lib.joint_conf_size(),):
        raise ValueError(
            f"conf must be joint_conf()'s {lib.joint_conf_size()} numbers, got shape {conf.shape}"
        )
    h, w = signal.shape
    out_cl = ctypes.c_void_p()
    out_ev = ctypes.c_void_p()
    n = lib.joint_frame(
        _ptr(signal), _ptr(iv), h, w, _ptr(starts), starts.shape[0], float(e), float(width),
        _ptr(cdf), _ptr(pdf), cdf.size, float(t0), float(inv_h), _ptr(conf),
        ctypes.byref(out_cl), ctypes.byref(out_ev),
    )  # fmt: skip
    if n < 0:
        raise MemoryError("native joint fit: out of memory")
    try:
        clouds = np.empty((n, 4), np.float64)
        event = np.empty(n, np.uint8)
        if n:
            ctypes.memmove(_ptr(clouds), out_cl, clouds.nbytes)
            ctypes.memmove(_ptr(event), out_ev, event.nbytes)
    finally:
        lib.joint_free(out_cl)
        lib.joint_free(out_ev)
    return clouds, event
