"""Regenerate docs/img/show_example.png: what `streamstore show` draws for an emulated run.

The camera emulator makes 1200 frames of 512 x 768 pixels with a bright disk
(dark frames first, for the calibration), streamstore counts them and stores
the events, four frame ids are dropped on purpose, and the summary figure of
the first 600 frames is drawn with an ROI box around the disk::

    python docs/img/make_show_example.py   # about 30 s on 2 cores
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

import streamstore
from streamstore import Calibration, CameraEmulator, count
from streamstore.analysis.plotting import save_summary

H, W = 512, 768
FRAME_TIME_S = 1 / 1500
LOST = [250, 251, 252, 777]


def main() -> None:
    emu = CameraEmulator(
        (H, W), pattern="disk", seed=4, dose_rate_e_per_px_s=45.0, frame_time_s=FRAME_TIME_S
    )
    dark, _ = emu.dark_frames(32)
    cal = Calibration.from_dark_frames(np.asarray(dark))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "disk_run.h5"
        with streamstore.StoreWriter(
            path, (H, W), frame_time_s=FRAME_TIME_S, pixel_size_A=0.83, calibration=cal
        ) as w:
            for first in range(0, 1200, 100):
                frames, _ = emu.generate(100)
                events = count(frames, cal)
                ids = np.arange(first, first + 100)
                keep = np.flatnonzero(~np.isin(ids, LOST))
                kept = streamstore.EventBatch.concatenate(
                    [events.slice(int(i), int(i) + 1) for i in keep]
                )
                ts = (ids[keep] * FRAME_TIME_S * 1e9).astype(np.int64)
                w.append(kept, ids[keep], ts)
            w.mark_missing(LOST)
        with streamstore.open(path) as store:
            out = Path(__file__).with_name("show_example.png")
            save_summary(
                store,
                out,
                dpi=80,
                stop=600,
                roi=(150, 350, 250, 520),
                title=path.name,
                progress=False,
            )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
