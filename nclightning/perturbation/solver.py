"""Minimiser of the perturbation model, Eq. 2 (docs/science.md §2), from sufficient statistics.

Features are rows here: ``H0[N, d]``, ``H[N, d]`` (docs/science.md writes ``d x N`` columns);
``W[K, d]``; ``Y^T`` is the one-hot ``[N, K]``. The objective is the generalised Eq. 2::

    f(W, H) = 1/(2N) ||W H - Y||^2 + lambda_W/(2K) ||W||^2
            + lambda_H/(2N) ||H||^2 + beta/(2N) ||H - H0||^2

**H eliminated.** For fixed ``W`` the minimiser is ``H*(W) = A (W^T Y + beta H0)`` with
``A = (W^T W + c I_d)^-1``, ``c = lambda_H + beta`` (docs/science.md §2). It is affine per class:
class means ``m_k = A (w_k + beta mu0_k)`` and within-class deviations
``h_i - m_k = beta A (h0_i - mu0_k)``. So ``g(W) = min_H f(W, H)`` and its gradient
(envelope theorem: ``grad g = df/dW`` at ``H*(W)``) need only the class counts ``n_k``, the
class means ``mu0_k`` and the pooled within-class scatter ``Sw0`` of ``H0``, i.e. a
:class:`~nclightning.metrics.ClassMoments`; nothing depends on ``N`` beyond these. With the
push-through identity ``W A = (W W^T + c I_K)^-1 W`` an objective/gradient evaluation costs
one ``[K, d] x [d, d]`` product plus ``O(K^2 d + K^3)`` (no ``d x d`` inverse).
Splitting into means and deviations also avoids the cancellations of the raw-moment form
(``G0 = H0 H0^T``, ``beta^2 G0`` against ``N``) for large ``beta``.

**Optimiser.** L-BFGS over ``W`` (``K d`` unknowns), preconditioned by the Hessian of ``f`` in
``W`` at fixed ``H``, ``V -> V (H H^T / N + lambda_W/K I)`` (built from the same statistics;
its ``d x d`` inverse, ``O(d^3)``, is refreshed every 10 iterations and applied as one more
``[K, d] x [d, d]`` product per iteration; with it a step of length one is exactly the
alternating update ``W <- W*(H*(W))``), scaled by the Barzilai-Borwein factor of the latest
pair, with a strong Wolfe line search whose decrease test falls back on the approximate-Wolfe
test near the float64 floor (:mod:`._lbfgs`). Initial point: ridge regression of ``Y`` on ``H0``.

**Stopping measure.** The *relative gradient norm* is::

    ||grad g(W)||_F / ( ||W H H^T||_F / N + ||Y H^T||_F / N + lambda_W/K ||W||_F )

at ``H = H*(W)``: the gradient ``(W H H^T - Y H^T)/N + lambda_W/K W`` divided by the sum of
the norms of its three terms (a relative residual of the stationarity equation; 0 when the
denominator vanishes at ``W = 0``, ``Y H0^T = 0``). It is scale free and does not depend on
the starting point.

Known behaviour: the problem is non-convex (bilinear); for ``beta >~ 1`` it is very well
conditioned (a handful of iterations); for ``beta`` between ``~lambda`` and ``~0.1`` the
objective is nearly invariant under rotations of ``(W, H)`` (exactly so at ``beta = 0``) and
the solver needs hundreds of iterations.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from nclightning.metrics import ClassMoments, metrics_from_moments
from nclightning.perturbation._inputs import as_moments, one_hot
from nclightning.perturbation._lbfgs import Evaluation, minimize

__all__ = ["ConvergenceWarning", "SolveResult", "objective", "solve"]

_NAN = float("nan")


class ConvergenceWarning(RuntimeWarning):
    """The solver stopped before reaching its tolerance (see ``SolveResult.message``)."""


@dataclass(frozen=True, eq=False)
class SolveResult:
    """Minimiser of Eq. 2 (docs/science.md §2) and its diagnostics.

    Attributes:
        W: ``[K, d]`` classifier weights.
        objective: Eq. 2 at ``(W, H*(W))`` (1/(2N) and lambda_W/(2K) normalisation).
        grad_norm: ``||df/dW||_F`` at ``(W, H*(W))``; ``df/dH`` vanishes there identically,
            so this is the norm of the full gradient over ``(W, H)``.
        rel_grad_norm: the relative gradient norm of the module docstring.
        iterations: L-BFGS iterations; ``evaluations``: objective/gradient evaluations.
        converged: ``rel_grad_norm <= tol``; if ``False`` a :class:`ConvergenceWarning` was
            issued and ``message`` says why.
        metrics: collapse metrics of ``H*`` (keys of ``collapse_metrics``: METRIC_KEYS, nc3
            with ``W``, nc4); ``cdnv`` is NaN when only pooled statistics of ``H0`` were given
            (no per-class scatter), ``nc4`` is NaN without raw features.
        moments: :class:`ClassMoments` of ``H*`` (``class_scatter`` not propagated).
        H: ``[N, d]`` optimal features (rows, input order) when raw features were given.
    """

    W: Tensor
    objective: float
    grad_norm: float
    rel_grad_norm: float
    iterations: int
    evaluations: int
    converged: bool
    message: str
    metrics: dict[str, float]
    moments: ClassMoments
    H: Tensor | None = None
    params: dict[str, float] = field(default_factory=dict)


class _Model:
    """``g(W) = min_H f(W, H)`` of Eq. 2 from the class moments of ``H0`` (module docstring)."""

    def __init__(self, m: ClassMoments, lambda_W: float, lambda_H: float, beta: float) -> None:
        if not lambda_W > 0:
            raise ValueError(f"lambda_W must be > 0, got {lambda_W}")
        if not (lambda_H >= 0 and beta >= 0 and lambda_H + beta > 0):
            raise ValueError(
                f"need lambda_H >= 0, beta >= 0, lambda_H + beta > 0; got {lambda_H}, {beta}"
            )
        self.moments = m
        self.n = m.counts
        self.mu0 = m.means
        self.sw0 = 0.5 * (m.scatter + m.scatter.T)
        self.N = m.total
        self.K, self.d = m.means.shape
        self.lw, self.lh, self.beta = float(lambda_W), float(lambda_H), float(beta)
        self.c = self.lh + self.beta
        self.tr_sw0 = float(self.sw0.trace())
        self.eye_k = torch.eye(self.K, dtype=torch.float64, device=m.means.device)

    # -- one evaluation ------------------------------------------------------------------
    def evaluate(self, W: Tensor) -> Evaluation:
        """Objective, gradient and relative gradient norm at ``W`` (cost ``O(K d^2)``)."""
        b, c, lh, N = self.beta, self.c, self.lh, self.N
        L = torch.linalg.cholesky(W @ W.T + c * self.eye_k)  # M = W W^T + c I_K
        MiW = torch.cholesky_solve(W, L)  # M^-1 W = W A
        Mi = torch.cholesky_inverse(L)
        Wmu = self.mu0 @ W.T  # [k, j] = w_j . mu0_k
        WS = W @ self.sw0
        WSWt = WS @ W.T
        X = W + b * self.mu0
        means = (X - (X @ W.T) @ MiW) / c  # rows m_k = A (w_k + beta mu0_k)
        # class-mean residuals W m_k - e_k = M^-1 (beta (W mu0_k - e_k) - lambda_H e_k), rows
        rbar = (b * (Wmu - self.eye_k) - lh * self.eye_k) @ Mi
        wsa = (WS - WSWt @ MiW) / c  # W Sw0 A
        within_g = (b * b) * (Mi @ wsa)  # sum_i (W d_i) d_i^T, d_i = beta A (h0_i - mu0_k)
        nm = self.n.unsqueeze(1) * means
        grad = (rbar.T @ nm + within_g) / N + (self.lw / self.K) * W
        # objective: class means part + within-class part, both sums of non-negative terms
        dk = (self.eye_k - Wmu) @ W - lh * self.mu0
        dk = (dk - (dk @ W.T) @ MiW) / c  # rows m_k - mu0_k
        between = (
            self.n * (rbar.square().sum(1) + lh * means.square().sum(1) + b * dk.square().sum(1))
        ).sum()
        t1 = float((Mi * WSWt).sum())  # Tr(M^-1 W Sw0 W^T) = Tr(A W^T W Sw0)
        within = b * ((b / c) * t1 + (lh / c) * self.tr_sw0)  # beta Tr(A (W^T W + lh) Sw0)
        f = float(between + within) / (2 * N) + self.lw / (2 * self.K) * float(W.square().sum())
        # relative gradient norm: |grad| / (|W H H^T| + |Y H^T|)/N + lw/K |W|)
        whh = (W @ means.T) @ nm + within_g
        scale = (
            float(torch.linalg.matrix_norm(whh)) / N
            + float(torch.linalg.matrix_norm(nm)) / N
            + self.lw / self.K * float(torch.linalg.matrix_norm(W))
        )
        gn = float(torch.linalg.matrix_norm(grad))
        rel = gn / scale if scale > 0 else (0.0 if gn == 0 else math.inf)
        return Evaluation(f, grad, rel, (MiW, Mi, WS, WSWt, means))

    # -- preconditioner ------------------------------------------------------------------
    def hh(self, W: Tensor, ev: Evaluation) -> Tensor:
        """``H H^T`` at ``H*(W)`` (``[d, d]``), from the quantities of ``ev``."""
        MiW, Mi, WS, WSWt, means = ev.ctx
        ps = W.T @ (Mi @ WS)  # W^T M^-1 W Sw0
        asa = (self.sw0 - ps - ps.T + MiW.T @ (WSWt @ MiW)) / self.c**2  # A Sw0 A
        return means.T @ (self.n.unsqueeze(1) * means) + self.beta**2 * asa

    def preconditioner(self, W: Tensor, ev: Evaluation):
        """``q -> q (H H^T/N + lambda_W/K I)^-1``: the W-Hessian of f at fixed H = H*(W)."""
        p = self.hh(W, ev) / self.N
        p = 0.5 * (p + p.T)
        ridge = self.lw / self.K
        p.diagonal().add_(ridge)
        L, info = torch.linalg.cholesky_ex(p)
        jitter = ridge
        while int(info) != 0:  # rounding made it indefinite: add more ridge
            p.diagonal().add_(jitter)
            jitter *= 10
            L, info = torch.linalg.cholesky_ex(p)
        p_inv = torch.cholesky_inverse(L)  # explicit: q @ p_inv is a GEMM, faster than TRSM
        p_inv = 0.5 * (p_inv + p_inv.T)
        return lambda q: q @ p_inv

    def initial(self) -> Tensor:
        """Ridge regression of ``Y`` on ``H0``: ``S0 (G0 + N lambda_W/K I)^-1`` (rows)."""
        m = self.moments
        g0 = self.sw0 + self.mu0.T @ (self.n.unsqueeze(1) * self.mu0)
        g0 = g0 / self.N
        g0.diagonal().add_(self.lw / self.K)
        return torch.linalg.solve(g0, m.class_sums.T / self.N).T.contiguous()

    # -- the optimal features ------------------------------------------------------------
    def a_parts(self, W: Tensor) -> tuple[Tensor, Tensor]:
        """``(V[d, r], a[r])`` with ``A = V diag(a) V^T + (I - V V^T)/c`` (thin SVD of W)."""
        _, s, vh = torch.linalg.svd(W, full_matrices=False)
        return vh.T, 1.0 / (s.square() + self.c)

    def apply_a(self, X: Tensor, V: Tensor, a: Tensor) -> Tensor:
        """``X A`` for rows ``X[., d]``."""
        xv = X @ V
        return (xv * a) @ V.T + (X - xv @ V.T) / self.c

    def feature_moments(
        self, W: Tensor, features: Tensor | None = None, labels: Tensor | None = None
    ) -> tuple[ClassMoments, Tensor | None]:
        """Moments of ``H*(W)`` (docs/science.md §2) and, given raw features, ``H*`` itself.

        ``means* = (W + beta mu0) A`` (rows), ``scatter* = beta^2 A Sw0 A``. ``class_ss*``: exact
        from ``H*`` with raw features; ``beta^2 <A^2, C_k>`` from per-class scatters ``C_k``
        (``moments.class_scatter``); otherwise NaN (pooled statistics cannot give it).
        """
        b, c, m = self.beta, self.c, self.moments
        V, a = self.a_parts(W)
        means = self.apply_a(W + b * self.mu0, V, a)
        t = self.sw0 @ V  # [d, r]
        vtv = V.T @ t  # V^T Sw0 V
        vsq = t.T - vtv @ V.T  # V^T Sw0 Q, Q = I - V V^T
        qsq = self.sw0 - t @ V.T - V @ t.T + V @ vtv @ V.T  # Q Sw0 Q
        av = a.unsqueeze(1) * vsq / c
        asa = (V * a) @ vtv @ (V * a).T + V @ av + av.T @ V.T + qsq / c**2
        scatter = b * b * 0.5 * (asa + asa.T)
        H = None
        if features is not None:
            H = self.apply_a(one_hot(labels, self.K) @ W + b * features, V, a)
            dev = H - means[labels]
            class_ss = torch.zeros_like(self.n).index_add_(0, labels, dev.square().sum(1))
        elif m.class_scatter is not None:
            a2 = (V * a.square()) @ V.T + (
                torch.eye(self.d, dtype=W.dtype, device=W.device) - V @ V.T
            ) / c**2
            class_ss = b * b * torch.einsum("kij,ij->k", m.class_scatter.to(W.dtype), a2)
        else:
            class_ss = torch.full_like(self.n, _NAN)
        return ClassMoments(self.n.clone(), means, scatter, class_ss), H


def objective(
    W: Tensor,
    H: Tensor,
    h0: Tensor,
    labels: Tensor,
    lambda_W: float,
    lambda_H: float,
    beta: float,
    num_classes: int | None = None,
) -> Tensor:
    """Eq. 2 evaluated densely at ``W[K, d]``, ``H[N, d]`` (rows) for ``H0 = h0[N, d]``.

    Differentiable (autograd), for checks and small problems; ``num_classes`` defaults to
    ``W.shape[0]``.
    """
    K = W.shape[0] if num_classes is None else num_classes
    N = H.shape[0]
    y = one_hot(labels, K).to(H.dtype)
    return (
        (H @ W.T - y).square().sum() + lambda_H * H.square().sum() + beta * (H - h0).square().sum()
    ) / (2 * N) + lambda_W / (2 * K) * W.square().sum()


def _nc4(H: Tensor, labels: Tensor, W: Tensor, m: ClassMoments) -> float:
    """Fraction of rows where ``argmax W h`` differs from the nearest present class mean."""
    present = m.present.nonzero().flatten()
    mu = m.means[present]
    pred = (H @ W.T).argmax(1)
    ncc = present[(mu.square().sum(1) - 2 * H @ mu.T).argmin(1)]
    return float((pred != ncc).double().mean())


def solve(
    h0: Any,
    labels: Tensor | None,
    lambda_W: float,
    lambda_H: float,
    beta: float,
    *,
    num_classes: int | None = None,
    tol: float = 1e-9,
    max_iter: int = 5000,
    init: Tensor | None = None,
    memory: int = 10,
    warn: bool = True,
) -> SolveResult:
    """Minimise Eq. 2 (docs/science.md §2) for the features ``h0`` of an earlier layer.

    Args:
        h0: ``Tensor[N, d]`` (rows, with ``labels[N]``), a
            :class:`~nclightning.metrics.ClassMoments`, or any object with a ``moments()``
            method (e.g. :class:`~nclightning.metrics.ClassStatistics`). Only the moments are
            used by the optimiser, so its cost does not grow with ``N``.
        labels: ``[N]`` int labels with raw features, else ``None``.
        lambda_W, lambda_H, beta: Eq. 2 (``lambda_W > 0``, ``lambda_H, beta >= 0``,
            ``lambda_H + beta > 0``). Imbalanced classes are handled exactly (``D_n``).
        num_classes: ``K`` (default ``labels.max() + 1`` or the moments' ``K``).
        tol: target relative gradient norm (module docstring).
        max_iter: L-BFGS iteration cap; init: starting ``W[K, d]`` (default: ridge).
        warn: issue a :class:`ConvergenceWarning` when not converged.

    Returns:
        :class:`SolveResult`; ``H`` (``[N, d]``, rows in input order) only with raw features.
    """
    m, features, y = as_moments(h0, labels, num_classes)
    model = _Model(m, lambda_W, lambda_H, beta)
    if init is None:
        W0 = model.initial()
    else:
        W0 = init.detach().to(device=m.means.device, dtype=torch.float64).clone()
        if W0.shape != (model.K, model.d):
            raise ValueError(f"init must be [K, d] = {(model.K, model.d)}, got {tuple(W0.shape)}")
    res = minimize(
        model.evaluate,
        W0,
        tol=tol,
        max_iter=max_iter,
        memory=memory,
        precond=model.preconditioner,
    )
    W = res.x
    if not res.converged and warn:
        warnings.warn(
            f"perturbation solve (beta={beta:g}, lambda_W={lambda_W:g}, lambda_H={lambda_H:g}) "
            f"did not converge: {res.message}; relative gradient norm "
            f"{res.evaluation.rel:.3g} > tol {tol:g} after {res.iterations} iterations",
            ConvergenceWarning,
            stacklevel=2,
        )
    moments, H = model.feature_moments(W, features, y)
    metrics = metrics_from_moments(moments, weight=W)
    if not bool(torch.isfinite(moments.class_ss).all()):
        metrics["cdnv"] = _NAN
    metrics["nc4"] = _nc4(H, y, W, moments) if H is not None else _NAN
    return SolveResult(
        W=W,
        objective=res.evaluation.f,
        grad_norm=float(torch.linalg.matrix_norm(res.evaluation.grad)),
        rel_grad_norm=res.evaluation.rel,
        iterations=res.iterations,
        evaluations=res.evaluations,
        converged=res.converged,
        message=res.message,
        metrics=metrics,
        moments=moments,
        H=H,
        params={"lambda_W": float(lambda_W), "lambda_H": float(lambda_H), "beta": float(beta)},
    )
