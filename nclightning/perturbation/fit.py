"""Fit ``beta`` of Eq. 2 to a measured collapse metric of a deeper layer (docs/science.md §2-3).

``beta -> inf`` gives ``H* = H0`` (the metric of ``H0``); ``beta -> 0`` the collapsed UFM
minimiser (``nc1_tilde -> 0``, Theorem 2.1 and Corollary 3.2). In between the metric of ``H*``
is usually monotone in ``beta``, but not always (small ``lambda``, strongly anisotropic
``H0``), so the search scans a log-spaced grid from the largest ``beta`` down and refines the
first sign change of ``metric(beta) - target``: the largest ``beta`` (the smallest
perturbation of ``H0``) that reproduces the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from nclightning.metrics import METRIC_KEYS, ClassMoments
from nclightning.perturbation._inputs import as_moments
from nclightning.perturbation.solver import SolveResult, solve

__all__ = ["BetaFit", "fit_beta"]


@dataclass(frozen=True, eq=False)
class BetaFit:
    """Result of :func:`fit_beta`.

    ``reachable`` is ``False`` when no ``beta`` of the searched range brings the metric to
    the target; ``beta`` is then the grid point whose metric is closest to it, and
    ``message`` gives the range of values seen. ``history`` lists every ``(beta, value)``.
    """

    beta: float
    value: float
    target: float
    metric: str
    reachable: bool
    bracket: tuple[float, float] | None
    result: SolveResult
    message: str
    history: list[tuple[float, float]] = field(default_factory=list)


def fit_beta(
    h0_stats: Any,
    target: float,
    metric: str = "nc1_tilde",
    *,
    lambda_W: float,
    lambda_H: float,
    labels: Tensor | None = None,
    num_classes: int | None = None,
    beta_range: tuple[float, float] = (1e-3, 1e4),
    points_per_decade: float = 1.0,
    rtol: float = 1e-6,
    max_evals: int = 100,
    tol: float = 1e-9,
) -> BetaFit:
    """The ``beta`` whose minimiser of Eq. 2 has ``metrics[metric] == target``.

    Args:
        h0_stats: the ``H0`` layer: ``ClassMoments``, an object with ``moments()``, or
            ``Tensor[N, d]`` with ``labels``. ``metric="cdnv"`` needs per-class scatter
            (``class_scatter``) or raw features.
        target: measured value of ``metric`` (a key of ``SolveResult.metrics``).
        lambda_W, lambda_H: Eq. 2.
        beta_range: searched interval (``0 < lo < hi``), scanned from ``hi`` down on a log
            grid with ``points_per_decade`` points per decade.
        rtol: relative accuracy of ``beta`` (Illinois regula falsi in ``log beta``).
        tol: solver tolerance of each evaluation (warm-started from the nearest one).

    Returns:
        :class:`BetaFit`. An unreachable target is reported with ``reachable=False`` (no
        exception, no warning: a training callback can log it and go on).
    """
    if metric not in (*METRIC_KEYS, "nc3"):
        raise ValueError(f"metric must be one of {(*METRIC_KEYS, 'nc3')}, got {metric!r}")
    lo, hi = (float(b) for b in beta_range)
    if not 0 < lo < hi:
        raise ValueError(f"beta_range must satisfy 0 < lo < hi, got {beta_range}")
    m, features, y = as_moments(h0_stats, labels, num_classes)
    if features is not None and metric == "cdnv":
        m = ClassMoments.from_features(features, y, m.num_classes, per_class_scatter=True)
    history: list[tuple[float, float]] = []
    warm: dict[float, Tensor] = {}

    def value(beta: float) -> float:
        init = warm[min(warm, key=lambda b: abs(math.log(b / beta)))] if warm else None
        res = solve(m, lambda_W=lambda_W, lambda_H=lambda_H, beta=beta, tol=tol, init=init)
        v = res.metrics.get(metric, math.nan)
        if not math.isfinite(v):
            raise ValueError(f"metric {metric!r} is not finite at beta={beta:g} ({v})")
        warm[beta] = res.W
        history.append((beta, v))
        return v - target

    n_grid = max(2, math.ceil(math.log10(hi / lo) * points_per_decade) + 1)
    grid = torch.logspace(math.log10(hi), math.log10(lo), n_grid, dtype=torch.float64).tolist()
    bracket = None
    prev = None
    for beta in grid:
        f = value(beta)
        if f == 0.0:
            bracket = (beta, beta)
            break
        if prev is not None and (f > 0) != (prev[1] > 0):
            bracket = (beta, prev[0])
            fa, fb = f, prev[1]
            break
        prev = (beta, f)
    if bracket is None:
        best = min(history, key=lambda bv: abs(bv[1] - target))
        vals = [v for _, v in history]
        msg = (
            f"target {metric}={target:g} not reachable for beta in [{lo:g}, {hi:g}]: "
            f"values seen span [{min(vals):g}, {max(vals):g}]"
        )
        res = solve(
            h0_stats,
            labels,
            lambda_W=lambda_W,
            lambda_H=lambda_H,
            beta=best[0],
            num_classes=num_classes,
            tol=tol,
            init=warm[best[0]],
        )
        return BetaFit(best[0], best[1], target, metric, False, None, res, msg, history)
    if bracket[0] != bracket[1]:
        # Illinois regula falsi on x = log beta, with fa, fb of opposite signs
        a, b = math.log(bracket[0]), math.log(bracket[1])
        xtol = math.log1p(rtol)
        while abs(b - a) > xtol and len(history) < max_evals:
            x = (a * fb - b * fa) / (fb - fa)
            fx = value(math.exp(x))
            if fx == 0.0:
                a = b = x
                break
            if (fx > 0) != (fb > 0):
                a, fa = b, fb
            else:
                fa *= 0.5
            b, fb = x, fx
        beta = math.exp(b)
    else:
        beta = bracket[0]
    res = solve(
        h0_stats,
        labels,
        lambda_W=lambda_W,
        lambda_H=lambda_H,
        beta=beta,
        num_classes=num_classes,
        tol=tol,
        init=warm[min(warm, key=lambda bb: abs(math.log(bb / beta)))],
    )
    converged = abs(b - a) <= math.log1p(rtol) if bracket[0] != bracket[1] else True
    msg = "converged" if converged else f"stopped after {max_evals} evaluations"
    return BetaFit(beta, res.metrics[metric], target, metric, True, bracket, res, msg, history)
