"""The minimiser of the perturbation model, Eq. 2 (docs/science.md §2), from class moments.

Owns :func:`solve` and its result. Features are rows here: ``H0[N, d]``, ``H[N, d]``
(docs/science.md writes ``d x N`` columns); ``W[K, d]``; ``Y^T`` is the one-hot ``[N, K]``::

    f(W, H) = 1/(2N) ||W H - Y||^2 + lambda_W/(2K) ||W||^2
            + lambda_H/(2N) ||H||^2 + beta/(2N) ||H - H0||^2

**H eliminated.** For fixed ``W`` the minimiser is ``H*(W) = A (W^T Y + beta H0)`` with
``A = (W^T W + (lambda_H + beta) I)^-1`` (docs/science.md §2): class means
``A (w_k + beta mu0_k)``, within-class deviations ``beta A (h0_i - mu0_k)``. So
``g(W) = min_H f(W, H)`` and its derivatives need only the class counts, the class means and
the pooled within-class scatter ``Sw0`` of ``H0`` (a :class:`~nclightning.metrics.ClassMoments`):
nothing grows with ``N``.

**Cost.** One eigendecomposition of ``Sw0`` (``O(d^3)``, :mod:`._spectral`); then every
objective, gradient and Hessian-vector product costs ``O(K^2 d)`` (:mod:`._model`), and the
moments of ``H*`` in the original basis ``O(K d^2)`` once at the end.

**Optimiser.** Truncated Newton (:mod:`._newton`): exact Hessian-vector products,
conjugate-gradient directions preconditioned per iteration by whichever of two approximations
of the Hessian (per-coordinate ``K x K`` blocks, or the Hessian at fixed ``H``) predicts the
curvature of the gradient step best, strong-Wolfe line search. From the ridge regression of
``Y`` on ``H0`` (the ``beta -> inf`` solution) or ``init``. Measured by
``benchmarks/perturbation.py`` [1] (``lambda_W = lambda_H = 5e-4``, default tol, ``H0`` at the
UFM scale, ridge start, ``beta / lambda_H`` in ``[1e-2, 1e4]``): 3-10 Newton iterations and
15-90 Hessian-vector products at ``d = 1024, K = 10``; 4-16 iterations and 38-295 products at
``d = 512, K = 100``, the most at ``beta / lambda_H ~ 1e3``, where neither preconditioner
captures the curvature well. The objective is non-convex: from some starts a non-global local
minimum is reached (``fit_pair`` compares starts, docs/science.md §10), and where ``H0`` has
empty coordinates (zero-padded, or ``N < d``) a saddle is left along a direction of negative
curvature.

**Stopping measure.** The *relative gradient norm*::

    ||grad g(W)||_F / ( ||W H H^T||_F / N + ||Y H^T||_F / N + lambda_W/K ||W||_F )

at ``H = H*(W)``: the gradient ``(W H H^T - Y H^T)/N + lambda_W/K W`` divided by the sum of the
norms of its three terms (a scale-free relative residual of the stationarity equation; 0 when
the denominator vanishes). A small gradient does not bound the error of ``W`` where the
Hessian is ill-conditioned, so convergence also requires a negligible Newton step
(:mod:`._newton`); at the default ``tol = 1e-10`` the metrics of ``H*`` then agree with a solve
to the float64 floor to better than 1e-7 relative, also after a warm start (tested).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from nclightning.metrics import ClassMoments, NCCReference, metrics_from_moments
from nclightning.perturbation._inputs import as_moments, one_hot
from nclightning.perturbation._linesearch import Evaluation
from nclightning.perturbation._model import Model
from nclightning.perturbation._newton import Choice, NewtonResult, minimize
from nclightning.perturbation._spectral import Spectrum

__all__ = ["DEFAULT_TOL", "ConvergenceWarning", "SolveResult", "objective", "solve"]

DEFAULT_TOL = 1e-10
"""Default relative gradient norm of :func:`solve` (module docstring)."""

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
        iterations: Newton iterations; ``evaluations``: objective/gradient evaluations;
            ``hessian_products``: Hessian-vector products.
        converged: ``rel_grad_norm <= tol``; if ``False`` a :class:`ConvergenceWarning` was
            issued (unless ``warn=False``) and ``message`` says why.
        metrics: collapse metrics of ``H*`` (``metrics_from_moments`` with ``W``, so ``nc3``
            included); ``cdnv`` is NaN when ``H0`` came without per-class scatter or raw
            features; ``nc4`` (NCC mismatch of ``W``) only with raw features.
        moments: :class:`ClassMoments` of ``H*`` (original basis).
        H: ``[N, d]`` optimal features (rows, input order) when raw features were given.
    """

    W: Tensor
    objective: float
    grad_norm: float
    rel_grad_norm: float
    iterations: int
    evaluations: int
    hessian_products: int
    converged: bool
    message: str
    metrics: dict[str, float]
    moments: ClassMoments
    H: Tensor | None = None
    params: dict[str, float] = field(default_factory=dict)


