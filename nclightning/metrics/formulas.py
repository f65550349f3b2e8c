"""Collapse metrics from class moments (docs/science.md §1).

All functions take a :class:`~nclightning.metrics.moments.ClassMoments` (float64) and return
Python floats. Conventions (docs/science.md §1):

* ``Sigma_B``, ``M`` (NC2) and NC3 centre the class means on the *mean of class means*
  (:attr:`ClassMoments.mean_of_means`); for balanced classes this is the sample mean.
* ``K`` is the number of classes present; absent classes are ignored here (the streaming
  statistics decide whether an absent class is an error).
* ``std`` is the unbiased (``ddof=1``) standard deviation, as in Papyan et al.'s code.
* The pseudo-inverse in NC1 drops eigenvalues of ``Sigma_B`` below ``eig_rtol`` times the
  largest one (default :data:`EIG_RTOL`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from nclightning.metrics.moments import ClassMoments

__all__ = [
    "EIG_RTOL",
    "METRIC_KEYS",
    "cdnv",
    "metrics_from_moments",
    "nc1",
    "nc1_tilde",
    "nc2",
    "nc3",
]

EIG_RTOL = 1e-10
"""Relative eigenvalue cut-off of the pseudo-inverse ``Sigma_B^+`` in NC1.

``Sigma_B`` has rank at most ``K - 1`` (its centred means sum to zero); eigenvalues below
``EIG_RTOL * lambda_max`` are treated as zero. In float64 the structural zero sits near
``1e-30 lambda_max``, far below the cut-off, while genuine between-class directions of a
network's features sit far above it."""

METRIC_KEYS = (
    "nc1",
    "nc1_tilde",
    "cdnv",
    "nc2_etf",
    "nc2_equinorm",
    "nc2_equiangle",
    "nc2_maxangle",
)
"""Keys of the metrics computable from moments alone (``nc3``/``nc4`` need a classifier)."""

_NAN = float("nan")


def nc1(m: ClassMoments, eig_rtol: float = EIG_RTOL) -> float:
    """``(1/K) Tr(Sigma_W Sigma_B^+)`` (Papyan et al. 2020).

    Computed in the ``K``-dimensional range of the centred means ``M^T [K, d]``: with the thin
    SVD ``M = U S V^T``, ``Sigma_B = U (S^2/K) U^T`` so
    ``Tr(Sigma_W Sigma_B^+) = K sum_i (u_i^T Sigma_W u_i) / s_i^2`` over kept ``i``.
    Cost ``O(K d^2 + K^2 d)`` instead of an ``O(d^3)`` eigendecomposition.
    """
    mt = m.centered_means  # [K, d]
    K = mt.shape[0]
    if K < 2:
        return _NAN
    _, s, vh = torch.linalg.svd(mt, full_matrices=False)  # mt = U diag(s) Vh; Vh rows = u_i
    ev = s.square()
    keep = ev > eig_rtol * ev.max()
    if not bool(keep.any()):
        return _NAN
    u = vh[keep]  # [r, d]
    quad = ((u @ m.sigma_w) * u).sum(1)  # u_i^T Sigma_W u_i
    return float((K * quad / ev[keep]).sum() / K)


def nc1_tilde(m: ClassMoments) -> float:
    """``Tr(Sigma_W) / Tr(Sigma_B)`` (Eq. 3 of Tirer et al.; docs/science.md §1)."""
    if int(m.present.sum()) < 2:
        return _NAN
    tr_b = float(torch.trace(m.sigma_b))
    tr_w = float(torch.trace(m.scatter)) / m.total
    return tr_w / tr_b if tr_b > 0 else _NAN


def cdnv(m: ClassMoments) -> float:
    """Mean over ``k != l`` of ``(V_k + V_l) / (2 ||mu_k - mu_l||^2)`` (Galanti et al. 2022)."""
    p = m.present
    K = int(p.sum())
    if K < 2:
        return _NAN
    v = m.class_ss[p] / m.counts[p]
    mu = m.means[p]
    # explicit differences: the |a|^2 + |b|^2 - 2ab shortcut cancels for nearby means
    dist2 = torch.cdist(mu, mu, compute_mode="donot_use_mm_for_euclid_dist").square()
    off = ~torch.eye(K, dtype=torch.bool, device=mu.device)
    ratio = (v.unsqueeze(0) + v.unsqueeze(1))[off] / (2 * dist2[off])
    return float(ratio.mean())


def _std(x: Tensor) -> float:
    return float(x.std()) if x.numel() > 1 else 0.0


def nc2(m: ClassMoments) -> dict[str, float]:
    """ETF distance, equinorm and equiangularity of the centred class means (docs/science.md §1).

    * ``nc2_etf = || G/||G||_F - (I - 11^T/K)/sqrt(K-1) ||_F`` with ``G = M^T M``;
    * ``nc2_equinorm = std_k ||mu_k - mu_c|| / mean_k ||mu_k - mu_c||``;
    * ``nc2_equiangle = std_{k != l} cos(mu_k - mu_c, mu_l - mu_c)``;
    * ``nc2_maxangle = max_{k != l} |cos + 1/(K-1)|``.
    """
    mt = m.centered_means
    K = mt.shape[0]
    if K < 2:
        return {"nc2_etf": _NAN, "nc2_equinorm": _NAN, "nc2_equiangle": _NAN, "nc2_maxangle": _NAN}
    g = mt @ mt.T
    eye = torch.eye(K, dtype=g.dtype, device=g.device)
    etf = (eye - 1.0 / K) / math.sqrt(K - 1)
    gn = torch.linalg.matrix_norm(g)
    nc2_etf = float(torch.linalg.matrix_norm(g / gn - etf)) if gn > 0 else _NAN
    norms = g.diagonal().clamp_min(0).sqrt()
    cos = g / (norms.unsqueeze(0) * norms.unsqueeze(1))
    off = ~eye.bool()
    return {
        "nc2_etf": nc2_etf,
        "nc2_equinorm": _std(norms) / float(norms.mean()),
        "nc2_equiangle": _std(cos[off]),
        "nc2_maxangle": float((cos[off] + 1.0 / (K - 1)).abs().max()),
    }


def nc3(m: ClassMoments, weight: Tensor) -> float:
    """Self-duality ``|| W/||W||_F - M^T/||M||_F ||_F`` with ``weight = W[K, d]`` (rows).

    Only rows of present classes are compared.
    """
    w = weight.detach().to(device=m.means.device, dtype=torch.float64)
    if w.shape != m.means.shape:
        raise ValueError(
            f"classifier weight must be [K, d] = {tuple(m.means.shape)}, got {tuple(w.shape)}"
        )
    w = w[m.present]
    mt = m.centered_means
    wn, mn = torch.linalg.matrix_norm(w), torch.linalg.matrix_norm(mt)
    if wn == 0 or mn == 0:
        return _NAN
    return float(torch.linalg.matrix_norm(w / wn - mt / mn))


def metrics_from_moments(
    m: ClassMoments, weight: Tensor | None = None, *, eig_rtol: float = EIG_RTOL
) -> dict[str, float]:
    """Every moment-based collapse metric: :data:`METRIC_KEYS`, plus ``nc3`` given ``weight``."""
    out = {"nc1": nc1(m, eig_rtol), "nc1_tilde": nc1_tilde(m), "cdnv": cdnv(m), **nc2(m)}
    if weight is not None:
        out["nc3"] = nc3(m, weight)
    return out
