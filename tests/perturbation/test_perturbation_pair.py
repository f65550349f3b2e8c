"""fit_pair: the scale-free fit of a pair of layers (docs/science.md §7).

Checked against independent references: a dense minimisation of Eq. 2 over the raw features
(scipy L-BFGS over (W, H) from random starts, conftest), metrics of the materialised H*, and
the invariances the normalisations are built to have.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nclightning.errors import ConfigurationError, DataError
from nclightning.metrics import ClassMoments, metrics_from_moments
from nclightning.perturbation import (
    PERTURBATIVE_FACTOR,
    RESIDUAL_KEYS,
    STATUSES,
    fit_pair,
    solve,
    ufm_scale,
)

LW = LH = 5e-4
CASES = {  # (class counts, width of H0, width of H): equal and zero-padded widths
    "balanced": ([8, 8, 8], 5, 5),
    "imbalanced": ([5, 11, 7, 9], 5, 5),
    "padded": ([6, 9, 7], 4, 6),
}


def deeper_layer(seed, h0, labels, d, shrink=0.5):
    """Features of a more collapsed layer of width ``d``: within-class deviations shrunk."""
    g = torch.Generator().manual_seed(1000 + seed)
    K = int(labels.max()) + 1
    mu = torch.stack([h0[labels == k].mean(0) for k in range(K)])[labels]
    mix = torch.randn(h0.shape[1], d, generator=g, dtype=torch.float64)
    return (mu + shrink * (h0 - mu)) @ mix


def pair(ref, case, seed=0):
    counts, d0, d = CASES[case]
    h0, labels = ref.random_features(seed, counts, d0, between=1.0)
    h = deeper_layer(seed, h0, labels, d)
    h0 = torch.nn.functional.pad(h0, (0, d - d0))  # zero-padded H0 (raw)
    m0 = ClassMoments.from_features(h0[:, :d0], labels, per_class_scatter=True).pad(d)
    m = ClassMoments.from_features(h, labels)
    return h0, h, labels, m0, m


def moments_times(m: ClassMoments, t: float) -> ClassMoments:
    cs = m.class_scatter
    return ClassMoments(
        counts=m.counts,
        means=t * m.means,
        scatter=t * t * m.scatter,
        class_ss=t * t * m.class_ss,
        class_scatter=None if cs is None else t * t * cs,
    )


def rms(m: ClassMoments) -> float:
    """RMS feature norm from moments: sqrt((sum_k class_ss_k + n_k |mu_k|^2) / N)."""
    return math.sqrt(float(m.class_ss.sum() + (m.counts * m.means.square().sum(1)).sum()) / m.total)


def scale_free_outputs(fit):
    out = {
        "coupling": fit.coupling,
        "beta": fit.beta,
        "objective": fit.objective,
        **{f"predicted/{k}": v for k, v in fit.predicted.items()},
        **{f"measured/{k}": v for k, v in fit.measured.items() if k != "norm_ratio"},
        **{f"residual/{k}": v for k, v in fit.residuals.items() if k != "norm_ratio"},
    }
    return out, (fit.status, fit.perturbative, fit.converged)


def assert_same(a, b, rtol=1e-6):
    va, flags_a = scale_free_outputs(a)
    vb, flags_b = scale_free_outputs(b)
    assert flags_a == flags_b
    assert va.keys() == vb.keys()
    for k in va:
        assert math.isfinite(va[k]), k
        assert abs(va[k] - vb[k]) <= rtol * abs(va[k]) + 1e-12, (k, va[k], vb[k])


@pytest.mark.parametrize("normalization", ["between", "total"])
@pytest.mark.parametrize("case", list(CASES))
@settings(max_examples=3, deadline=None)
@given(e0=st.floats(-3, 3), e1=st.floats(-3, 3))
def test_scale_free(ref, case, normalization, e0, e1):
    """Rescaling H0 by 10^e0 and H by 10^e1 changes no scale-free output (< 1e-6)."""
    _, _, _, m0, m = pair(ref, case)
    W = torch.randn(m.num_classes, m.dim, generator=torch.Generator().manual_seed(3)).double()
    kw = dict(lambda_W=LW, lambda_H=LH, weight=W, normalization=normalization)
    base = fit_pair(m0, m, **kw)
    assert base.status == "fitted" and base.converged, base.message
    t0, t1 = 10.0**e0, 10.0**e1
    for a, b in ((t0, 1.0), (1.0, t1), (t0, t0), (t0, t1)):
        fit = fit_pair(moments_times(m0, a), moments_times(m, b), **kw)
        assert_same(base, fit)
        assert fit.scale * a == pytest.approx(base.scale, rel=1e-12)  # s is in H0's units
        ratio = fit.measured["norm_ratio"] / base.measured["norm_ratio"]
        assert ratio == pytest.approx(b / a, rel=1e-12)  # the one output that is not scale free


@pytest.mark.parametrize("normalization", ["between", "total"])
def test_normalisations_fix_the_documented_scale(ref, normalization):
    """The rule behind each scale: Tr Sigma_B(s H0) = rho (K-1)/K, or mean ||s h0||^2 = rho."""
    h0, _, labels, m0, m = pair(ref, "imbalanced")
    fit = fit_pair(m0, m, lambda_W=LW, lambda_H=LH, normalization=normalization)
    x = fit.scale * h0
    rho = ufm_scale(LW, LH)
    assert rho == pytest.approx((1 - math.sqrt(LW * LH)) * math.sqrt(LW / LH))
    if normalization == "between":
        mu = torch.stack([x[labels == k].mean(0) for k in range(4)])
        energy = float((mu - mu.mean(0)).square().sum(1).mean())
        assert energy == pytest.approx(rho * 3 / 4, rel=1e-12)
    else:
        assert float(x.square().sum(1).mean()) == pytest.approx(rho, rel=1e-12)


def test_norm_ratio_normalisation_is_free_of_a_common_rescaling(ref):
    """Fitted scale: norm_ratio reproduced, invariant only to rescaling both layers."""
    _, _, _, m0, m = pair(ref, "balanced")
    m = moments_times(m, 0.9 * rms(m0) / rms(m))  # a ratio the model reaches (0.9)
    kw = dict(lambda_W=LW, lambda_H=LH, normalization="norm_ratio")
    base = fit_pair(m0, m, **kw)
    assert base.status == "fitted" and base.converged, base.message
    assert base.predicted["norm_ratio"] == pytest.approx(base.measured["norm_ratio"], rel=1e-5)
    assert "norm_ratio" not in base.residuals  # never a residual
    for t in (1e-3, 1e3):
        assert_same(base, fit_pair(moments_times(m0, t), moments_times(m, t), **kw), rtol=1e-5)
    moved = fit_pair(m0, moments_times(m, 0.8 / 0.9), **kw)  # H alone: another measured ratio
    assert moved.converged and moved.scale != pytest.approx(base.scale, rel=1e-3)
    assert moved.predicted["norm_ratio"] == pytest.approx(0.8, rel=1e-5)


@pytest.mark.parametrize(
    ("case", "normalization"),
    [("balanced", "total"), ("padded", "total"), ("padded", "norm_ratio")],
)
def test_matches_dense_reference_at_the_fitted_coupling(ref, case, normalization):
    """Objective and every predicted metric against L-BFGS + Newton over (W, H) on raw features."""
    h0, h, labels, m0, m = pair(ref, case)
    t = 0.9 * rms(m0) / rms(m)  # an H with a norm ratio the model reaches
    h, m = t * h, moments_times(m, t)
    K = m.num_classes
    W_net = torch.randn(K, m.dim, generator=torch.Generator().manual_seed(5)).double()
    fit = fit_pair(m0, m, lambda_W=LW, lambda_H=LH, weight=W_net, normalization=normalization)
    assert fit.status == "fitted" and fit.converged, fit.message
    x0 = fit.scale * h0
    f_ref, W, H = ref.dense_minimize(x0, labels, K, LW, LH, fit.beta, seeds=(11, 12, 13))
    assert fit.objective <= f_ref * (1 + 1e-10)  # no worse than the best dense start
    assert fit.objective == pytest.approx(f_ref, rel=1e-9)
    dense = metrics_from_moments(
        ClassMoments.from_features(H, labels, K, per_class_scatter=True), weight=W
    )
    dense["norm_ratio"] = float(H.square().sum(1).mean().sqrt() / x0.square().sum(1).mean().sqrt())
    for key in ("nc1", "nc1_tilde", "cdnv", "nc2_etf", "nc2_equinorm", "nc3", "norm_ratio"):
        assert fit.predicted[key] == pytest.approx(dense[key], rel=1e-6), key
    # the fitted metrics reproduce H's; the residuals are log10(predicted / measured of H)
    measured = metrics_from_moments(ClassMoments.from_features(h, labels), weight=W_net)
    measured["norm_ratio"] = float(
        h.square().sum(1).mean().sqrt() / h0.square().sum(1).mean().sqrt()
    )
    assert dense["nc1_tilde"] == pytest.approx(measured["nc1_tilde"], rel=1e-7)
    if normalization == "norm_ratio":
        assert dense["norm_ratio"] == pytest.approx(measured["norm_ratio"], rel=1e-5)
    assert fit.measured["norm_ratio"] == pytest.approx(measured["norm_ratio"], rel=1e-12)
    for key in set(RESIDUAL_KEYS) - {"nc1_tilde"}:
        assert fit.residuals[key] == pytest.approx(math.log10(dense[key] / measured[key]), abs=1e-6)
    assert set(fit.residuals) == set(RESIDUAL_KEYS) - {"nc1_tilde"}
    err = math.sqrt(LH / LW) / fit.beta  # docs/science.md §5.6
    rule = err <= 0.1 and fit.beta >= PERTURBATIVE_FACTOR * max(1, LH)
    assert fit.perturbative == rule
    assert fit.coupling == pytest.approx(fit.beta / LH, rel=1e-15)


@pytest.mark.parametrize("normalization", ["total", "norm_ratio"])
def test_identical_layers(ref, normalization):
    """H0 == H (or H = t H0): beta = inf fits exactly; residuals 0, no NaN, no exception."""
    _, _, _, m0, _ = pair(ref, "imbalanced")
    W = torch.randn(m0.num_classes, m0.dim, generator=torch.Generator().manual_seed(2)).double()
    kw = dict(lambda_W=LW, lambda_H=LH, weight=W, normalization=normalization)
    for t in (1.0, 5.0):
        fit = fit_pair(m0, moments_times(m0, t), **kw)
        assert fit.status == "identical" and fit.status in STATUSES
        assert fit.coupling == math.inf and fit.beta == math.inf and fit.solve is None
        assert fit.converged and fit.perturbative
        for key in ("nc1", "nc2_etf", "nc2_equinorm", "cdnv"):
            assert fit.residuals[key] == pytest.approx(0.0, abs=1e-12), key
        assert all(math.isfinite(v) for v in fit.residuals.values())
        assert set(fit.residuals) == set(RESIDUAL_KEYS)  # nc3: the ridge classifier against W
        assert fit.measured["norm_ratio"] == pytest.approx(t, rel=1e-12)  # a fact, no residual


def test_less_collapsed_layer_is_a_status_not_a_failure(ref):
    """nc1_tilde(H) >= nc1_tilde(H0): coupling inf, predicted = H0's metrics, finite residuals."""
    _, _, _, m, m0 = pair(ref, "balanced")  # swapped: H0 is the more collapsed layer
    fit = fit_pair(m0, m, lambda_W=LW, lambda_H=LH)
    assert fit.status == "not_more_collapsed" and fit.status in STATUSES
    assert fit.coupling == math.inf and fit.converged and "not more collapsed" in fit.message
    h0_metrics = metrics_from_moments(m0)
    meas = metrics_from_moments(m)
    for key in ("nc1", "nc1_tilde", "cdnv", "nc2_etf", "nc2_equinorm"):
        assert fit.predicted[key] == pytest.approx(h0_metrics[key], rel=1e-12)
        if key != "nc1_tilde":
            expected = math.log10(h0_metrics[key] / meas[key])
            assert fit.residuals[key] == pytest.approx(expected, rel=1e-12)
    assert fit.predicted["norm_ratio"] == 1.0
    assert all(math.isfinite(v) for v in fit.residuals.values())


