"""fit_pair's search: any fitted metric, recovered couplings, unreachable targets, the largest
root and the local-minimum guard (docs/science.md §7.5, §10).

References are independent of the search: ``H`` made as the minimiser ``H*`` of Eq. 2 at a chosen
coupling by ``solve`` on the raw features (then fitted back), the normalisation scale from its
closed form (docs/science.md §7.4), and dense minimisations of Eq. 2 over ``(W, H)`` from random
starts (conftest) for the shape of the map and the global minimiser.
"""

from __future__ import annotations

import math

import pytest
import torch

from nclightning.errors import ConfigurationError
from nclightning.metrics import ClassMoments, metrics_from_moments
from nclightning.perturbation import DEFAULT_COUPLING_RANGE, FIT_METRICS, fit_pair, solve

LW, LH = math.sqrt(2), 0.1


def total_scale(h0: torch.Tensor, lambda_W: float, lambda_H: float) -> float:
    """``s`` of the ``"total"`` rule: mean ``||s h0_i||^2 = rho = (1 - c) sqrt(lW / lH)``."""
    c = math.sqrt(lambda_W * lambda_H)
    rho = (1 - c) * math.sqrt(lambda_W / lambda_H)
    return math.sqrt(rho / float(h0.square().sum(1).mean()))


def model_layer(ref, seed, coupling, lambda_W=LW, lambda_H=LH):
    """``(h0, labels, H*)``: ``H*`` the minimiser of Eq. 2 for ``s h0`` at ``coupling``."""
    h0, labels = ref.random_features(seed, [8, 12, 10], 6, between=1.0)
    s = total_scale(h0, lambda_W, lambda_H)
    res = solve(
        s * h0, labels, lambda_W=lambda_W, lambda_H=lambda_H, beta=coupling * lambda_H, tol=1e-12
    )
    return h0, labels, res.H, res.W


@pytest.mark.parametrize("metric", FIT_METRICS)
@pytest.mark.parametrize("coupling", [3.0, 200.0])
def test_recovers_the_coupling_of_a_model_layer(ref, metric, coupling):
    """``H = H*`` at a chosen coupling: fitting any metric gives that coupling back, and every
    other metric (``nc3`` against the model's classifier) is reproduced: residuals 0."""
    h0, labels, H, W = model_layer(ref, 0, coupling)
    m0 = ClassMoments.from_features(h0, labels, per_class_scatter=True)
    m = ClassMoments.from_features(H, labels)
    fit = fit_pair(m0, m, lambda_W=LW, lambda_H=LH, weight=W, metric=metric, tol=1e-12)
    assert fit.status == "fitted" and fit.converged and fit.metric == metric, fit.message
    assert fit.message == "converged"
    assert fit.coupling == pytest.approx(coupling, rel=1e-5)
    assert fit.beta == pytest.approx(coupling * LH, rel=1e-5)
    assert fit.scale == pytest.approx(total_scale(h0, LW, LH), rel=1e-12)
    assert fit.predicted[metric] == pytest.approx(fit.measured[metric], rel=1e-7)
    assert metric not in fit.residuals
    compared = {"nc1_tilde", "nc1", "cdnv", "nc2_etf", "nc2_equinorm", "nc3"}
    assert set(fit.residuals) == compared - {metric}
    for key, value in fit.residuals.items():
        assert value == pytest.approx(0.0, abs=1e-5), key


