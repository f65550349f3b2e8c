"""Independent float64 two-pass reference for the collapse metrics (docs/science.md §1, §8).

Written with numpy and explicit per-class loops, sharing no code with
``nclightning.metrics``. Features are rows ``x[N, d]``. The NC1 pseudo-inverse is
``np.linalg.pinv(Sigma_B, rtol=PINV_RTOL, hermitian=True)``: eigenvalues of ``Sigma_B`` at or
below ``PINV_RTOL`` times the largest are treated as zero (rank ``<= K - 1``).
Exposed to the tests as the session fixture ``ref``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

PINV_RTOL = 1e-10


def reference_moments(x, y, K):
    """Two-pass float64 statistics over the classes present in ``y``."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    classes = [k for k in range(K) if np.any(y == k)]
    # pass 1: class means
    means = np.stack([x[y == k].mean(axis=0) for k in classes])
    # pass 2: deviations from them
    d = x.shape[1]
    sw = np.zeros((d, d))
    v = []
    for i, k in enumerate(classes):
        dev = x[y == k] - means[i]
        sw += dev.T @ dev
        v.append(np.mean(np.sum(dev**2, axis=1)))
    sw /= x.shape[0]
    centre = means.mean(axis=0)  # mean of class means (docs/science.md §1, imbalanced convention)
    M = (means - centre).T  # d x K
    sb = M @ M.T / len(classes)
    return SimpleNamespace(
        classes=classes,
        means=means,
        sigma_w=sw,
        sigma_b=sb,
        V=np.array(v),
        M=M,
        global_mean=x.mean(axis=0),
    )


def reference_metrics(x, y, K, weight=None, ood_mean=None):
    """Every scalar of docs/science.md §1 and §8 by the textbook formulas: ``nc1``,
    ``nc1_tilde``, ``cdnv``, ``nc2_*``, ``gnc2_log``, ``feature_norm``, ``class_mean_norm``,
    plus ``nc3``, ``unc3`` given ``weight[K, d]`` and ``nc5`` given ``ood_mean[d]``."""
    r = reference_moments(x, y, K)
    Kp = len(r.classes)
    out = {
        "nc1": float(
            np.trace(r.sigma_w @ np.linalg.pinv(r.sigma_b, rtol=PINV_RTOL, hermitian=True))
        )
        / Kp,
        "nc1_tilde": float(np.trace(r.sigma_w) / np.trace(r.sigma_b)),
    }
    ratios = []
    for i in range(Kp):
        for j in range(Kp):
            if i != j:
                dist2 = np.sum((r.means[i] - r.means[j]) ** 2)
                ratios.append((r.V[i] + r.V[j]) / (2 * dist2))
    out["cdnv"] = float(np.mean(ratios))
    G = r.M.T @ r.M
    etf = (np.eye(Kp) - np.ones((Kp, Kp)) / Kp) / np.sqrt(Kp - 1)
    out["nc2_etf"] = float(np.linalg.norm(G / np.linalg.norm(G) - etf))
    norms = np.linalg.norm(r.M, axis=0)
    out["nc2_equinorm"] = float(np.std(norms, ddof=1) / np.mean(norms))
    cos = [
        r.M[:, i] @ r.M[:, j] / (norms[i] * norms[j])
        for i in range(Kp)
        for j in range(Kp)
        if i != j
    ]
    out["nc2_equiangle"] = float(np.std(cos, ddof=1))
    out["nc2_maxangle"] = float(np.max(np.abs(np.array(cos) + 1 / (Kp - 1))))
    if weight is not None:
        W = np.asarray(weight, dtype=np.float64)[r.classes].T  # d x K
        out["nc3"] = float(np.linalg.norm(W / np.linalg.norm(W) - r.M / np.linalg.norm(r.M)))
    out.update(reference_measures(x, y, K, weight, ood_mean))
    return out


