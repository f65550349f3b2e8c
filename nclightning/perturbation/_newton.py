"""Truncated Newton (Newton-CG) with a Wolfe line search, on float64 tensors.

Owns the optimiser of :func:`nclightning.perturbation.solve` (docs/science.md §10). Generic:
it minimises any ``fun(x) -> Evaluation`` given ``hessian(x, ev) -> (hvp, preconditioners)``,
exact Hessian-vector products and one or more symmetric positive definite approximations of
the inverse Hessian. One iteration:

1. *choose a preconditioner*: for each candidate ``M``, the step ``z = -M g`` and the ratio
   ``rho = z^T H z / (-z^T g)`` (1 for the exact Newton step); keep the ``M`` with ``rho``
   closest to 1 in ratio;
2. *direction*: preconditioned conjugate gradients on ``H p = -g`` until the residual falls
   below ``forcing * |g|`` (``forcing = min(0.5, sqrt(rel))``: superlinear, then quadratic
   convergence) or a direction of non-positive curvature appears (then the CG iterate so far,
   or the preconditioned gradient step at the first CG iteration);
3. *step*: strong-Wolfe line search from step length 1 (:mod:`._linesearch`); when it fails,
   one retry along the preconditioned gradient, then stop (float64 floor).

Stops when ``ev.rel <= tol`` (the caller's relative stationarity measure).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from nclightning.perturbation._linesearch import Evaluation, line_search

__all__ = ["Evaluation", "NewtonResult", "minimize"]

Operator = Callable[[Tensor], Tensor]
Hessian = Callable[[Tensor, Evaluation], tuple[Operator, Sequence[Operator]]]


@dataclass
class NewtonResult:
    """Final point, its evaluation and counts; ``message`` says why the optimiser stopped."""

    x: Tensor
    evaluation: Evaluation
    iterations: int
    evaluations: int
    hessian_products: int
    converged: bool
    message: str


def _dot(a: Tensor, b: Tensor) -> float:
    return float((a * b).sum())


def _choose(hvp: Operator, preconds: Sequence[Operator], g: Tensor) -> tuple[Operator, int]:
    """The candidate whose gradient step has curvature ratio closest to 1 (and #products)."""
    if len(preconds) == 1:
        return preconds[0], 0
    best, best_score = preconds[0], math.inf
    for m in preconds:
        z = m(g)
        zg, zhz = _dot(z, g), _dot(z, hvp(z))
        score = abs(math.log(zhz / zg)) if zg > 0 and zhz > 0 else math.inf
        if score < best_score:
            best, best_score = m, score
    return best, len(preconds)


def _cg(hvp: Operator, precond: Operator, g: Tensor, forcing: float, max_cg: int):
    """Approximate solution of ``H p = -g`` by preconditioned CG: ``(p, #products)``."""
    p = g.new_zeros(g.shape)
    r = -g
    z = precond(r)
    d = z
    rz = _dot(r, z)
    stop = forcing * float(g.norm())
    for k in range(1, max_cg + 1):
        hd = hvp(d)
        curv = _dot(d, hd)
        if curv <= 0:  # non-positive curvature: keep what we have
            return (z if k == 1 else p), k
        a = rz / curv
        p = p + a * d
        r = r - a * hd
        if float(r.norm()) <= stop:
            return p, k
        z = precond(r)
        rz, rz_old = _dot(r, z), rz
        d = z + (rz / rz_old) * d
    return p, max_cg


def minimize(
    fun: Callable[[Tensor], Evaluation],
    x0: Tensor,
    *,
    hessian: Hessian,
    tol: float,
    max_iter: int,
    max_cg: int = 200,
) -> NewtonResult:
    """Minimise ``fun`` from ``x0`` until ``Evaluation.rel <= tol`` (module docstring)."""
    x, ev = x0, fun(x0)
    n_evals, n_hvp = 1, 0
    for it in range(max_iter + 1):
        if not (math.isfinite(ev.f) and math.isfinite(ev.rel)):
            return NewtonResult(x, ev, it, n_evals, n_hvp, False, "non-finite objective")
        if ev.rel <= tol:
            return NewtonResult(x, ev, it, n_evals, n_hvp, True, "relative gradient below tol")
        if it == max_iter:
            break
        hvp, preconds = hessian(x, ev)
        precond, used = _choose(hvp, preconds, ev.grad)
        direction, k = _cg(hvp, precond, ev.grad, min(0.5, math.sqrt(ev.rel)), max_cg)
        n_hvp += used + k
        if _dot(direction, ev.grad) >= 0:
            direction = -precond(ev.grad)
        step, new, used = line_search(fun, x, ev, direction, 1.0)
        n_evals += used
        if new is None:  # retry once along the preconditioned gradient
            direction = -precond(ev.grad)
            step, new, used = line_search(fun, x, ev, direction, 1.0)
            n_evals += used
            if new is None:
                return NewtonResult(x, ev, it, n_evals, n_hvp, False, "line search failed")
        x, ev = x + step * direction, new
    msg = f"no convergence in {max_iter} iterations"
    return NewtonResult(x, ev, max_iter, n_evals, n_hvp, False, msg)
