"""fit_beta and the root search it shares with fit_pair (docs/science.md §2-3, §10)."""

from __future__ import annotations

import math

import pytest

from nclightning.metrics import ClassMoments, metrics_from_moments
from nclightning.perturbation import DEFAULT_COUPLING_RANGE, fit_beta, solve

LW, LH = math.sqrt(2), 0.1


@pytest.mark.parametrize("beta_true", [0.3, 20.0])
def test_recovers_beta(ref, beta_true):
    h0, labels = ref.random_features(0, [8, 12, 10], 6, between=1.0)
    m = ClassMoments.from_features(h0, labels)
    target = solve(m, lambda_W=LW, lambda_H=LH, beta=beta_true, tol=1e-12).metrics["nc1_tilde"]
    fit = fit_beta(m, target, lambda_W=LW, lambda_H=LH, rtol=1e-8, tol=1e-12)
    assert fit.reachable and fit.metric == "nc1_tilde"
    assert fit.beta == pytest.approx(beta_true, rel=1e-5)
    assert fit.value == pytest.approx(target, rel=1e-7)
    assert fit.bracket[0] <= fit.beta <= fit.bracket[1]
    assert fit.result.params["beta"] == fit.beta
    assert len(fit.history) < 40  # grid scan stops at the first bracket


def test_raw_features_and_cdnv(ref):
    h0, labels = ref.random_features(1, [6, 9, 7], 5, between=1.0)
    target = solve(h0, labels, lambda_W=LW, lambda_H=LH, beta=2.0, tol=1e-12).metrics["cdnv"]
    fit = fit_beta(h0, target, "cdnv", lambda_W=LW, lambda_H=LH, labels=labels, rtol=1e-8)
    assert fit.reachable and fit.beta == pytest.approx(2.0, rel=1e-4)
    assert fit.result.H is not None  # final solve on the raw features
    # pooled statistics cannot give the CDNV of H*: a clear error, not a wrong fit
    with pytest.raises(ValueError, match="not finite"):
        fit_beta(ClassMoments.from_features(h0, labels), target, "cdnv", lambda_W=LW, lambda_H=LH)


def test_unreachable_target_is_flagged(ref):
    h0, labels = ref.random_features(2, [10, 10, 10], 6, between=1.0)
    m = ClassMoments.from_features(h0, labels)
    nc1_h0 = metrics_from_moments(m)["nc1_tilde"]  # the beta -> inf limit
    fit = fit_beta(m, 2 * nc1_h0, lambda_W=LW, lambda_H=LH, beta_range=(1e-2, 1e3))
    assert not fit.reachable and fit.bracket is None
    assert "not reachable" in fit.message
    assert fit.beta == pytest.approx(1e3)  # closest value at the largest beta
    assert fit.value < 2 * nc1_h0
    with pytest.raises(ValueError, match="metric"):
        fit_beta(m, 1.0, "nc4", lambda_W=LW, lambda_H=LH)
    with pytest.raises(ValueError, match="beta_range"):
        fit_beta(m, 1.0, lambda_W=LW, lambda_H=LH, beta_range=(1.0, 0.5))


L = 5e-4  # the project's default weight decays, raw scale


def dense_nc1_tilde(ref, h0, labels, beta):
    """nc1_tilde of the best dense minimiser over (W, H) from four random starts."""
    f, _, H = ref.dense_minimize(h0, labels, 3, L, L, beta, seeds=(1, 2, 3, 4))
    return f, metrics_from_moments(ClassMoments.from_features(H, labels))["nc1_tilde"]


def test_non_monotone_map_gives_the_largest_root(ref):
    """beta -> nc1_tilde(H*) dips below the target, rises above it and falls again: three
    crossings; the search reports the largest beta, whatever ``near`` says."""
    h0, labels = ref.random_features(1, [10, 10, 10], 6, between=1.0)
    m = ClassMoments.from_features(h0, labels)
    target = 0.99
    fit = fit_beta(m, target, lambda_W=L, lambda_H=L)
    assert fit.reachable and fit.message == "converged"
    assert fit.value == pytest.approx(target, rel=1e-9)
    _, v = dense_nc1_tilde(ref, h0, labels, fit.beta)
    assert v == pytest.approx(target, rel=1e-7)
    for factor in (1.3, 2.0, 5.0):  # no crossing above the reported root ...
        assert dense_nc1_tilde(ref, h0, labels, factor * fit.beta)[1] > target
    assert dense_nc1_tilde(ref, h0, labels, 0.3 * fit.beta)[1] > target  # ... but one below
    for near in (0.2 * fit.beta, 0.45 * fit.beta):  # previous roots on the lower crossings
        again = fit_beta(m, target, lambda_W=L, lambda_H=L, near=near)
        assert again.beta == pytest.approx(fit.beta, rel=1e-7)


def test_local_minimum_guard(ref):
    """A chain of warm starts along beta stays on a branch that stopped being global; the search
    compares cold starts and fits the global minimiser (objective of the dense reference)."""
    h0, labels = ref.random_features(2, [10, 10, 10], 6, between=1.0)
    m = ClassMoments.from_features(h0, labels)
    chain = None
    for beta in (0.3, 0.24, 0.19, 0.15, 0.12, 0.097, 0.077):  # warm starts downwards
        chain = solve(m, lambda_W=L, lambda_H=L, beta=beta, init=None if chain is None else chain.W)
    cold = solve(m, lambda_W=L, lambda_H=L, beta=0.077)
    f_dense, _ = dense_nc1_tilde(ref, h0, labels, 0.077)
    assert chain.objective > f_dense * (1 + 1e-3)  # negative control: the warm chain is stuck
    assert cold.objective == pytest.approx(f_dense, rel=1e-9)
    fit = fit_beta(m, 1.2745, lambda_W=L, lambda_H=L, points_per_decade=8)
    assert fit.reachable and fit.branches >= 1 and fit.message == "converged"
    f_dense, v = dense_nc1_tilde(ref, h0, labels, fit.beta)
    assert fit.result.objective == pytest.approx(f_dense, rel=1e-9)
    assert v == pytest.approx(1.2745, rel=1e-7)


def test_default_range_is_the_shared_coupling_range(ref):
    """fit_beta searches lambda_H * DEFAULT_COUPLING_RANGE, the range fit_pair searches."""
    h0, labels = ref.random_features(3, [10, 10, 10], 6, between=1.0)
    m = ClassMoments.from_features(h0, labels)
    fit = fit_beta(m, 0.5, lambda_W=L, lambda_H=L)
    lo, hi = DEFAULT_COUPLING_RANGE
    betas = [b for b, _ in fit.history]
    assert max(betas) == pytest.approx(L * hi) and fit.reachable
    assert min(betas) >= L * lo
