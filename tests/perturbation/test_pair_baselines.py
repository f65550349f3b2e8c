"""Pair fits judged against baselines, the linearisation error and scale freedom (§5.6, §7.6).

References are independent: the collapse metrics of H0 and H recomputed in float64 numpy from
the raw features (docs/science.md §1), the baselines and the skill from their definitions,
the linearisation error from the dense exact and Eq. 5 operators (``perturbation_operator``),
and scale freedom from every key the callback logs for a pair (``analysis.pair_rows``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nclightning.callbacks.analysis import pair_rows
from nclightning.metrics import ClassMoments
from nclightning.perturbation import (
    LINEARISATION_TOLERANCE,
    eq5_relative_error,
    fit_pair,
    linearisation_error,
    perturbation_operator,
    ufm_minimizer,
)
from nclightning.record import keys

LW = LH = 5e-4
DISTANCES = ("nc2_etf", "nc2_equinorm", "nc3")


def features(seed=0, counts=(7, 9, 8), d=5, shrink=0.4):
    """Raw float64 features of H0 and of a more collapsed H (same samples), and W."""
    g = np.random.default_rng(seed)
    K = len(counts)
    labels = np.repeat(np.arange(K), counts)
    centres = 1.5 * g.standard_normal((K, d))
    h0 = centres[labels] + g.standard_normal((labels.size, d)) * (1 + g.random(d))
    mu = np.stack([h0[labels == k].mean(0) for k in range(K)])[labels]
    mix = np.eye(d) + 0.3 * g.standard_normal((d, d))
    h = (mu + shrink * (h0 - mu)) @ mix
    W = g.standard_normal((K, d))
    return h0, h, labels, W


def np_metrics(x, labels, W):
    """docs/science.md §1.2-§1.7 in numpy float64, written from the formulas."""
    K = labels.max() + 1
    mu = np.stack([x[labels == k].mean(0) for k in range(K)])
    M = (mu - mu.mean(0)).T  # d x K
    dev = x - mu[labels]
    sw = dev.T @ dev / len(x)
    sb = M @ M.T / K
    var = np.array([np.square(dev[labels == k]).sum(1).mean() for k in range(K)])
    cd = [
        (var[k] + var[l]) / (2 * np.square(mu[k] - mu[l]).sum())
        for k in range(K)
        for l in range(K)
        if k != l
    ]
    G = M.T @ M
    E = (np.eye(K) - 1 / K) / math.sqrt(K - 1)
    norms = np.linalg.norm(M, axis=0)
    return {
        "nc1_tilde": np.trace(sw) / np.trace(sb),
        "nc1": np.trace(sw @ np.linalg.pinv(sb, rtol=1e-10)) / K,
        "cdnv": float(np.mean(cd)),
        "nc2_etf": np.linalg.norm(G / np.linalg.norm(G) - E),
        "nc2_equinorm": norms.std(ddof=1) / norms.mean(),
        "nc3": np.linalg.norm(W.T / np.linalg.norm(W) - M / np.linalg.norm(M)),
    }


def moments(x, labels, per_class=False):
    t = torch.as_tensor(x, dtype=torch.float64)
    return ClassMoments.from_features(t, torch.as_tensor(labels), per_class_scatter=per_class)


def reference_judgement(h0, h, labels, W, predicted, fitted):
    """Baselines' residuals and skill from their definitions (docs/science.md §7.6)."""
    a, b = np_metrics(h0, labels, W), np_metrics(h, labels, W)
    K = labels.max() + 1
    r = b["nc1_tilde"] / a["nc1_tilde"]
    compared = [k for k in b if k not in fitted]
    base = {
        "h0": {k: math.log10(a[k] / b[k]) for k in compared},
        "ratio": {
            k: math.log10(a[k] * (math.sqrt(r) if k in DISTANCES else r) / b[k]) for k in compared
        },
        "etf": {"cdnv": math.log10((K - 1) / (2 * K) * b["nc1_tilde"] / b["cdnv"])},
    }
    model = {k: math.log10(predicted[k] / b[k]) for k in compared}
    skill = {k: abs(model[k]) - min(abs(v[k]) for v in base.values() if k in v) for k in compared}
    return base, skill


@pytest.mark.parametrize("coupling", [None, 3.0])
def test_baselines_and_skill_match_float64_references(coupling):
    """Every baseline residual and skill value, fitted and at a fixed coupling."""
    h0, h, labels, W = features()
    kw = {} if coupling is None else {"coupling": coupling}
    fit = fit_pair(
        moments(h0, labels, True), moments(h, labels), lambda_W=LW, lambda_H=LH,
        weight=torch.as_tensor(W), **kw,
    )  # fmt: skip
    fitted = ("nc1_tilde",) if coupling is None else ()
    assert fit.status == ("fitted" if coupling is None else "fixed"), fit.message
    base, skill = reference_judgement(h0, h, labels, W, fit.predicted, fitted)
    assert set(fit.baselines) == set(base) == {"h0", "ratio", "etf"}
    for name, ref in base.items():
        assert set(fit.baselines[name]) == set(ref), name
        for k, v in ref.items():
            assert fit.baselines[name][k] == pytest.approx(v, abs=1e-10), (name, k)
    assert set(fit.skill) == set(skill)
    for k, v in skill.items():
        assert fit.skill[k] == pytest.approx(v, abs=1e-10), k
    if coupling is not None:  # the ratio baseline is nc1_tilde(H) itself: residual 0
        assert fit.baselines["ratio"]["nc1_tilde"] == pytest.approx(0.0, abs=1e-12)


