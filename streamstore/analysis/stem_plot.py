"""The ``streamstore show --virtual`` figure: a virtual detector image of a 4D-STEM scan.

Left, the summed diffraction pattern (log scale) with the detector drawn on
it; right, the virtual bright-field or annular dark-field image, or the two
centre-of-mass components, over the scan with the scan axes labelled (scan
row down, scan column across, as stored). Without radii the bright-field disk
is found from the summed pattern (:func:`find_disk`): BF is that disk, ADF the
annulus from 1.5 to 3 disk radii.

matplotlib is imported only when a figure is drawn (Agg canvas).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from streamstore.errors import UserError

__all__ = ["VIRTUAL_KINDS", "find_disk", "save_virtual", "virtual_figure"]

VIRTUAL_KINDS = ("bf", "adf", "com")


def find_disk(pattern: np.ndarray) -> tuple[tuple[float, float], float]:
    """Centre ``(row, col)`` and radius of the bright disk of a summed pattern.

    The centre is the centre of mass of the pixels brighter than halfway
    between the pattern's median and its (lightly smoothed) maximum, so a
    diffuse background does not pull it; the radius is that of a disk with
    the area of those pixels.
    """
    from scipy.ndimage import uniform_filter

    img = np.asarray(pattern, np.float64)
    if img.sum() <= 0:
        raise UserError("the scan holds no events: nothing to show")
    smooth = uniform_filter(img, 3, mode="nearest")
    half = (smooth.max() + np.median(smooth)) / 2
    bright = np.where(smooth >= half, smooth, 0.0)
    total = bright.sum()
    h, w = img.shape
    cr = float(bright.sum(axis=1) @ np.arange(h) / total)
    cc = float(bright.sum(axis=0) @ np.arange(w) / total)
    # the radius of a disk of the bright area: counting losses can dim the
    # disk's middle, so a walk outwards from the centre would stop too early
    radius = float(np.sqrt(np.count_nonzero(bright) / np.pi))
    return (cr, cc), max(radius, 1.0)


def virtual_figure(
    store: Any,
    kind: str,
    *,
    inner: float | None = None,
    outer: float | None = None,
    center: tuple[float, float] | None = None,
    dpi: int = 100,
    title: str = "",
) -> Any:
    """Draw the virtual ``kind`` ("bf", "adf" or "com") of a scanned store; return the Figure."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle
    from matplotlib.ticker import MaxNLocator

    if kind not in VIRTUAL_KINDS:
        raise UserError(f"virtual must be one of {VIRTUAL_KINDS}, got {kind!r}")
    if store.scan is None:
        raise UserError(
            f"{store.path} has no scan geometry; give it with --scan ROWS,COLS[,FRAMES[,FLYBACK]]"
        )
    pattern = store.diffraction_sum()
    found_c, radius = find_disk(pattern)
    c = found_c if center is None else center
    if kind == "bf":
        inner, outer = (0.0 if inner is None else inner), (radius if outer is None else outer)
    elif kind == "adf":
        inner = 1.5 * radius if inner is None else inner
        outer = 3.0 * radius if outer is None else outer
    rows, cols = store.scan.scan_shape
    n_maps = 2 if kind == "com" else 1
    fig = Figure(figsize=(4.5 * (1 + n_maps), 4.5), dpi=dpi, layout="constrained")
    axes = fig.subplots(1, 1 + n_maps)
    ax = axes[0]
    ax.imshow(np.log1p(pattern), cmap="gray", interpolation="nearest")
    ax.set_title("summed diffraction pattern (log)")
    ax.set_xlabel("detector column (px)")
    ax.set_ylabel("detector row (px)")
    if kind == "com":
        com = store.center_of_mass()
        maps = [com[0] - np.nanmean(com[0]), com[1] - np.nanmean(com[1])]
        names = ["centre of mass, row shift (px)", "centre of mass, column shift (px)"]
        ax.plot([c[1]], [c[0]], "r+", markersize=12)
        cmap = "RdBu_r"
    else:
        maps = [store.virtual_image(inner, outer, c)]
        names = [f"virtual {kind.upper()}: r {inner:.1f}-{outer:.1f} px (counts)"]
        for rad in (inner, outer):
            if rad and rad > 0:
                ax.add_patch(Circle((c[1], c[0]), rad, fill=False, color="tab:red", lw=1.2))
        cmap = "gray"
    for ax, m, name in zip(axes[1:], maps, names, strict=True):
        if kind == "com":
            lim = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0
            im = ax.imshow(m, cmap=cmap, vmin=-lim, vmax=lim, interpolation="nearest")
        else:
            im = ax.imshow(m, cmap=cmap, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f"scan column (0-{cols - 1})")
        ax.set_ylabel(f"scan row (0-{rows - 1})")
        fig.colorbar(im, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


def save_virtual(store: Any, out: str | Path, kind: str, **kwargs: Any) -> Path:
    """Draw :func:`virtual_figure` and write it as PNG; return ``out``."""
    out = Path(out)
    if not out.parent.exists():
        raise UserError(f"the folder {out.parent} does not exist")
    fig = virtual_figure(store, kind, **kwargs)
    fig.savefig(out, format="png")
    return out
