"""Linearised perturbation operator F (docs/science.md §5, Theorems 4.1 and 4.2, Eq. 5).

Owns :func:`perturbation_operator` (exact and Eq. 5), its blocks and the Theorem 4.2 table.

Paper convention: ``H`` is ``d x N``, ``vec`` stacks columns, samples are ordered class by
class (labels ``0..K-1``, stable within a class), ``vec(W)`` stacks the columns of ``W[K, d]``.
With features as rows (``H[N, d]``) ``vec(H)`` is simply ``H.reshape(-1)`` once the rows are
sorted by class. To first order ``vec(dH) = F vec(dH0)`` with::

    F = (beta/N) (Hess_HH f - Hess_HW f (Hess_WW f)^-1 Hess_WH f)^-1     (exact, Thm 4.1)

at the minimiser of Eq. 2. In closed form (docs/science.md §5, ``R = W H - Y``)::

    N Hess_HH = I_N kron W^T W + (lambda_H + beta) I_dN
    N Hess_WW = H H^T kron I_K + (N lambda_W / K) I_dK
    N Hess_WH = E^T + H kron W,   E^T vec(D) = vec(R D^T)

so ``F = beta ((beta + lambda_H) I + I_N kron W^T W - Z)^-1`` with
``Z = (E^T + H kron W)^T (N Hess_WW)^-1 (E^T + H kron W)``; Eq. 5 is its first-order
expansion ``F ~ I - (lambda_H/beta) I - (1/beta) I_N kron W^T W + (1/beta) Z`` (the paper's
``n lambda_W`` is ``N lambda_W / K``, equal for balanced classes). Dense ``(dN)^2`` matrices:
meant for the paper's small sizes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from nclightning.perturbation._inputs import one_hot
from nclightning.perturbation.solver import solve

__all__ = [
    "block_singular_values",
    "class_order",
    "eq5_relative_error",
    "operator_blocks",
    "perturbation_operator",
    "theorem_spectrum",
]


def class_order(labels: Tensor) -> Tensor:
    """Permutation sorting samples class by class (stable): the paper's sample order."""
    return torch.sort(labels, stable=True).indices


def _z_and_wtw(W: Tensor, H: Tensor, y: Tensor, lambda_W: float) -> tuple[Tensor, Tensor]:
    """``Z [dN, dN]`` and ``W^T W`` at ``(W[K, d], H[N, d])``, rows sorted by class."""
    K, d = W.shape
    N = H.shape[0]
    R = W @ H.T - y.T  # [K, N], paper's W H - Y
    # E^T as a [d, K, N, d] tensor: (E^T)[(j,k),(i,j')] = R[k, i] delta_{j j'}
    eye_d = torch.eye(d, dtype=W.dtype, device=W.device)
    et = torch.einsum("ki,jl->jkil", R, eye_d).reshape(d * K, N * d)
    hw = torch.kron(H.T.contiguous(), W)  # (H kron W)[(j,k),(i,j')] = H[i, j] W[k, j']
    b = et + hw  # [dK, dN]
    hww = torch.kron(H.T @ H, torch.eye(K, dtype=W.dtype, device=W.device))
    hww.diagonal().add_(N * lambda_W / K)
    L = torch.linalg.cholesky(hww)
    z = b.T @ torch.cholesky_solve(b, L)
    return 0.5 * (z + z.T), W.T @ W


