"""Class matrices, per-class variances, depth profile and the pair figure, read back."""

from __future__ import annotations

import math

import numpy as np
import pytest
from figtools import (
    assert_png,
    axes_fraction,
    band_xs,
    bar_tops,
    caption,
    gid_lines,
    panels,
    xdata,
    ydata,
)
from matplotlib.colors import LogNorm

from nclightning import plotting

NAMES = ["cat", "dog", "ship", "frog"]


def cosines(K=4, seed=0):
    g = np.random.default_rng(seed)
    mu = g.standard_normal((K, 6))
    c = mu - mu.mean(0)
    u = c / np.linalg.norm(c, axis=1, keepdims=True)
    return u @ u.T


def test_cosine_matrix_beside_the_simplex_etf(tmp_path):
    cos = cosines()
    cos[1, 2] = cos[2, 1] = math.nan  # an undefined entry is drawn grey, not dropped
    fig = plotting.cosine_vs_etf(cos, NAMES, title="run")
    measured, etf = panels(fig)
    np.testing.assert_array_equal(measured.images[0].get_array().filled(np.nan), cos)
    want = np.full((4, 4), -1 / 3)
    np.fill_diagonal(want, 1.0)
    np.testing.assert_allclose(etf.images[0].get_array(), want, rtol=1e-15)
    off = ~np.eye(4, dtype=bool) & np.isfinite(cos)
    dev = np.max(np.abs(cos[off] + 1 / 3))
    assert f"{dev:.3g}" in measured.get_title() and "-0.333" in etf.get_title()
    assert [t.get_text() for t in measured.get_yticklabels()] == NAMES
    assert measured.images[0].get_clim() == (-1.0, 1.0) == etf.images[0].get_clim()
    assert_png(plotting.save_figure(fig, tmp_path / "cos.png"))


def test_cdnv_heatmap_with_class_names_on_a_log_scale(tmp_path):
    g = np.random.default_rng(1)
    m = np.exp(g.standard_normal((4, 4)))
    m = (m + m.T) / 2
    fig = plotting.cdnv_heatmap(m, NAMES)
    (ax,) = panels(fig)
    shown = ax.images[0].get_array().filled(np.nan)
    off = ~np.eye(4, dtype=bool)
    np.testing.assert_array_equal(shown[off], m[off])
    assert np.all(np.isnan(np.diag(shown)))  # k = l is undefined
    assert isinstance(ax.images[0].norm, LogNorm)
    assert f"{m[off].mean():.3g}" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == NAMES
    assert_png(plotting.save_figure(fig, tmp_path / "cdnv.png"))
    with pytest.raises(ValueError, match=r"\[K, K\]"):
        plotting.cdnv_heatmap(np.ones(3))


def test_many_classes_drop_the_names_but_keep_every_cell():
    K = 100
    fig = plotting.cosine_vs_etf(cosines(K), None)
    measured, _ = panels(fig)
    assert measured.images[0].get_array().shape == (K, K)
    assert measured.get_xticklabels() == [] or len(measured.get_xticks()) < K
    assert len(measured.texts) == 0  # no cell values at this size


def test_class_variance_bars_per_layer():
    var = {"h0": [0.5, 0.25, 0.4, math.nan], "penultimate": [0.01, 0.0, 0.02, 0.03]}
    fig = plotting.class_variance_bars(var, NAMES, title="V_k")
    a, b = panels(fig)
    (bars_a,) = a.containers
    assert bar_tops(bars_a) == [0.5, 0.25, 0.4]  # the absent class has no bar
    assert [p.get_y() for p in bars_a] == [0.0] * 3 and a.get_yscale() == "linear"
    (mean_a,) = [ln for ln in a.get_lines() if ln.get_label() == "mean over classes"]
    assert ydata(mean_a)[0] == pytest.approx((0.5 + 0.25 + 0.4) / 3)
    assert bar_tops(b.containers[0]) == [0.01, 0.0, 0.02, 0.03]
    assert "frog" in caption(fig) and "penultimate" in b.get_title()
    with pytest.raises(ValueError, match="3 class names for 4 classes"):
        plotting.class_variance_bars(var, NAMES[:3])


