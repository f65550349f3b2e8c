"""Independent references for the perturbation-model tests (docs/science.md §2-5).

Nothing here uses ``nclightning.perturbation``: Eq. 2 is written out densely over ``(W, H)``
with features as columns (the paper's convention), derivatives come from autograd, and the
dense minimiser is scipy's L-BFGS over the *joint* variables followed by Newton steps with
the autograd Hessian (no elimination of ``H``, no sufficient statistics).

The dense minimisations are expensive (seconds to a minute each) and their inputs are fixed,
so ``ref.dense_minimize`` reads them from ``data/dense_refs.pt`` when an entry with the same
inputs is stored there (inputs compared to 1e-12, relative), and computes them otherwise
(with a warning). ``data/regenerate_dense_refs.sh`` recomputes the file: it runs these tests
with ``NCL_WRITE_DENSE_REFS=1``, which stores every minimisation the session made.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
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


DENSE_REFS = Path(__file__).resolve().parent / "data" / "dense_refs.pt"


class StoredDense:
    """:func:`dense_minimize` with its results read from (or written to) :data:`DENSE_REFS`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries = torch.load(path, weights_only=True) if path.exists() else []
        self.used: list[dict] = []

    @staticmethod
    def _same(entry, h0, labels, K, lambda_W, lambda_H, beta, seeds, newton_steps):
        scale = max(float(h0.abs().max()), 1e-300)
        return (
            entry["key"] == (K, lambda_W, lambda_H, tuple(seeds), newton_steps)
            and entry["h0"].shape == h0.shape
            and torch.equal(entry["labels"], labels.cpu())
            and abs(entry["beta"] - beta) <= 1e-12 * max(1.0, abs(beta))
            and float((entry["h0"] - h0.cpu()).abs().max()) <= 1e-12 * scale
        )

    def __call__(self, h0, labels, K, lambda_W, lambda_H, beta, seeds=(11, 12), newton_steps=8):
        h0 = h0.detach().to(torch.float64)
        args = (h0, labels, K, lambda_W, lambda_H, float(beta), seeds, newton_steps)
        entry = next((e for e in self.entries if self._same(e, *args)), None)
        if entry is None:
            warnings.warn(
                f"a dense reference is not stored in {self.path.name}: computed now (slow); "
                "regenerate the file with tests/perturbation/data/regenerate_dense_refs.sh",
                stacklevel=2,
            )
            f, W, H = dense_minimize(*args)
            entry = {
                "key": (K, lambda_W, lambda_H, tuple(seeds), newton_steps),
                "h0": h0.cpu().clone(),
                "labels": labels.cpu().clone(),
                "beta": float(beta),
                "f": f,
                "W": W.detach().clone(),
                "H": H.detach().clone(),
            }
        self.used.append(entry)
        return entry["f"], entry["W"].clone(), entry["H"].clone()

    def write(self) -> None:
        """Store every minimisation this session used (NCL_WRITE_DENSE_REFS=1 only)."""
        self.path.parent.mkdir(exist_ok=True)
        unique = {id(e): e for e in self.used}
        torch.save(list(unique.values()), self.path)


@pytest.fixture(scope="session")
def ref():
    stored = StoredDense(DENSE_REFS)
    yield SimpleNamespace(
        eq2=eq2,
        onehot_columns=onehot_columns,
        dense_minimize=stored,
        random_features=random_features,
    )
    if os.environ.get("NCL_WRITE_DENSE_REFS") == "1":
        stored.write()