def perturbation_operator(
    h0: Tensor,
    labels: Tensor,
    lambda_W: float,
    lambda_H: float,
    beta: float,
    form: Literal["exact", "eq5"] = "exact",
    *,
    num_classes: int | None = None,
    minimizer: tuple[Tensor, Tensor] | None = None,
    tol: float = 1e-12,
) -> Tensor:
    """``F [dN, dN]`` of Theorem 4.1 (``form="exact"``) or its Eq. 5 approximation.

    Args:
        h0: ``[N, d]`` features of the earlier layer (rows); labels ``[N]``.
        lambda_W, lambda_H, beta: Eq. 2 (docs/science.md §2).
        form: ``"exact"`` (Schur complement of the Hessians, inverted) or ``"eq5"``.
        minimizer: ``(W[K, d], H[N, d])`` (rows in input order) to use instead of
            :func:`~nclightning.perturbation.solve` at tolerance ``tol``.

    Returns:
        Float64 ``F`` in the paper's convention: rows and columns indexed by
        ``i * d + j`` for sample ``i`` of the class-sorted order (:func:`class_order`) and
        feature ``j``, i.e. ``vec`` of the ``d x N`` column matrix.
    """
    if form not in ("exact", "eq5"):
        raise ValueError(f"form must be 'exact' or 'eq5', got {form!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    x = h0.detach().to(torch.float64)
    lab = labels.to(device=x.device, dtype=torch.long)
    K = int(lab.max()) + 1 if num_classes is None else int(num_classes)
    order = class_order(lab)
    if minimizer is None:
        res = solve(x, lab, lambda_W=lambda_W, lambda_H=lambda_H, beta=beta, num_classes=K, tol=tol)
        W, H = res.W, res.H
        assert H is not None  # solve() of raw features returns H*
    else:
        W, H = (t.detach().to(device=x.device, dtype=torch.float64) for t in minimizer)
    H, lab = H[order], lab[order]
    N, d = H.shape
    z, wtw = _z_and_wtw(W, H, one_hot(lab, K), lambda_W)
    blockdiag = torch.kron(torch.eye(N, dtype=H.dtype, device=H.device), wtw)
    eye = torch.eye(N * d, dtype=H.dtype, device=H.device)
    if form == "eq5":
        return eye - (lambda_H / beta) * eye - blockdiag / beta + z / beta
    s = (beta + lambda_H) * eye + blockdiag - z  # N x Schur complement, symmetric PD
    F = beta * torch.cholesky_inverse(torch.linalg.cholesky(0.5 * (s + s.T)))
    return 0.5 * (F + F.T)


def eq5_relative_error(exact: Tensor, eq5: Tensor) -> float:
    """``||F - F_eq5||_2 / ||I - F||_2``: the relative error of Eq. 5's first-order term.

    ``F`` itself is ``I`` to zeroth order, so its relative error says nothing about the
    expansion; the part Theorems 4.1-4.2 describe is ``I - F``. With ``X = beta (I - F_eq5)``
    and ``F = (I + X / beta)^-1``, an eigenvalue ``x >= 0`` of ``X`` gives ``I - F`` the value
    ``e / (1 + e)`` and the error ``e^2 / (1 + e)``, ``e = x / beta``; both grow with ``e``, so
    the ratio is ``||X||_2 / beta`` (docs/science.md §5.6).
    """
    eye = torch.eye(exact.shape[0], dtype=exact.dtype, device=exact.device)
    num = torch.linalg.matrix_norm(exact - eq5, 2)
    return float(num / torch.linalg.matrix_norm(eye - exact, 2))


def operator_blocks(F: Tensor, counts: Tensor | Sequence[int], d: int) -> list[list[Tensor]]:
    """Blocks ``F_kl`` (``[d n_k, d n_l]``) of ``F`` in class-major order (docs/science.md §5).

    ``counts`` are the class sizes ``n_k`` (e.g. ``torch.bincount(labels)``); ``F_kl`` maps
    the perturbation of the class-``l`` features to the change of the class-``k`` features.
    """
    offsets = [0]
    for c in torch.as_tensor(counts).tolist():
        offsets.append(offsets[-1] + int(c) * d)
    if offsets[-1] != F.shape[0] or F.shape[0] != F.shape[1]:
        raise ValueError(f"class sizes times d = {offsets[-1]} but F is {tuple(F.shape)}")
    K = len(offsets) - 1
    return [
        [F[offsets[k] : offsets[k + 1], offsets[j] : offsets[j + 1]] for j in range(K)]
        for k in range(K)
    ]


def block_singular_values(F: Tensor, counts: Tensor | Sequence[int], d: int) -> list[list[Tensor]]:
    """Singular values (descending) of every block ``F_kl`` (see :func:`operator_blocks`)."""
    return [[torch.linalg.svdvals(b) for b in row] for row in operator_blocks(F, counts, d)]


def theorem_spectrum(
    K: int, d: int, n: int, lambda_W: float, lambda_H: float, beta: float
) -> list[tuple[float, int, str]]:
    """docs/science.md §5 table: ``(singular value, multiplicity, singular vectors)`` of ``F_kk``.

    Eq. 5 form at the collapsed UFM minimiser (Theorem 4.2: ``lambda_H lambda_W < 1``,
    ``d > K``).
    """
    c = math.sqrt(lambda_H * lambda_W)
    return [
        (1.0, d - K, "vec(u 1^T)/sqrt(n)"),
        (1.0 - 2 * lambda_H * (1 - c) / beta, K - 1, "vec(r_j 1^T), j != k"),
        (1.0 - 4 * lambda_H * (1 - c) / beta, 1, "vec(r_k 1^T)"),
        (1.0 - lambda_H / beta, (d - K) * (n - 1), "vec(u z^T)"),
        (1.0 - math.sqrt(lambda_H / lambda_W) / beta, K * (n - 1), "vec(r_j z^T)"),
    ]
