"""Figures of :mod:`nclightning.plotting`: content of the axes, PNG output, speed."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from matplotlib import image as mpimg
from matplotlib.figure import Figure

from nclightning import plotting

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def history(layers=("h0", "blocks.0", "penultimate"), epochs=5, metrics=("nc1", "nc1_tilde")):
    return {
        layer: {
            m: [(e, (j + 1) * (i + 1) * 0.5**e) for e in range(epochs + 1)]
            for j, m in enumerate(metrics)
        }
        for i, layer in enumerate(layers)
    }


def visible_axes(fig: Figure):
    return [ax for ax in fig.axes if ax.get_visible()]


def assert_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 200 and float(img.var()) > 1e-3
    colours = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 20


def test_history_from_scalars():
    flat = {
        "nc/train/blocks.2/nc1": [(0, 2.0), (1, 1.0)],
        "nc/train/accuracy": [(0, 0.1)],
        "nc/val/h0/nc1": [(0, 5.0)],
        "nc/train/a/b/nc2_etf": [(1, 0.5)],
        "pm/h0->penultimate/nc1": [(0, 1.0)],
        "train/loss": [(0, 3.0)],
    }
    assert plotting.history_from_scalars(flat, "train") == {
        "blocks.2": {"nc1": [(0.0, 2.0), (1.0, 1.0)]},
        "a/b": {"nc2_etf": [(1.0, 0.5)]},
    }
    assert plotting.history_from_scalars(flat, "val") == {"h0": {"nc1": [(0.0, 5.0)]}}


def test_metric_curves_panels_lines_and_log_scale(tmp_path):
    hist = history(metrics=("nc1", "nc1_tilde", "nc4"))
    hist["penultimate"]["nc4"] = [(0, 0.3), (1, math.nan), (2, 0.1), (3, 0.0), (4, -1.0)]
    fig = plotting.metric_curves(hist, metrics=("nc1", "nc4", "nc3"), layers=["penultimate", "h0"])
    axes = visible_axes(fig)
    assert len(axes) == 2  # nc3 is not logged: no panel
    assert axes[0].get_title().startswith("nc1:") and axes[1].get_title().startswith("nc4:")
    assert all(ax.get_yscale() == "log" for ax in axes)
    assert [line.get_label() for line in axes[0].get_lines()] == ["penultimate", "h0"]
    x, y = axes[0].get_lines()[0].get_data()
    assert list(x) == list(range(6)) and list(y) == [3 * 0.5**e for e in range(6)]
    # NaN and non-positive points are dropped, and the drop is said
    nc4 = axes[1].get_lines()[0]
    assert nc4.get_label() == "penultimate"
    assert list(nc4.get_xdata()) == [0, 2] and list(nc4.get_ydata()) == [0.3, 0.1]
    assert any("2 values <= 0 not shown" in t.get_text() for t in axes[1].texts)
    assert axes[1].get_xlim() == axes[0].get_xlim()  # shorter series keep the run's x-range
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["penultimate", "h0"]
    assert_png(plotting.save_figure(fig, tmp_path / "sub" / "curves.png"))


def test_panel_without_positive_values_is_linear_and_says_so():
    hist = {"h": {"nc4": [(0, 0.0), (1, 0.0)], "nc1": [(0, math.nan)]}}
    fig = plotting.metric_curves(hist, metrics=("nc4", "nc1"))
    a, b = visible_axes(fig)
    assert a.get_yscale() == "linear" and "all values <= 0" in a.texts[0].get_text()
    assert b.get_yscale() == "linear" and "no finite values" in b.texts[0].get_text()


def test_nothing_to_draw_raises():
    with pytest.raises(ValueError, match="no selected layer"):
        plotting.metric_curves(history(), metrics=("nc9",))
    with pytest.raises(ValueError, match="no selected layer"):
        plotting.metric_curves(history(), layers=["fc"])
    with pytest.raises(ValueError):
        plotting.depth_profile({"a": {"nc1": 1.0}}, metrics=("nc2_etf",))
    with pytest.raises(ValueError):
        plotting.measured_vs_predicted({}, {}, {})
    with pytest.raises(ValueError):
        plotting.run_overlay({}, "nc1", "h0")


def test_depth_profile_follows_the_given_order(tmp_path):
    values = {
        "h0": {"nc1": 4.0, "nc1_tilde": 2.0},
        "blocks.0": {"nc1": 2.0},
        "penultimate": {"nc1": 1.0, "nc1_tilde": 0.5},
    }
    fig = plotting.depth_profile(values, order=["h0", "blocks.0", "penultimate"], xlabel="depth")
    ax_nc1, ax_tilde = visible_axes(fig)
    assert [t.get_text() for t in ax_nc1.get_xticklabels()] == ["h0", "blocks.0", "penultimate"]
    assert list(ax_nc1.get_lines()[0].get_ydata()) == [4.0, 2.0, 1.0]
    assert list(ax_tilde.get_lines()[0].get_xdata()) == [0, 2]  # blocks.0 has no nc1_tilde
    assert ax_nc1.get_yscale() == "log" and ax_nc1.get_xlabel() == "depth"
    assert_png(plotting.save_figure(fig, tmp_path / "depth.png"))


def test_measured_vs_predicted_bars_and_beta(tmp_path):
    h0 = {"nc1": 1.0, "nc1_tilde": 0.8, "nc2_etf": 0.5}
    h = {"nc1": 0.1, "nc1_tilde": 0.08, "nc2_etf": math.nan}
    h_star = {"nc2_etf": 0.3, "nc1": 0.09, "nc1_tilde": 0.07, "objective": 1.0}
    fig = plotting.measured_vs_predicted(h0, h, h_star, beta=12.5)
    (ax,) = visible_axes(fig)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["nc1", "nc1_tilde", "nc2_etf"]
    heights = [[p.get_height() for p in c] for c in ax.containers]
    assert heights == [[1.0, 0.8, 0.5], [0.1, 0.08], [0.09, 0.07, 0.3]]
    assert ax.get_yscale() == "log" and ax.get_ylim()[0] < 0.07  # the smallest bar shows
    assert "12.5" in ax.get_title() and r"\beta" in ax.get_title()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "H0 (measured)",
        "H (measured)",
        "H* (model)",
    ]
    assert_png(plotting.save_figure(fig, tmp_path / "pm.png"))


def test_run_overlay_one_line_per_run(tmp_path):
    runs = {"baseline": history(), "wd_x2": history(epochs=3), "no_layer": {"x": {}}}
    fig = plotting.run_overlay(runs, "nc1", "penultimate")
    (ax,) = visible_axes(fig)
    assert [line.get_label() for line in ax.get_lines()] == ["baseline", "wd_x2"]
    assert "penultimate" in ax.get_title() and ax.get_yscale() == "log"
    fig2 = plotting.run_overlay(runs, ["nc1", "nc1_tilde"], "h0")
    assert len(visible_axes(fig2)) == 2
    assert_png(plotting.save_figure(fig, tmp_path / "overlay.png"))


def test_figures_stay_out_of_pyplot(tmp_path):
    plotting.save_figure(plotting.metric_curves(history()), tmp_path / "a.png")
    plt = sys.modules.get("matplotlib.pyplot")
    assert plt is None or plt.get_fignums() == []


def test_large_history_draws_every_layer(tmp_path):
    """10 layers x 300 epochs x 6 metrics: one line per layer in every panel, a valid PNG.

    (Drawing speed is not asserted here: timings belong in benchmarks, not unit tests.)
    """
    layers = [f"blocks.{i}" for i in range(10)]
    hist = history(layers=layers, epochs=300, metrics=plotting.DEFAULT_METRICS)
    fig = plotting.metric_curves(hist)
    panels = visible_axes(fig)
    assert len(panels) == len(plotting.DEFAULT_METRICS)
    assert all([line.get_label() for line in ax.get_lines()] == layers for ax in panels)
    assert_png(plotting.save_figure(fig, tmp_path / "big.png"))