def test_a_fitted_metric_other_than_nc1_tilde_matches_the_dense_minimiser(ref):
    """``metric="cdnv"`` on an ``H`` that is no model layer: the fitted ``H*`` is the dense
    minimiser at the reported ``beta``, its cdnv is ``H``'s, ``nc1_tilde`` is a residual."""
    h0, labels = ref.random_features(4, [8, 8, 8], 5, between=1.0)
    K = 3
    mu = torch.stack([h0[labels == k].mean(0) for k in range(K)])[labels]
    h = mu + 0.5 * (h0 - mu)
    m0 = ClassMoments.from_features(h0, labels, per_class_scatter=True)
    m = ClassMoments.from_features(h, labels)
    fit = fit_pair(m0, m, lambda_W=LW, lambda_H=LH, metric="cdnv")
    assert fit.status == "fitted" and fit.converged and fit.metric == "cdnv", fit.message
    f_ref, _, H = ref.dense_minimize(fit.scale * h0, labels, K, LW, LH, fit.beta)
    dense = metrics_from_moments(ClassMoments.from_features(H, labels, K, per_class_scatter=True))
    measured = metrics_from_moments(ClassMoments.from_features(h, labels, K))
    assert fit.objective == pytest.approx(f_ref, rel=1e-9)
    assert dense["cdnv"] == pytest.approx(measured["cdnv"], rel=1e-7)
    assert "cdnv" not in fit.residuals
    expected = math.log10(dense["nc1_tilde"] / measured["nc1_tilde"])
    assert fit.residuals["nc1_tilde"] == pytest.approx(expected, abs=1e-6)


def test_metric_needs_and_unknown_metrics_are_refused(ref):
    h0, labels, H, _ = model_layer(ref, 1, 20.0)
    m0 = ClassMoments.from_features(h0, labels, per_class_scatter=True)
    m = ClassMoments.from_features(H, labels)
    for bad in ("nc3", "nc4", "norm_ratio", "NC1"):
        with pytest.raises(ConfigurationError, match="metric must be one of"):
            fit_pair(m0, m, lambda_W=LW, lambda_H=LH, metric=bad)
    # pooled statistics cannot give the CDNV of H*: a clear error, not a NaN fit
    pooled = ClassMoments.from_features(h0, labels)
    with pytest.raises(ConfigurationError, match="per-class scatter"):
        fit_pair(pooled, m, lambda_W=LW, lambda_H=LH, metric="cdnv")
    by_nc1 = fit_pair(pooled, m, lambda_W=LW, lambda_H=LH, metric="nc1")  # needs no more
    assert by_nc1.converged and by_nc1.coupling == pytest.approx(20.0, rel=1e-5)
    no_scatter = ClassMoments(counts=m.counts, means=m.means, scatter=None, class_ss=m.class_ss)
    with pytest.raises(ConfigurationError, match="within-class scatter"):
        fit_pair(m0, no_scatter, lambda_W=LW, lambda_H=LH, metric="nc1")


def test_unreachable_target_is_flagged(ref):
    """A target below every value of the range: not converged, the message says so, the closest
    coupling (the bottom of the range) is reported; the default range is DEFAULT_COUPLING_RANGE."""
    h0, labels, H, _ = model_layer(ref, 2, 1.0)
    m0 = ClassMoments.from_features(h0, labels, per_class_scatter=True)
    m = ClassMoments.from_features(H, labels)
    for metric in ("nc1_tilde", "cdnv"):
        kw = dict(lambda_W=LW, lambda_H=LH, metric=metric)
        fit = fit_pair(m0, m, coupling_range=(1e2, 1e6), **kw)
        assert fit.status == "fitted" and not fit.converged
        assert f"target {metric}=" in fit.message and "not reachable" in fit.message
        assert fit.coupling == pytest.approx(1e2, rel=1e-12)
        assert fit.predicted[metric] > fit.measured[metric]
        reached = fit_pair(m0, m, **kw)  # the default range reaches coupling 1
        assert reached.converged and reached.coupling == pytest.approx(1.0, rel=1e-5)
    # H nearly collapsed: below what the bottom of the default range gives
    mu = torch.stack([H[labels == k].mean(0) for k in range(3)])[labels]
    tight = ClassMoments.from_features(mu + 1e-9 * (H - mu), labels)
    fit = fit_pair(m0, tight, lambda_W=LW, lambda_H=LH)
    assert not fit.converged and "not reachable" in fit.message
    assert fit.coupling == pytest.approx(DEFAULT_COUPLING_RANGE[0], rel=1e-12)


