"""Strong-Wolfe line search with the approximate-Wolfe fallback, on float64 tensors.

Owns one step of the optimiser of :mod:`._newton` (docs/science.md §10): the search along a
descent direction of any ``fun(x) -> Evaluation`` (objective, gradient, stopping measure).

Line search: strong Wolfe conditions where the Armijo test may be replaced by the
*approximate Wolfe* test of Hager & Zhang (2005), ``phi(a) <= phi(0) + eps |phi(0)|`` and
``phi'(a) <= (2 c1 - 1) phi'(0)``. Near a minimiser the decrease of ``f`` per step falls below
float64 resolution long before the gradient reaches 1e-9 of its scale; the derivative test
keeps the search working there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["Evaluation", "line_search"]


@dataclass
class Evaluation:
    """Objective ``f``, gradient (shape of ``x``), stopping measure ``rel``, extras ``ctx``."""

    f: float
    grad: Tensor
    rel: float
    ctx: Any = None


def _dot(a: Tensor, b: Tensor) -> float:
    return float((a * b).sum())


def _interpolate(a: float, fa: float, da: float, b: float, fb: float, db: float) -> float:
    """Minimiser of the cubic through (a, fa, da), (b, fb, db), kept inside [a, b]."""
    lo, hi = min(a, b), max(a, b)
    if a != b:
        d1 = da + db - 3.0 * (fa - fb) / (a - b)
        disc = d1 * d1 - da * db
        if disc >= 0.0:
            d2 = math.copysign(math.sqrt(disc), b - a)
            denom = db - da + 2.0 * d2
            if denom != 0.0:
                t = b - (b - a) * (db + d2 - d1) / denom
                width = hi - lo
                if lo + 0.1 * width <= t <= hi - 0.1 * width:
                    return t
    return 0.5 * (lo + hi)


def line_search(
    fun: Callable[[Tensor], Evaluation],
    x: Tensor,
    ev0: Evaluation,
    direction: Tensor,
    step: float,
    *,
    c1: float = 1e-4,
    c2: float = 0.9,
    eps_f: float = 1e-12,
    max_evals: int = 30,
) -> tuple[float, Evaluation | None, int]:
    """Strong-Wolfe search along ``direction``; returns (step, evaluation or None, #evals)."""
    f0, d0 = ev0.f, _dot(ev0.grad, direction)
    f_tol = eps_f * abs(f0)

    def decrease(a: float, fa: float, da: float) -> bool:
        return fa <= f0 + c1 * a * d0 or (fa <= f0 + f_tol and da <= (2 * c1 - 1) * d0)

    lo, f_lo, d_lo = 0.0, f0, d0
    hi: float | None = None
    f_hi = d_hi = math.nan
    best: tuple[float, Evaluation] | None = None
    a = step
    for n in range(1, max_evals + 1):
        ev = fun(x + a * direction)
        fa, da = ev.f, _dot(ev.grad, direction)
        if not math.isfinite(fa) or not decrease(a, fa, da) or fa > f_lo + f_tol:
            hi, f_hi, d_hi = a, fa, da  # too far: minimum lies in [lo, a]
        else:
            if best is None or fa <= best[1].f:
                best = (a, ev)
            if abs(da) <= -c2 * d0:
                return a, ev, n
            # slope points back towards lo: the minimum lies between a and the old lo
            if (da > 0) if hi is None else (da * (hi - lo) >= 0):
                hi, f_hi, d_hi = lo, f_lo, d_lo
            lo, f_lo, d_lo = a, fa, da
        if hi is None:
            a = 4.0 * a
        else:
            if not (math.isfinite(f_hi) and math.isfinite(d_hi)):
                a = 0.5 * (lo + hi)
            else:
                a = _interpolate(lo, f_lo, d_lo, hi, f_hi, d_hi)
            if abs(hi - lo) <= 1e-15 * max(abs(lo), abs(hi)):
                break
    if best is not None:
        return best[0], best[1], n
    return 0.0, None, n
