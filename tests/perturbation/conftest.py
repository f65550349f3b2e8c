"""Independent references for the perturbation-model tests (docs/science.md §2-5).

Nothing here uses ``nclightning.perturbation``: Eq. 2 is written out densely over ``(W, H)``
with features as columns (the paper's convention), derivatives come from autograd, and the
dense minimiser is scipy's L-BFGS over the *joint* variables followed by Newton steps with
the autograd Hessian (no elimination of ``H``, no sufficient statistics).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import scipy.optimize
import torch


def eq2(W, Hc, H0c, Y, lambda_W, lambda_H, beta):
    """Eq. 2 with columns: ``W[K, d]``, ``Hc[d, N]``, ``H0c[d, N]``, one-hot ``Y[K, N]``."""
    K, N = Y.shape
    return (
        (W @ Hc - Y).square().sum() / (2 * N)
        + lambda_W / (2 * K) * W.square().sum()
        + lambda_H / (2 * N) * Hc.square().sum()
        + beta / (2 * N) * (Hc - H0c).square().sum()
    )


def onehot_columns(labels, K):
    """``Y[K, N]`` with ``Y[k, i] = 1`` iff ``labels[i] == k``."""
    Y = torch.zeros(K, len(labels), dtype=torch.float64)
    Y[labels, torch.arange(len(labels))] = 1.0
    return Y


def dense_minimize(h0, labels, K, lambda_W, lambda_H, beta, seeds=(11, 12), newton_steps=8):
    """Best local minimiser over ``(W, H)`` from random starts: ``(f, W[K, d], H[N, d])``.

    Features in and out are rows (``[N, d]``); internally columns.
    """
    H0c = h0.T.contiguous().to(torch.float64)
    d, N = H0c.shape
    Y = onehot_columns(labels, K)
    nw = K * d

    def f_of(x):
        return eq2(x[:nw].reshape(K, d), x[nw:].reshape(d, N), H0c, Y, lambda_W, lambda_H, beta)

    def fun(x):
        t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        f = f_of(t)
        (g,) = torch.autograd.grad(f, t)
        return float(f.detach()), g.numpy()

    best = None
    for seed in seeds:
        x0 = np.random.default_rng(seed).standard_normal(nw + d * N)
        r = scipy.optimize.minimize(
            fun,
            x0,
            jac=True,
            method="L-BFGS-B",
            options={
                "maxiter": 200_000,
                "maxfun": 400_000,
                "ftol": 0.0,
                "gtol": 1e-14,
                "maxcor": 50,
            },
        )
        x = torch.tensor(r.x, dtype=torch.float64)
        for _ in range(newton_steps):
            g = torch.autograd.functional.jacobian(f_of, x)
            hess = torch.autograd.functional.hessian(f_of, x)
            # least squares: at beta = 0 the rotations of (W, H) make the Hessian singular
            x = x - torch.linalg.lstsq(hess, g.unsqueeze(1), rcond=1e-13).solution.squeeze(1)
        f = float(f_of(x))
        if best is None or f < best[0]:
            best = (f, x)
    f, x = best
    return f, x[:nw].reshape(K, d), x[nw:].reshape(d, N).T.contiguous()


def random_features(seed, counts, d, between=2.0, within=1.0):
    """Non-collapsed rows ``[N, d]`` with Gaussian class means, labels in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    K = len(counts)
    labels = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    mu = between * torch.randn(K, d, generator=g, dtype=torch.float64)
    h0 = mu[labels] + within * torch.randn(len(labels), d, generator=g, dtype=torch.float64)
    return h0, labels


@pytest.fixture(scope="session")
def ref():
    return SimpleNamespace(
        eq2=eq2,
        onehot_columns=onehot_columns,
        dense_minimize=dense_minimize,
        random_features=random_features,
    )