def test_not_more_collapsed_is_decided_by_the_fitted_metric(ref):
    """``H`` more collapsed than ``H0`` in ``nc1_tilde``, less in ``nc2_etf`` (one class mean
    pulled toward the centre): fitted by default, ``"not_more_collapsed"`` (coupling inf) when
    nc2_etf is the fitted metric."""
    h0, labels = ref.random_features(5, [8, 8, 8], 5, between=1.0)
    K = 3
    means = torch.stack([h0[labels == k].mean(0) for k in range(K)])
    centre = means.mean(0)
    moved = means.clone()
    moved[0] = centre + 0.3 * (means[0] - centre)
    h = moved[labels] + 0.5 * (h0 - means[labels])
    m0 = ClassMoments.from_features(h0, labels, per_class_scatter=True)
    m = ClassMoments.from_features(h, labels)
    ref0, meas = metrics_from_moments(m0), metrics_from_moments(m)
    assert meas["nc1_tilde"] < ref0["nc1_tilde"] and meas["nc2_etf"] > ref0["nc2_etf"]
    assert fit_pair(m0, m, lambda_W=LW, lambda_H=LH).status == "fitted"
    fit = fit_pair(m0, m, lambda_W=LW, lambda_H=LH, metric="nc2_etf")
    assert fit.status == "not_more_collapsed" and fit.metric == "nc2_etf"
    assert fit.coupling == math.inf and fit.converged and "nc2_etf" in fit.message
    for key in ("nc1", "nc1_tilde", "nc2_etf", "nc2_equinorm", "cdnv"):
        assert fit.predicted[key] == pytest.approx(ref0[key], rel=1e-12), key
    expected = math.log10(ref0["nc2_etf"] / meas["nc2_etf"])
    assert fit.residuals["nc2_etf"] == pytest.approx(expected, rel=1e-12)


L = 5e-4  # the project's default weight decays


def shrunk_layer(h0, labels, target):
    """Moments of ``H0`` with its within-class deviations shrunk to ``nc1_tilde(H) = target``."""
    K = int(labels.max()) + 1
    mu = torch.stack([h0[labels == k].mean(0) for k in range(K)])[labels]
    nc1_tilde = metrics_from_moments(ClassMoments.from_features(h0, labels))["nc1_tilde"]
    a = math.sqrt(target / nc1_tilde)
    return ClassMoments.from_features(mu + a * (h0 - mu), labels)


def dense_nc1_tilde(ref, x0, labels, beta, seeds=(1, 2, 3, 4)):
    """``(objective, nc1_tilde)`` of the best dense minimiser over (W, H) from random starts."""
    f, _, H = ref.dense_minimize(x0, labels, 3, L, L, beta, seeds=seeds)
    return f, metrics_from_moments(ClassMoments.from_features(H, labels))["nc1_tilde"]


def test_non_monotone_map_gives_the_largest_root(ref):
    """coupling -> nc1_tilde(H*) dips below the target, rises above it and falls again: three
    crossings within a decade (hence 4 grid points per decade); the search reports the largest
    coupling, whatever ``near`` says."""
    h0, labels = ref.random_features(1, [10, 10, 10], 6, between=1.0)
    m0 = ClassMoments.from_features(h0, labels)
    target = 0.955
    kw = dict(lambda_W=L, lambda_H=L, points_per_decade=4)
    fit = fit_pair(m0, shrunk_layer(h0, labels, target), **kw)
    assert fit.status == "fitted" and fit.converged and fit.message == "converged"
    assert fit.predicted["nc1_tilde"] == pytest.approx(target, rel=1e-9)
    x0 = total_scale(h0, L, L) * h0
    assert fit.scale == pytest.approx(total_scale(h0, L, L), rel=1e-12)
    _, v = dense_nc1_tilde(ref, x0, labels, fit.beta)
    assert v == pytest.approx(target, rel=1e-7)
    for factor in (1.3, 2.0, 5.0):  # no crossing above the reported root ...
        assert dense_nc1_tilde(ref, x0, labels, factor * fit.beta)[1] > target
    assert dense_nc1_tilde(ref, x0, labels, 0.45 * fit.beta)[1] > target  # ... but two below
    assert dense_nc1_tilde(ref, x0, labels, 0.25 * fit.beta)[1] < target
    for near in (0.25, 0.45, 0.9, 1.1):  # lower crossings, and inside the final bracket
        again = fit_pair(m0, shrunk_layer(h0, labels, target), near=near * fit.coupling, **kw)
        assert again.coupling == pytest.approx(fit.coupling, rel=1e-7)


