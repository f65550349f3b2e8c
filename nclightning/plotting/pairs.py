"""The perturbation-model figure of a layer pair (docs/science.md §2, §5.6, §7.4-§7.7).

Owns :func:`measured_vs_predicted`. Per metric, the value measured on ``H`` beside the value
the model's ``H*`` predicts and the values the model-free baselines predict (``h0``: ``H0``'s
own value; ``ratio``: ``H0``'s moved by the measured ``nc1_tilde`` ratio; ``etf``: ``cdnv``
of simplex means, §7.6); then ``log10(prediction / measured)`` of the model and of each
baseline (the fitted metric, ``nc1_tilde`` of a fitted pair, has none and says so); then the
coupling over epochs with its status (``not_more_collapsed`` and ``identical``, whose coupling
is infinite, on a band at the top) and whether the fit met the perturbative rule (Eq. 5 within
10 %, §5.6; filled markers) or not (hollow). One colour per source in every panel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from nclightning.plotting import _layout as L

__all__ = ["BASELINE_LABELS", "SOURCE_STYLE", "STATUS_STYLE", "measured_vs_predicted"]

Series = Sequence[tuple[float, float]]
STATUS_STYLE = {"not_more_collapsed": ("C3", "^"), "identical": ("0.4", "D")}
"""Colour and marker of the statuses whose coupling is infinite (on the top band)."""
SOURCE_STYLE = {
    "H0": ("0.6", None),
    "H": ("C0", None),
    "H*": ("C3", "//"),
    "h0": ("0.6", ".."),
    "ratio": ("C1", None),
    "etf": ("C4", None),
}
"""``(colour, hatch)`` of each source of a value, the same in every panel and in no other
meaning: measured ``H0`` and ``H``, the model ``H*``, the baselines."""
BASELINE_LABELS = {
    "h0": "baseline h0: H0's value",
    "ratio": "baseline ratio: H0's, scaled by nc1_tilde(H)/nc1_tilde(H0)",
    "etf": "baseline etf: (K-1)/(2K) nc1_tilde(H)",
}


def _pair_metrics(
    groups: Sequence[Mapping[str, float]], metrics: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """Metrics to draw (caller's order, else the model's) and those without any value."""
    metrics = list(groups[1]) if metrics is None else list(metrics)
    keep: list[str] = []
    left_out: list[str] = []
    for m in metrics:
        values = [d.get(m, math.nan) for d in groups]
        (keep if any(math.isfinite(v) for v in values) else left_out).append(m)
    return keep, left_out


def _offsets(n: int) -> tuple[list[float], float]:
    width = 0.8 / n
    return [(j - (n - 1) / 2) * width for j in range(n)], width


def _bar_panel(
    ax: Axes,
    metrics: Sequence[str],
    groups: Sequence[Mapping[str, float]],
    labels: Sequence[str],
    styles: Sequence[tuple[Any, Any]],
) -> None:
    """Grouped bars (one per source) per metric on a log axis; zeros on the band."""
    data, drawn = L.LogData(), []
    offsets, width = _offsets(len(groups))
    for vals, off, (colour, _) in zip(groups, offsets, styles):
        pts = [(i + off, float(vals.get(m, math.nan))) for i, m in enumerate(metrics)]
        pos = [(x, v) for x, v in pts if math.isfinite(v) and v > 0]
        data.ys += [v for _, v in pos]
        data.low += [(x, colour) for x, v in pts if v <= 0]
        drawn.append(pos)
    L.finish_log_axis(ax, data, room=0.15)
    floor = L.bar_floor(ax, data) if data.ys else 0.0
    for pos, label, (colour, hatch) in zip(drawn, labels, styles):
        xs, ys = zip(*pos) if pos else ((), ())
        ax.bar(
            xs, [y - floor for y in ys], bottom=floor, width=width, label=label, color=colour,
            hatch=hatch, edgecolor="0.2" if hatch else "white", linewidth=0.5,
        )  # fmt: skip
    _metric_ticks(ax, metrics)
    ax.set_title("measured and predicted values", fontsize="medium")


def _metric_ticks(ax: Axes, metrics: Sequence[str]) -> None:
    rotate = len(metrics) > 4
    ax.set_xticks(
        range(len(metrics)), metrics, rotation=30 if rotate else 0,
        ha="right" if rotate else "center", rotation_mode="anchor",
    )  # fmt: skip
    ax.set_xlim(-0.6, len(metrics) - 0.4)


def _residual_panel(
    ax: Axes,
    metrics: Sequence[str],
    groups: Sequence[Mapping[str, float]],
    labels: Sequence[str],
    styles: Sequence[tuple[Any, Any]],
    fitted: Any,
) -> None:
    """``log10(prediction / measured)`` per metric and source; the fitted metric says so."""
    offsets, width = _offsets(len(groups))
    top = 0.5
    for vals, off, label, (colour, hatch) in zip(groups, offsets, labels, styles):
        pts = [(i + off, vals.get(m, math.nan)) for i, m in enumerate(metrics)]
        pts = [(x, float(y)) for x, y in pts if y is not None and math.isfinite(y)]
        xs, ys = zip(*pts) if pts else ((), ())
        ax.bar(xs, ys, width=width, color=colour, hatch=hatch, label=label, linewidth=0.5,
               edgecolor="0.2" if hatch else "white")  # fmt: skip
        top = max([top, *(abs(y) for y in ys)])
    top *= 1.15
    for i, m in enumerate(metrics):
        if not any(math.isfinite(g.get(m, math.nan)) for g in groups):
            word = "fitted" if m in fitted else "n/a"
            ax.text(i, 0.05 * top, word, ha="center", va="bottom", fontsize="small",
                    color="0.3", rotation=90, gid=f"residual-{word}")  # fmt: skip
    ax.axhline(0.0, color="0.2", lw=0.8)
    ax.set_ylim(-top, top)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_ylabel("log10(prediction / measured H)")
    _metric_ticks(ax, metrics)
    ax.set_title("residuals against H (0: exact)", fontsize="medium")


def _coupling_panel(ax: Axes, coupling: Series, status: Any, perturbative: Series) -> list[Line2D]:
    """Coupling over epochs (log); infinite-coupling statuses on the top band.

    Returns proxy legend handles for the markers used.
    """
    names = dict(status)
    regime = {x: v for x, v in perturbative}
    finite = [(x, c) for x, c in coupling if math.isfinite(c) and c > 0]
    data = L.log_line(ax, finite, color="C2", marker="none", label="_coupling")
    handles = []
    for flag, fill, gid, text in (
        (1.0, "C2", "perturbative", "perturbative: Eq. 5 error <= 10 %"),
        (0.0, "white", "not_perturbative", "not perturbative"),
    ):
        pts = [(x, c) for x, c in finite if regime.get(x) == flag]
        if pts:
            ax.plot(*zip(*pts), ls="none", marker="o", ms=5, mec="C2", mfc=fill, gid=gid)
            handles.append(Line2D([], [], ls="none", marker="o", mec="C2", mfc=fill, label=text))
    if finite:
        L.finish_log_axis(ax, data)
    else:  # every fit at an infinite coupling: nothing on a log scale, only the band
        ax.set_ylim(0.0, 1.0)
        ax.set_yticks([])
        ax.text(0.5, 0.45, "no finite coupling", transform=ax.transAxes, ha="center",
                color="0.4", fontsize="small")  # fmt: skip
    if all(float(x).is_integer() for x, _ in coupling):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    infinite = [(x, names.get(x, "fitted")) for x, c in coupling if c == math.inf]
    for name, (colour, mark) in STATUS_STYLE.items():
        xs = [x for x, n in infinite if n == name]
        if xs:
            L.band_points(ax, [(x, colour) for x in xs], "top", "inf")
            ax.lines[-1].set_marker(mark)
            ax.lines[-1].set_gid(f"status-{name}")
    ax.set_xlabel("completed epochs")
    ax.set_title("coupling = beta / lambda_H (scale free)", fontsize="medium")
    used = {n for _, n in infinite}
    for name, (colour, mark) in STATUS_STYLE.items():
        if name in used:
            handles.append(
                Line2D([], [], ls="none", marker=mark, color=colour, label=f"{name} (inf)")
            )
    return handles


def measured_vs_predicted(
    h0: Mapping[str, float],
    h: Mapping[str, float],
    h_star: Mapping[str, float],
    metrics: Sequence[str] | None = None,
    *,
    residuals: Mapping[str, float] | None = None,
    baselines: Mapping[str, Mapping[str, float]] | None = None,
    fitted: Sequence[str] = (),
    coupling: Series = (),
    status: Sequence[tuple[float, str]] = (),
    perturbative: Series = (),
    labels: tuple[str, str, str] = ("H0 (measured)", "H (measured)", "H* (model)"),
    title: str | None = None,
    notes: Sequence[str] = (),
) -> Figure:
    """The pair figure: values, residuals, and the coupling over epochs.

    ``h0``, ``h``, ``h_star`` map metric names to floats at one epoch; ``metrics`` defaults
    to ``h_star``'s keys. ``baselines`` (``{name: {metric: log10(baseline / measured)}}``)
    draws each baseline's value ``h * 10**residual`` beside ``H`` and ``H*`` (the ``h0``
    baseline stands for ``H0``); without it ``H0``'s measured values are drawn. ``residuals``
    (the model's ``log10(predicted / measured)``) adds the residual panel, with the
    baselines' residuals beside the model's; ``fitted`` names the metrics the fit
    reproduces by construction (labelled "fitted" there). ``coupling``/``status``/
    ``perturbative`` (series over epochs; status as names of
    ``nclightning.record.keys.PAIR_STATUS``) add the coupling panel. Metrics with no finite
    value anywhere are left out and named in the caption, after ``notes``.
    """
    baselines = dict(baselines or {})
    names = [b for b in BASELINE_LABELS if b in baselines] + [
        b for b in baselines if b not in BASELINE_LABELS
    ]
    groups = [h, h_star] + [
        {m: h.get(m, math.nan) * 10.0**r for m, r in baselines[b].items()} for b in names
    ]
    sources = ["H", "H*", *names]
    value_labels = [labels[1], labels[2], *(BASELINE_LABELS.get(b, b) for b in names)]
    if not names:
        groups, sources = [h0, *groups], ["H0", *sources]
        value_labels = [labels[0], *value_labels]
    keep, left_out = _pair_metrics(groups if names else [h0, h_star, h], metrics)
    if not keep:
        raise ValueError("measured_vs_predicted: no metric with a value to draw")
    styles = [SOURCE_STYLE.get(s, ("0.3", None)) for s in sources]
    panels = 1 + (residuals is not None) + bool(coupling)
    rotate_room = 0.07 * max(len(m) for m in keep) if len(keep) > 4 else 0.0
    lines = [*notes, *([f"no value: {', '.join(left_out)}"] if left_out else [])]
    slot = panels == 3  # a 2 x 2 grid: the legend takes the fourth slot
    grid = L.new_figure(
        panels + slot, ncols=2, ax_w=max(L.AX_W, 0.16 * len(keep) * len(groups)), ax_h=2.8,
        legend_w=0.0 if slot else L.legend_width(value_labels), title_lines=1,
        suptitle=bool(title), xlabel_extra=rotate_room, caption_lines=len(lines),
    )  # fmt: skip
    if slot:  # the empty slot's top left anchors the legend
        spare = grid.panels.pop()
        box = spare.get_position()
        grid.fig.delaxes(spare)
        grid.legend_anchor = (box.x0, box.y1)
    axes = iter(grid.panels)
    _bar_panel(next(axes), keep, groups, value_labels, styles)
    if residuals is not None:
        res = [residuals, *(baselines[b] for b in names)]
        at = sources.index("H*")  # the model, then the baselines, as in the value panel
        part = slice(at, at + len(res))
        _residual_panel(next(axes), keep, res, value_labels[part], styles[part], fitted)
    extra = _coupling_panel(next(axes), coupling, status, perturbative) if coupling else []
    L.legend(grid, None, extra)
    if title:
        grid.fig.suptitle(title)
    L.caption(grid.fig, lines)
    return grid.fig