def reference_measures(x, y, K, weight=None, ood_mean=None):
    """The scalars of docs/science.md §8, by explicit loops over classes and pairs."""
    x = np.asarray(x, dtype=np.float64)
    r = reference_moments(x, y, K)
    Kp = len(r.classes)
    u = [r.M[:, i] / np.linalg.norm(r.M[:, i]) for i in range(Kp)]
    dists = [np.linalg.norm(u[i] - u[j]) for i in range(Kp) for j in range(i + 1, Kp)]
    logs = [math.log(1.0 / r) if r > 0 else math.nan for r in dists]  # log(1/0): undefined
    out = {
        "gnc2_log": float(np.var(logs, ddof=1)) if len(logs) > 1 else 0.0,
        "feature_norm": float(np.mean(np.sqrt(np.sum(x**2, axis=1)))),
        "class_mean_norm": float(np.mean([np.linalg.norm(r.M[:, i]) for i in range(Kp)])),
    }
    if weight is not None:
        W = np.asarray(weight, dtype=np.float64)
        cos = [
            W[k] @ r.M[:, i] / (np.linalg.norm(W[k]) * np.linalg.norm(r.M[:, i]))
            for i, k in enumerate(r.classes)
        ]
        out["unc3"] = float(np.var(cos, ddof=1))
    if ood_mean is not None:
        v = np.asarray(ood_mean, dtype=np.float64) - r.means.mean(axis=0)
        cos = [
            abs(r.M[:, i] @ v) / (np.linalg.norm(r.M[:, i]) * np.linalg.norm(v)) for i in range(Kp)
        ]
        out["nc5"] = float(np.mean(cos))
    return out


def reference_class_quantities(x, y, K):
    """``class_var[K]``, ``cdnv_matrix[K, K]``, ``cosine_matrix[K, K]`` (NaN: absent class,
    diagonal of the CDNV matrix), by explicit loops."""
    r = reference_moments(x, y, K)
    var = np.full(K, np.nan)
    cdnv = np.full((K, K), np.nan)
    cos = np.full((K, K), np.nan)
    for i, k in enumerate(r.classes):
        var[k] = r.V[i]
        for j, l in enumerate(r.classes):
            a, b = r.M[:, i], r.M[:, j]
            cos[k, l] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            if k != l:
                cdnv[k, l] = (r.V[i] + r.V[j]) / (2 * np.sum((r.means[i] - r.means[j]) ** 2))
    return {"class_var": var, "cdnv_matrix": cdnv, "cosine_matrix": cos}


def reference_nc4(x, means, weight, bias=None):
    """Brute-force NCC mismatch: explicit distances to every mean (rows of ``means``)."""
    x = np.asarray(x, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    W = np.asarray(weight, dtype=np.float64)
    b = np.zeros(W.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64)
    dist = np.stack([np.sum((x - m) ** 2, axis=1) for m in means], axis=1)
    ncc = np.argmin(dist, axis=1)
    clf = np.argmax(x @ W.T + b, axis=1)
    return float(np.mean(ncc != clf))


def rel_err(a, b):
    return abs(a - b) / abs(b)


def collapsed_data(rng, N, d, K, std_ratio, *, sizes=None, per_coordinate=False, mean_norm=10.0):
    """Float32 features near collapse: class means of norm ``mean_norm`` with random
    directions; within-class noise with RMS deviation norm ``std_ratio * mean_norm`` (or, with
    ``per_coordinate``, per-coordinate std ``std_ratio * mean_norm``). Rows shuffled."""
    mu = rng.standard_normal((K, d))
    mu *= mean_norm / np.linalg.norm(mu, axis=1, keepdims=True)
    if sizes is None:
        y = rng.integers(0, K, N)
    else:
        y = np.repeat(np.arange(K), sizes)
        rng.shuffle(y)
    s = std_ratio * mean_norm * (1.0 if per_coordinate else 1.0 / np.sqrt(d))
    x = (mu[y] + s * rng.standard_normal((len(y), d))).astype(np.float32)
    return x, y


def random_batch_sizes(rng, N, num_batches):
    """``num_batches`` positive integers summing to ``N``, of widely varying sizes."""
    cuts = np.sort(rng.choice(np.arange(1, N), size=num_batches - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [N]])).tolist()


@pytest.fixture(scope="session")
def ref():
    return SimpleNamespace(
        moments=reference_moments,
        metrics=reference_metrics,
        measures=reference_measures,
        class_quantities=reference_class_quantities,
        nc4=reference_nc4,
        rel_err=rel_err,
        collapsed_data=collapsed_data,
        batch_sizes=random_batch_sizes,
        PINV_RTOL=PINV_RTOL,
    )


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The CI machine has 2 cores; one thread per test process avoids oversubscription."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
