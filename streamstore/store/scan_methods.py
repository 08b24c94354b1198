"""The scan (4D-STEM) methods of :class:`streamstore.Store`.

The scan geometry is the store's own (read from the file, or given by
:meth:`ScanMethods.with_scan`). The reductions (virtual detectors, centre of
mass, diffraction sums, radial profiles) are functions of a store in
:mod:`streamstore.analysis.stem`, a stage above the store: the store never
imports it. The methods here are a front for those functions, found by name
when first called (:func:`analysis_function`); ``tests/test_architecture.py``
checks that every name forwarded exists.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from streamstore.errors import UserError
from streamstore.scan import ScanGeometry, scan_positions

__all__ = ["ScanMethods", "analysis_function", "require_scan"]


def analysis_function(module: str, name: str) -> Callable[..., Any]:
    """The function ``name`` of ``streamstore.analysis.<module>``, imported now.

    The store stage sits below the analysis stage (docs/architecture.md), so
    its convenience methods reach the analysis code by name at call time, not
    by an import that would make the store depend on it.
    """
    return getattr(importlib.import_module(f"streamstore.analysis.{module}"), name)


def require_scan(store: Any) -> ScanGeometry:
    """The scan geometry of ``store``, or a UserError saying how to give one."""
    geom = store.scan
    if geom is None:
        raise UserError(
            f"{store.path} has no scan geometry (a movie, or a file written before scans "
            "were recorded); give one with store.with_scan(scan_shape, frames_per_position, "
            "flyback)"
        )
    return geom


class ScanMethods:
    """The scan methods of :class:`streamstore.Store` (4D-STEM)."""

    _scan_override: ScanGeometry | None = None

    @property
    def scan(self) -> ScanGeometry | None:
        """The scan geometry (``first_frame_id`` resolved), or None for a series without one.

        From :meth:`with_scan` if set, else from the file (written from the start
        message's ``scan_shape``/``frames_per_position``, or ``StoreWriter(scan=...)``).
        """
        geom = self._scan_override
        if geom is None:
            if "_scan_file" not in self.__dict__:  # attribute reads cost ~1 ms: once
                f = getattr(self, "_f", None)
                if f is not None:
                    found = ScanGeometry.from_attrs(f.attrs)
                elif getattr(self, "shards", None):
                    found = self.shards[0].scan
                else:
                    found = None
                self.__dict__["_scan_file"] = found
            geom = self.__dict__["_scan_file"]
        if geom is None:
            return None
        return geom.resolved(self.frame_ids, self.missing_frame_ids)  # type: ignore[attr-defined]

    def with_scan(
        self,
        scan_shape: tuple[int, int],
        frames_per_position: int = 1,
        flyback: int = 0,
        *,
        first_frame_id: int | None = None,
    ) -> Any:
        """This store seen as a scan of ``scan_shape`` positions (the file is not changed).

        Parameters
        ----------
        scan_shape : (rows, cols)
            Probe positions kept.
        frames_per_position : int, default 1
            Consecutive frames per position.
        flyback : int, default 0
            Positions at the end of each scan row to drop.
        first_frame_id : int, optional
            Frame id of the scan's first frame; default the lowest id of the
            series, stored or missing.

        Returns
        -------
        Store
            A view sharing this store's open file (closing either closes both).
        """
        view = copy.copy(self)
        view._scan_override = ScanGeometry(
            tuple(scan_shape), frames_per_position, flyback, first_frame_id
        )  # type: ignore[arg-type]
        return view

    def scan_positions(self) -> np.ndarray:
        """Flat scan position (``row * cols + col``) of each stored frame; -1 for none."""
        return scan_positions(require_scan(self), self.frame_ids)  # type: ignore[attr-defined]

    def scan_coverage(self, scan_roi: Sequence[int] | None = None) -> np.ndarray:
        """Stored frames per position, int64 ``(rows, cols)`` (short where frames were lost)."""
        return analysis_function("stem", "scan_coverage")(self, scan_roi)

    def virtual_image(
        self,
        inner_radius: float | None = None,
        outer_radius: float | None = None,
        center: tuple[float, float] | None = None,
        *,
        mask: Any = None,
        scan_roi: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Virtual detector image: per scan position, the events inside a detector.

        Parameters
        ----------
        inner_radius, outer_radius : float
            Annular detector ``inner**2 <= d**2 < outer**2`` (``inner_radius=0``:
            a bright-field disk).
        center : (row, col), optional
            Detector centre in pixels; None: the centre of mass of the summed
            pattern of the selected positions.
        mask : array_like (H, W), optional
            Any detector instead of radii: boolean/integer (nonzero = in), or
            float weights.
        scan_roi : (row0, row1, col0, col1), optional
            Scan region; default the whole scan.

        Returns
        -------
        ndarray (rows, cols)
            int64 counts (float64 for a float mask).
        """
        return analysis_function("stem", "virtual_image")(
            self, inner_radius, outer_radius, center, mask=mask, scan_roi=scan_roi
        )

    def virtual_images(
        self,
        radii: Sequence[tuple[float, float]],
        center: tuple[float, float] | None = None,
        *,
        scan_roi: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Several annular detectors at once (bright field, annular dark field, ...).

        Each detector equals :meth:`virtual_image` with the same radii and
        centre. Detectors that share no pixel are counted in one pass over the
        events (the file is read and decompressed once, as stempy's
        ``create_stem_images`` takes several radii); overlapping ones cost a
        pass each.

        Parameters
        ----------
        radii : sequence of (inner_radius, outer_radius)
            One annulus ``inner**2 <= d**2 < outer**2`` per detector.
        center : (row, col), optional
            Common centre in pixels; None: the centre of mass of the summed
            pattern of the selected positions.
        scan_roi : (row0, row1, col0, col1), optional
            Scan region; default the whole scan.

        Returns
        -------
        ndarray (n_detectors, rows, cols)
            int64 counts.
        """
        return analysis_function("stem", "virtual_images")(self, radii, center, scan_roi=scan_roi)

    def virtual_images_and_com(
        self,
        radii: Sequence[tuple[float, float]],
        center: tuple[float, float] | None = None,
        *,
        scan_roi: Sequence[int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`virtual_images` and :meth:`center_of_mass` (no mask) in one pass.

        The first analyses of a scan, bright field, dark field and centre of
        mass, from one read and decompression of the events instead of two.

        Returns
        -------
        images : ndarray (n_detectors, rows, cols)
            int64 counts, as :meth:`virtual_images`.
        com : ndarray (2, rows, cols)
            As :meth:`center_of_mass`.
        """
        return analysis_function("stem", "virtual_images_and_com")(
            self, radii, center, scan_roi=scan_roi
        )

    def center_of_mass(
        self, mask: Any = None, *, scan_roi: Sequence[int] | None = None
    ) -> np.ndarray:
        """Centre of mass of each position's events (differential phase contrast).

        Parameters
        ----------
        mask : array_like (H, W), optional
            Count only events on nonzero pixels; default all.
        scan_roi : (row0, row1, col0, col1), optional
            Scan region.

        Returns
        -------
        ndarray (2, rows, cols) float64
            Index 0: row (y) coordinate, index 1: column (x) coordinate, in
            detector pixels; NaN at positions without events.
        """
        return analysis_function("stem", "center_of_mass")(self, mask, scan_roi=scan_roi)

    def diffraction_sum(self, scan_roi: Sequence[int] | None = None) -> np.ndarray:
        """Summed diffraction pattern (uint32 ``(H, W)``) of the positions in ``scan_roi``."""
        return analysis_function("stem", "diffraction_sum")(self, scan_roi)

    def radial_profile(
        self,
        center: tuple[float, float] | None = None,
        bins: Any = None,
        *,
        scan_roi: Sequence[int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Events per ring around ``center``, for every scan position.

        Parameters
        ----------
        center : (row, col), optional
            Default: the centre of mass of the summed pattern.
        bins : int or sequence of float, optional
            Ring edges in pixels as ``numpy.histogram`` takes them (ring ``k`` is
            ``[e_k, e_k+1)``, the last one closed); an int ``n`` makes ``n``
            equal rings from 0 to the farthest pixel; default rings 1 pixel wide
            (edges ``0, 1, 2, ...``) covering the frame.
        scan_roi : (row0, row1, col0, col1), optional
            Scan region.

        Returns
        -------
        profile : ndarray (n_rings, rows, cols) int64
            Summed over the scan axes it is the radial profile of the region's
            summed pattern.
        edges : ndarray (n_rings + 1,)
        """
        return analysis_function("stem", "radial_profile")(self, center, bins, scan_roi=scan_roi)
