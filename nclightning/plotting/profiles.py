"""Values across layers or classes at one moment: the depth profile, per-class variances.

Owns :func:`depth_profile` (each metric against the layer, or against the depth of a
layer-wise run: paper Fig. 2, Papyan 2020 Fig. 6; docs/science.md §6, §8; log y-axes with
the bands of :mod:`nclightning.plotting._layout`) and :func:`class_variance_bars` (``V_k``,
the within-class variance of each class, per layer, on linear axes from 0; docs/science.md
§8).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from nclightning.plotting import _layout as L
from nclightning.plotting._titles import title_of

__all__ = ["class_variance_bars", "depth_profile"]


def _category_axis(ax: Axes, names: Sequence[str], rotate: bool, xlabel: str) -> None:
    ax.set_xticks(
        range(len(names)), [str(k) for k in names], fontsize="small",
        rotation=45 if rotate else 0, ha="right" if rotate else "center", rotation_mode="anchor",
    )  # fmt: skip
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_xlabel(xlabel)


def _rotation(names: Sequence[str], ax_w: float) -> tuple[bool, float]:
    """Whether category labels must be rotated, and the extra room they then need."""
    rotate = 0.07 * sum(len(str(k)) + 2 for k in names) > ax_w
    return rotate, (0.045 * max(len(str(k)) for k in names) if rotate else 0.0)


def depth_profile(
    values_by_layer: Mapping[str, Mapping[str, float]],
    metrics: Sequence[str] = ("nc1", "nc1_tilde"),
    *,
    order: Sequence[str] | None = None,
    title: str | None = None,
    xlabel: str = "layer",
) -> Figure:
    """One panel per metric: its value at each layer (x, in order) on a log y-axis.

    ``values_by_layer[layer][metric] -> float`` (e.g. the last values, or for a layer-wise
    run the deepest layer after each stage, keyed by depth). A metric needs a finite value at
    two layers or more to get a panel; the caption names those left out.
    """
    names = list(values_by_layer) if order is None else [k for k in order if k in values_by_layer]
    keep: list[str] = []
    notes: list[str] = []
    for m in metrics:
        n = sum(math.isfinite(values_by_layer[k].get(m, math.nan)) for k in names)
        (keep if n >= 2 else notes).append(m)
    if not names or not keep:
        raise ValueError("depth_profile: no metric has a finite value at two layers")
    ax_w = max(L.AX_W, 0.3 * len(names))
    rotate, extra = _rotation(names, ax_w)
    grid = L.new_figure(
        len(keep), suptitle=bool(title), xlabel_extra=extra, ax_w=ax_w, caption_lines=bool(notes)
    )
    for ax, metric in zip(grid.panels, keep):
        pts = [(i, float(values_by_layer[k].get(metric, math.nan))) for i, k in enumerate(names)]
        L.finish_log_axis(ax, L.log_line(ax, pts, color="C0", marker="o"))
        _category_axis(ax, names, rotate, xlabel)
        ax.set_title(title_of(metric), fontsize="medium")
    if title:
        grid.fig.suptitle(title)
    L.caption(grid.fig, [f"not drawn (fewer than two layers): {', '.join(notes)}"] if notes else [])
    return grid.fig


def class_variance_bars(
    class_var: Mapping[str, Sequence[float]],
    class_names: Sequence[str] | None = None,
    *,
    title: str | None = None,
) -> Figure:
    """Per layer, a bar per class: ``V_k = mean ||h - mu_k||^2`` of class k.

    Linear axes from 0 (a bar's height is the value; each layer has its own scale), a dashed
    line at the mean over classes, values written on the bars up to 20 classes.
    ``class_var[layer]`` has one value per class; NaN (an absent class) gets no bar and is
    named in the caption.
    """
    if not class_var:
        raise ValueError("class_variance_bars: no layer")
    K = len(next(iter(class_var.values())))
    names = list(class_names) if class_names is not None else [str(k) for k in range(K)]
    if len(names) != K:
        raise ValueError(f"class_variance_bars: {len(names)} class names for {K} classes")
    ax_w = max(L.AX_W, 0.22 * K)
    rotate, extra = _rotation(names, ax_w) if K <= 40 else (False, 0.0)
    absent = sorted({names[k] for v in class_var.values() for k in range(K) if math.isnan(v[k])})
    grid = L.new_figure(
        len(class_var), ncols=1 if K > 20 else None, ax_w=ax_w, suptitle=bool(title),
        xlabel_extra=extra, caption_lines=bool(absent),
    )  # fmt: skip
    for ax, (layer, values) in zip(grid.panels, class_var.items()):
        _variance_panel(ax, [float(v) for v in values], K <= 20)
        if K <= 40:
            _category_axis(ax, names, rotate, "class")
        else:
            ax.set_xlabel("class index")
        ax.set_title(f"{layer}: within-class variance $V_k$", fontsize="medium")
    if title:
        grid.fig.suptitle(title)
    L.caption(grid.fig, [f"absent classes (no bar): {', '.join(absent)}"] if absent else [])
    return grid.fig


def _variance_panel(ax: Axes, values: Sequence[float], annotate: bool) -> None:
    pos = [(k, v) for k, v in enumerate(values) if math.isfinite(v)]
    if pos:
        ax.bar(*zip(*pos), width=0.8, color="C0", gid="class_var")  # type: ignore[misc]
        mean = sum(v for _, v in pos) / len(pos)
        ax.axhline(mean, color="0.3", ls="--", lw=1, label="mean over classes")
        top = max(v for _, v in pos)
        for k, v in pos if annotate else ():
            ax.text(k, v + 0.01 * top, f"{v:.3g}", ha="center", va="bottom", fontsize="x-small")
        ax.set_ylim(0, 1.12 * top if top > 0 else 1.0)
    ax.grid(True, axis="y", alpha=0.3)
