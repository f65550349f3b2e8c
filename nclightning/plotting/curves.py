"""Curves over training: collapse metrics per layer (or per probe), overlays of runs with bands.

Owns the figures whose x-axis is training time (completed epochs, or epochs since zero
training error; docs/science.md §6 for the paper's curves, §1 and §8 for the metrics):
:func:`metric_curves` (one panel per metric, one line per layer or probe, the learning rate
in a strip under the panels) and :func:`overlay` (one metric of several runs; a group of
seeds as its mean and the band from its lowest to its highest run).
``History`` is ``{line: {metric: [(x, value), ...]}}``; see :mod:`nclightning.plotting`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator

from nclightning.plotting import _layout as L
from nclightning.plotting._titles import title_of

__all__ = ["band_stats", "metric_curves", "overlay"]

Series = Sequence[tuple[float, float]]
History = Mapping[str, Mapping[str, Series]]
_STRIP_H = 0.6  # inches of the learning-rate strip


def _drawable(
    history: History, lines: Sequence[str], metrics: Sequence[str], asked: bool
) -> tuple[list[str], list[str]]:
    """Metrics with at least one value to show, and a note per metric left out."""
    keep: list[str] = []
    notes: list[str] = []
    for m in metrics:
        values = [v for lay in lines for _, v in history[lay].get(m, ())]
        if not values:
            if asked:
                notes.append(f"{m} (not logged)")
        elif all(math.isnan(v) for v in values):
            notes.append(f"{m} (no finite value)")
        else:
            keep.append(m)
    return keep, notes


def metric_curves(
    history: History,
    metrics: Sequence[str] | None = None,
    lines: Sequence[str] | None = None,
    *,
    title: str | None = None,
    xlabel: str = "completed epochs",
    legend_title: str = "layer",
    cmap: str = "viridis",
    dashed: Collection[str] = (),
    lr: Mapping[str, Series] | None = None,
    marks: Mapping[str, float] | None = None,
) -> Figure:
    """One panel per metric, one line per layer (or probe), on log y-axes.

    ``lines`` selects and orders the lines (default: ``history`` order; colours run along
    ``cmap``); ``dashed`` names lines drawn dashed. ``metrics`` default to every metric the
    lines have. Metrics with no finite value get no panel; the caption names them (and those
    asked for but not logged). ``lr`` (``{"lr-SGD": series}``) is drawn as steps in a strip
    under each panel of the last row; ``marks`` (``{label: x}``) are dotted vertical
    lines (e.g. the epoch of zero training error). ``ValueError`` when no panel is left.
    """
    lines = list(history) if lines is None else [n for n in lines if n in history]
    asked = metrics is not None
    if metrics is None:
        metrics = list(dict.fromkeys(m for n in lines for m in history[n]))
    keep, notes = _drawable(history, lines, metrics, asked)
    if not keep:
        raise ValueError(f"metric_curves: nothing to draw ({', '.join(notes) or 'no line'})")
    grid = L.new_figure(
        len(keep), legend_w=L.legend_width([*lines, *(marks or {}), *(lr or {})], legend_title),
        suptitle=bool(title), strip_h=_STRIP_H if lr else 0.0, caption_lines=bool(notes),
    )  # fmt: skip
    colours = dict(zip(lines, L.colors(len(lines), cmap)))
    xs: list[float] = []
    for ax, metric in zip(grid.panels, keep):
        data = L.LogData()
        for name in lines:
            series = history[name].get(metric, ())
            xs += [x for x, _ in series]
            style = {"ls": "--"} if name in dashed else {}
            data.add(L.log_line(ax, series, color=colours[name], label=name, **style))
        L.finish_log_axis(ax, data)
        ax.set_title(title_of(metric), fontsize="medium")
        ax.set_xlabel(xlabel)
        for label, x in (marks or {}).items():
            ax.axvline(x, color="0.25", ls=":", lw=1.2, label=label)
            xs.append(x)
    for strip in grid.strips:
        _lr_strip(strip, lr or {}, xlabel, max(xs, default=math.nan))
    L.share_xlim(grid.panels, xs)
    L.legend(grid, legend_title)
    if title:
        grid.fig.suptitle(title)
    L.caption(grid.fig, ["not drawn: " + ", ".join(notes)] if notes else [])
    return grid.fig


def _lr_strip(ax: Axes, lr: Mapping[str, Series], xlabel: str, until: float) -> None:
    """Learning rates as steps: each value holds until the next, the last one until ``until``
    (the end of the panels' data); log y when all positive and spanning over 10x."""
    values = []
    for colour, (name, series) in zip(L.colors(len(lr), "tab10"), lr.items()):
        pts = [(x, v) for x, v in series if math.isfinite(x) and math.isfinite(v)]
        if pts:
            if until > pts[-1][0]:
                pts.append((until, pts[-1][1]))
            ax.step(*zip(*pts), where="post", color=colour, lw=1.2, label=name, gid="lr")
            values += [v for _, v in pts]
    if values and min(values) > 0 and max(values) >= 10 * min(values):
        ax.set_yscale("log")
        ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylabel("lr", fontsize="small")
    ax.tick_params(axis="y", labelsize="x-small")
    ax.yaxis.set_major_locator(MaxNLocator(3) if ax.get_yscale() == "linear" else LogLocator())
    ax.grid(True, alpha=0.3)
    ax.set_xlabel(xlabel)


def band_stats(runs: Sequence[Series]) -> list[tuple[float, float, float, float, int]]:
    """``(x, mean, lowest, highest, n)`` per x logged by any run, over its finite values.

    ``n`` is how many runs have a finite value at ``x``; points where none has are left out.
    """
    at: dict[float, list[float]] = {}
    for series in runs:
        for x, v in series:
            if math.isfinite(x):
                at.setdefault(x, [])
                if math.isfinite(v):
                    at[x].append(v)
    return [(x, sum(vs) / len(vs), min(vs), max(vs), len(vs)) for x, vs in sorted(at.items()) if vs]


def _draw_band(ax: Axes, runs: Sequence[Series], color: Any, label: str) -> L.LogData:
    stats = band_stats(runs)
    data = L.log_line(ax, [(x, m) for x, m, *_ in stats], color=color, label=label)
    xs = [x for x, *_ in stats]
    positive = band_stats([[(x, v) for x, v in s if v > 0] for s in runs])
    low_at = {x: lo for x, _, lo, _, _ in positive}  # a run at 0 sits on the zero band
    lows = [low_at.get(x, math.nan) for x in xs]
    highs = [hi if hi > 0 else math.nan for _, _, _, hi, _ in stats]
    ax.fill_between(xs, lows, highs, color=color, alpha=0.22, lw=0, gid=f"band:{label}")
    data.ys += [v for v in lows + highs if math.isfinite(v)]
    for series in runs:  # a run at 0 pulls the band to the zero band: mark it there
        data.low += [(x, color) for x, v in series if math.isfinite(x) and v <= 0]
    return data


def overlay(
    curves: Mapping[str, Sequence[Series]],
    *,
    metric: str,
    subtitle: str | None = None,
    title: str | None = None,
    xlabel: str = "completed epochs",
    marks: Mapping[str, float] | None = None,
) -> Figure:
    """One metric of several runs on one log axis (paper Fig. 3).

    ``curves[label]`` holds one series per run of that label: one run is a line; several
    (seeds of one setting) are their mean (arithmetic, over the runs with a finite value at
    each x) and a band from the lowest to the highest run (the lowest positive one where a
    run is at 0, that run marked on the zero band), labelled with the run count.
    Labels without a finite value are left out and named in the caption.
    """
    kept = {k: v for k, v in curves.items() if any(math.isfinite(y) for s in v for _, y in s)}
    notes = [k for k in curves if k not in kept]
    if not kept:
        raise ValueError(f"overlay: no run has a finite {metric}")
    labels = [k if len(v) == 1 else f"{k}: mean, min-max of {len(v)} runs" for k, v in kept.items()]
    grid = L.new_figure(
        1, legend_w=L.legend_width([*labels, *(marks or {})], "run"), title_lines=2,
        suptitle=bool(title), caption_lines=bool(notes),
    )  # fmt: skip
    (ax,) = grid.panels
    data, xs = L.LogData(), []
    for colour, label, runs in zip(L.colors(len(kept), "tab10"), labels, kept.values()):
        xs += [x for s in runs for x, _ in s]
        if len(runs) == 1:
            data.add(L.log_line(ax, runs[0], color=colour, label=label))
        else:
            data.add(_draw_band(ax, runs, colour, label))
    for label, x in (marks or {}).items():
        ax.axvline(x, color="0.25", ls=":", lw=1.2, label=label)
    L.finish_log_axis(ax, data)
    ax.set_title(title_of(metric) + (f"\n{subtitle}" if subtitle else ""), fontsize="medium")
    ax.set_xlabel(xlabel)
    L.share_xlim([ax], xs)
    L.legend(grid, "run")
    if title:
        grid.fig.suptitle(title)
    L.caption(grid.fig, [f"no finite {metric}: " + ", ".join(notes)] if notes else [])
    return grid.fig