def test_cdnv_needs_per_class_scatter_of_h0(ref):
    _, _, _, m0, m = pair(ref, "balanced")
    pooled = ClassMoments(
        counts=m0.counts, means=m0.means, scatter=m0.scatter, class_ss=m0.class_ss
    )
    fit = fit_pair(pooled, m, lambda_W=LW, lambda_H=LH)
    assert math.isnan(fit.predicted["cdnv"]) and math.isnan(fit.residuals["cdnv"])
    assert "nc4" not in fit.predicted  # needs raw features: dropped, not a NaN column
    full = fit_pair(m0, m, lambda_W=LW, lambda_H=LH)
    assert full.predicted["nc1"] == pytest.approx(fit.predicted["nc1"], rel=1e-9)


def test_near_does_not_change_the_root(ref):
    """A previous coupling only orders the evaluations: the same root to rtol."""
    _, _, _, m0, m = pair(ref, "imbalanced")
    base = fit_pair(m0, m, lambda_W=LW, lambda_H=LH)
    for near in (base.coupling * 1.01, base.coupling / 3, 1e-3, 1e6):
        fit = fit_pair(m0, m, lambda_W=LW, lambda_H=LH, near=near)
        assert fit.coupling == pytest.approx(base.coupling, rel=1e-7)


def test_bad_pairs_are_refused_clearly(ref):
    _, h, labels, m0, m = pair(ref, "balanced")
    narrow = ClassMoments.from_features(h[:, :3], labels)
    with pytest.raises(ConfigurationError, match="one space"):
        fit_pair(m0, narrow, lambda_W=LW, lambda_H=LH)
    other = ClassMoments.from_features(h[:20], labels[:20])
    with pytest.raises(ConfigurationError, match="same samples"):
        fit_pair(m0, other, lambda_W=LW, lambda_H=LH)
    with pytest.raises(ConfigurationError, match="normalization"):
        fit_pair(m0, m, lambda_W=LW, lambda_H=LH, normalization="raw")
    with pytest.raises(ConfigurationError, match="UFM minimiser is 0"):
        fit_pair(m0, m, lambda_W=2.0, lambda_H=2.0)
    dead = moments_times(m, 0.0)
    with pytest.raises(DataError, match="no between-class spread"):
        fit_pair(m0, dead, lambda_W=LW, lambda_H=LH)


