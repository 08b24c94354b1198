"""The ``streamstore show`` figure: a stored series at a glance.

Left, the summed counts image of a window of frames (linear or log colour
scale, robust limits so a few hot pixels do not wash it out, an optional ROI
box); right, the dose per frame over time with missing frames marked and the
summed window shaded, and below it the cumulative dose.

matplotlib is an optional extra (``pip install 'streamstore[plot]'``); it is
imported only when a figure is drawn, with the Agg canvas (no display, no
pyplot global state).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from streamstore.errors import UserError
from streamstore.exports.progress import Progress
from streamstore.store.selection import check_roi, check_window

__all__ = ["summary_figure", "save_summary", "summed_image", "FIGSIZE_IN", "DEFAULT_DPI"]

#: figure size in inches (width, height); the PNG is FIGSIZE_IN * dpi pixels
FIGSIZE_IN = (13.0, 6.5)
#: default resolution of the PNG
DEFAULT_DPI = 100

# images larger than this (in either axis) are block-summed for display
_MAX_DISPLAY_PX = 1400
# a progress bar appears for windows with more events than this
_CHUNK_EVENTS = 20_000_000

_UNIT_LABEL = {"events": "events", "e/px": "e$^-$/px", "e/A2": "e$^-$/Å$^2$"}


def summed_image(
    store: Any,
    start: int | None = None,
    stop: int | None = None,
    *,
    progress: bool | None = None,
) -> np.ndarray:
    """Summed counts of frames ``start:stop`` (int64), in chunks with a progress bar.

    Parameters
    ----------
    store : Store
        An open store.
    start, stop : int or None, default None
        Stored-frame window, ``stop`` exclusive; None means the series ends.
    progress : bool or None, default None
        Progress bar (None: only on a terminal).

    Returns
    -------
    ndarray of int64, shape (H, W)
    """
    a, b = check_window(store.n_frames, start, stop, empty_ok=False, need_frames=True)
    counts = np.asarray(store.event_counts[a:b], dtype=np.int64)
    # cut the window where the running event count crosses multiples of a chunk
    cum = np.cumsum(counts)
    cuts = np.searchsorted(cum, np.arange(_CHUNK_EVENTS, cum[-1] if cum.size else 0, _CHUNK_EVENTS))
    edges = np.unique(np.concatenate([[0], cuts + 1, [b - a]]).clip(0, b - a)) + a
    img = np.zeros(tuple(store.frame_shape), dtype=np.int64)
    with Progress(b - a, "sum", "frame", enabled=progress if len(edges) > 2 else False) as bar:
        for i, j in zip(edges[:-1], edges[1:], strict=True):
            img += np.asarray(store.sum(int(i), int(j)), dtype=np.int64)
            bar.update(int(j - i))
    return img


def _times_s(store: Any) -> tuple[np.ndarray, np.ndarray, str]:
    """Time of each stored and each missing frame, seconds from the first frame."""
    ids = np.asarray(store.frame_ids, dtype=np.int64)
    ts = np.asarray(store.timestamps_ns, dtype=np.int64)
    missing = np.asarray(getattr(store, "missing_frame_ids", np.zeros(0)), dtype=np.int64)
    ft = getattr(store, "frame_time_s", None) or None
    good_ts = ts.size > 1 and np.all(np.diff(ts) > 0)
    if good_ts:
        t = (ts - ts[0]) / 1e9
        if ids.size > 1 and missing.size:
            order = np.argsort(ids)
            tm = np.interp(missing, ids[order], t[order])
            if ft:  # outside the stored range: extrapolate with the frame time
                tm = np.where(missing < ids.min(), (missing - ids.min()) * ft, tm)
                tm = np.where(missing > ids.max(), t[order][-1] + (missing - ids.max()) * ft, tm)
        else:
            tm = np.zeros(0)
        return t, tm, "time since first frame (s)"
    if ft:
        base = ids.min() if ids.size else 0
        return (ids - base) * ft, (missing - base) * ft, "time since first frame (s)"
    base = ids.min() if ids.size else 0
    return (ids - base).astype(float), (missing - base).astype(float), "frame id"


def _bin_for_display(img: np.ndarray) -> tuple[np.ndarray, int]:
    f = int(np.ceil(max(img.shape) / _MAX_DISPLAY_PX))
    if f <= 1:
        return img, 1
    h, w = img.shape
    hp, wp = -(-h // f) * f, -(-w // f) * f
    pad = np.zeros((hp, wp), dtype=img.dtype)
    pad[:h, :w] = img
    return pad.reshape(hp // f, f, wp // f, f).sum(axis=(1, 3)), f


def _running_mean(y: np.ndarray, k: int) -> np.ndarray:
    c = np.cumsum(np.concatenate([[0.0], y]))
    out = (c[k:] - c[:-k]) / k
    pad = k // 2
    return np.concatenate([np.full(pad, np.nan), out, np.full(y.size - out.size - pad, np.nan)])


def summary_figure(
    store: Any,
    *,
    start: int | None = None,
    stop: int | None = None,
    roi: Any = None,
    log: bool = False,
    unit: str | None = None,
    title: str | None = None,
    dpi: int = DEFAULT_DPI,
    progress: bool | None = None,
) -> Any:
    """Draw the summary figure of a series.

    Parameters
    ----------
    store : Store
        An open store.
    start, stop : int or None, default None
        Window of stored frames summed into the image (``stop`` exclusive).
    roi : (row0, row1, col0, col1) or str or None, default None
        Region of interest drawn as a box, with its counts in the panel title.
    log : bool, default False
        Logarithmic colour scale (zeros shown black).
    unit : {"e/A2", "e/px", "events"} or None, default None
        Dose unit of the time panels; None means e/A2 when the pixel size is
        known, else e/px.
    title : str or None, default None
        First title line (usually the file name).
    dpi : int, default 100
        Resolution; the figure is ``FIGSIZE_IN`` inches.
    progress : bool or None, default None
        Progress bar while summing (None: only on a terminal).

    Returns
    -------
    matplotlib.figure.Figure
        With an Agg canvas attached (``fig.savefig`` works without pyplot).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import LogNorm, Normalize
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError:  # pragma: no cover - optional extra
        raise UserError("show needs matplotlib: pip install 'streamstore[plot]'") from None

    a, b = check_window(store.n_frames, start, stop, empty_ok=False, need_frames=True)
    r = check_roi(roi, tuple(store.frame_shape))
    pixel = store.pixel_size_A
    if unit is None:
        unit = "e/A2" if pixel else "e/px"
    if unit == "e/A2" and not pixel:
        raise UserError("dose in e/A2 needs the pixel size, and this series has none recorded")
    h, w = store.frame_shape
    img = summed_image(store, a, b, progress=progress)
    dose = np.asarray(store.dose(unit=unit), dtype=np.float64)
    t, t_missing, xlabel = _times_s(store)
    ft = getattr(store, "frame_time_s", None)
    n_missing = int(t_missing.size)

    fig = Figure(figsize=FIGSIZE_IN, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, 2, width_ratios=(1.25, 1.0), height_ratios=(1.0, 1.0))
    ax_img = fig.add_subplot(gs[:, 0])
    ax_dose = fig.add_subplot(gs[0, 1])
    ax_cum = fig.add_subplot(gs[1, 1], sharex=ax_dose)

    # -- summed image ----------------------------------------------------
    disp, f = _bin_for_display(img)
    vals = disp[disp > 0]
    if log:
        vmax = float(np.percentile(vals, 99.9)) if vals.size else 1.0
        norm = LogNorm(vmin=max(float(vals.min()) if vals.size else 1.0, 1.0), vmax=max(vmax, 2.0))
        shown = np.ma.masked_less_equal(disp, 0)
    else:
        lo, hi = np.percentile(disp, [0.5, 99.8]) if disp.size else (0, 1)
        norm = Normalize(vmin=float(lo), vmax=float(max(hi, lo + 1)))
        shown = disp
    cmap = _gray_with_black_bad()
    im = ax_img.imshow(
        shown,
        cmap=cmap,
        norm=norm,
        extent=(0, w, h, 0),
        interpolation="antialiased",
        origin="upper",
    )
    ax_img.set_xlabel("column (px)")
    ax_img.set_ylabel("row (px)")
    n_ev = int(img.sum())
    bin_note = f", shown binned {f}x{f}" if f > 1 else ""
    ax_img.set_title(
        f"summed counts, frames {a}:{b} ({b - a} frames, {n_ev:,} events{bin_note})",
        fontsize=10,
    )
    cbar = fig.colorbar(im, ax=ax_img, shrink=0.85, pad=0.02)
    if log:
        from matplotlib.ticker import FuncFormatter

        plain = FuncFormatter(lambda v, _pos: f"{v:g}")
        cbar.ax.yaxis.set_major_formatter(plain)
        cbar.ax.yaxis.set_minor_formatter(plain)
        cbar.ax.tick_params(which="both", labelsize=8)
    cbar.set_label(
        f"counts per {'binned ' if f > 1 else ''}pixel" + (" (log scale)" if log else ""),
        fontsize=9,
    )
    if r is not None:
        r0, r1, c0, c1 = r
        ax_img.add_patch(
            Rectangle((c0, r0), c1 - c0, r1 - r0, fill=False, lw=1.8, ec="#00e5ff", ls="-")
        )
        roi_counts = int(img[r0:r1, c0:c1].sum())
        npx = (r1 - r0) * (c1 - c0)
        above = r0 > 0.12 * h  # room for the label above the box, else below it
        ax_img.annotate(
            f"ROI {r0}:{r1}, {c0}:{c1}\n{roi_counts:,} events, {roi_counts / npx:.3g} e$^-$/px",
            xy=(c0, r0 if above else r1),
            xytext=(0, 4 if above else -4),
            textcoords="offset points",
            va="bottom" if above else "top",
            color="#00e5ff",
            fontsize=9,
            fontweight="bold",
            bbox={"boxstyle": "round,pad=0.25", "fc": "black", "alpha": 0.6, "ec": "none"},
        )

    # -- dose per frame --------------------------------------------------
    ulabel = _UNIT_LABEL[unit]
    # break the line where frames are missing, so a gap never looks like data
    ids = np.asarray(store.frame_ids, dtype=np.int64)
    gap = np.flatnonzero(np.diff(ids) > 1) + 1 if ids.size > 1 else np.zeros(0, np.intp)
    tg, dg = np.insert(t, gap, np.nan), np.insert(dose, gap, np.nan)
    ax_dose.plot(
        tg,
        dg,
        lw=0.7,
        color="#4a7ab5",
        alpha=0.8 if t.size > 400 else 1.0,
        label="per frame",
        marker="." if t.size <= 60 else None,
        ms=4,
    )
    if t.size > 400:
        k = max(5, t.size // 100)
        ax_dose.plot(
            tg,
            np.insert(_running_mean(dose, k), gap, np.nan),
            lw=1.6,
            color="#1a3a6b",
            label=f"running mean ({k} frames)",
        )
    if n_missing:
        # a red tick along the bottom per missing frame: visible, and never hides the data
        ax_dose.vlines(
            t_missing,
            0,
            0.07,
            transform=ax_dose.get_xaxis_transform(),
            color="#d62728",
            lw=1.0,
        )
        ax_dose.plot([], [], color="#d62728", lw=1.5, label=f"missing frames ({n_missing:,})")
    step = float(ft) if (ft and xlabel.startswith("time")) else (1.0 if t.size else 0.0)
    if b - a < t.size and t.size:
        span = {"color": "#f2b134", "alpha": 0.18, "lw": 0}
        ax_dose.axvspan(t[a], t[b - 1] + step, label="summed window", **span)
        ax_cum.axvspan(t[a], t[b - 1] + step, **span)
    ax_dose.set_ylabel(f"dose per frame ({ulabel})")
    # headroom above the data for the legend, so it never covers a curve
    top = float(dose.max()) if dose.size and dose.max() > 0 else 1.0
    ax_dose.set_ylim(0, top * 1.45)
    # which dose: the corrected electrons where the file records them, else the events
    kind = "corrected" if getattr(store, "dose_corrected", False) else "counted events"
    ax_dose.set_title(
        f"dose per frame ({kind}): mean {dose.mean():.3g} "
        f"(range {dose.min():.3g} to {dose.max():.3g})",
        fontsize=10,
    )
    ax_dose.legend(loc="upper right", fontsize=8, framealpha=0.85, ncol=2)
    ax_dose.tick_params(labelbottom=False)

    # -- cumulative dose -------------------------------------------------
    # dose received by the end of each frame, starting from zero at the first frame
    cum = np.cumsum(dose)
    tc = np.concatenate([t[:1], t + step]) if t.size else t
    cc = np.concatenate([[0.0], cum]) if t.size else cum
    ax_cum.plot(tc, cc, lw=1.8, color="#2c7d4f")
    ax_cum.fill_between(tc, cc, color="#2c7d4f", alpha=0.12, lw=0)
    ax_cum.set_ylabel(f"cumulative dose ({ulabel})")
    ax_cum.set_xlabel(xlabel)
    ax_cum.set_ylim(bottom=0)
    total = float(cum[-1]) if cum.size else 0.0
    ax_cum.set_title(f"cumulative dose: {total:.4g} {ulabel} in {t.size:,} frames", fontsize=10)
    for ax in (ax_dose, ax_cum):
        ax.grid(True, color="0.88", lw=0.6)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        if t.size:
            ax.set_xlim(
                min(t[0], t_missing.min() if n_missing else t[0]),
                max(tc[-1], t_missing.max() if n_missing else tc[-1]),
            )

    # -- headline --------------------------------------------------------
    head = title or "streamstore series"
    # the camera's frame time and the rate the frames were sent at (timestamps), named
    # as `streamstore info` names them
    rate = f"frame time {ft * 1e3:.4g} ms" if ft else "frame time unknown"
    ids = np.asarray(store.frame_ids, dtype=np.int64)
    ts = np.asarray(store.timestamps_ns, dtype=np.int64)
    if ids.size > 1 and ts[-1] > ts[0]:
        rate += (
            f" · sent at {float(ids[-1] - ids[0]) / (float(ts[-1] - ts[0]) / 1e9):,.6g} frames/s"
        )
    px = f"pixel {pixel:g} Å" if pixel else "pixel size unknown"
    fig.suptitle(
        f"{head}\n{store.n_frames:,} frames stored, {n_missing:,} missing · {h} x {w} px · "
        f"{rate} · {px}",
        fontsize=11,
    )
    return fig


def _gray_with_black_bad() -> Any:
    from matplotlib import colormaps

    return colormaps["gray"].with_extremes(bad="black")


def save_summary(store: Any, out: str | Path, *, dpi: int = DEFAULT_DPI, **kwargs: Any) -> Path:
    """Draw :func:`summary_figure` and write it as PNG.

    Parameters
    ----------
    store : Store
        An open store.
    out : str or Path
        PNG path.
    dpi : int, default 100
        Resolution: the PNG is ``FIGSIZE_IN[0] * dpi`` by ``FIGSIZE_IN[1] * dpi`` pixels.
    **kwargs
        Passed to :func:`summary_figure`.

    Returns
    -------
    Path
        ``out``.
    """
    out = Path(out)
    if not out.parent.exists():
        raise UserError(f"the folder {out.parent} does not exist")
    fig = summary_figure(store, dpi=dpi, **kwargs)
    fig.savefig(out, dpi=dpi, format="png")
    return out
