"""Electron counting: raw frames plus a :class:`~streamstore.Calibration` -> :class:`EventBatch`.

``count(frames, calibration)`` is the one-call form; called frame after frame
it costs what the kernel costs: what counting derives from a calibration and
a frame type (integer threshold maps, the kernel's narrow maps, the row type
chosen from the first frame) is computed once and cached with the calibration,
which is immutable. A :class:`Counter` saves only the argument checks.

Three implementations share one specification (``_reference.py`` documents
it; ``docs/counting.md`` explains it): a plain numpy reference, the numba
kernel used here, and the C twin in ``native_ref/``.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from streamstore.events import EventBatch

if TYPE_CHECKING:  # pragma: no cover
    from streamstore.counting.calibration import Calibration

__all__ = ["Counter", "count"]

_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))
#: The counting rules, simplest first.
METHODS = ("peak", "resolve", "fit", "joint")


def _check_threads(threads: int | None) -> int | None:
    if threads is None:
        return None
    if isinstance(threads, bool) or int(threads) != threads or threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    return int(threads)


class Counter:
    """Reusable counter for frames of one dtype and one calibration.

    Parameters
    ----------
    calibration : Calibration
        Dark, noise, gain, mask and thresholds; fixes the frame shape.
    dtype : uint8 or uint16
        Type of the frames that will be counted.
    subpixel : bool, default False
        Also report each event's 4 x 4 sub-pixel cell ``(qy << 2) | qx``.
    threads : int, optional
        Number of threads for each call (None: numba's default, all cores).
    implementation : {"numba", "reference", "native"}, default "numba"
        "reference" is the plain numpy specification, "native" the C twin
        from ``native_ref`` (compiled on first use); both for tests and benchmarks.
    dose : bool, default True
        Fill ``EventBatch.electrons``: a :class:`~streamstore.counting.dose.DoseCorrector`
        pools the frames this Counter counts, call after call, and corrects each
        frame from the frames up to it. False: ``electrons`` stays None.
    method : {"peak", "resolve", "fit", "joint"}, default "peak"
        "peak": a pixel above ``n_sigma`` noise that is a 3 x 3 local maximum
        (``_reference.py``). "resolve": candidates at a lower threshold, accepted
        on the peak rule or on the charge of a 2 x 2 quadrant, and events split in
        two on charge and anisotropy (``_resolve_reference.py``); finds electrons
        whose charge is spread over several pixels, and some merged ones. Opt-in:
        not yet as fast. "fit": the events of "resolve" without its splits, each
        fitted with an electron's cloud beside its neighbours' clouds, placed at
        its cloud's centre and split where two clouds fit better
        (:mod:`streamstore.counting.fit`): finds more of the merged electrons and
        places events better, at about 13 us an event on one core (for counting
        after the fact). "joint": the events of "fit" as the clouds of one model
        of the frame, refitted together where they crowd, clouds added where the
        residual holds an electron and heavy ones tried as two
        (:mod:`streamstore.counting.joint`): finds most of the electrons "fit"
        loses at 0.05 e/px/frame, at some 70 us an electron more (after the fact).
    resolve : ResolveParams, optional
        Thresholds of the "resolve", "fit" and "joint" methods (default
        ``ResolveParams()``).
    electron_charge : float, optional
        One electron's gain-corrected charge in ADU, the split unit of "resolve".
        None: measured on the first call's frames
        (:func:`streamstore.counting.resolve.single_electron`) and kept; while
        too few electrons have been seen, nothing is split. The first call's
        frames also set how much wider the noise of a 2 x 2 sum is than
        independent pixels give (:func:`~streamstore.counting.resolve.quadrant_noise_factor`,
        ``Counter.noise_factor``) and, for "fit" and "joint", one electron's cloud width
        (:func:`~streamstore.counting.fit.cloud_width`, ``Counter.cloud_width``;
        no fits while too few lone electrons have been seen), so "resolve" and
        "fit" events depend on what the first call counted, never on the thread
        count.

    Notes
    -----
    Calling a Counter releases the GIL inside the kernel; it is safe to call
    one Counter from several Python threads. The dose correction of a frame
    depends on the frames counted before it, so calls from several threads get
    electrons that depend on the order the calls finish in (the events do not).
    """

    def __init__(
        self,
        calibration: Calibration,
        dtype: Any = np.uint16,
        *,
        subpixel: bool = False,
        threads: int | None = None,
        implementation: str = "numba",
        dose: bool = True,
        method: str = "peak",
        resolve: Any = None,
        electron_charge: float | None = None,
    ) -> None:
        from streamstore.counting.calibration import Calibration

        if not isinstance(calibration, Calibration):
            raise ValueError(
                f"calibration must be a streamstore.Calibration, got {type(calibration).__name__}"
            )
        dt = np.dtype(dtype)
        if dt not in _DTYPES:
            raise ValueError(f"frames must be uint8 or uint16, got dtype {dt}")
        if implementation not in ("numba", "reference", "native"):
            raise ValueError(
                f"implementation must be 'numba', 'reference' or 'native', got {implementation!r}"
            )
        if method not in METHODS:
            raise ValueError(
                f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}"
            )
        self.method = method
        self.resolve = None
        self.calibration = calibration
        self.dtype = dt
        self.kernel_dtype = calibration.frame_dtype(dt)
        self.subpixel = bool(subpixel)
        self.threads = _check_threads(threads)
        self.implementation = implementation
        self.frame_shape = calibration.frame_shape
        self._lo, self._dark, self._gain, self._xray_level = calibration.threshold_maps(dt)
        self._radius = calibration.xray_radius
        # what the numba kernel derives from the calibration (its maps, the row type
        # the first frame chose) lives in the calibration's cache, so a Counter built
        # per call, as count() does, costs no more than a reused one
        self._derived = calibration._derived()
        self._maps: tuple[np.ndarray, ...] | None = None
        self._unsigned_lo: np.ndarray | None = None
        self._unsigned_dark: np.ndarray | None = None
        self._wide_rows: bool | None = None
        self._dose = None
        if dose:
            from streamstore.counting.dose import DoseCorrector

            self._dose = DoseCorrector(
                self.frame_shape, calibration=calibration, dtype=dt, threads=self.threads
            )
        self._dose_lock = threading.Lock()

        if method != "peak":
            from streamstore.counting.resolve import ResolveParams, charge_units

            self.resolve = ResolveParams() if resolve is None else resolve
            if not isinstance(self.resolve, ResolveParams):
                raise ValueError("resolve must be a ResolveParams")
            self._e_unit: int | None = None
            #: one electron's anisotropy, measured on the first call's frames
            self.anisotropy: float | None = None
            #: widening of the quadrant noise, measured on the first call's frames
            self.noise_factor: float | None = None
            #: one electron's cloud width (px) for "fit", measured on the first call's frames
            self.cloud_width: float | None = None
            # the first call measures; a concurrent first call waits for it
            self._measure_lock = threading.Lock()
            if electron_charge is not None:
                e = float(electron_charge)
                if not (np.isfinite(e) and e > 0):
                    raise ValueError(f"electron_charge must be positive, got {electron_charge!r}")
                self._e_unit = max(1, int(round(e * charge_units(calibration, self.kernel_dtype))))

    def dose_model(self) -> dict | None:
        """The dose model and its current parameters (None with ``dose=False``)."""
        if self._dose is None:
            return None
        with self._dose_lock:
            return self._dose.model()

    def _prepare(self, frames: Any) -> np.ndarray:
        arr = np.asarray(frames)
        if arr.dtype != self.dtype:
            if arr.dtype in _DTYPES:
                raise ValueError(
                    f"frames have dtype {arr.dtype} but this Counter was built for {self.dtype}"
                )
            raise ValueError(f"frames must be uint8 or uint16, got dtype {arr.dtype}")
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise ValueError(f"frames must be (H, W) or (n, H, W), got shape {arr.shape}")
        if arr.shape[1:] != self.frame_shape:
            raise ValueError(
                f"frames have shape (H, W) = {arr.shape[1:]} but the calibration is for "
                f"{self.frame_shape}"
            )
        arr = np.ascontiguousarray(arr)
        if self.kernel_dtype != arr.dtype:
            arr = arr.view(self.kernel_dtype)
        return arr

    def __call__(self, frames: Any, *, _dose: bool = True) -> EventBatch:
        """Count ``frames`` ((H, W) or (n, H, W)); returns one batch entry per frame."""
        arr = self._prepare(frames)
        args = (
            arr,
            self._lo,
            self._dark,
            self._gain,
            self._xray_level,
            self._radius,
            self.subpixel,
        )
        if arr.shape[0] == 0:
            return EventBatch.empty(0, self.frame_shape, self.subpixel)
        if self.method != "peak":
            offsets, indices, sub = self._count_resolve(arr)
        elif self.implementation == "numba":
            from streamstore.counting._launch import count_frames
            from streamstore.counting._maps import (
                as_unsigned,
                frame_only_maps,
                kernel_maps,
                wide_rows_pay,
            )

            if self._maps is None:
                key = ("kernel_maps", self.kernel_dtype.str)
                if key not in self._derived:
                    # wrapped frames are counted as unsigned ones, with unsigned maps
                    lo, dark = as_unsigned(self._lo), as_unsigned(self._dark)
                    maps = kernel_maps(lo, dark)
                    # one dark level and threshold for every pixel (frames the camera
                    # dark-subtracted): the kernel streams only the frame
                    one = None if self._gain is not None else frame_only_maps(maps, lo.dtype)
                    self._derived[key] = (maps if one is None else (*maps, *one), lo, dark)
                self._maps, self._unsigned_lo, self._unsigned_dark = self._derived[key]
            if self._wide_rows is None:  # a speed choice only: the events are the same
                key = ("wide_rows", self.kernel_dtype.str)
                if key not in self._derived:
                    self._derived[key] = wide_rows_pay(arr[0], self._lo, self._dark)
                self._wide_rows = self._derived[key]
                if self._wide_rows:  # one-value maps come with byte rows only (no
                    self._maps = self._maps[:3]  # variant of their own for 16-bit rows)
            offsets, indices, sub = count_frames(
                arr,
                self._unsigned_lo,
                self._unsigned_dark,
                *args[3:],
                threads=self.threads,
                maps=self._maps,
                wide_rows=self._wide_rows,
            )
        elif self.implementation == "reference":
            from streamstore.counting._reference import count_reference

            offsets, indices, sub = count_reference(*args)
        else:
            from native_ref import count_native

            offsets, indices, sub = count_native(*args)
        batch = EventBatch(offsets, indices, sub, self.frame_shape, validate=False)
        if _dose and self._dose is not None:
            with self._dose_lock:
                batch = self._dose(batch, arr)
        return batch

    def _count_resolve(self, arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        from streamstore.counting.resolve import (
            quadrant_noise_factor,
            resolve_maps,
            single_electron,
        )

        with self._measure_lock:
            if self.noise_factor is None:
                self.noise_factor = quadrant_noise_factor(self.calibration, arr)
            key = ("resolve_maps", self.kernel_dtype.str, self.resolve, self.noise_factor)
            if key not in self._derived:
                self._derived[key] = resolve_maps(
                    self.calibration, self.dtype, self.resolve, self.noise_factor
                )
            maps = self._derived[key]
            if self.anisotropy is None:
                single = single_electron(arr, maps, self._radius)
                if single is not None:
                    if self._e_unit is None:
                        self._e_unit = single[0]
                    self.anisotropy = single[1]
        lo, lo_c, dark, gain, qthr, level = maps
        e_unit = 2**40 if self._e_unit is None else self._e_unit  # unknown: no splits
        if self.method in ("fit", "joint"):  # the fit splits, not the rule
            e_unit = 2**40
        # the joint fit starts from the fit's places to a quarter pixel
        subpixel = self.subpixel or self.method == "joint"
        args = (
            arr, lo, lo_c, dark, gain, qthr, level, self._radius, subpixel, e_unit,
            *self.resolve.integers(self.anisotropy or 0.0),
        )  # fmt: skip
        if self.implementation == "numba":
            from streamstore.counting._maps import as_unsigned
            from streamstore.counting._resolve_kernels import count_resolve_frames

            if self.kernel_dtype.kind == "i":  # wrapped: counted as unsigned, maps made once
                if key + ("unsigned",) not in self._derived:
                    self._derived[key + ("unsigned",)] = tuple(map(as_unsigned, (lo, lo_c, dark)))
                args = (arr, *self._derived[key + ("unsigned",)], *args[4:])
            found = count_resolve_frames(*args, threads=self.threads)
        elif self.implementation == "reference":
            from streamstore.counting._resolve_reference import count_resolve_reference

            found = count_resolve_reference(*args)
        else:
            from native_ref import count_resolve_native

            found = count_resolve_native(*args)
        if self.method in ("fit", "joint"):
            found = self._fit_splits(arr, dark, gain, found)
        if self.method == "joint" and self.cloud_width is not None and self._e_unit is not None:
            from streamstore.counting.joint import joint_events, joint_form

            found = joint_events(
                arr, maps, self._radius, self._fit_weights(gain),
                found, self._e_unit, self.cloud_width, self.resolve.fit_model_error,
                joint_form(self.implementation, self.threads),
            )  # fmt: skip
        if subpixel and not self.subpixel:
            found = (found[0], found[1], None)
        return found

    def _fit_weights(self, gain: np.ndarray | None) -> np.ndarray:
        """Each pixel's weight in the fits (:func:`~streamstore.counting.fit.fit_maps`),
        made once per calibration and frame type."""
        from streamstore.counting.fit import fit_maps

        key = ("fit_weights", self.kernel_dtype.str)
        if key not in self._derived:
            self._derived[key] = fit_maps(self.calibration, gain)
        return self._derived[key]

    def _fit_splits(
        self,
        arr: np.ndarray,
        dark: np.ndarray,
        gain: np.ndarray | None,
        found: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Method "fit": the events of ``found`` fitted, moved and split
        (:func:`~streamstore.counting.fit.fit_splits`)."""
        from streamstore.counting.fit import (
            cloud_width,
            event_windows,
            fit_forms,
            fit_splits,
        )

        windows = event_windows(
            arr, dark, gain, self._fit_weights(gain), found[0], found[1],
            self.resolve.fit_model_error, self.implementation,
        )  # fmt: skip
        with self._measure_lock:
            if self.cloud_width is None and self._e_unit is not None:
                # lone events of one electron's charge (0.8 to 1.2) give the width
                charge, win, iv, _, _, alone = windows
                q16 = 16 * charge
                one = alone & (q16 >= 13 * self._e_unit) & (q16 < 19 * self._e_unit)
                if one.sum() >= 50:
                    pick = np.flatnonzero(one)[:400]
                    self.cloud_width = cloud_width(win[pick], iv[pick], self.threads)
        if self.cloud_width is None or self._e_unit is None:
            return found
        _, _, fitter = fit_forms(self.implementation, self.threads)
        return fit_splits(
            arr.shape, windows, *found, self._e_unit, self.cloud_width, self.resolve.fit_drop,
            int(round(16 * self.resolve.fit_charge)), fitter,
        )  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"Counter(frame_shape={self.frame_shape}, dtype={self.dtype}, "
            f"subpixel={self.subpixel}, threads={self.threads}, "
            f"implementation={self.implementation!r}"
            + (f", method={self.method!r})" if self.method != "peak" else ")")
        )


