"""fit_beta: the beta of Eq. 2 reproducing a measured metric (docs/science.md §2-3)."""

from __future__ import annotations

import math

import pytest

from nclightning.metrics import ClassMoments, metrics_from_moments
from nclightning.perturbation import fit_beta, solve

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