def test_depth_profile_follows_the_order_and_names_what_it_left_out(tmp_path):
    values = {
        "h0": {"nc1": 4.0, "nc1_tilde": 2.0, "nc3": 1.0},
        "blocks.0": {"nc1": 2.0},
        "penultimate": {"nc1": 0.0, "nc1_tilde": 0.5},
    }
    fig = plotting.depth_profile(values, ("nc1", "nc1_tilde", "nc3"), xlabel="depth")
    ax_nc1, ax_tilde = panels(fig)
    assert [t.get_text() for t in ax_nc1.get_xticklabels()] == ["h0", "blocks.0", "penultimate"]
    assert ydata(ax_nc1.get_lines()[0])[:2] == [4.0, 2.0]
    assert band_xs(ax_nc1) == [2.0]  # penultimate's 0, on the band
    assert xdata(ax_tilde.get_lines()[0]) == [0, 1, 2]
    assert math.isnan(ydata(ax_tilde.get_lines()[0])[1])  # blocks.0 has no nc1_tilde
    assert "nc3" in caption(fig)  # one layer only: no panel
    assert_png(plotting.save_figure(fig, tmp_path / "depth.png"))


# ---------------------------------------------------------------------------------------------
# pair figure
# ---------------------------------------------------------------------------------------------


def pair_figure(**kw):
    h0 = {"nc1": 1.0, "nc1_tilde": 0.8, "nc2_etf": 0.5, "norm_ratio": 1.0}
    h = {"nc1": 0.1, "nc1_tilde": 0.08, "nc2_etf": 0.0, "norm_ratio": 1.2}
    h_star = {"nc1": 0.01, "nc1_tilde": 0.08, "nc2_etf": 0.03, "norm_ratio": 1.1}
    residuals = {"nc1": -1.0, "nc2_etf": math.nan, "norm_ratio": math.log10(1.1 / 1.2)}
    kw.setdefault("fitted", ("nc1_tilde",))
    return plotting.measured_vs_predicted(h0, h, h_star, residuals=residuals, **kw)


def test_pair_bars_show_the_three_sets_of_metrics(tmp_path):
    fig = pair_figure(labels=("H0", "H", "H*"))
    bars, _ = panels(fig)
    assert [t.get_text() for t in bars.get_xticklabels()] == [
        "nc1",
        "nc1_tilde",
        "nc2_etf",
        "norm_ratio",
    ]
    tops = [bar_tops(c) for c in bars.containers]
    np.testing.assert_allclose(tops[0], [1.0, 0.8, 0.5, 1.0], rtol=1e-12)
    np.testing.assert_allclose(tops[1], [0.1, 0.08, 1.2], rtol=1e-12)  # H's nc2_etf is 0
    np.testing.assert_allclose(tops[2], [0.01, 0.08, 0.03, 1.1], rtol=1e-12)
    assert len(band_xs(bars)) == 1  # the zero on the band, at nc2_etf's H slot
    assert axes_fraction(bars, 0.01) > 0.1  # the smallest bar stands clear of the band
    assert [t.get_text() for t in fig.legends[0].get_texts()][:3] == ["H0", "H", "H*"]
    assert_png(plotting.save_figure(fig, tmp_path / "pm.png"))


def test_residuals_per_metric_and_the_fitted_metric_said():
    _, res = panels(pair_figure())
    (bars,) = res.containers
    assert [p.get_x() + p.get_width() / 2 for p in bars] == [0.0, 3.0]
    np.testing.assert_allclose([p.get_height() for p in bars], [-1.0, math.log10(1.1 / 1.2)])
    words = {t.get_gid(): t.get_position()[0] for t in res.texts if t.get_gid()}
    assert words == {"residual-fitted": 1, "residual-n/a": 2}  # nc1_tilde fitted, nc2_etf NaN
    assert res.get_ylim()[0] < -1.0 < 1.0 < res.get_ylim()[1]


