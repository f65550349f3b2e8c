"""Shared drawing machinery of :mod:`nclightning.plotting`: grids, log axes, bands, captions.

Owns the look every figure shares: a grid of panels placed with fixed margins in inches
(constrained layout would measure every tick label several times), optional strips under the
lowest panel of each column (the learning rate), a figure legend in a right-hand column, a
caption under the panels that says what was left out, and log y-axes that never hide a value
silently: NaN and infinite values break a line; a value ``<= 0`` also breaks it and is marked
on a grey band at the bottom of the panel (``+inf`` on one at the top, for pair couplings),
with no tick of the data inside the band. Plain data in, :class:`~matplotlib.figure.Figure`
out, never pyplot, no torch.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator
from matplotlib.transforms import blended_transform_factory

__all__ = [
    "AX_H",
    "AX_W",
    "BAND",
    "Grid",
    "band_points",
    "bar_floor",
    "colors",
    "figure_png",
    "finish_log_axis",
    "fit_margins",
    "legend",
    "legend_width",
    "log_line",
    "new_figure",
    "save_figure",
    "share_xlim",
]

AX_W, AX_H = 3.4, 2.4  # inches per panel (axes box)
LINE = 0.22  # inches per line of title or caption text
MAX_COLS = 3
BAND = 0.09
"""Height of the bottom (zero) and top (infinity) bands, in axes fractions."""
_DATA_LO, _DATA_HI = BAND + 0.07, 0.95  # axes fractions the finite positive data may reach


@dataclass
class Grid:
    """A new figure: ``panels`` row-major, ``strips`` under the panels of the last row."""

    fig: Figure
    panels: list[Axes]
    strips: list[Axes] = field(default_factory=list)
    legend_anchor: tuple[float, float] = (1.0, 1.0)


def new_figure(
    npanels: int,
    *,
    ncols: int | None = None,
    ax_w: float = AX_W,
    ax_h: float = AX_H,
    legend_w: float = 0.0,
    title_lines: int = 1,
    suptitle: bool = False,
    xlabel_extra: float = 0.0,
    strip_h: float = 0.0,
    caption_lines: int = 0,
) -> Grid:
    """A figure of ``npanels`` axes (``ncols`` per row, default up to 3), margins in inches.

    ``legend_w`` reserves a right-hand column for :func:`legend`; ``strip_h`` (inches) adds a
    strip axes sharing x under each panel of the last row; ``caption_lines`` reserves
    lines for :func:`caption`. ``xlabel_extra`` is room for long or rotated tick labels.
    """
    ncols = max(1, min(ncols or MAX_COLS, npanels))
    nrows = max(1, math.ceil(npanels / ncols))
    left, wgap, right = 0.85, 0.85, 0.25 + legend_w
    top = 0.15 + LINE * title_lines + (0.35 if suptitle else 0.0)
    above = LINE * title_lines + 0.15
    strip_gap = 0.08 if strip_h else 0.0
    below = 0.5 + xlabel_extra
    bottom = below + strip_gap + strip_h + (LINE * caption_lines + 0.1 if caption_lines else 0.0)
    width = left + ncols * ax_w + (ncols - 1) * wgap + right
    height = top + nrows * ax_h + (nrows - 1) * (below + above) + bottom
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    panels, lowest = [], {}
    for i in range(npanels):
        r, c = divmod(i, ncols)
        x0 = left + c * (ax_w + wgap)
        y0 = height - top - (r + 1) * ax_h - r * (below + above)
        panels.append(fig.add_axes((x0 / width, y0 / height, ax_w / width, ax_h / height)))
        if r == nrows - 1:
            lowest[c] = (panels[-1], x0, y0)
    strips = []
    for c in sorted(lowest) if strip_h else ():
        ax, x0, y0 = lowest[c]
        y = y0 - strip_gap - strip_h
        strips.append(
            fig.add_axes((x0 / width, y / height, ax_w / width, strip_h / height), sharex=ax)
        )
        ax.tick_params(labelbottom=False)
    anchor = (1 - (legend_w + 0.05) / width, 1 - top / height)
    return Grid(fig, panels, strips, anchor)


def caption(fig: Figure, lines: Sequence[str]) -> None:
    """Lines of small grey text at the bottom left (room from ``new_figure(caption_lines=)``)."""
    if lines:
        height = fig.get_figheight()
        fig.text(
            0.01, 0.08 / height, "\n".join(lines), ha="left", va="bottom", color="0.3",
            fontsize="small", gid="caption",
        )  # fmt: skip


def legend_width(labels: Iterable[str], title: str | None = None) -> float:
    """Inches a small-font legend with these labels needs (handle + text)."""
    n = max([len(str(t)) for t in labels] + [len(title or "")], default=0)
    return 0.75 + 0.075 * n


def colors(n: int, cmap: str = "viridis") -> list:
    """``n`` colours: ``tab10`` (categorical, up to 10) or a sequential map (shallow -> deep)."""
    from matplotlib import colormaps

    if n <= 10 and cmap == "tab10":
        return [colormaps["tab10"](i) for i in range(n)]
    cm = colormaps["viridis" if cmap == "tab10" else cmap]
    return [cm(0.85 * i / max(n - 1, 1)) for i in range(n)]


def legend(grid: Grid, title: str | None, extra: Sequence = ()) -> None:
    """One figure legend in the column reserved by :func:`new_figure` (``extra`` handles too)."""
    seen: dict[str, object] = {}
    for ax in [*grid.panels, *grid.strips]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    for h in extra:
        seen.setdefault(h.get_label(), h)
    if seen:
        grid.fig.legend(  # type: ignore[call-overload]
            list(seen.values()), list(seen), loc="upper left", bbox_to_anchor=grid.legend_anchor,
            title=title, fontsize="small", title_fontsize="small", frameon=False,
        )  # fmt: skip


def marker(n: int) -> str | None:
    return "o" if n <= 40 else None


# ---------------------------------------------------------------------------------------------
# log axes with bands
# ---------------------------------------------------------------------------------------------


@dataclass
class LogData:
    """What a log panel received: finite positive values, and the x of values on the bands."""

    ys: list[float] = field(default_factory=list)
    low: list[tuple[float, object]] = field(default_factory=list)  # (x, colour) of values <= 0
    high: list[tuple[float, object]] = field(default_factory=list)  # (x, colour) of +inf
    negative: bool = False

    def add(self, other: LogData) -> None:
        self.ys += other.ys
        self.low += other.low
        self.high += other.high
        self.negative |= other.negative


def log_line(
    ax: Axes, series: Iterable[tuple[float, float]], *, color: Any, **style: Any
) -> LogData:
    """Draw ``series`` on a log axis: NaN, infinite and ``<= 0`` values break the line.

    Returns what :func:`finish_log_axis` needs to place the limits and the bands.
    """
    xs, ys, data = [], [], LogData()
    for x, v in series:
        if not math.isfinite(x):
            continue
        xs.append(x)
        ok = math.isfinite(v) and v > 0
        ys.append(v if ok else math.nan)
        if ok:
            data.ys.append(v)
        elif v <= 0:
            data.low.append((x, color))
            data.negative |= v < 0
        elif v == math.inf:
            data.high.append((x, color))
    if data.ys:
        n = len(data.ys)
        ax.plot(xs, ys, color=color, marker=style.pop("marker", marker(n)), ms=3, lw=1.4, **style)
    return data


class _OutsideBands(LogLocator):
    """A log locator that puts no tick on the bands (they hold no data value)."""

    def __init__(self, lo: float, hi: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lo, self.hi = lo, hi

    def tick_values(self, vmin: float, vmax: float) -> Any:
        ticks = super().tick_values(vmin, vmax)
        return [t for t in ticks if self.lo <= t <= self.hi]


def band_points(ax: Axes, points: Sequence[tuple[float, object]], where: str, text: str) -> None:
    """Grey band at the bottom or top of ``ax`` with a marker per ``(x, colour)`` point."""
    y0 = 0.0 if where == "bottom" else 1.0 - BAND
    ax.add_patch(Rectangle((0, y0), 1, BAND, transform=ax.transAxes, color="0.92", zorder=0, lw=0))
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    by_colour: dict[object, list[float]] = {}
    for x, c in points:
        by_colour.setdefault(c, []).append(x)
    for c, xs in by_colour.items():
        ax.plot(
            xs, [y0 + BAND / 2] * len(xs), transform=trans, ls="none", color=c, ms=4, clip_on=False,
            marker="v" if where == "bottom" else "^", gid=f"band-{where}", label="_band",
        )  # fmt: skip
    ax.text(
        -0.015, y0 + BAND / 2, text, transform=ax.transAxes, ha="right", va="center",
        fontsize="x-small", color="0.3", gid=f"band-{where}-label",
    )  # fmt: skip


def finish_log_axis(ax: Axes, data: LogData, *, room: float = 0.05) -> None:
    """Log y-scale over ``data.ys``; bands for the values ``<= 0`` and ``+inf``.

    The positive data fill the axes between the bands. Without any positive value the panel
    is linear and shows the zeros at 0. Minor ticks only when the data span under two
    decades (then they carry the labels). ``room`` is the axes fraction left under the
    smallest value above the band (bars want more than lines).
    """
    ax.grid(True, which="major", alpha=0.3)
    if not data.ys:
        _all_zero_axis(ax, data)
        return
    ax.set_yscale("log")
    lo, hi = math.log10(min(data.ys)), math.log10(max(data.ys))
    if hi - lo < 1e-9:  # one value: a decade around it
        lo, hi = lo - 0.5, hi + 0.5
    f_lo = _DATA_LO + room - 0.05 if data.low else room  # axes fractions of the extremes
    f_hi = 1 - _DATA_LO if data.high else _DATA_HI
    per = (hi - lo) / (f_hi - f_lo)  # decades per axes fraction
    ax.set_ylim(10 ** (lo - f_lo * per), 10 ** (hi + (1 - f_hi) * per))
    inner = (10 ** (lo - 0.02 * per), 10 ** (hi + 0.02 * per))
    ax.yaxis.set_major_locator(_OutsideBands(*inner))
    decades = math.floor(hi) - math.ceil(lo) + 1
    if decades >= 2:
        ax.yaxis.set_minor_locator(NullLocator())
    else:
        ax.yaxis.set_minor_locator(_OutsideBands(*inner, subs="auto"))
    if data.low:
        band_points(ax, data.low, "bottom", "<= 0" if data.negative else "0")
    if data.high:
        band_points(ax, data.high, "top", "inf")


def bar_floor(ax: Axes, data: LogData) -> float:
    """Where bars start on a finished log axis: its bottom, or the top of the zero band."""
    lo, hi = (math.log10(v) for v in ax.get_ylim())
    return 10 ** (lo + (BAND if data.low else 0.0) * (hi - lo))


def _all_zero_axis(ax: Axes, data: LogData) -> None:
    """No positive value: a linear axis with the zeros at 0 (``inf`` on the top band)."""
    by_colour: dict[object, list[float]] = {}
    for x, c in data.low:
        by_colour.setdefault(c, []).append(x)
    for c, xs in by_colour.items():
        ax.plot(xs, [0.0] * len(xs), color=c, marker="o", ms=3, lw=1.4, gid="zeros")
    ax.set_ylim(-1, 1)
    ax.set_yticks([0.0])
    if data.high:
        band_points(ax, data.high, "top", "inf")


def share_xlim(axes: Sequence[Axes], xs: Sequence[float]) -> None:
    """Same x-range on every panel (a metric logged for fewer epochs must not look shorter)."""
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return
    lo, hi = min(xs), max(xs)
    pad = 0.03 * (hi - lo) if hi > lo else 0.5
    integer = all(float(x).is_integer() for x in xs)
    for ax in axes:
        ax.set_xlim(lo - pad, hi + pad)
        if integer:  # epochs: no 0.5 ticks
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------


def fit_margins(fig: Figure, pad: float = 0.08) -> None:
    """Grow ``fig`` where its drawn contents (long tick labels, titles, legends) stick out.

    The margins of :func:`new_figure` are fixed in inches and fit usual labels; a longer one
    (``1.66x10^-1`` on a narrow log range) would be clipped at the edge. This draws the figure
    once, and where its tight box leaves the canvas, widens or heightens the canvas by that
    much (plus ``pad`` inches), keeping every axes, text and legend where it was relative to
    the others.
    """
    from matplotlib.text import Text

    box = fig.get_tightbbox()  # inches, from the figure's own renderer
    width, height = fig.get_size_inches()
    grow_l, grow_b = max(0.0, pad - box.x0), max(0.0, pad - box.y0)
    grow_r, grow_t = max(0.0, box.x1 + pad - width), max(0.0, box.y1 + pad - height)
    if not (box.x0 < 0 or box.y0 < 0 or box.x1 > width or box.y1 > height):
        return
    new_w, new_h = width + grow_l + grow_r, height + grow_b + grow_t

    def moved(x: float, y: float) -> tuple[float, float]:  # figure fractions, old -> new
        return (x * width + grow_l) / new_w, (y * height + grow_b) / new_h

    anchors = []
    for legend in fig.legends:
        anchor = legend.get_bbox_to_anchor()
        anchors.append((legend, anchor.x0 / fig.dpi / width, anchor.y1 / fig.dpi / height))
    for ax in fig.axes:
        pos = ax.get_position()
        x0, y0 = moved(pos.x0, pos.y0)
        ax.set_position((x0, y0, pos.width * width / new_w, pos.height * height / new_h))
    for text in fig.findobj(Text):
        if text.get_transform() == fig.transFigure and text.figure is fig:
            text.set_position(moved(*text.get_position()))
    fig.set_size_inches(new_w, new_h)
    for legend, x, y in anchors:
        legend.set_bbox_to_anchor(moved(x, y), transform=fig.transFigure)


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parents created), release it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fit_margins(fig)
    fig.savefig(path, dpi=dpi, format="png")
    _release(fig)
    return path


def figure_png(fig: Figure, *, dpi: int = 100) -> bytes:
    """``fig`` as PNG bytes (for ``wandb.Image(PIL.Image.open(io.BytesIO(...)))``), released."""
    buf = io.BytesIO()
    fit_margins(fig)
    fig.savefig(buf, dpi=dpi, format="png")
    _release(fig)
    return buf.getvalue()


def _release(fig: Figure) -> None:
    fig.clear()
    if getattr(fig.canvas, "manager", None) is not None:  # a pyplot figure passed in by a caller
        import matplotlib.pyplot as plt

        plt.close(fig)
