"""The report's figures are saved as palette PNGs that look like matplotlib's own."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.figures import PALETTE_COLOURS, save_figure  # noqa: E402


def _figure():
    figure, ax = plt.subplots(figsize=(4, 3))
    x = np.linspace(0, 1, 50)
    for shift in range(4):
        ax.plot(x, x**2 + shift, label=str(shift))
        ax.fill_between(x, x**2 + shift - 0.2, x**2 + shift + 0.2, alpha=0.2)
    ax.legend()
    return figure


def test_a_figure_is_saved_as_a_palette_png_close_to_the_full_colour_render(tmp_path):
    full = tmp_path / "full.png"
    _figure().savefig(full, dpi=80, facecolor="white")
    small = tmp_path / "small.png"
    save_figure(_figure(), small, dpi=80)
    with Image.open(small) as saved, Image.open(full) as reference:
        assert saved.mode == "P" and len(saved.getcolors()) <= PALETTE_COLOURS
        difference = np.abs(np.asarray(saved.convert("RGB"), float) - np.asarray(reference.convert("RGB"), float))
    assert difference.mean() < 1.0  # of 255, per channel
    assert small.stat().st_size < full.stat().st_size / 2