def test_coupling_over_epochs_with_status_and_regime():
    coupling = [(0, math.inf), (1, 3.0), (2, 6.0), (3, 8.0), (4, math.inf)]
    status = [(0, "not_more_collapsed"), (1, "fitted"), (2, "fitted"), (3, "fitted")]
    status.append((4, "identical"))
    perturbative = [(0, 0.0), (1, 0.0), (2, 1.0), (3, 1.0), (4, 0.0)]
    fig = pair_figure(coupling=coupling, status=status, perturbative=perturbative)
    *_, cpl = panels(fig)
    (line,) = [ln for ln in cpl.get_lines() if ln.get_label() == "_coupling"]
    assert xdata(line) == [1, 2, 3] and ydata(line) == [3.0, 6.0, 8.0]
    (filled,) = gid_lines(cpl, "perturbative")
    (hollow,) = gid_lines(cpl, "not_perturbative")
    assert xdata(filled) == [2, 3] and xdata(hollow) == [1]
    assert hollow.get_markerfacecolor() in ("white", (1.0, 1.0, 1.0, 1.0))
    assert xdata(gid_lines(cpl, "status-not_more_collapsed")[0]) == [0]
    assert xdata(gid_lines(cpl, "status-identical")[0]) == [4]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("perturbative" in t for t in legend) and "identical (inf)" in legend


def test_pair_figure_without_values():
    with pytest.raises(ValueError, match="no metric"):
        plotting.measured_vs_predicted({}, {}, {"nc1": math.nan})
    fig = plotting.measured_vs_predicted({"nc1": 1.0}, {"nc1": 0.5}, {"nc1": 0.4, "x": math.nan})
    assert len(panels(fig)) == 1 and "x" in caption(fig)


def test_baselines_beside_the_model_one_colour_per_source(tmp_path):
    """Values: H, H*, then each baseline at H * 10**residual; residuals: the model's and the
    baselines', in the colours of the value panel; nothing called fitted when nothing was."""
    h = {"nc1": 0.1, "nc1_tilde": 0.08, "cdnv": 0.02}
    h_star = {"nc1": 0.01, "nc1_tilde": 0.09, "cdnv": 0.03}
    residuals = {"nc1": -1.0, "nc1_tilde": math.log10(0.09 / 0.08), "cdnv": math.log10(1.5)}
    baselines = {
        "h0": {"nc1": 0.5, "nc1_tilde": 0.7, "cdnv": 0.4},
        "ratio": {"nc1": 0.2, "nc1_tilde": 0.0, "cdnv": -0.1},
        "etf": {"cdnv": 0.05},
    }
    fig = plotting.measured_vs_predicted(
        {}, h, h_star, ["nc1", "nc1_tilde", "cdnv"], residuals=residuals, baselines=baselines,
    )  # fmt: skip
    values, res = panels(fig)
    tops = [bar_tops(c) for c in values.containers]
    np.testing.assert_allclose(tops[0], [0.1, 0.08, 0.02], rtol=1e-12)
    np.testing.assert_allclose(tops[1], [0.01, 0.09, 0.03], rtol=1e-12)
    np.testing.assert_allclose(tops[2], [0.1 * 10**0.5, 0.08 * 10**0.7, 0.02 * 10**0.4])
    np.testing.assert_allclose(tops[3], [0.1 * 10**0.2, 0.08, 0.02 * 10**-0.1])
    np.testing.assert_allclose(tops[4], [0.02 * 10**0.05])
    heights = [[p.get_height() for p in c] for c in res.containers]
    np.testing.assert_allclose(heights[0], [-1.0, math.log10(0.09 / 0.08), math.log10(1.5)])
    assert heights[1:] == [[0.5, 0.7, 0.4], [0.2, 0.0, -0.1], [0.05]]
    colour = lambda c: c.patches[0].get_facecolor()  # noqa: E731
    assert [colour(c) for c in res.containers] == [colour(c) for c in values.containers[1:]]
    assert len({colour(c) for c in values.containers}) == 5
    assert not [t for t in res.texts if t.get_gid() == "residual-fitted"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:2] == ["H (measured)", "H* (model)"] and len(legend) == 5
    assert_png(plotting.save_figure(fig, tmp_path / "pm.png"))


def test_a_pair_never_fitted_shows_only_its_statuses():
    fig = pair_figure(
        coupling=[(0, math.inf), (1, math.inf)],
        status=[(0, "identical"), (1, "not_more_collapsed")],
        perturbative=[(0, 0.0), (1, 0.0)],
    )
    *_, cpl = panels(fig)
    assert [t.get_text() for t in cpl.texts if t.get_gid() is None] == ["no finite coupling"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert not any(t.startswith("fitted") for t in legend)
    assert {"identical (inf)", "not_more_collapsed (inf)"} <= set(legend)