@pytest.mark.parametrize("normalization", ["between", "norm_ratio"])
def test_a_fixed_coupling_is_the_minimiser_at_that_coupling(ref, normalization):
    """``coupling=c``: no fit, H* of s H0 at beta = c lambda_H; at the fitted coupling it
    is the fitted H*, and it agrees with a direct solve of the scaled moments."""
    _, _, _, m0, m = pair(ref, "balanced")
    kw = dict(lambda_W=LW, lambda_H=LH, normalization=normalization)
    fitted = fit_pair(m0, m, **kw)
    fixed = fit_pair(m0, m, coupling=fitted.coupling, **kw)
    assert fitted.status == "fitted" and fixed.status == "fixed" and fixed.status in STATUSES
    assert fixed.coupling == pytest.approx(fitted.coupling, rel=1e-15)
    assert fixed.scale == pytest.approx(fitted.scale, rel=1e-5)
    for key, value in fitted.predicted.items():
        assert fixed.predicted[key] == pytest.approx(value, rel=1e-5), key
    assert "nc1_tilde" in fixed.residuals and "nc1_tilde" not in fitted.residuals
    assert fixed.residuals["nc1_tilde"] == pytest.approx(0.0, abs=1e-5)
    direct = solve(moments_times(m0, fixed.scale), lambda_W=LW, lambda_H=LH, beta=fixed.beta)
    for key in ("nc1", "nc1_tilde", "nc2_etf", "nc2_equinorm"):
        assert fixed.predicted[key] == pytest.approx(direct.metrics[key], rel=1e-6), key
    elsewhere = fit_pair(m0, m, coupling=10 * fitted.coupling, **kw)
    assert elsewhere.residuals["nc1_tilde"] > 0  # a larger coupling: H* less collapsed than H
