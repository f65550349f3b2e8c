"""The statistics-based solver of Eq. 2 (docs/science.md §2) and Corollary 3.2 (§3)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from nclightning.metrics import ClassMoments, metrics_from_moments
from nclightning.perturbation import ConvergenceWarning, objective, solve

LW, LH = 0.3, 0.2

CASES = {
    "balanced": [5, 5, 5],
    "imbalanced": [2, 7, 4],
}


@pytest.mark.parametrize("counts", list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize("beta", [0.1, 1.0, 10.0, 1e2, 1e4])
def test_matches_dense_joint_minimisation(ref, counts, beta):
    """Objective within 1e-9 (relative) and H within 1e-6 of L-BFGS + Newton over (W, H)."""
    d = 5
    h0, labels = ref.random_features(1, counts, d)
    res = solve(h0, labels, lambda_W=LW, lambda_H=LH, beta=beta, tol=1e-12)
    assert res.converged and res.rel_grad_norm <= 1e-12
    f_ref, W_ref, H_ref = ref.dense_minimize(h0, labels, len(counts), LW, LH, beta)
    assert res.objective <= f_ref * (1 + 1e-12)  # never worse than the dense optimum
    assert res.objective == pytest.approx(f_ref, rel=1e-9)
    assert float((res.H - H_ref).abs().max()) <= 1e-6
    assert float((res.W - W_ref).abs().max()) <= 1e-6


def test_absent_class_matches_dense(ref):
    """A class with no sample (K from num_classes) still enters Y and W: row of zeros in Y."""
    h0, labels = ref.random_features(2, [4, 6], 4)
    res = solve(h0, labels, lambda_W=LW, lambda_H=LH, beta=2.0, num_classes=3, tol=1e-12)
    f_ref, _W_ref, H_ref = ref.dense_minimize(h0, labels, 3, LW, LH, 2.0)
    assert res.W.shape == (3, 4)
    assert res.objective == pytest.approx(f_ref, rel=1e-9)
    assert float((res.H - H_ref).abs().max()) <= 1e-6


@pytest.mark.parametrize("beta", [0.05, 3.0, 300.0])
def test_reported_objective_and_gradient_are_those_of_eq2(ref, beta):
    """objective / grad_norm equal Eq. 2 and its autograd gradient at (W, H*) (dense)."""
    h0, labels = ref.random_features(3, [6, 3, 5, 4], 6)
    res = solve(
        h0, labels, lambda_W=LW, lambda_H=LH, beta=beta, tol=1e-6
    )  # stop early: gradient not ~0
    W = res.W.clone().requires_grad_(True)
    Hc = res.H.T.clone().requires_grad_(True)
    f = ref.eq2(W, Hc, h0.T, ref.onehot_columns(labels, 4), LW, LH, beta)
    gw, gh = torch.autograd.grad(f, (W, Hc))
    assert res.objective == pytest.approx(float(f.detach()), rel=1e-13)
    assert res.grad_norm == pytest.approx(float(gw.norm()), rel=1e-9)
    assert float(gh.norm()) <= 1e-12  # H = H*(W) exactly, so dH f = 0
    assert float(
        objective(res.W, res.H, h0, labels, lambda_W=LW, lambda_H=LH, beta=beta)
    ) == pytest.approx(res.objective, rel=1e-13)


def test_statistics_inputs_give_the_same_solution(ref):
    """Tensor, ClassMoments and any object with moments() solve the same problem."""
    h0, labels = ref.random_features(4, [30, 50, 20], 8)
    m = ClassMoments.from_features(h0, labels)

    class Streaming:  # duck-typed ClassStatistics
        def moments(self):
            return m

    raw = solve(h0, labels, lambda_W=LW, lambda_H=LH, beta=5.0, tol=1e-12)
    for src in (m, Streaming()):
        res = solve(src, lambda_W=LW, lambda_H=LH, beta=5.0, tol=1e-12)
        assert res.H is None
        assert torch.allclose(res.W, raw.W, atol=1e-11)
        assert res.objective == pytest.approx(raw.objective, rel=1e-12)
    with pytest.raises(ValueError, match="labels"):
        solve(h0, lambda_W=LW, lambda_H=LH, beta=1.0)
    with pytest.raises(TypeError):
        solve([1.0, 2.0], lambda_W=LW, lambda_H=LH, beta=1.0)


def test_solution_depends_on_statistics_only(ref):
    """Duplicating every sample (same moments up to N) leaves W unchanged (§2)."""
    h0, labels = ref.random_features(5, [7, 4, 9], 6)
    a = solve(h0, labels, lambda_W=LW, lambda_H=LH, beta=2.0, tol=1e-12)
    b = solve(
        torch.cat([h0, h0]),
        torch.cat([labels, labels]),
        lambda_W=LW,
        lambda_H=LH,
        beta=2.0,
        tol=1e-12,
    )
    assert torch.allclose(a.W, b.W, atol=1e-11)
    assert a.objective == pytest.approx(b.objective, rel=1e-12)


@pytest.mark.parametrize("beta", [0.3, 30.0])
def test_metrics_of_h_star_from_statistics(ref, beta):
    """Moments of H* from (means, beta^2 A Sw0 A) equal those of the materialised H*."""
    h0, labels = ref.random_features(6, [9, 14, 6, 11], 7, within=1.5)
    res = solve(h0, labels, lambda_W=LW, lambda_H=LH, beta=beta, tol=1e-12)
    direct = ClassMoments.from_features(res.H, labels, 4)
    assert torch.allclose(res.moments.means, direct.means, atol=1e-12)
    assert torch.allclose(res.moments.scatter, direct.scatter, rtol=1e-10, atol=1e-12)
    expected = metrics_from_moments(direct, weight=res.W)
    for key, v in expected.items():
        assert res.metrics[key] == pytest.approx(v, rel=1e-9), key
    # nc4 (raw features): argmax of W h against the nearest class mean, by brute force
    dist = torch.cdist(res.H, direct.means)
    mismatch = ((res.H @ res.W.T).argmax(1) != dist.argmin(1)).double().mean()
    assert res.metrics["nc4"] == pytest.approx(float(mismatch))
    # per-class scatter given: cdnv exact without raw features
    m_cs = ClassMoments.from_features(h0, labels, 4, per_class_scatter=True)
    res_cs = solve(m_cs, lambda_W=LW, lambda_H=LH, beta=beta, tol=1e-12)
    assert res_cs.metrics["cdnv"] == pytest.approx(expected["cdnv"], rel=1e-9)
    assert torch.allclose(res_cs.moments.class_ss, direct.class_ss, rtol=1e-9)
    assert "nc4" not in res_cs.metrics  # NCC mismatch needs the samples: dropped, not NaN
    # pooled statistics only: cdnv cannot be known and is NaN, the rest is exact
    res_pool = solve(
        ClassMoments.from_features(h0, labels, 4), lambda_W=LW, lambda_H=LH, beta=beta, tol=1e-12
    )
    assert math.isnan(res_pool.metrics["cdnv"])
    assert res_pool.metrics["nc1"] == pytest.approx(expected["nc1"], rel=1e-9)
    assert res_pool.metrics["nc3"] == pytest.approx(expected["nc3"], rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [10.0, 100.0, 1000.0])
def test_corollary_3_2_large_beta_reduces_nc1_tilde(ref, seed, beta):
    h0, labels = ref.random_features(seed, [10, 10, 10, 10], 12, between=1.0, within=1.0)
    res = solve(h0, labels, lambda_W=math.sqrt(2), lambda_H=0.1, beta=beta)
    nc1_h0 = metrics_from_moments(ClassMoments.from_features(h0, labels))["nc1_tilde"]
    direct = metrics_from_moments(ClassMoments.from_features(res.H, labels))["nc1_tilde"]
    assert res.metrics["nc1_tilde"] == pytest.approx(direct, rel=1e-9)
    assert res.metrics["nc1_tilde"] < nc1_h0


def test_non_convergence_is_reported(ref):
    h0, labels = ref.random_features(7, [5, 5, 5], 6)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        res = solve(h0, labels, lambda_W=LW, lambda_H=LH, beta=0.1, max_iter=1, tol=1e-14)
    assert not res.converged and res.iterations == 1 and res.rel_grad_norm > 1e-14
    assert "1 iterations" in res.message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not solve(
            h0, labels, lambda_W=LW, lambda_H=LH, beta=0.1, max_iter=1, tol=1e-14, warn=False
        ).converged


def test_rejects_invalid_parameters(ref):
    h0, labels = ref.random_features(8, [3, 3], 3)
    for lw, lh, beta in [(0.0, 0.1, 1.0), (0.1, -1.0, 1.0), (0.1, 0.0, 0.0)]:
        with pytest.raises(ValueError):
            solve(h0, labels, lambda_W=lw, lambda_H=lh, beta=beta)
    with pytest.raises(ValueError, match="init"):
        solve(h0, labels, lambda_W=0.1, lambda_H=0.1, beta=1.0, init=torch.zeros(3, 3))


def test_streaming_class_statistics_input(ref):
    """A real ClassStatistics (streamed in batches, per-class scatter) as the H0 argument."""
    from nclightning.metrics import ClassStatistics

    h0, labels = ref.random_features(10, [12, 20, 16], 6)
    stats = ClassStatistics(3, 6, per_class_scatter=True, sync_on_compute=False)
    for x, y in zip(h0.split(7), labels.split(7)):
        stats.update(x, y)
    raw = solve(h0, labels, lambda_W=LW, lambda_H=LH, beta=3.0, tol=1e-12)
    res = solve(stats, lambda_W=LW, lambda_H=LH, beta=3.0, tol=1e-12)
    assert torch.allclose(res.W, raw.W, atol=1e-10)
    for key in ("nc1", "nc1_tilde", "cdnv", "nc2_etf", "nc3"):
        assert res.metrics[key] == pytest.approx(raw.metrics[key], rel=1e-9), key


@pytest.mark.parametrize("beta", [5e-5, 5e-4, 5e-3, 0.5])
def test_predicted_metrics_converge_at_the_default_tolerance(ref, beta):
    """Every metric of H* at the default tol (cold and warm-started) agrees to <= 1e-7 with a
    solve at the float64 floor; the sensitive ones (nc1, nc2_etf) included. lambda = 5e-4 and
    H0 at the UFM scale make beta / lambda_H span the strongly collapsing regime."""
    h0, labels = ref.random_features(11, [12, 9, 15, 10], 10, within=0.7)
    m = ClassMoments.from_features(h0, labels, per_class_scatter=True)
    s = math.sqrt((1 - 5e-4) * 0.75 / float(m.sigma_b.trace()))  # Tr Sigma_B(s H0) = rho (K-1)/K
    m = ClassMoments(
        counts=m.counts,
        means=s * m.means,
        scatter=s * s * m.scatter,
        class_ss=s * s * m.class_ss,
        class_scatter=s * s * m.class_scatter,
    )
    kw = dict(lambda_W=5e-4, lambda_H=5e-4)
    exact = solve(m, beta=beta, tol=1e-15, warn=False, **kw)
    warm_start = solve(m, beta=3 * beta, **kw).W  # a nearby solution: small gradient, far W
    for res in (solve(m, beta=beta, **kw), solve(m, beta=beta, init=warm_start, **kw)):
        assert res.converged
        for key in ("nc1", "nc1_tilde", "cdnv", "nc2_etf", "nc2_equinorm", "nc3"):
            assert res.metrics[key] == pytest.approx(exact.metrics[key], rel=1e-7), key


def test_a_small_gradient_alone_does_not_fix_the_metrics(ref):
    """Negative control for the test above: stopping on the relative gradient only (no bound on
    the Newton step) leaves nc1 of H* off by far more than 1e-7 after a warm start."""
    from nclightning.perturbation._model import Model
    from nclightning.perturbation._spectral import Spectrum
    from nclightning.perturbation.solver import minimize_model, result_of

    h0, labels = ref.random_features(11, [12, 9, 15, 10], 10, within=0.7)
    m = ClassMoments.from_features(h0, labels)
    spec = Spectrum.of(m).scaled(math.sqrt((1 - 5e-4) * 0.75 / float(m.sigma_b.trace())))
    model = Model(spec, 5e-4, 5e-4, 5e-4)
    warm = minimize_model(Model(spec, 5e-4, 5e-4, 1.5e-3), None, tol=1e-10, max_iter=200).x
    loose = minimize_model(model, warm, tol=1e-10, max_iter=200, step_tol=math.inf)
    tight = minimize_model(model, warm, tol=1e-10, max_iter=200)
    assert loose.converged and loose.evaluation.rel <= 1e-10
    nc1_loose, nc1_tight = (result_of(model, r).metrics["nc1"] for r in (loose, tight))
    assert abs(nc1_loose / nc1_tight - 1) > 1e-6


@pytest.mark.parametrize("beta", [1e-3, 0.3, 30.0])
def test_hessian_vector_products_are_those_of_eq2_with_h_eliminated(ref, beta):
    """The solver's Hessian-vector product (``_model.Model.hvp``, eigenbasis of ``Sw0``) against
    autograd's, of Eq. 2 written densely with ``H`` replaced by its closed-form minimiser
    ``H*(W) = (Y^T W + beta H0) (W^T W + (lambda_H + beta) I)^-1`` (docs/science.md §2), at
    points away from the optimum, imbalanced classes."""
    from nclightning.perturbation._model import Model
    from nclightning.perturbation._spectral import Spectrum

    K, d = 3, 5
    h0, labels = ref.random_features(3, [3, 4, 6], d)
    Y = ref.onehot_columns(labels, K)  # [K, N]

    def g(W):
        A = torch.linalg.inv(W.T @ W + (LH + beta) * torch.eye(d, dtype=torch.float64))
        Hc = A @ (W.T @ Y + beta * h0.T)  # columns [d, N]
        return ref.eq2(W, Hc, h0.T, Y, LW, LH, beta)

    spec = Spectrum.of(ClassMoments.from_features(h0, labels, K))
    model = Model(spec, LW, LH, beta)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        W = torch.randn(K, d, generator=gen, dtype=torch.float64)
        V = torch.randn(K, d, generator=gen, dtype=torch.float64)
        ev = model.evaluate(spec.to_eigen(W))
        e0, _, e1 = model.multipliers(ev.ctx)
        got = spec.to_original(model.hvp(ev.ctx, e0, e1)(spec.to_eigen(V)))
        _, want = torch.autograd.functional.hvp(g, W, V)
        assert torch.allclose(got, want, rtol=0, atol=1e-10 * float(want.abs().max())), beta


def test_the_preconditioner_chosen_last_is_tried_first_and_kept_unless_poor():
    """``_newton._choose``: the preferred candidate is built first and kept outright while
    its first CG step leaves at most INCUMBENT_GOOD_ENOUGH of the gradient (the other is then
    never built); above that the other is built too and the better one is chosen."""
    from nclightning.perturbation import _newton

    def run(h, prefer, rate=None):
        built = []
        hvp = lambda v: h * v  # noqa: E731  (H = diag(h))
        factories = [
            lambda: built.append("exact") or (lambda q: q / h),
            lambda: built.append("identity") or (lambda q: q),
        ]
        last = None if prefer is None else _newton.Choice(prefer, None, rate)
        _, _, _, chosen = _newton._choose(hvp, factories, torch.ones(2, dtype=torch.float64), last)
        return built, chosen

    mild = torch.tensor([1.0, 2.0], dtype=torch.float64)  # identity's residual 0.32
    harsh = torch.tensor([1.0, 100.0], dtype=torch.float64)  # identity's residual 0.70
    assert _newton.GOOD_ENOUGH < 0.32 < _newton.INCUMBENT_GOOD_ENOUGH < 0.70
    assert run(mild, prefer=1) == (["identity"], 1)  # kept: the exact one is never built
    assert run(mild, prefer=None) == (["exact"], 0)  # in order: the exact one first, kept
    assert run(harsh, prefer=1) == (["identity", "exact"], 0)  # too poor: both, the better
    assert run(mild, prefer=0) == (["exact"], 0)
    # its last CG solve converged slowly: the other is tried first and kept
    slow = _newton.SLOW_CG + 0.05
    assert run(mild, prefer=1, rate=slow) == (["exact"], 0)
    assert run(mild, prefer=1, rate=_newton.SLOW_CG) == (["identity"], 1)


def test_a_preconditioner_that_was_slow_loses_unless_the_others_are_poor():
    """``_newton._choose`` with ``Choice.slow_indices``: a candidate whose last CG solve
    contracted slowly is built last and chosen only where the others' first CG step leaves
    more than SLOW_FLOOR of the gradient, however good its own first step; where every
    candidate has been slow, the residuals alone decide and a slow incumbent is kept outright
    only below GOOD_ENOUGH."""
    from nclightning.perturbation import _newton

    def run(h, last):
        built = []
        hvp = lambda v: h * v  # noqa: E731  (H = diag(h))
        factories = [
            lambda: built.append("exact") or (lambda q: q / h),
            lambda: built.append("identity") or (lambda q: q),
        ]
        g = torch.ones(h.shape, dtype=torch.float64)
        return built, _newton._choose(hvp, factories, g, last)[3]

    harsh = torch.tensor([1.0, 100.0], dtype=torch.float64)  # identity's residual 0.70
    flat = torch.tensor([1.0] * 9 + [1e4], dtype=torch.float64)  # identity's residual 0.95
    assert _newton.INCUMBENT_GOOD_ENOUGH < 0.70 < _newton.SLOW_FLOOR < 0.95
    exact_was_slow = _newton.Choice(1, None, 0.5, frozenset({0}))
    # the exact one leaves nothing, but was slow: the identity, leaving 0.70, is chosen
    assert run(harsh, exact_was_slow) == (["identity", "exact"], 1)
    assert run(harsh, _newton.Choice(1, None, 0.5)) == (["identity", "exact"], 0)  # control
    # the identity leaves 0.95 > SLOW_FLOOR: the slow one is chosen after all
    assert run(flat, exact_was_slow) == (["identity", "exact"], 0)
    # both slow: the residuals decide (exact); the slow incumbent is not kept at 0.70
    both = _newton.Choice(1, None, 0.9, frozenset({0, 1}))
    assert run(harsh, both) == (["identity", "exact"], 0)
    # the measured rate updates the slow indices: slow added, a fast solve removes it
    c = _newton.Choice(0).then(1, None, _newton.SLOW_CG + 0.1)
    assert c.slow_indices == {1} and c.slow
    c = c.then(0, None, 0.2).then(1, None, 0.3)
    assert c.slow_indices == frozenset() and not c.slow
    assert c.then(0, None, None).slow_indices == frozenset()  # not measured: unchanged


@pytest.mark.parametrize(
    ("counts", "d", "beta", "w_scale"),
    [
        ([9, 14, 6, 11], 7, 0.3, 1.0),  # K < d
        ([9, 14, 6, 11], 7, 1e-3, 30.0),  # sigma^2 >> c: W's row space nearly annihilated
        ([5, 7, 0, 6, 8, 4], 3, 2.0, 1.0),  # K > d (W rank-deficient), an absent class
    ],
)
def test_the_fitted_metric_of_h_star_from_a_solver_state(ref, counts, d, beta, w_scale):
    """``Model.nc1_tilde`` and ``Model.rms`` (K x K eigendecomposition of ``W W^T``, no SVD)
    equal those of the materialised ``H*(W) = A (W^T Y + beta H0)`` in float64, for any ``W``
    (not only a minimiser), rank-deficient ``W`` and absent classes included."""
    from nclightning.perturbation._model import Model
    from nclightning.perturbation._spectral import Spectrum

    h0, labels = ref.random_features(3, counts, d, within=1.5)
    K, N = len(counts), len(labels)
    spec = Spectrum.of(ClassMoments.from_features(h0, labels, K))
    model = Model(spec, LW, LH, beta)
    g = torch.Generator().manual_seed(5)
    W = w_scale * torch.randn(K, d, generator=g, dtype=torch.float64)  # eigenbasis
    Wo = spec.to_original(W)
    A = torch.linalg.inv(Wo.T @ Wo + (LH + beta) * torch.eye(d, dtype=torch.float64))
    H = (A @ (Wo.T @ ref.onehot_columns(labels, K) + beta * h0.T)).T  # rows
    present = torch.tensor(counts) > 0
    means = torch.stack([H[labels == k].mean(0) for k in range(K) if counts[k] > 0])
    within = sum(
        float((H[labels == k] - H[labels == k].mean(0)).square().sum())
        for k in range(K)
        if counts[k] > 0
    )
    between = float((means - means.mean(0)).square().sum()) / int(present.sum())
    st = model.state(W)
    assert model.nc1_tilde(st) == pytest.approx(within / N / between, rel=1e-10)
    assert model.rms(st) == pytest.approx(math.sqrt(float(H.square().sum()) / N), rel=1e-12)
    # a state of the same W at another beta lends its beta-free products: the same numbers
    other = Model(spec, LW, LH, 10.0 * beta).state(W.clone())
    lent = model.state(W, like=other)
    assert lent.gram is other.gram and lent.t is other.t
    for name in ("gram", "m_inv", "m_inv_w", "w_mu", "ws", "t", "means", "r"):
        assert torch.equal(getattr(lent, name), getattr(st, name)), name
    unrelated = model.state(W, like=model.state(2.0 * W))  # another W: not lent
    assert torch.equal(unrelated.gram, st.gram) and torch.equal(unrelated.means, st.means)


def test_the_operator_chosen_last_is_reused_before_anything_is_built():
    """``_newton._choose`` given the operator a previous iteration or solve chose (built at
    another point): tried first and kept while its first CG step leaves at most
    INCUMBENT_GOOD_ENOUGH of the gradient, nothing built; above that it is dropped and the
    candidates are built as without it, the preferred one first."""
    from nclightning.perturbation import _newton

    h = torch.tensor([1.0, 100.0], dtype=torch.float64)
    g = torch.ones(2, dtype=torch.float64)
    hvp = lambda v: h * v  # noqa: E731  (H = diag(h))

    def run(reuse):
        built = []
        factories = [
            lambda: built.append("exact") or (lambda q: q / h),
            lambda: built.append("identity") or (lambda q: q),
        ]
        op, products, first, chosen = _newton._choose(hvp, factories, g, _newton.Choice(1, reuse))
        return op, built, chosen, products, first

    stale = lambda q: q / torch.tensor([1.0, 90.0], dtype=torch.float64)  # noqa: E731
    op, built, chosen, products, first = run(stale)
    assert op is stale and built == [] and chosen == 1 and products == 1
    assert torch.equal(first[0], stale(g)) and torch.equal(first[1], hvp(stale(g)))
    poor = lambda q: q  # noqa: E731  (residual 0.70 on this H)
    op, built, chosen, products, _ = run(poor)
    assert op is not poor and built == ["identity", "exact"] and chosen == 0 and products == 3


def test_cg_reports_its_mean_contraction_per_iteration():
    """``_newton._cg``'s rate is ``(|H p + g| / |g|)^(1/k)`` after ``k`` iterations (what
    ``Choice.slow`` judges a preconditioner by), and ``None`` when the solve ended early."""
    from nclightning.perturbation import _newton

    h = torch.linspace(1.0, 50.0, 12, dtype=torch.float64)  # H = diag(h): 12 CG steps at most
    g = torch.linspace(-1.0, 2.0, 12, dtype=torch.float64)
    hvp = lambda v: h * v  # noqa: E731
    p, products, small, rate = _newton._cg(hvp, lambda q: q.clone(), g, 1e-3, 50)
    residual = float((h * p + g).norm() / g.norm())
    assert not small and residual <= 1e-3
    assert rate == pytest.approx(residual ** (1.0 / products), rel=1e-6)  # k = products here
    assert 0.3 < rate < 1.0  # identity preconditioner on condition number 50: slow
    _, _, small, rate = _newton._cg(hvp, lambda q: q / h, g, 1e-3, 50, small=lambda p: True)
    assert small and rate is None