def objective(
    W: Tensor,
    H: Tensor,
    h0: Tensor,
    labels: Tensor,
    *,
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


def minimize_model(
    model: Model,
    init: Tensor | None,
    *,
    tol: float,
    max_iter: int,
    step_tol: float = 1e-8,
    ev0: Evaluation | None = None,
    last: Choice | None = None,
    rebuild: bool = True,
) -> NewtonResult:
    """Newton from ``init`` (eigenbasis ``[K, d]``) or the ridge start (:mod:`._newton`);
    ``ev0``: ``model.evaluate(init)``, when already known (a solve continued to a finer tol,
    a predicted warm start); ``last``, ``rebuild``: the preconditioner a previous solve ended
    with, and whether each iteration builds its own (:func:`._newton.minimize`)."""
    W0 = model.initial() if init is None else init
    return minimize(
        model.evaluate,
        W0,
        hessian=model.hessian,
        tol=tol,
        max_iter=max_iter,
        step_tol=step_tol,
        escape=model.escape,
        ev0=None if init is None else ev0,
        last=last,
        rebuild=rebuild,
    )


def solve(
    h0: Any,
    labels: Tensor | None = None,
    *,
    lambda_W: float,
    lambda_H: float,
    beta: float,
    num_classes: int | None = None,
    tol: float = DEFAULT_TOL,
    max_iter: int = 200,
    init: Tensor | None = None,
    warn: bool = True,
) -> SolveResult:
    """Minimise Eq. 2 (docs/science.md §2) for the features ``h0`` of an earlier layer.

    Args:
        h0: ``Tensor[N, d]`` (rows, with ``labels[N]``), a
            :class:`~nclightning.metrics.ClassMoments`, or any object with a ``moments()``
            method (e.g. :class:`~nclightning.metrics.ClassStatistics`). Only the moments are
            used by the optimiser, so its cost does not grow with ``N``.
        labels: ``[N]`` int labels, with raw features only.
        lambda_W, lambda_H, beta: Eq. 2 (``lambda_W > 0``, ``lambda_H, beta >= 0``,
            ``lambda_H + beta > 0``). Imbalanced classes are handled exactly (``D_n``).
        num_classes: ``K`` (default ``labels.max() + 1`` or the moments' ``K``).
        tol: target relative gradient norm (module docstring).
        max_iter: Newton iteration cap; init: starting ``W[K, d]`` (default: ridge).
        warn: issue a :class:`ConvergenceWarning` when not converged.

    Returns:
        :class:`SolveResult`; ``H`` (``[N, d]``, rows in input order) only with raw features.

    Example:
        The minimiser ``H*`` of Eq. 2 is more collapsed than the features ``H0`` it starts from.

        >>> import torch
        >>> from nclightning.metrics import collapse_metrics
        >>> from nclightning.perturbation import solve
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(3).repeat(20)
        >>> h0 = 4 * torch.eye(3, dtype=torch.float64)[y] + 0.5 * torch.randn(
        ...     60, 3, generator=g, dtype=torch.float64)
        >>> res = solve(h0, y, lambda_W=5e-3, lambda_H=5e-3, beta=1.0)
        >>> res.converged
        True
        >>> bool(res.metrics["nc1_tilde"] < collapse_metrics(h0, y)["nc1_tilde"])
        True
    """
    m, features, y = as_moments(h0, labels, num_classes)
    spec = Spectrum.of(m)
    model = Model(spec, lambda_W, lambda_H, beta)
    start = None
    if init is not None:
        W0 = init.detach().to(device=m.means.device, dtype=torch.float64)
        if W0.shape != (model.K, model.d):
            raise ValueError(f"init must be [K, d] = {(model.K, model.d)}, got {tuple(W0.shape)}")
        start = spec.to_eigen(W0)
    res = minimize_model(model, start, tol=tol, max_iter=max_iter)
    if not res.converged and warn:
        warnings.warn(
            f"perturbation solve (beta={beta:g}, lambda_W={lambda_W:g}, lambda_H={lambda_H:g}) "
            f"did not converge: {res.message}; relative gradient norm "
            f"{res.evaluation.rel:.3g} > tol {tol:g} after {res.iterations} iterations",
            ConvergenceWarning,
            stacklevel=2,
        )
    return result_of(model, res, features, y)


def result_of(
    model: Model,
    res: NewtonResult,
    features: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    rows_only: bool = False,
) -> SolveResult:
    """The :class:`SolveResult` of an optimiser run, in the original basis; ``rows_only``: the
    raw features serve only ``class_ss`` of ``H*`` (:func:`feature_moments`), no ``H``."""
    spec = model.spec
    W = spec.to_original(res.x)
    moments, H = feature_moments(
        spec.moments, W, model.beta, model.c, features, labels, spec.scale, rows_only=rows_only
    )
    metrics = metrics_from_moments(moments, weight=W)
    if not bool(torch.isfinite(moments.class_ss).all()):
        metrics["cdnv"] = _NAN
    if H is not None:
        ref = NCCReference(moments.means, weight=W, present=moments.present)
        metrics["nc4"] = float(ref.mismatches(H, torch.float64)) / H.shape[0]
    return SolveResult(
        W=W,
        objective=res.evaluation.f,
        grad_norm=float(res.evaluation.grad.norm()),
        rel_grad_norm=res.evaluation.rel,
        iterations=res.iterations,
        evaluations=res.evaluations,
        hessian_products=res.hessian_products,
        converged=res.converged,
        message=res.message,
        metrics=metrics,
        moments=moments,
        H=H,
        params={"lambda_W": model.lw, "lambda_H": model.lh, "beta": model.beta},
    )


def _apply_a(X: Tensor, V: Tensor, a: Tensor, c: float) -> Tensor:
    """``X A`` for rows ``X[., d]``, ``A = V diag(a) V^T + (I - V V^T) / c``."""
    xv = X @ V
    return (xv * a) @ V.T + (X - xv @ V.T) / c


def feature_moments(
    m: ClassMoments,
    W: Tensor,
    beta: float,
    c: float,
    features: Tensor | None = None,
    labels: Tensor | None = None,
    scale: float = 1.0,
    *,
    rows_only: bool = False,
) -> tuple[ClassMoments, Tensor | None]:
    """Moments of ``H*(W)`` (docs/science.md §2) for ``H0 = scale * m``; given raw features, ``H*``.

    ``means* = (W + beta mu0) A`` (rows), ``scatter* = beta^2 A Sw0 A`` with ``A`` from the thin
    SVD of ``W`` (no cancellation in the directions ``A`` shrinks). ``class_ss*``: exact from
    ``H*`` with raw features; ``beta^2 <A^2, C_k>`` from per-class scatters ``C_k``
    (``m.class_scatter``); otherwise NaN (pooled statistics cannot give it). ``O(K d^2)``.
    ``rows_only``: the raw features give ``class_ss*`` only, ``sum_i ||beta A (h0_i - mu_k)||^2``
    a chunk of rows at a time (``O(N d r)``, no ``H*`` formed; :func:`rows_class_ss`).
    """
    assert m.scatter is not None, "feature_moments needs H0's full scatter"
    _, sv, vh = torch.linalg.svd(W, full_matrices=False)
    V, a = vh.T, 1.0 / (sv.square() + c)
    b2 = (beta * scale) ** 2  # beta^2 times the scale of every second moment of H0
    sw0 = 0.5 * (m.scatter + m.scatter.T)
    means = _apply_a(W + (beta * scale) * m.means, V, a, c)
    t = sw0 @ V  # [d, r]
    vtv = V.T @ t
    vsq = t.T - vtv @ V.T  # V^T Sw0 Q, Q = I - V V^T
    qsq = sw0 - t @ V.T - V @ t.T + V @ vtv @ V.T  # Q Sw0 Q
    av = a.unsqueeze(1) * vsq / c
    asa = (V * a) @ vtv @ (V * a).T + V @ av + av.T @ V.T + qsq / c**2
    scatter = b2 * 0.5 * (asa + asa.T)
    H = None
    if rows_only and features is not None and labels is not None:
        class_ss = rows_class_ss(m, V, a, c, features, labels) * b2
    elif features is not None and labels is not None:
        H = _apply_a(one_hot(labels, m.num_classes) @ W + (beta * scale) * features, V, a, c)
        dev = H - means[labels]
        class_ss = torch.zeros_like(m.counts).index_add_(0, labels, dev.square().sum(1))
    elif m.class_scatter is not None:
        vcv = ((m.class_scatter @ V) * V).sum(1)  # [K, r]: diagonals of V^T C_k V
        tr_q = m.class_scatter.diagonal(dim1=1, dim2=2).sum(1) - vcv.sum(1)
        class_ss = b2 * ((a.square() * vcv).sum(1) + tr_q / c**2)
    else:
        class_ss = torch.full_like(m.counts, _NAN)
    moments = ClassMoments(counts=m.counts.clone(), means=means, scatter=scatter, class_ss=class_ss)
    return moments, H


ROWS = 512
"""Rows of ``H0`` per chunk in :func:`rows_class_ss`: 4 MiB of float64 at d=1024, so the
chunk stays in cache across its few passes (4096 rows were 4x slower, bound by memory)."""


def rows_class_ss(
    m: ClassMoments, V: Tensor, a: Tensor, c: float, features: Tensor, labels: Tensor
) -> Tensor:
    """``[K]``: ``sum_{i in k} ||A (h_i - mu_k)||^2`` from the rows ``features[N, d]`` of ``m``'s
    samples, ``A = V diag(a) V^T + (I - V V^T) / c``: with ``p = V^T x`` and the orthogonal
    part ``x - V p`` formed explicitly (no cancellation), ``||A x||^2 = sum_r a_r^2 p_r^2 +
    ||x - V p||^2 / c^2``. Float64, ``ROWS`` rows at a time; ``h - mu_k - V p`` is one product
    ``h - [onehot | p] [mu; V^T]`` and ``p = V^T h - V^T mu_k``: rounding of float64 order
    ``eps |mu_k|``, far below that of float32 features (``2^-24 |h|``)."""
    out = torch.zeros_like(m.counts)
    a2 = a.square()
    right = torch.cat([m.means, V.T])  # [K + r, d]
    mv = m.means @ V
    for start in range(0, features.shape[0], ROWS):
        y = labels[start : start + ROWS].to(device=out.device, dtype=torch.long)
        # a copy (updated in place below), also where the rows already are float64
        x = features[start : start + ROWS].to(device=out.device, dtype=torch.float64, copy=True)
        p = (x @ V).sub_(mv[y])  # V^T (h - mu_k)
        left = torch.cat([one_hot(y, m.num_classes), p], 1)
        perp = x.addmm_(left, right, alpha=-1.0).square_().sum(1)
        out.index_add_(0, y, (p.square_() * a2).sum(1).add_(perp, alpha=1.0 / (c * c)))
    return out


def ridge_classifier(
    m: ClassMoments, s: float, lambda_W: float, lambda_H: float
) -> tuple[Tensor, float]:
    """``(W, f)``: the classifier of Eq. 2 at ``H = s H0`` (ridge regression of ``Y``) and Eq. 2
    there (the ``beta`` term vanishes). ``H0 = m`` needs its full ``scatter``; ``O(d^3)``."""
    K, N = m.num_classes, m.total
    gram = (s * s) * m.gram
    sums = s * m.class_sums
    a = gram / N
    a.diagonal().add_(lambda_W / K)
    W = torch.linalg.solve(a, sums.T / N).T
    fit = (
        float((W @ gram * W).sum())
        - 2 * float((W * sums).sum())
        + float(m.counts[m.counts > 0].sum())
    )
    f = (
        fit / (2 * N)
        + lambda_W / (2 * K) * float(W.square().sum())
        + lambda_H / (2 * N) * float(gram.trace())
    )
    return W, f
