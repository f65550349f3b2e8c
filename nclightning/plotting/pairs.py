"""The perturbation-model figure of a layer pair (docs/science.md §2, §7.4, §7.5, §7.6).

Owns :func:`measured_vs_predicted`: per metric, H0 and H measured beside H* predicted by the
model fitted to the pair; the residual ``log10(predicted / measured)`` of each metric the fit
was not fitted to (the test of the model, §7.6: the coupling is chosen so that H* has H's
``nc1_tilde``, so that metric matches by construction); and the coupling over epochs with its
status (fitted; ``not_more_collapsed`` and ``identical``, where the coupling is infinite, on
a band at the top) and whether it lies in the perturbative regime where Theorems 4.1-4.2 may
be read into it (§5.3; filled markers) or not (hollow).
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

__all__ = ["STATUS_STYLE", "measured_vs_predicted"]

Series = Sequence[tuple[float, float]]
STATUS_STYLE = {"not_more_collapsed": ("C3", "^"), "identical": ("0.4", "D")}
"""Colour and marker of the statuses whose coupling is infinite (on the top band)."""
_BAR_STYLES = (("0.6", None, "white"), ("C0", None, "white"), ("C3", "//", "0.2"))
_WIDTH = 0.27


def _pair_metrics(
    h0: Mapping[str, float],
    h: Mapping[str, float],
    h_star: Mapping[str, float],
    metrics: Sequence[str] | None,
) -> tuple[list[str], list[str]]:
    """Metrics to draw (caller's order, else ``h_star``'s) and those without any value."""
    metrics = list(h_star) if metrics is None else list(metrics)
    keep: list[str] = []
    left_out: list[str] = []
    for m in metrics:
        values = [d.get(m, math.nan) for d in (h0, h, h_star)]
        (keep if any(math.isfinite(v) for v in values) else left_out).append(m)
    return keep, left_out


def _bar_panel(
    ax: Axes, metrics: Sequence[str], values: Sequence[Mapping[str, float]], labels: Sequence[str]
) -> None:
    """Grouped bars (H0, H, H*) per metric on a log axis; zeros on the band."""
    data, groups = L.LogData(), []
    for j, (vals, (colour, _, _)) in enumerate(zip(values, _BAR_STYLES)):
        pts = [(i + (j - 1) * _WIDTH, float(vals.get(m, math.nan))) for i, m in enumerate(metrics)]
        pos = [(x, v) for x, v in pts if math.isfinite(v) and v > 0]
        data.ys += [v for _, v in pos]
        data.low += [(x, colour) for x, v in pts if v <= 0]
        groups.append(pos)
    L.finish_log_axis(ax, data, room=0.15)
    floor = L.bar_floor(ax, data) if data.ys else 0.0
    for pos, label, (colour, hatch, edge) in zip(groups, labels, _BAR_STYLES):
        xs, ys = zip(*pos) if pos else ((), ())
        ax.bar(
            xs, [y - floor for y in ys], bottom=floor, width=_WIDTH, label=label, color=colour,
            hatch=hatch, edgecolor=edge, linewidth=0.5,
        )  # fmt: skip
    _metric_ticks(ax, metrics)
    ax.set_title("measured and predicted metrics", fontsize="medium")


def _metric_ticks(ax: Axes, metrics: Sequence[str]) -> None:
    rotate = len(metrics) > 4
    ax.set_xticks(
        range(len(metrics)), metrics, rotation=30 if rotate else 0,
        ha="right" if rotate else "center", rotation_mode="anchor",
    )  # fmt: skip
    ax.set_xlim(-0.6, len(metrics) - 0.4)


def _residual_panel(ax: Axes, metrics: Sequence[str], residuals: Mapping[str, float]) -> None:
    """``log10(predicted / measured)`` per metric; the fitted metric has none (says so)."""
    xs, ys = [], []
    for i, m in enumerate(metrics):
        r = residuals.get(m)
        if r is not None and math.isfinite(r):
            xs.append(i)
            ys.append(r)
        else:
            word = "fitted" if r is None else "n/a"
            ax.text(i, 0.0, word, ha="center", va="bottom", fontsize="x-small", color="0.3",
                    rotation=90, gid=f"residual-{word}")  # fmt: skip
    ax.bar(xs, ys, width=0.6, color=["C3" if y > 0 else "C0" for y in ys], gid="residuals")
    top = max([abs(y) for y in ys] + [0.5]) * 1.15
    for x, y in zip(xs, ys):
        ax.text(x, y + (0.03 if y >= 0 else -0.03) * top, f"{y:+.2g}", ha="center",
                va="bottom" if y >= 0 else "top", fontsize="x-small")  # fmt: skip
    ax.axhline(0.0, color="0.2", lw=0.8)
    ax.set_ylim(-top, top)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_ylabel("log10(predicted / measured)", fontsize="small")
    _metric_ticks(ax, metrics)
    ax.set_title("residuals of H* against H", fontsize="medium")


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
        (1.0, "C2", "perturbative", "fitted, perturbative (Thms 4.1-4.2 apply)"),
        (0.0, "white", "not_perturbative", "fitted, outside that regime"),
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
    coupling: Series = (),
    status: Sequence[tuple[float, str]] = (),
    perturbative: Series = (),
    labels: tuple[str, str, str] = ("H0 (measured)", "H (measured)", "H* (model)"),
    title: str | None = None,
) -> Figure:
    """The pair figure: bars (H0, H, H*), residuals, and the coupling over epochs.

    ``h0``, ``h``, ``h_star`` map metric names to floats at one epoch; ``metrics`` defaults
    to ``h_star``'s keys. ``residuals`` (``log10(predicted / measured)`` per metric) adds the
    residual panel; ``coupling``/``status``/``perturbative`` (series over epochs; status as
    names of ``nclightning.record.keys.PAIR_STATUS``) add the coupling panel. Metrics with
    no finite value anywhere are left out and named in the caption.
    """
    keep, left_out = _pair_metrics(h0, h, h_star, metrics)
    if not keep:
        raise ValueError("measured_vs_predicted: no metric with a value to draw")
    panels = 1 + (residuals is not None) + bool(coupling)
    rotate_room = 0.035 * max(len(m) for m in keep) if len(keep) > 4 else 0.0
    grid = L.new_figure(
        panels, ncols=3, ax_w=max(L.AX_W, 0.55 * len(keep)), legend_w=3.0,
        title_lines=1, suptitle=bool(title), xlabel_extra=rotate_room,
        caption_lines=bool(left_out),
    )  # fmt: skip
    axes = iter(grid.panels)
    _bar_panel(next(axes), keep, (h0, h, h_star), labels)
    if residuals is not None:
        _residual_panel(next(axes), keep, residuals)
    extra = _coupling_panel(next(axes), coupling, status, perturbative) if coupling else []
    L.legend(grid, None, extra)
    if title:
        grid.fig.suptitle(title)
    L.caption(grid.fig, [f"no value: {', '.join(left_out)}"] if left_out else [])
    return grid.fig