def test_not_more_collapsed_pair_has_h0_as_model_and_baseline():
    """H* = H0 (coupling inf): the model's residuals equal the h0 baseline's; skill >= 0."""
    h0, h, labels, W = features(seed=1)
    fit = fit_pair(
        moments(h, labels, True), moments(h0, labels), lambda_W=LW, lambda_H=LH,
        weight=torch.as_tensor(W),
    )  # fmt: skip
    assert fit.status == "not_more_collapsed"
    base, _ = reference_judgement(h, h0, labels, W, fit.predicted, ())
    for k in ("nc1_tilde", "nc1", "cdnv", "nc2_etf", "nc2_equinorm"):
        assert fit.residuals[k] == pytest.approx(base["h0"][k], abs=1e-10), k
        assert fit.skill[k] >= -1e-12
    assert fit.linearisation_error == 0.0 and fit.perturbative


@pytest.mark.parametrize(
    "lambda_W, lambda_H, beta",
    [(1.41, 0.1, 3.0), (0.1, 0.1, 10.0), (0.01, 1.0, 10.0), (1e-3, 1.0, 100.0), (1e-3, 1.0, 7.0)],
)
def test_linearisation_error_is_that_of_the_exact_operator(lambda_W, lambda_H, beta):
    """At the collapsed H0 of Thms 4.1-4.2: ||F - F_eq5|| / ||I - F|| = sqrt(lH/lW) / beta."""
    _W, H, labels = ufm_minimizer(3, 5, 4, lambda_W, lambda_H, seed=3)
    exact = perturbation_operator(H, labels, lambda_W, lambda_H, beta, "exact")
    eq5 = perturbation_operator(H, labels, lambda_W, lambda_H, beta, "eq5")
    measured = eq5_relative_error(exact, eq5)
    assert linearisation_error(beta, lambda_W, lambda_H) == pytest.approx(measured, rel=1e-8)
    assert math.sqrt(lambda_H / lambda_W) / beta == pytest.approx(measured, rel=1e-8)


@pytest.mark.parametrize("coupling, expected", [(100.0, False), (2000.0, True)])
def test_perturbative_follows_the_linearisation_error(coupling, expected):
    """lambda_H / lambda_W = 100: beta = 10 passes beta >= 10 max(1, lambda_H) but Eq. 5 errs
    by 100 %; only beta = 200 (error 5 %) is perturbative."""
    h0, h, labels, _ = features(seed=2)
    fit = fit_pair(
        moments(h0, labels, True), moments(h, labels), lambda_W=1e-3, lambda_H=0.1,
        coupling=coupling,
    )  # fmt: skip
    err = math.sqrt(0.1 / 1e-3) / fit.beta
    assert fit.beta == pytest.approx(0.1 * coupling, rel=1e-12)
    assert fit.linearisation_error == pytest.approx(err, rel=1e-12)
    assert fit.perturbative is expected
    assert (err <= LINEARISATION_TOLERANCE) is expected


def _logged(h0, h, labels, W, t0, t1, **kw):
    fit = fit_pair(
        moments(t0 * h0, labels, True), moments(t1 * h, labels), lambda_W=LW, lambda_H=LH,
        weight=torch.as_tensor(W / t1), **kw,
    )  # fmt: skip
    return pair_rows("train", {"h0->h": fit})


@pytest.mark.parametrize("normalization", ["total", "between"])
@pytest.mark.parametrize("kind", ["fitted", "fixed", "not_more_collapsed"])
@pytest.mark.parametrize("t0, t1", [(100.0, 1.0), (1.0, 0.01), (0.1, 30.0)])
def test_every_logged_pair_key_is_scale_free(normalization, kind, t0, t1):
    """H0 -> t0 H0, H -> t1 H, W -> W / t1 (the network's function unchanged): every logged
    pair key but ``keys.PAIR_SCALE_KEYS`` keeps its value; those move as documented."""
    h0, h, labels, W = features(seed=4)
    if kind == "not_more_collapsed":
        h0, h = h, h0
    kw = {"normalization": normalization, **({"coupling": 2.0} if kind == "fixed" else {})}
    base = _logged(h0, h, labels, W, 1.0, 1.0, **kw)
    moved = _logged(h0, h, labels, W, t0, t1, **kw)
    assert set(base) == set(moved)
    head = "pm-train-h0->h/"
    status = base[head + "status"]
    assert keys.status_name(status) == kind
    quantities = {k[len(head) :] for k in base}
    assert {"skill/nc1", "baseline/etf/cdnv", "baseline/ratio/nc3", "linearisation_error"} <= (
        quantities
    )
    for key, value in base.items():
        q = key[len(head) :]
        if q in keys.PAIR_SCALE_KEYS:
            continue
        assert math.isfinite(value) or math.isinf(value), key
        tol = 1e-6 * max(1.0, abs(value)) if q not in ("grad_norm",) else 1e-6
        assert moved[key] == pytest.approx(value, abs=tol, rel=1e-6), key
    assert moved[head + "scale"] == pytest.approx(base[head + "scale"] / t0, rel=1e-9)
    ratio = moved[head + "measured/norm_ratio"] / base[head + "measured/norm_ratio"]
    assert ratio == pytest.approx(t1 / t0, rel=1e-12)
