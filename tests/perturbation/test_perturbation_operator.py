"""Linearised operator F: Theorem 4.1, Eq. 5, Theorem 4.2 and the spectrum table (§5)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from nclightning.perturbation import (
    block_singular_values,
    class_order,
    operator_blocks,
    perturbation_operator,
    solve,
    ufm_minimizer,
)

LW = math.sqrt(2)
K, D, N_PER = 4, 10, 10  # the paper's Figure 1 setting


def _table(lambda_H, beta):
    """docs/science.md §5, transcribed independently: sorted singular values of F_kk."""
    c = math.sqrt(lambda_H * LW)
    rows = [
        (1.0, D - K),
        (1 - 2 * lambda_H * (1 - c) / beta, K - 1),
        (1 - 4 * lambda_H * (1 - c) / beta, 1),
        (1 - lambda_H / beta, (D - K) * (N_PER - 1)),
        (1 - math.sqrt(lambda_H / LW) / beta, K * (N_PER - 1)),
    ]
    vals = [v for v, m in rows for _ in range(m)]
    assert len(vals) == D * N_PER
    return torch.tensor(sorted(vals, reverse=True), dtype=torch.float64)


def _table_error(F, lambda_H, beta):
    """Largest deviation of the blocks' singular values from Theorem 4.2 / the table."""
    sv = block_singular_values(F, [N_PER] * K, D)
    pred = _table(lambda_H, beta)
    off = 2 * lambda_H * (1 - math.sqrt(lambda_H * LW)) / beta
    err_diag = max(float((sv[k][k] - pred).abs().max()) for k in range(K))
    err_off = max(
        max(abs(float(sv[k][l][0]) - off), float(sv[k][l][1:].abs().max()))
        for k in range(K)
        for l in range(K)
        if k != l
    )
    return err_diag, err_off


@pytest.mark.parametrize("lambda_H", [0.01, 0.1, 0.3, 0.6])
@pytest.mark.parametrize("beta", [10.0, 100.0, 1e4])
def test_eq5_matches_spectrum_table(lambda_H, beta):
    _W, H, labels = ufm_minimizer(K, D, N_PER, LW, lambda_H, seed=5)
    F = perturbation_operator(H, labels, LW, lambda_H, beta, form="eq5")
    assert F.shape == (D * K * N_PER, D * K * N_PER) and F.dtype == torch.float64
    err_diag, err_off = _table_error(F, lambda_H, beta)
    assert err_diag <= 1e-12 and err_off <= 1e-12


def test_eq5_singular_vectors_and_rank_one_blocks():
    """The table's singular vectors; F_kl = -(2 lH (1-c)/(beta n)) vec(r_l 1^T) vec(r_k 1^T)^T."""
    lambda_H, beta = 0.1, 100.0
    c = math.sqrt(lambda_H * LW)
    _W, H, labels = ufm_minimizer(K, D, N_PER, LW, lambda_H, seed=2)
    F = perturbation_operator(H, labels, LW, lambda_H, beta, form="eq5")
    blocks = operator_blocks(F, [N_PER] * K, D)
    R = H[::N_PER] / H[::N_PER].norm(dim=1, keepdim=True)  # rows r_k
    u = torch.linalg.qr(torch.cat([R.T, torch.ones(D, 1, dtype=R.dtype)], 1))[0][:, K]
    z = torch.arange(N_PER, dtype=R.dtype) - (N_PER - 1) / 2  # z ⊥ 1_n

    def vec(col, row):  # vec of the d x n matrix col row^T (column stacking)
        return torch.outer(row, col).reshape(-1)

    ones = torch.ones(N_PER, dtype=R.dtype)
    k = 1
    cases = [
        (vec(u, ones), 1.0),
        (vec(R[2], ones), 1 - 2 * lambda_H * (1 - c) / beta),
        (vec(R[k], ones), 1 - 4 * lambda_H * (1 - c) / beta),
        (vec(u, z), 1 - lambda_H / beta),
        (vec(R[3], z), 1 - math.sqrt(lambda_H / LW) / beta),
    ]
    for x, s in cases:
        assert float((blocks[k][k] @ x - s * x).abs().max()) <= 1e-13 * float(x.abs().max())
    for k, l in [(0, 1), (1, 0), (2, 3)]:
        expected = -(2 * lambda_H * (1 - c) / (beta * N_PER)) * torch.outer(
            vec(R[l], ones), vec(R[k], ones)
        )
        assert float((blocks[k][l] - expected).abs().max()) <= 1e-15


