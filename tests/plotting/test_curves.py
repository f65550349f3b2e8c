"""``plotting.curves`` and the shared layout: what each panel draws, read back from its artists."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from figtools import (
    assert_png,
    axes_fraction,
    band_xs,
    caption,
    gid_lines,
    lines,
    panels,
    strips,
    xdata,
    ydata,
)

from nclightning import plotting


def history(layers=("h0", "blocks.0", "penultimate"), epochs=5, metrics=("nc1", "nc1_tilde")):
    return {
        layer: {
            m: [(e, (j + 1) * (i + 1) * 0.5**e) for e in range(epochs + 1)]
            for j, m in enumerate(metrics)
        }
        for i, layer in enumerate(layers)
    }


def test_one_panel_per_metric_one_line_per_layer(tmp_path):
    hist = history(metrics=("nc1", "nc1_tilde", "nc4"))
    fig = plotting.metric_curves(hist, ("nc1", "nc1_tilde"), ["penultimate", "h0"])
    a, b = panels(fig)
    assert a.get_title().startswith("nc1:") and b.get_title().startswith("nc1_tilde:")
    assert a.get_yscale() == b.get_yscale() == "log"
    assert list(lines(a)) == ["penultimate", "h0"]
    assert xdata(lines(a)["penultimate"]) == list(range(6))
    assert ydata(lines(a)["penultimate"]) == [3 * 0.5**e for e in range(6)]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["penultimate", "h0"]
    assert caption(fig) == ""  # nothing left out
    assert_png(plotting.save_figure(fig, tmp_path / "sub" / "curves.png"))


def test_zeros_break_the_line_and_sit_on_the_band_below_the_data():
    """NC4 reaching 0: no line across the zeros, the zeros marked on the bottom band, no
    note written over the data, the smallest positive value above the band."""
    nc4 = [(0, 0.3), (1, 0.2), (2, 0.0), (3, 0.0), (4, 0.1), (5, math.nan), (6, 0.0)]
    fig = plotting.metric_curves({"penultimate": {"nc4": nc4}})
    (ax,) = panels(fig)
    y = ydata(lines(ax)["penultimate"])
    assert y[:2] == [0.3, 0.2] and y[4] == 0.1
    assert all(math.isnan(v) for v in (y[2], y[3], y[5], y[6]))  # the line is broken there
    assert band_xs(ax, "bottom") == [2.0, 3.0, 6.0]
    assert [t.get_text() for t in ax.texts] == ["0"]  # the band's label, nothing else
    assert axes_fraction(ax, 0.1) > 0.12  # the data stay clear of the band
    lo, hi = ax.get_ylim()
    ticks = [t for t in ax.get_yticks() if lo <= t <= hi]
    assert ticks and all(axes_fraction(ax, t) > 0.09 for t in ticks)  # no value tick on it
    assert not any(t.get_text().endswith("top") for t in ax.texts)


def test_metrics_without_a_finite_value_get_no_panel_and_are_named():
    hist = {"h": {"nc1": [(0, 1.0), (1, 0.5)], "nc3": [(0, math.nan)], "nc4": [(0, 0.0)]}}
    fig = plotting.metric_curves(hist, ("nc1", "nc3", "nc4", "cdnv"))
    titles = [ax.get_title().split(":")[0] for ax in panels(fig)]
    assert titles == ["nc1", "nc4"]
    assert "nc3 (no finite value)" in caption(fig) and "cdnv (not logged)" in caption(fig)
    (zero_panel,) = [ax for ax in panels(fig) if ax.get_title().startswith("nc4")]
    assert zero_panel.get_yscale() == "linear"  # only zeros: drawn at 0
    (zeros,) = gid_lines(zero_panel, "zeros")
    assert ydata(zeros) == [0.0]
    with pytest.raises(ValueError, match="nothing to draw"):
        plotting.metric_curves(hist, ("nc3",))


def test_learning_rate_strip_under_the_panels_and_zero_error_mark():
    lr = {"lr-SGD": [(0.0, 0.05), (1.0, 0.05), (2.0, 0.005)]}
    fig = plotting.metric_curves(
        history(epochs=3, metrics=("nc1", "nc1_tilde", "cdnv", "nc2_etf")),
        lr=lr,
        marks={"zero train error": 2.0},
    )
    four = panels(fig)
    assert len(four) == 4
    below = strips(fig)
    assert len(below) == 1  # under each panel of the last row (3 + 1 panels: one)
    (step,) = gid_lines(below[0], "lr")
    # each value holds until the next; the last one to the end of the data (epoch 3)
    assert xdata(step) == [0.0, 1.0, 2.0, 3.0] and ydata(step) == [0.05, 0.05, 0.005, 0.005]
    assert step.get_drawstyle() == "steps-post" and below[0].get_yscale() == "log"
    assert below[0].get_xlim() == four[-1].get_xlim() == four[0].get_xlim()  # one x-axis
    marks = [ln for ln in four[0].get_lines() if ln.get_label() == "zero train error"]
    assert len(marks) == 1 and xdata(marks[0]) == [2.0, 2.0]


def test_overlay_draws_a_group_of_seeds_as_mean_and_band():
    seeds = [[(e, s * 0.5**e) for e in range(4)] for s in (1.0, 2.0, 4.0)]
    seeds[2][3] = (3, 0.0)  # one seed at 0: the band reaches the zero band there
    single = [[(e, 3.0 * 0.6**e) for e in range(4)]]
    fig = plotting.overlay({"wd 5e-4": seeds, "wd 1e-3": single}, metric="nc1", subtitle="h")
    (ax,) = panels(fig)
    mean = lines(ax)["wd 5e-4: mean, min-max of 3 runs"]
    want = [(1 + 2 + 4) / 3 * 0.5**e for e in range(3)] + [(1 + 2) * 0.125 / 3]
    np.testing.assert_allclose(ydata(mean), want, rtol=1e-15)
    assert ydata(lines(ax)["wd 1e-3"]) == [3.0 * 0.6**e for e in range(4)]
    (band,) = [c for c in ax.collections if c.get_gid() == "band:wd 5e-4: mean, min-max of 3 runs"]
    vertices = band.get_paths()[0].vertices
    for e, (lo, hi) in enumerate([(1.0, 4.0), (0.5, 2.0), (0.25, 1.0), (0.125, 0.25)]):
        ys = vertices[np.isclose(vertices[:, 0], e), 1]  # at 3: the lowest positive run
        np.testing.assert_allclose([ys.min(), ys.max()], [lo, hi], rtol=1e-12)
    assert band_xs(ax, "bottom") == [3.0]
    assert "h" in ax.get_title()


def test_band_stats_over_the_runs_that_logged_each_x():
    runs = [[(0, 1.0), (1, 2.0)], [(0, 3.0), (2, math.nan)], [(1, 4.0)]]
    assert plotting.band_stats(runs) == [(0, 2.0, 1.0, 3.0, 2), (1, 3.0, 2.0, 4.0, 2)]


def test_overlay_leaves_out_runs_without_values():
    fig = plotting.overlay({"a": [[(0, 1.0)]], "b": [[(0, math.nan)]]}, metric="nc1")
    assert list(lines(panels(fig)[0])) == ["a"] and "b" in caption(fig)
    with pytest.raises(ValueError, match="no run has a finite nc1"):
        plotting.overlay({"b": [[(0, math.nan)]]}, metric="nc1")


def test_figures_stay_out_of_pyplot(tmp_path):
    plotting.save_figure(plotting.metric_curves(history()), tmp_path / "a.png")
    png = plotting.figure_png(plotting.metric_curves(history()))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    plt = sys.modules.get("matplotlib.pyplot")
    assert plt is None or plt.get_fignums() == []


def test_plotting_imports_neither_torch_nor_pyplot():
    code = (
        "import sys, nclightning.plotting; "
        "assert not {'torch', 'lightning', 'matplotlib.pyplot'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_large_history_draws_every_layer(tmp_path):
    """10 layers x 300 epochs x 6 metrics: one line per layer in every panel, a valid PNG.

    (Drawing speed is not asserted here: timings belong in benchmarks, not unit tests.)
    """
    layers = [f"blocks.{i}" for i in range(10)]
    metrics = ("nc1", "nc1_tilde", "cdnv", "nc2_etf", "nc3", "nc4")
    fig = plotting.metric_curves(history(layers=layers, epochs=300, metrics=metrics))
    assert len(panels(fig)) == 6
    assert all(list(lines(ax)) == layers for ax in panels(fig))
    assert_png(plotting.save_figure(fig, tmp_path / "big.png"))
