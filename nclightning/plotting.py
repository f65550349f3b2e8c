"""Figures of neural collapse runs: plain Python data in, :class:`matplotlib.figure.Figure` out.

No Lightning or torch import; used by ``nclightning report`` (PNG files) and by the
callback (W&B images). Figures are built with :class:`~matplotlib.figure.Figure` and an Agg
canvas, never through ``pyplot``: nothing is registered globally, the process-wide backend is
left alone, and an unreferenced figure is simply garbage-collected. :func:`save_figure` writes a
PNG and releases the figure's artists.

Data shapes (shared by every function here and by ``nclightning report``):

* ``Series``: a sequence of ``(x, value)`` pairs in logging order, ``x`` the epoch
  (0 = the baseline probe before training) or a depth; values may be NaN or non-positive.
* ``History``: ``history[layer][metric] -> Series``, e.g.
  ``{"penultimate": {"nc1": [(0, 3.1), (1, 1.7)], "nc1_tilde": [...]}, "h0": {...}}``.
  Layer order is the dict's insertion order (shallow to deep).
* :func:`history_from_scalars` builds a ``History`` from flat logger keys
  ``nc/{split}/{layer}/{metric}``.

On log axes, points that are NaN, infinite or ``<= 0`` are dropped (an NC4 of exactly 0 is
common at collapse); a panel with no plottable point says so instead of failing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator

__all__ = [
    "DEFAULT_METRICS",
    "METRIC_ORDER",
    "METRIC_TITLES",
    "History",
    "Series",
    "depth_profile",
    "history_from_scalars",
    "measured_vs_predicted",
    "metric_curves",
    "run_overlay",
    "save_figure",
]

Series = Sequence[tuple[float, float]]
History = Mapping[str, Mapping[str, Series]]

METRIC_ORDER = (
    "nc1",
    "nc1_tilde",
    "cdnv",
    "nc2_etf",
    "nc2_equinorm",
    "nc2_equiangle",
    "nc2_maxangle",
    "nc3",
    "nc4",
)
"""Every collapse metric key, in the order figures show them."""

DEFAULT_METRICS = ("nc1", "nc1_tilde", "cdnv", "nc2_etf", "nc3", "nc4")
"""Metrics drawn when a caller does not choose (those absent from the data are skipped)."""

METRIC_TITLES = {
    "nc1": r"nc1: $\mathrm{Tr}(\Sigma_W\Sigma_B^{+})/K$",
    "nc1_tilde": r"nc1_tilde: $\mathrm{Tr}\,\Sigma_W/\mathrm{Tr}\,\Sigma_B$",
    "cdnv": "cdnv: class-distance normalised variance",
    "nc2_etf": "nc2_etf: distance to simplex ETF",
    "nc2_equinorm": "nc2_equinorm: std/mean of mean norms",
    "nc2_equiangle": "nc2_equiangle: std of mean cosines",
    "nc2_maxangle": r"nc2_maxangle: max $|\cos + 1/(K-1)|$",
    "nc3": "nc3: self-duality distance",
    "nc4": "nc4: NCC mismatch rate",
}
"""Panel titles; each starts with the metric key so figures match the logged names."""

_AX_W, _AX_H = 3.4, 2.4  # inches per panel (axes box)
_MAX_COLS = 3
_LINE = 0.22  # inches per line of title text


# ---------------------------------------------------------------------------------------------
# data helpers
# ---------------------------------------------------------------------------------------------


def history_from_scalars(
    scalars: Mapping[str, Series], split: str = "train", prefix: str = "nc"
) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """``History`` of one split from flat keys ``{prefix}/{split}/{layer}/{metric}``.

    Other keys (``nc/{split}/accuracy``, ``pm/...``, ``train/loss``) are ignored. A layer
    alias may itself contain ``/``: the metric is the last component. Layers appear in the
    order of their first key in ``scalars``.
    """
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    head = f"{prefix}/{split}/"
    for key, series in scalars.items():
        if not key.startswith(head):
            continue
        layer, sep, metric = key[len(head) :].rpartition("/")
        if not sep or not layer:
            continue
        out.setdefault(layer, {})[metric] = [(float(x), float(v)) for x, v in series]
    return out


def _positive(series: Iterable[tuple[float, float]]) -> tuple[list[float], list[float], int]:
    """Points of ``series`` a log axis can show (finite, > 0), and how many ``<= 0`` were cut."""
    xs: list[float] = []
    ys: list[float] = []
    cut = 0
    for x, v in series:
        if not (math.isfinite(v) and math.isfinite(x)):
            continue
        if v > 0:
            xs.append(x)
            ys.append(v)
        else:
            cut += 1
    return xs, ys, cut


def _title(metric: str) -> str:
    return METRIC_TITLES.get(metric, metric)


def _legend_width(labels: Iterable[str], title: str | None = None) -> float:
    """Inches a small-font legend with these labels needs (handle + text)."""
    n = max([len(str(t)) for t in labels] + [len(title or "")], default=0)
    return 0.75 + 0.075 * n


def _new_figure(
    npanels: int,
    *,
    ncols: int | None = None,
    legend_w: float = 0.0,
    title_lines: int = 1,
    suptitle: bool = False,
    bottom_extra: float = 0.0,
    ax_w: float = _AX_W,
) -> tuple[Figure, list[Axes]]:
    """Figure with ``npanels`` axes in a row-major grid and fixed margins in inches.

    Margins are computed up front instead of with constrained layout, which would measure
    every tick label several times (3-5x slower for multi-panel log plots). ``legend_w``
    reserves a column on the right for a figure legend (see :func:`_legend`).
    """
    ncols = max(1, min(ncols or _MAX_COLS, npanels))
    nrows = max(1, math.ceil(npanels / ncols))
    left, wgap = 0.8, 0.8
    right = 0.25 + legend_w
    top = 0.15 + _LINE * title_lines + (0.35 if suptitle else 0.0)
    bottom = 0.55 + bottom_extra
    hgap = 0.45 + bottom_extra + _LINE * title_lines + 0.15
    width = left + ncols * ax_w + (ncols - 1) * wgap + right
    height = top + nrows * _AX_H + (nrows - 1) * hgap + bottom
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=wgap / ax_w,
        hspace=hgap / _AX_H,
    )
    for ax in axes[npanels:]:
        ax.set_visible(False)
    fig._ncl_legend_anchor = (1 - (legend_w + 0.05) / width, 1 - top / height)  # type: ignore[attr-defined]
    return fig, axes[:npanels]


def _colors(n: int, cmap: str = "viridis") -> list:
    """``n`` colours: ``tab10`` (categorical) or a sequential map (shallow -> deep)."""
    from matplotlib import colormaps

    if n <= 10 and cmap == "tab10":
        return [colormaps["tab10"](i) for i in range(n)]
    cm = colormaps[cmap]
    return [cm(0.85 * i / max(n - 1, 1)) for i in range(n)]


def _finish_log_axis(ax: Axes, ys: Sequence[float], cut: int = 0) -> None:
    """Log y-scale over the plotted values ``ys``; a note for ``cut`` values ``<= 0``.

    Minor ticks are kept only when fewer than two powers of ten fall inside the data range
    (then they carry the labels); otherwise they add clutter and most of the drawing time.
    """
    ax.grid(True, which="major", alpha=0.3)
    note = None
    if not ys:
        note = "all values <= 0 (log scale)" if cut else "no finite values"
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, color="0.4")
        return
    if cut:
        ax.text(
            0.02,
            0.02,
            f"{cut} value{'s' if cut > 1 else ''} <= 0 not shown",
            ha="left",
            va="bottom",
            transform=ax.transAxes,
            color="0.4",
            fontsize="x-small",
        )
    ax.set_yscale("log")
    decades = math.floor(math.log10(max(ys))) - math.ceil(math.log10(min(ys))) + 1
    if decades >= 2:
        ax.yaxis.set_minor_locator(NullLocator())


def _share_xlim(axes: Sequence[Axes], xs: Sequence[float]) -> None:
    """Same x-range on every panel (a metric logged for fewer epochs must not look shorter)."""
    if not xs:
        return
    lo, hi = min(xs), max(xs)
    pad = 0.03 * (hi - lo) if hi > lo else 0.5
    integer = all(float(x).is_integer() for x in xs)
    for ax in axes:
        ax.set_xlim(lo - pad, hi + pad)
        if integer:  # epochs: no 0.5 ticks
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend(fig: Figure, axes: list[Axes], title: str | None) -> None:
    """One figure-level legend in the right-hand column reserved by :func:`_new_figure`."""
    seen: dict[str, object] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    if seen:
        fig.legend(
            list(seen.values()),
            list(seen.keys()),
            loc="upper left",
            bbox_to_anchor=fig._ncl_legend_anchor,  # type: ignore[attr-defined]
            title=title,
            fontsize="small",
            title_fontsize="small",
            frameon=False,
        )


def _marker(n: int) -> str | None:
    return "o" if n <= 40 else None


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------


def metric_curves(
    history: History,
    metrics: Sequence[str] = DEFAULT_METRICS,
    layers: Sequence[str] | None = None,
    *,
    title: str | None = None,
    xlabel: str = "epoch",
) -> Figure:
    """One panel per metric, one line per layer, metric against epoch on a log y-axis.

    ``history[layer][metric]`` is a ``Series`` (module docstring). ``layers`` selects and
    orders layers (default: all, in ``history`` order; colours run shallow to deep); metrics
    that no selected layer has are skipped. Raises ``ValueError`` when nothing is left.
    """
    layers = list(history) if layers is None else [lay for lay in layers if lay in history]
    metrics = [m for m in metrics if any(m in history[lay] for lay in layers)]
    if not layers or not metrics:
        raise ValueError("metric_curves: no selected layer has any selected metric")
    fig, axes = _new_figure(
        len(metrics), legend_w=_legend_width(layers, "layer"), suptitle=bool(title)
    )
    colors = _colors(len(layers))
    all_xs: list[float] = []
    for ax, metric in zip(axes, metrics):
        all_ys: list[float] = []
        cut = 0
        for color, layer in zip(colors, layers):
            series = history[layer].get(metric, ())
            all_xs += [x for x, _ in series if math.isfinite(x)]
            xs, ys, c = _positive(series)
            cut += c
            if xs:
                ax.plot(xs, ys, color=color, label=layer, marker=_marker(len(xs)), ms=3, lw=1.4)
                all_ys += ys
        _finish_log_axis(ax, all_ys, cut)
        ax.set_title(_title(metric), fontsize="medium")
        ax.set_xlabel(xlabel)
    _share_xlim(axes, all_xs)
    _legend(fig, axes, "layer")
    if title:
        fig.suptitle(title)
    return fig


def depth_profile(
    values_by_layer: Mapping[str, Mapping[str, float]],
    metrics: Sequence[str] = ("nc1", "nc1_tilde"),
    *,
    order: Sequence[str] | None = None,
    title: str | None = None,
    xlabel: str = "layer",
) -> Figure:
    """One panel per metric: its value at each layer (x, in order) on a log y-axis.

    ``values_by_layer[layer][metric] -> float`` (e.g. the last epoch's values, or for a
    layer-wise run the deepest layer's value after each stage, keyed by depth). Layers are
    drawn in ``order`` when given, else in mapping order. Paper Fig. 2 is this figure with
    the depth on the x-axis.
    """
    names = list(values_by_layer) if order is None else [k for k in order if k in values_by_layer]
    metrics = [m for m in metrics if any(m in values_by_layer[k] for k in names)]
    if not names or not metrics:
        raise ValueError("depth_profile: no selected layer has any selected metric")
    ax_w = max(_AX_W, 0.3 * len(names))
    rotate = 0.07 * sum(len(str(k)) + 2 for k in names) > ax_w  # labels would collide
    bottom_extra = 0.045 * max(len(str(k)) for k in names) if rotate else 0.0
    fig, axes = _new_figure(
        len(metrics), suptitle=bool(title), bottom_extra=bottom_extra, ax_w=ax_w
    )
    for ax, metric in zip(axes, metrics):
        pts = [(i, float(values_by_layer[k].get(metric, math.nan))) for i, k in enumerate(names)]
        xs, ys, cut = _positive(pts)
        if xs:
            ax.plot(xs, ys, marker="o", color="C0", lw=1.6)
        _finish_log_axis(ax, ys, cut)
        ax.set_xticks(
            range(len(names)),
            [str(k) for k in names],
            fontsize="small",
            rotation=45 if rotate else 0,
            ha="right" if rotate else "center",
            rotation_mode="anchor",
        )
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_title(_title(metric), fontsize="medium")
        ax.set_xlabel(xlabel)
    if title:
        fig.suptitle(title)
    return fig


def measured_vs_predicted(
    h0: Mapping[str, float],
    h: Mapping[str, float],
    h_star: Mapping[str, float],
    metrics: Sequence[str] | None = None,
    *,
    beta: float | None = None,
    labels: tuple[str, str, str] = ("H0 (measured)", "H (measured)", "H* (model)"),
    title: str | None = None,
) -> Figure:
    """Grouped bars on a log y-axis: per metric, H0 and H measured, H* predicted by Eq. 2.

    ``h0``, ``h``, ``h_star`` map metric names to floats. ``metrics`` defaults to the
    :data:`METRIC_ORDER` keys present in ``h_star``, then its other keys that ``h0`` and
    ``h`` also have. Missing, NaN or non-positive values leave an empty slot. ``beta`` (when
    given) is shown in the title.
    """
    if metrics is None:
        metrics = [m for m in METRIC_ORDER if m in h_star]
        metrics += [m for m in h_star if m not in metrics and m in h0 and m in h]
    metrics = list(metrics)
    if not metrics:
        raise ValueError("measured_vs_predicted: no metric to draw")
    rotate = len(metrics) > 4
    bottom_extra = 0.035 * max(len(m) for m in metrics) if rotate else 0.0
    fig, (ax,) = _new_figure(
        1,
        legend_w=_legend_width(labels),
        bottom_extra=bottom_extra,
        ax_w=max(_AX_W, 0.75 * len(metrics)),
        title_lines=1 + (title is not None),
    )
    width = 0.27
    all_ys: list[float] = []
    cut = 0
    styles = (("0.6", None, "white"), ("C0", None, "white"), ("C3", "//", "0.2"))
    for j, (values, label, (color, hatch, edge)) in enumerate(zip((h0, h, h_star), labels, styles)):
        pts = [(i + (j - 1) * width, float(values.get(m, math.nan))) for i, m in enumerate(metrics)]
        xs, ys, c = _positive(pts)
        ax.bar(
            xs,
            ys,
            width=width,
            label=label,
            color=color,
            hatch=hatch,
            edgecolor=edge,
            linewidth=0.5,
        )
        all_ys += ys
        cut += c
    _finish_log_axis(ax, all_ys, cut)
    if all_ys:  # log bars grow from the lower limit: leave room so the smallest shows
        ax.set_ylim(min(all_ys) / 4, max(all_ys) * 2)
    ax.set_xticks(
        range(len(metrics)),
        metrics,
        rotation=30 if rotate else 0,
        ha="right" if rotate else "center",
        rotation_mode="anchor",
    )
    ax.set_xlim(-0.6, len(metrics) - 0.4)
    _legend(fig, [ax], None)
    head = "measured vs perturbation-model prediction"
    if beta is not None and math.isfinite(beta):
        head += rf" ($\beta$ = {beta:.4g})"
    ax.set_title(head if title is None else f"{title}\n{head}", fontsize="medium")
    return fig


def run_overlay(
    runs: Mapping[str, History],
    metric: str | Sequence[str],
    layer: str,
    *,
    title: str | None = None,
    xlabel: str = "epoch",
) -> Figure:
    """Several runs' curves of ``metric`` at ``layer`` on one log-y axes (paper Fig. 3).

    ``runs[label]`` is a ``History``; runs without the layer or metric are left out of that
    panel. A list of metrics gives one panel per metric with a shared legend.
    """
    metrics = [metric] if isinstance(metric, str) else list(metric)
    if not runs or not metrics:
        raise ValueError("run_overlay: no run or no metric")
    fig, axes = _new_figure(
        len(metrics), legend_w=_legend_width(runs, "run"), title_lines=2, suptitle=bool(title)
    )
    colors = _colors(len(runs), "tab10" if len(runs) <= 10 else "viridis")
    all_xs: list[float] = []
    for ax, m in zip(axes, metrics):
        all_ys: list[float] = []
        cut = 0
        for color, (label, hist) in zip(colors, runs.items()):
            series = hist.get(layer, {}).get(m, ())
            all_xs += [x for x, _ in series if math.isfinite(x)]
            xs, ys, c = _positive(series)
            cut += c
            if xs:
                ax.plot(xs, ys, color=color, label=label, marker=_marker(len(xs)), ms=3, lw=1.4)
                all_ys += ys
        _finish_log_axis(ax, all_ys, cut)
        ax.set_title(f"{_title(m)}\nlayer {layer}", fontsize="medium")
        ax.set_xlabel(xlabel)
    _share_xlim(axes, all_xs)
    _legend(fig, axes, "run")
    if title:
        fig.suptitle(title)
    return fig


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parents created), release it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    fig.clear()
    manager = getattr(fig.canvas, "manager", None)
    if manager is not None:  # a pyplot-managed figure passed in by a caller
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path