def test_local_minimum_guard(ref):
    """A chain of warm starts down the grid stays on a branch that stopped being global; the
    search compares ridge starts and fits the global minimiser (the dense reference's)."""
    h0, labels = ref.random_features(2, [10, 10, 10], 6, between=1.0)
    m0 = ClassMoments.from_features(h0, labels)
    target = 1.0
    h = shrunk_layer(h0, labels, target)
    fit = fit_pair(m0, h, lambda_W=L, lambda_H=L, points_per_decade=8)
    assert fit.status == "fitted" and fit.converged, fit.message
    assert "two starts reached different minima" in fit.message  # the guard was needed
    x0 = total_scale(h0, L, L) * h0
    assert fit.scale == pytest.approx(total_scale(h0, L, L), rel=1e-12)
    # eight random starts: six of them end on the branch the warm chain below is stuck on
    f_dense, v = dense_nc1_tilde(ref, x0, labels, fit.beta, seeds=tuple(range(1, 9)))
    assert fit.objective == pytest.approx(f_dense, rel=1e-9)
    assert v == pytest.approx(target, rel=1e-7)
    # negative control: warm starts down the same grid from the top stay stuck above f_dense
    ms = ClassMoments.from_features(x0, labels)
    chain = None
    for k in range(40, -1, -1):
        beta = L * 10 ** (k / 8)
        if beta <= fit.beta:
            break
        init = None if chain is None else chain.W
        chain = solve(ms, lambda_W=L, lambda_H=L, beta=beta, init=init)
    assert chain is not None
    chain = solve(ms, lambda_W=L, lambda_H=L, beta=fit.beta, init=chain.W)
    cold = solve(ms, lambda_W=L, lambda_H=L, beta=fit.beta)
    assert chain.objective > f_dense * (1 + 1e-3)
    assert cold.objective == pytest.approx(f_dense, rel=1e-9)


def test_the_guard_decides_on_objectives_accurate_to_tol(monkeypatch):
    """The guard's ridge runs are loose, their objectives off by ~1e-8 relative: more than the
    1e-9 that counts as a lower minimum. Compared with a loose warm point (a scan point
    continued loose), a loose ridge objective can be lower by more than the margin at the same
    minimiser;
    it is confirmed at ``tol`` first, so the grid is not rescanned with two starts."""
    from nclightning.perturbation import _search
    from nclightning.perturbation._spectral import Spectrum

    g = torch.Generator().manual_seed(0)
    f64, d, K, n = torch.float64, 128, 10, 50
    means = 3.0 * torch.randn(K, d, generator=g, dtype=f64) / math.sqrt(d)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=f64))
    spec = 9.0 / torch.arange(1, d + 1, dtype=f64) / float((1.0 / torch.arange(1, d + 1)).sum())
    share = 1.0 + 0.2 * torch.rand(K, generator=g, dtype=f64)
    counts = torch.full((K,), float(n), dtype=f64)

    def moments(spectrum):
        scatter = (q * (K * n * spectrum)) @ q.T
        ss = float(scatter.trace()) * share / float(share.sum())
        return ClassMoments(counts.clone(), means.clone(), 0.5 * (scatter + scatter.T), ss)

    shrink = 0.3 + 0.4 * torch.linspace(0.0, 1.0, d, dtype=f64)
    m0, m = moments(spec), moments(spec * shrink.square())
    calls, scans = [], []
    at, scan = _search.Solver.at, _search.RootSearch._scan

    def spy_at(self, beta, starts, level="tight"):
        calls.append(len(starts))
        return at(self, beta, starts, level)

    def spy_scan(self, solver, guard):
        ends = scan(self, solver, guard)
        scans.append((self, solver, ends))
        return ends

    monkeypatch.setattr(_search.Solver, "at", spy_at)
    monkeypatch.setattr(_search.RootSearch, "_scan", spy_scan)
    fit = fit_pair(m0, m, lambda_W=5e-4, lambda_H=5e-4)
    assert fit.status == "fitted" and fit.converged, fit.message
    assert len(scans) == 1 and 2 not in calls  # no rescan with both starts
    # the guard on the scan's points, continued loose from the warm chain's coarse solves
    search, solver, _ = scans[0]
    gaps = []
    for end in [p for p in solver.points if p.level == "coarse" and not p.cold]:
        warm = at(solver, end.beta, [end.W], level="loose")
        ridge = at(solver, end.beta, [None], level="loose")
        f_warm, f_ridge = warm.result.evaluation.f, ridge.result.evaluation.f
        gaps.append((f_warm - f_ridge) / abs(f_warm))
        assert search._agree_with_cold(solver, (warm,))  # ... confirmed at tol: the same minimum
    assert max(gaps) > 1e-9  # a loose ridge objective below the warm one by more than the margin
    # the ridge start reaches the reported minimum at the fitted coupling
    model = _search.Model(Spectrum.of(m0).scaled(fit.scale), 5e-4, 5e-4, fit.beta)
    cold = _search.minimize_model(model, None, tol=1e-10, max_iter=200)
    assert cold.evaluation.f == pytest.approx(fit.objective, rel=1e-12)


