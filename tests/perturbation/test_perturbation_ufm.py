"""Theorem 2.1 and Corollary 2.2 (docs/science.md §4): UFM minimisers and collapsed H0."""

from __future__ import annotations

import math

import pytest
import torch

from nclightning.perturbation import solve, ufm_minimizer

LAMBDA_W = math.sqrt(2)


def _grad_norm(ref, W, H, labels, K, lambda_W, lambda_H, beta=0.0, H0=None):
    """Autograd gradient norm of Eq. 2 over (W, H) (columns inside the reference)."""
    W = W.clone().requires_grad_(True)
    Hc = H.T.clone().requires_grad_(True)
    H0c = torch.zeros_like(Hc) if H0 is None else H0.T
    f = ref.eq2(W, Hc, H0c, ref.onehot_columns(labels, K), lambda_W, lambda_H, beta)
    gw, gh = torch.autograd.grad(f, (W, Hc))
    return float(torch.cat([gw.flatten(), gh.flatten()]).norm()), float(f.detach())


@pytest.mark.parametrize("lambda_H", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("seed", [None, 3])
def test_theorem_2_1_minimiser_structure(ref, lambda_H, seed):
    K, d, n = 4, 10, 5
    W, H, labels = ufm_minimizer(K, d, n, LAMBDA_W, lambda_H, seed=seed)
    assert W.shape == (K, d) and H.shape == (K * n, d) and labels.shape == (K * n,)
    assert W.dtype == H.dtype == torch.float64
    assert torch.equal(labels, torch.arange(K).repeat_interleave(n))  # class by class
    c = math.sqrt(lambda_H * LAMBDA_W)
    rho = (1 - c) * math.sqrt(LAMBDA_W / lambda_H)
    gnorm, f = _grad_norm(ref, W, H, labels, K, LAMBDA_W, lambda_H)
    assert gnorm <= 1e-10
    # global minimum value of the UFM: per class 1/2 (a - 1)^2 + c a at a = 1 - c
    assert f == pytest.approx(c - c * c / 2, rel=1e-13)
    hbar = H[::n]
    assert torch.equal(H, hbar[labels])  # h_ki = hbar_k
    assert torch.allclose(hbar.square().sum(1), torch.full((K,), rho, dtype=H.dtype), rtol=1e-13)
    assert torch.allclose(hbar @ hbar.T, rho * torch.eye(K, dtype=H.dtype), atol=1e-13)
    assert torch.allclose(W, math.sqrt(lambda_H / LAMBDA_W) * hbar, atol=1e-14)


def _dense_ufm(ref, labels, K, n, d, lambda_H, seeds):
    """Dense minimisation of the UFM (Eq. 2 with beta = 0; H0 plays no part)."""
    h0 = torch.zeros(K * n, d, dtype=torch.float64)
    return ref.dense_minimize(h0, labels, K, LAMBDA_W, lambda_H, 0.0, seeds=seeds)


@pytest.mark.parametrize("lambda_H", [0.1, 0.6])
def test_theorem_2_1_global(ref, lambda_H):
    """No local minimisation from random starts finds a lower UFM objective."""
    K, d, n = 3, 4, 3
    W, H, labels = ufm_minimizer(K, d, n, LAMBDA_W, lambda_H, seed=0)
    _, f_star = _grad_norm(ref, W, H, labels, K, LAMBDA_W, lambda_H)
    f_dense, _, _ = _dense_ufm(ref, labels, K, n, d, lambda_H, seeds=(1, 2, 3))
    assert f_dense >= f_star - 1e-12
    assert f_dense == pytest.approx(f_star, rel=1e-9)


@pytest.mark.parametrize("lambda_H", [1.0, 3.0])
def test_theorem_2_1_zero_when_c_above_one(ref, lambda_H):
    K, d, n = 3, 5, 4
    assert math.sqrt(lambda_H * LAMBDA_W) > 1
    W, H, labels = ufm_minimizer(K, d, n, LAMBDA_W, lambda_H, seed=1)
    assert not W.any() and not H.any()
    gnorm, f = _grad_norm(ref, W, H, labels, K, LAMBDA_W, lambda_H)
    assert gnorm <= 1e-12 and f == pytest.approx(0.5)
    f_dense, W_d, H_d = _dense_ufm(ref, labels, K, n, d, lambda_H, seeds=(4, 5))
    assert f_dense == pytest.approx(0.5, rel=1e-10)
    assert float(W_d.abs().max()) < 1e-6 and float(H_d.abs().max()) < 1e-6


def test_ufm_minimizer_rejects_bad_input():
    with pytest.raises(ValueError, match="d >= K"):
        ufm_minimizer(5, 4, 2, 1.0, 0.1)
    with pytest.raises(ValueError, match="> 0"):
        ufm_minimizer(3, 4, 2, 1.0, 0.0)


@pytest.mark.parametrize("lambda_H", [0.05, 0.3])
@pytest.mark.parametrize("beta", [0.01, 1.0, 100.0, 1e4])
def test_corollary_2_2_collapsed_h0_is_fixed(lambda_H, beta):
    """H0 = H* (UFM minimiser) => the minimiser of Eq. 2 is (W*, H*) for every beta > 0."""
    K, d, n = 4, 10, 6
    W_star, H_star, labels = ufm_minimizer(K, d, n, LAMBDA_W, lambda_H, seed=7)
    g = torch.Generator().manual_seed(0)
    for init in (None, torch.randn(K, d, generator=g, dtype=torch.float64)):
        res = solve(
            H_star, labels, lambda_W=LAMBDA_W, lambda_H=lambda_H, beta=beta, tol=1e-12, init=init
        )
        assert res.converged
        assert torch.allclose(res.W, W_star, atol=1e-9)
        assert torch.allclose(res.H, H_star, atol=1e-9)
        assert res.metrics["nc1_tilde"] < 1e-15


@pytest.mark.parametrize("lambda_H", [0.05, 0.3])
def test_solve_at_beta_zero_reaches_the_ufm_minimum(ref, lambda_H):
    """beta = 0 is the UFM: the solver reaches c - c^2/2 and collapsed features (Thm 2.1)."""
    h0, labels = ref.random_features(0, [5, 5, 5, 5], 10)
    res = solve(h0, labels, lambda_W=LAMBDA_W, lambda_H=lambda_H, beta=0.0, tol=1e-12)
    c = math.sqrt(lambda_H * LAMBDA_W)
    assert res.converged
    assert res.objective == pytest.approx(c - c * c / 2, rel=1e-10)
    assert res.metrics["nc1_tilde"] < 1e-12
    assert res.metrics["nc2_etf"] < 1e-6  # centred orthogonal frame = simplex ETF
