"""Frame shapes written as text (``HxW``), as command lines and scripts take them."""

from __future__ import annotations

import argparse

__all__ = ["parse_shape"]


def parse_shape(text: str) -> tuple[int, int]:
    """Parse a frame shape written ``HxW`` (e.g. ``4092x5760``); an argparse ``type=``.

    Parameters
    ----------
    text : str
        Two positive integers joined by ``x`` (or ``X``).

    Returns
    -------
    (int, int)
        Height and width.

    Raises
    ------
    argparse.ArgumentTypeError
        When the text is not two positive integers joined by ``x``.
    """
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 4092x5760, got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"expected positive HxW, got {text!r}")
    return h, w