@pytest.mark.parametrize("coupling, chunk", [(None, None), (30.0, None), (None, 5)])
def test_cdnv_of_h_star_from_h0_rows_instead_of_a_per_class_scatter(
    ref, coupling, chunk, monkeypatch
):
    """Without H0's per-class scatter, ``h0_features`` (the rows of H0's samples) give the
    predicted cdnv: that of the per-class-scatter fit, and a float64 brute force over the rows
    ``H* = (Y^T W + beta s H0) (W^T W + (lambda_H + beta) I)^-1`` (docs/science.md §2)."""
    import numpy as np
    from support import reference_metrics

    from nclightning.perturbation import solver

    if chunk is not None:  # several chunks of rows, the last one short
        monkeypatch.setattr(solver, "ROWS", chunk)
    h0, labels = ref.random_features(4, [12, 9, 15, 11], 7)
    pooled = ClassMoments.from_features(h0, labels)
    h = shrunk_layer(h0, labels, 0.3 * metrics_from_moments(pooled)["nc1_tilde"])
    kw = dict(lambda_W=LW, lambda_H=LH, coupling=coupling)
    per_class = fit_pair(ClassMoments.from_features(h0, labels, per_class_scatter=True), h, **kw)
    kept = h0.clone()
    rows = fit_pair(pooled, h, h0_features=(h0, labels), **kw)
    assert torch.equal(h0, kept)  # float64 rows are read, never written
    assert rows.status == ("fixed" if coupling else "fitted") and rows.converged
    assert math.isnan(fit_pair(pooled, h, **kw).predicted["cdnv"])  # no rows: undefined
    assert rows.coupling == pytest.approx(per_class.coupling, rel=1e-8)
    for key, value in per_class.predicted.items():  # the same fit (rounding of the scatter)
        assert rows.predicted[key] == pytest.approx(value, rel=1e-7, abs=1e-12), key
    W, K = rows.solve.W, 4
    A = torch.linalg.inv(W.T @ W + (LH + rows.beta) * torch.eye(7, dtype=torch.float64))
    y = torch.eye(K, dtype=torch.float64)[labels]
    h_star = (y @ W + rows.beta * rows.scale * h0) @ A
    brute = reference_metrics(h_star.numpy(), labels.numpy(), K)["cdnv"]
    assert rows.predicted["cdnv"] == pytest.approx(brute, rel=1e-8)
    assert np.isfinite(brute)


def test_h0_features_must_be_the_samples_of_h0(ref):
    h0, labels = ref.random_features(4, [12, 9, 15], 5)
    m0, h = ClassMoments.from_features(h0, labels), shrunk_layer(h0, labels, 0.4)
    relabelled = labels.clone()
    relabelled[0] = (relabelled[0] + 1) % 3
    for bad in ((h0[:-1], labels[:-1]), (h0[:, :4], labels), (h0, relabelled), (h0, labels[:-1])):
        with pytest.raises(ConfigurationError, match="h0_features"):
            fit_pair(m0, h, lambda_W=LW, lambda_H=LH, h0_features=bad)
