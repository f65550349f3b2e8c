"""K x K class matrices as heatmaps: cosines of the centred class means, pairwise CDNV.

Owns :func:`cosine_vs_etf` (the cosine matrix of centred class means beside the simplex
ETF's, whose off-diagonal entries are all -1/(K-1); docs/science.md §1 NC2, §8) and
:func:`cdnv_heatmap` (``(V_k + V_l) / (2 ||mu_k - mu_l||^2)`` per pair of classes, on a log
colour scale; docs/science.md §8). Matrices are array-likes ``[K, K]``; NaN cells (absent
classes, the undefined CDNV diagonal) are drawn grey. Class names label the axes up to
:data:`MAX_NAMED` classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from nclightning.plotting import _layout as L

__all__ = ["MAX_NAMED", "cdnv_heatmap", "cosine_vs_etf", "etf_cosines"]

MAX_NAMED = 30
"""Up to this many classes, ticks carry the class names (and, up to 10, cells their values)."""
_CELL_W = 0.26  # inches per class, up to the panel size limits below


def etf_cosines(K: int) -> np.ndarray:
    """The simplex ETF's cosine matrix: 1 on the diagonal, ``-1/(K-1)`` elsewhere."""
    if K < 2:
        raise ValueError(f"a simplex ETF needs K >= 2 classes, got {K}")
    out = np.full((K, K), -1.0 / (K - 1))
    np.fill_diagonal(out, 1.0)
    return out


def _square(matrix: Any, what: str) -> np.ndarray:
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2:
        raise ValueError(f"{what}: expected a [K, K] matrix with K >= 2, got shape {m.shape}")
    return m


def _names(class_names: Sequence[str] | None, K: int) -> list[str]:
    names = [str(n) for n in class_names] if class_names is not None else [str(k) for k in range(K)]
    if len(names) != K:
        raise ValueError(f"{len(names)} class names for {K} classes")
    return names


def _side(K: int) -> float:
    return min(max(L.AX_H + 0.4, _CELL_W * K), 7.0)


def _label_room(names: Sequence[str], K: int) -> float:
    return 0.075 * max(len(n) for n in names) if K <= MAX_NAMED else 0.0


def _heatmap(
    ax: Axes, m: np.ndarray, names: Sequence[str], norm: Any, cmap: str, fmt: str | None
) -> Any:
    from matplotlib import colormaps

    cm = colormaps[cmap].with_extremes(bad="0.8")
    K = m.shape[0]
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cm, norm=norm, interpolation="nearest")
    if K <= MAX_NAMED:
        ax.set_xticks(range(K), names, rotation=90, fontsize="x-small")
        ax.set_yticks(range(K), names, fontsize="x-small")
    else:
        ax.set_xlabel("class index")
    if fmt and K <= 10:
        for (i, j), v in np.ndenumerate(m):
            if math.isfinite(v):
                r, g, b, _ = cm(norm(v))
                ink = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=6, color=ink)
    return im


def _colorbar(grid: L.Grid, im: Any, label: str) -> None:
    """A colour bar in the right-hand column that ``new_figure(legend_w=)`` reserved."""
    fig, pos = grid.fig, grid.panels[-1].get_position()
    width = fig.get_figwidth()
    cax = fig.add_axes((grid.legend_anchor[0] + 0.15 / width, pos.y0, 0.18 / width, pos.height))
    fig.colorbar(im, cax=cax, label=label)


def cosine_vs_etf(
    cosine: Any, class_names: Sequence[str] | None = None, *, title: str | None = None
) -> Figure:
    """Two heatmaps: the measured ``cos(mu_k - mu_c, mu_l - mu_c)`` and the simplex ETF's.

    ``cosine`` is ``[K, K]`` (``cosine_matrix`` of the per-class quantities). The left
    panel's title gives ``max |cos + 1/(K-1)|`` over the off-diagonal entries (nc2_maxangle).
    """
    m = _square(cosine, "cosine_vs_etf")
    K = m.shape[0]
    names = _names(class_names, K)
    etf = etf_cosines(K)
    off = ~np.eye(K, dtype=bool) & np.isfinite(m)
    dev = float(np.max(np.abs(m[off] - etf[off]))) if off.any() else math.nan
    side = _side(K)
    grid = L.new_figure(
        2, ax_w=side, ax_h=side, legend_w=1.1, title_lines=2, suptitle=bool(title),
        xlabel_extra=_label_room(names, K),
    )  # fmt: skip
    norm = Normalize(-1.0, 1.0)
    im = _heatmap(grid.panels[0], m, names, norm, "RdBu_r", ".2f")
    grid.panels[0].set_title(
        f"cosines of centred class means\nmax |cos + 1/(K-1)| = {dev:.3g}", fontsize="medium"
    )
    _heatmap(grid.panels[1], etf, names, norm, "RdBu_r", None)
    grid.panels[1].set_title(
        f"simplex ETF\noff-diagonal -1/(K-1) = {-1 / (K - 1):.3g}", fontsize="medium"
    )
    _colorbar(grid, im, "cosine")
    if title:
        grid.fig.suptitle(title)
    return grid.fig


def cdnv_heatmap(
    cdnv: Any, class_names: Sequence[str] | None = None, *, title: str | None = None
) -> Figure:
    """Heatmap of the pairwise CDNV ``[K, K]`` on a log colour scale; the diagonal is blank.

    The panel title gives the mean over ``k != l`` (the ``cdnv`` metric). Non-positive or
    NaN entries are drawn grey.
    """
    m = _square(cdnv, "cdnv_heatmap").copy()
    K = m.shape[0]
    names = _names(class_names, K)
    np.fill_diagonal(m, np.nan)
    mean = float(np.mean(m[np.isfinite(m)])) if np.isfinite(m).any() else math.nan
    m[~(m > 0)] = np.nan  # a log scale cannot colour 0 (two classes collapsed to points)
    finite = m[np.isfinite(m)]
    if finite.size == 0:
        raise ValueError("cdnv_heatmap: no finite positive off-diagonal entry")
    lo, hi = float(finite.min()), float(finite.max())
    norm = LogNorm(lo, hi if hi > lo else lo * 10)
    side = _side(K)
    grid = L.new_figure(
        1, ax_w=side, ax_h=side, legend_w=1.2, title_lines=2, suptitle=bool(title),
        xlabel_extra=_label_room(names, K),
    )  # fmt: skip
    im = _heatmap(grid.panels[0], m, names, norm, "viridis", ".2g")
    grid.panels[0].set_title(
        r"pairwise CDNV $(V_k + V_l) / (2\|\mu_k - \mu_l\|^2)$"
        f"\nmean over k != l = {mean:.3g} (grey: 0 or undefined)",
        fontsize="medium",
    )
    _colorbar(grid, im, "CDNV")
    if title:
        grid.fig.suptitle(title)
    return grid.fig
