"""Reading figures back: visible panels, lines by label, bands, captions, PNG checks."""

from __future__ import annotations

import math

import numpy as np
from matplotlib import image as mpimg
from matplotlib.figure import Figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def panels(fig: Figure):
    """Main panels (strips and colour bars excluded), in drawing order."""
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]


def strips(fig: Figure):
    return [ax for ax in fig.axes if any(ln.get_gid() == "lr" for ln in ax.get_lines())]


def lines(ax) -> dict:
    """Data lines by label (band markers and reference lines left out)."""
    return {
        ln.get_label(): ln
        for ln in ax.get_lines()
        if not ln.get_label().startswith("_") and ln.get_gid() is None
    }


def ydata(line) -> list[float]:
    return [float(v) for v in line.get_ydata()]


def xdata(line) -> list[float]:
    return [float(v) for v in line.get_xdata()]


def gid_lines(ax, gid: str):
    return [ln for ln in ax.get_lines() if ln.get_gid() == gid]


def band_xs(ax, where: str = "bottom") -> list[float]:
    """x of every marker on the bottom (zero) or top (infinity) band of ``ax``."""
    return sorted(x for ln in gid_lines(ax, f"band-{where}") for x in xdata(ln))


def caption(fig: Figure) -> str:
    return "\n".join(t.get_text() for t in fig.texts if t.get_gid() == "caption")


def axes_fraction(ax, y: float) -> float:
    """Where the data value ``y`` sits on ``ax``'s y-axis (0 bottom, 1 top)."""
    lo, hi = ax.get_ylim()
    if ax.get_yscale() == "log":
        return (math.log10(y) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    return (y - lo) / (hi - lo)


def bar_tops(container) -> list[float]:
    return [p.get_y() + p.get_height() for p in container]


def assert_png(path) -> None:
    """A valid PNG with non-trivial content."""
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    assert float(img.var()) > 1e-3
    rgb = (img[..., :3] * 255).astype(np.uint8).reshape(-1, 3).astype(np.uint32)
    # distinct (r, g, b) triples, each packed into one integer (np.unique(axis=0) sorts rows
    # as structured records: seconds per figure)
    colours = np.unique((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2])
    assert len(colours) > 20