def count(
    frames: Any,
    calibration: Calibration,
    *,
    subpixel: bool = False,
    threads: int | None = None,
    method: str = "peak",
    dose: bool = True,
) -> EventBatch:
    """Find the electron events in ``frames``.

    Parameters
    ----------
    frames : ndarray, shape (H, W) or (n, H, W), uint8 or uint16
        Raw frames; an (H, W) frame gives a batch of one frame.
    calibration : Calibration
        Per-pixel dark, noise, gain, mask and the thresholds.
    subpixel : bool, default False
        Also report the 4 x 4 sub-pixel cell of each event (centre of mass of
        the dark-subtracted 3 x 3 neighbourhood).
    threads : int, optional
        Threads to use (None: all cores). The result does not depend on it.
    method : {"peak", "resolve", "fit", "joint"}, default "peak"
        Counting rule (see :class:`Counter`); "resolve", "fit" and "joint" measure
        one electron's charge (and "fit" and "joint" its cloud's width) on these frames.
    dose : bool, default True
        Fill ``electrons`` (below). False: the events alone, ``electrons`` None
        (the dose model measures its areas from this call's frames: a one-frame
        call on 4092 x 5760 costs about 35 % more than the events alone on one
        thread, 60 % on two, where the model runs on one).

    Returns
    -------
    EventBatch
        Flat indices ``row * W + col`` ascending within each frame, and
        ``electrons`` (with ``dose``): per frame, the electrons estimated from the events,
        corrected for coincidence loss with the model pooled over the frames of
        this call (:func:`streamstore.counting.dose.corrected_electrons`).

    Raises
    ------
    ValueError
        Wrong frame shape or dtype, or a bad ``threads`` value.
    """
    from streamstore.counting.dose import corrected_electrons

    arr = np.asarray(frames)
    counter = Counter(
        calibration, arr.dtype, subpixel=subpixel, threads=threads, method=method, dose=False
    )
    batch = counter(arr)
    if not dose:
        return batch
    frames3 = arr.reshape((-1, *counter.frame_shape))
    electrons = corrected_electrons(batch, frames3, calibration, threads=counter.threads)
    return batch.with_electrons(electrons)