@pytest.mark.parametrize("lambda_H", [0.1, 0.3])
def test_exact_operator_matches_table_to_second_order(lambda_H):
    """Exact F deviates from the table by O(beta^-2): error / 4 when beta doubles."""
    _W, H, labels = ufm_minimizer(K, D, N_PER, LW, lambda_H, seed=1)
    errs = []
    for beta in (100.0, 200.0, 400.0):
        F = perturbation_operator(H, labels, LW, lambda_H, beta, form="exact")
        err_diag, err_off = _table_error(F, lambda_H, beta)
        assert err_diag <= 0.5 / beta**2 and err_off <= 0.5 / beta**2
        errs.append(err_diag)
    # error at beta=100, lambda_H=0.1: ~7e-6 (docs/science.md §5)
    for a, b in itertools.pairwise(errs):
        assert 3.6 <= a / b <= 4.4
    assert errs[0] > 1e-7  # the exact operator is not the Eq. 5 one


def _dense_f_operator(h0, labels, lambda_W, lambda_H, beta, W, H):
    """F from autograd Hessians of Eq. 2 in the paper's vec convention (reference)."""
    order = torch.sort(labels, stable=True).indices
    h0c, Hc = h0[order].T.contiguous(), H[order].T.contiguous()  # d x N, class-major
    Kc = W.shape[0]
    d, N = Hc.shape
    Y = torch.zeros(Kc, N, dtype=torch.float64)
    Y[labels[order], torch.arange(N)] = 1.0

    def f(x):  # x = [vec(W); vec(H)], column stacking
        Wx = x[: Kc * d].reshape(d, Kc).T
        Hx = x[Kc * d :].reshape(N, d).T
        return (
            (Wx @ Hx - Y).square().sum() / (2 * N)
            + lambda_W / (2 * Kc) * Wx.square().sum()
            + lambda_H / (2 * N) * Hx.square().sum()
            + beta / (2 * N) * (Hx - h0c).square().sum()
        )

    x = torch.cat([W.T.reshape(-1), Hc.T.reshape(-1)])
    hess = torch.autograd.functional.hessian(f, x)
    nw = Kc * d
    hww, hwh, hhh = hess[:nw, :nw], hess[:nw, nw:], hess[nw:, nw:]
    schur = hhh - hwh.T @ torch.linalg.solve(hww, hwh)
    return beta / N * torch.linalg.inv(schur)


@pytest.mark.parametrize("beta", [0.5, 20.0])
def test_exact_operator_is_the_hessian_schur_complement(ref, beta):
    """Closed-form exact F equals (beta/N)(Schur complement)^-1 of autograd Hessians."""
    h0, labels = ref.random_features(3, [2, 4, 3], 4)  # imbalanced, shuffled labels
    res = solve(h0, labels, lambda_W=0.5, lambda_H=0.2, beta=beta, tol=1e-13)
    F = perturbation_operator(h0, labels, 0.5, 0.2, beta, form="exact")
    F_ref = _dense_f_operator(h0, labels, 0.5, 0.2, beta, res.W, res.H)
    assert float((F - F_ref).abs().max()) <= 1e-10
    # Eq. 5 is the first-order expansion of the same matrix in 1/beta
    if beta > 10:
        F5 = perturbation_operator(h0, labels, 0.5, 0.2, beta, form="eq5")
        assert float((F5 - F).abs().max()) <= 20.0 / beta**2


def test_theorem_4_1_finite_difference_second_order(ref):
    """H*(H0 + eps D) - H*(H0) = eps F vec(D) + O(eps^2): the error falls 4x when eps halves."""
    lambda_W, lambda_H, beta = 0.5, 0.2, 3.0
    h0, labels = ref.random_features(9, [3, 5, 4], 4)
    order = class_order(labels)
    F = perturbation_operator(h0, labels, lambda_W, lambda_H, beta, form="exact")
    D = torch.randn(h0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    base = solve(
        h0, labels, lambda_W=lambda_W, lambda_H=lambda_H, beta=beta, tol=1e-14, warn=False
    ).H
    first = (F @ D[order].reshape(-1)).reshape(-1, h0.shape[1])  # class-major rows
    errs = []
    for eps in (4e-3, 2e-3, 1e-3):
        moved = solve(
            h0 + eps * D,
            labels,
            lambda_W=lambda_W,
            lambda_H=lambda_H,
            beta=beta,
            tol=1e-14,
            warn=False,
        ).H
        delta = (moved - base)[order]
        errs.append(float((delta - eps * first).norm()))
        assert errs[-1] <= 1e-2 * float((eps * first).norm())
    for a, b in itertools.pairwise(errs):
        assert 3.5 <= a / b <= 4.5


def test_operator_blocks_validate_shapes():
    F = torch.eye(12, dtype=torch.float64)
    blocks = operator_blocks(F, [1, 2], 4)
    assert blocks[0][1].shape == (4, 8) and blocks[1][1].shape == (8, 8)
    with pytest.raises(ValueError):
        operator_blocks(F, [1, 1], 4)
    with pytest.raises(ValueError, match="form"):
        perturbation_operator(torch.zeros(2, 2), torch.tensor([0, 1]), 1.0, 0.1, 1.0, "bad")
