"""What a report drew, read back from the artists, and what the run's own files say.

:func:`capture` replaces :func:`nclightning.plotting.save_figure` for one test: every figure
is read back (each panel's title, its labelled lines' x and y, the x of the markers on its
zero/infinity bands, its bars) just before it is written as usual, so a test compares the
drawn values with ``metrics.csv`` read by the ``csv`` module alone (:func:`logged_curves`),
never with the report's own reader.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from figtools import band_xs, lines, panels, xdata, ydata

from nclightning.plotting._titles import title_of


@dataclass
class Panel:
    title: str
    lines: dict[str, tuple[list[float], list[float]]]
    bottom: list[float]  # x of the markers on the band of values <= 0
    top: list[float]  # x of the markers on the band of infinite values
    bars: list[tuple[str, list[float]]] = field(default_factory=list)  # (label, heights)
    xticklabels: list[str] = field(default_factory=list)
    plain: list[tuple[list[float], list[float]]] = field(default_factory=list)  # no label


def read_figure(fig) -> list[Panel]:
    out = []
    for ax in panels(fig):
        drawn = {  # data lines only: marks (axvline) live in axes coordinates
            name: (xdata(ln), ydata(ln))
            for name, ln in lines(ax).items()
            if ln.get_transform() == ax.transData
        }
        bars = [
            (str(c.get_label()), [float(p.get_height()) for p in c.patches])
            for c in ax.containers
            if hasattr(c, "patches")
        ]
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        plain = [
            (xdata(ln), ydata(ln))
            for ln in ax.get_lines()
            if ln.get_gid() is None and str(ln.get_label()).startswith("_")
        ]
        out.append(
            Panel(ax.get_title(), drawn, band_xs(ax), band_xs(ax, "top"), bars, ticks, plain)
        )
    return out


def outside_texts(fig, margin: float = 0.5) -> list[str]:
    """What a reader would see clipped: the title of every axes (or colour bar) whose drawn
    extent (tick labels, labels, title, legend: matplotlib's tight box) leaves the figure."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    out = []
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        box = ax.get_tightbbox(renderer)
        if box is None:
            continue
        if (
            box.x0 < -margin
            or box.y0 < -margin
            or box.x1 > width + margin
            or box.y1 > height + margin
        ):
            name = ax.get_title() or ax.get_ylabel() or ax.get_label() or "axes"
            out.append(
                f"{name} {[round(v) for v in box.extents]} in {round(width)}x{round(height)}"
            )
    for legend in fig.legends:
        box = legend.get_window_extent(renderer)
        if (
            box.x0 < -margin
            or box.x1 > width + margin
            or box.y0 < -margin
            or box.y1 > height + margin
        ):
            out.append(f"legend {[round(v) for v in box.extents]}")
    return out


def capture(monkeypatch, clipped: list | None = None) -> dict[str, list[Panel]]:
    """``{file stem: panels}`` of every figure saved from now on (then saved for real);
    with a ``clipped`` list, each text drawn outside a figure is appended as ``(stem, text)``."""
    from nclightning import plotting
    from nclightning.plotting import _layout

    drawn: dict[str, list[Panel]] = {}
    real = _layout.save_figure

    def save(fig, path, **kwargs):
        drawn[Path(path).stem] = read_figure(fig)
        if clipped is not None:  # the figure as written: save_figure fits its margins first
            _layout.fit_margins(fig)
            clipped.extend((Path(path).stem, t) for t in outside_texts(fig))
        return real(fig, path, **kwargs)

    monkeypatch.setattr(plotting, "save_figure", save)
    return drawn


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def logged_curves(metrics_csv: Path, probe: str) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """``{layer: {metric: [(epochs_trained, value), ...]}}`` of ``probe``, in file order."""
    head = f"nc-{probe}/"
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for row in csv_rows(metrics_csv):
        for key, cell in row.items():
            if key.startswith(head) and key.count("/") == 2 and cell not in ("", None):
                _, layer, metric = key.split("/")
                out.setdefault(layer, {}).setdefault(metric, []).append(
                    (float(row["epochs_trained"]), float(cell))
                )
    return out


def assert_curve(panel: Panel, label: str, series: list[tuple[float, float]]) -> None:
    """The line ``label`` of ``panel`` is ``series`` as a log axis draws it: every x, the
    positive finite values as y (NaN where the line breaks), values <= 0 on the bottom band,
    +inf on the top band."""
    xs = [x for x, _ in series]
    want_y = [v if math.isfinite(v) and v > 0 else math.nan for _, v in series]
    if any(math.isfinite(v) and v > 0 for _, v in series):
        assert label in panel.lines, (panel.title, label, list(panel.lines))
        got_x, got_y = panel.lines[label]
        assert got_x == xs, (panel.title, label)
        assert len(got_y) == len(want_y) and all(
            (math.isnan(a) and math.isnan(b)) or a == b for a, b in zip(got_y, want_y)
        ), (panel.title, label, got_y, want_y)
    for x, v in series:
        if v <= 0:
            assert x in panel.bottom, (panel.title, label, x)
        if v == math.inf:
            assert x in panel.top, (panel.title, label, x)


def assert_metrics_figure(panels_: list[Panel], logged: dict, layers=None, metrics=None) -> int:
    """Every panel of a ``metrics_{probe}`` figure against the logged curves; returns the
    number of (layer, metric) curves compared. Every drawn metric and layer must be logged."""
    by_title = {p.title: p for p in panels_}
    compared = 0
    for layer in layers or logged:
        for metric, series in logged[layer].items():
            if metrics is not None and metric not in metrics:
                continue
            panel = by_title.get(title_of(metric))
            if panel is None:
                continue
            assert_curve(panel, layer, series)
            compared += 1
    for panel in panels_:  # every drawn data line is a logged layer's
        assert set(panel.lines) <= set(logged), (panel.title, list(panel.lines))
    return compared
