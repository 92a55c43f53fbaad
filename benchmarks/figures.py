"""Saving the report's figures small: every committed result folder carries its figures,
and the repository travels to the GPU machine whole (64 MiB in all)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib.pyplot as plt
from PIL import Image

PALETTE_COLOURS = 256
"""Line plots, bands and heat maps hold a few thousand colours, nearly all antialiasing
shades: a 256-colour palette (median cut, no dithering) keeps them indistinguishable at a
third of the bytes of matplotlib's RGBA PNG (measured on a committed curves.png: 123674 to
40121 bytes)."""


def save_figure(figure, path: str | Path, dpi: int) -> None:
    """Write `figure` to `path` as an optimized palette PNG on white, and close it."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    plt.close(figure)
    buffer.seek(0)
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(PALETTE_COLOURS, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    palette.save(path, optimize=True)
