"""Global minimisers of the unconstrained features model (docs/science.md §4, Theorem 2.1).

Owns :func:`ufm_minimizer`. The UFM is Eq. 2 with ``beta = 0`` (``H0`` irrelevant), balanced
classes ``N = K n``; its scale ``rho`` is :func:`~nclightning.perturbation.ufm_scale`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ufm_minimizer"]


def ufm_minimizer(
    K: int,
    d: int,
    n: int,
    lambda_W: float,
    lambda_H: float,
    seed: int | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor, Tensor]:
    """A global minimiser ``(W[K, d], H[K n, d], labels[K n])`` of the UFM (Theorem 2.1).

    With ``c = sqrt(lambda_H lambda_W) <= 1``: ``rho = (1 - c) sqrt(lambda_W / lambda_H)``,
    ``R[d, K]`` with orthonormal columns, every feature of class ``k`` equals
    ``sqrt(rho) r_k`` and ``w_k = sqrt(lambda_H / lambda_W) sqrt(rho) r_k``
    (docs/science.md §4; ``H`` here is the transpose of the paper's, rows ordered class by class).
    With ``c > 1`` the minimiser is ``(0, 0)``.

    ``R`` is the first ``K`` columns of the identity when ``seed`` is ``None``, otherwise a
    random orthonormal frame (QR of a Gaussian matrix drawn with ``seed``). Needs ``d >= K``.
    """
    if not (lambda_W > 0 and lambda_H > 0):
        raise ValueError(f"lambda_W and lambda_H must be > 0, got {lambda_W}, {lambda_H}")
    if K < 1 or n < 1:
        raise ValueError(f"K and n must be >= 1, got K={K}, n={n}")
    if d < K:
        raise ValueError(f"Theorem 2.1 needs d >= K (orthogonal class means), got d={d}, K={K}")
    labels = torch.arange(K).repeat_interleave(n)
    c = math.sqrt(lambda_H * lambda_W)
    if c > 1:
        return torch.zeros(K, d, dtype=dtype), torch.zeros(K * n, d, dtype=dtype), labels
    if seed is None:
        R = torch.eye(d, K, dtype=torch.float64)
    else:
        g = torch.Generator().manual_seed(int(seed))
        R, _ = torch.linalg.qr(torch.randn(d, K, generator=g, dtype=torch.float64))
    rho = (1.0 - c) * math.sqrt(lambda_W / lambda_H)
    hbar = math.sqrt(rho) * R.T  # [K, d], rows hbar_k
    W = math.sqrt(lambda_H / lambda_W) * hbar
    return W.to(dtype), hbar[labels].to(dtype), labels
