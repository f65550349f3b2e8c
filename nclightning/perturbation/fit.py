"""Fit ``beta`` of Eq. 2 to a measured collapse metric at the raw scale (docs/science.md §2-3).

Owns :func:`fit_beta`, the general search: any metric of ``H*``, ``beta`` in raw units (it
moves like ``1/s^2`` when ``H0`` is rescaled by ``s``: docs/science.md §7).
:func:`~nclightning.perturbation.fit_pair` is the scale-free fit of a pair of layers built on
the same search (:mod:`._search`: the largest ``beta`` reproducing the target, guarded
against non-global local minima).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from nclightning.metrics import ClassMoments, metrics_from_moments
from nclightning.perturbation._inputs import as_moments
from nclightning.perturbation._model import Model
from nclightning.perturbation._search import RootSearch, Solver
from nclightning.perturbation._spectral import Spectrum
from nclightning.perturbation.solver import DEFAULT_TOL, SolveResult, feature_moments, result_of

__all__ = ["DEFAULT_COUPLING_RANGE", "BetaFit", "fit_beta", "metric_of"]

DEFAULT_COUPLING_RANGE = (1e-4, 1e8)
"""Searched ``beta / lambda_H`` of :func:`fit_beta` (times ``lambda_H``) and ``fit_pair``."""


@dataclass(frozen=True, eq=False)
class BetaFit:
    """Result of :func:`fit_beta`.

    ``reachable`` is ``False`` when no ``beta`` of the searched range brings the metric to
    the target; ``beta`` is then the evaluated point whose metric is closest to it, and
    ``message`` gives the range of values seen. ``bracket``: the final bracket of the
    refinement; ``history`` lists every ``(beta, value)`` evaluated; ``branches`` counts the
    evaluations where two starts reached different local minima (the lower one is kept).
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
    branches: int = 0


def metric_of(name: str) -> Callable[[Model, Tensor], float]:
    """``(model, W_eigenbasis) -> metric of H*`` for :class:`._search.Solver`."""
    if name == "nc1_tilde":
        return lambda model, W: model.nc1_tilde(W)

    def value(model: Model, W: Tensor) -> float:
        spec = model.spec
        Wo = spec.to_original(W)
        moments, _ = feature_moments(spec.moments, Wo, model.beta, model.c, scale=spec.scale)
        return metrics_from_moments(moments, weight=Wo).get(name, float("nan"))

    return value


def search_message(search: RootSearch, metric: str) -> str:
    """One line on how the search ended."""
    if not search.reachable:
        vals = [v for _, v in search.history]
        return (
            f"target {metric}={search.target:g} not reachable for beta in "
            f"[{search.lo:g}, {search.hi:g}]: values seen span [{min(vals):g}, {max(vals):g}]"
        )
    if search.jump and search.bracket is not None:
        lo, hi = search.bracket
        return (
            f"the global minimiser's {metric} jumps across the target between beta={lo:.6g} "
            f"and {hi:.6g} (two local minima exchange): no beta reproduces it exactly"
        )
    return "converged"


def fit_beta(
    h0: Any,
    target: float,
    metric: str = "nc1_tilde",
    *,
    lambda_W: float,
    lambda_H: float,
    labels: Tensor | None = None,
    num_classes: int | None = None,
    beta_range: tuple[float, float] | None = None,
    points_per_decade: float = 1.0,
    rtol: float = 1e-8,
    tol: float = DEFAULT_TOL,
    near: float | None = None,
) -> BetaFit:
    """The ``beta`` whose minimiser of Eq. 2 has ``metrics[metric] == target`` (raw scale).

    Args:
        h0: the ``H0`` layer: ``ClassMoments``, an object with ``moments()``, or
            ``Tensor[N, d]`` with ``labels``. ``metric="cdnv"`` needs per-class scatter
            (``class_scatter``) or raw features.
        target: measured value of ``metric`` (a key of ``SolveResult.metrics``).
        lambda_W, lambda_H: Eq. 2.
        beta_range: searched interval (``0 < lo < hi``); default
            ``lambda_H * DEFAULT_COUPLING_RANGE``. Scanned from ``hi`` down on the grid
            ``10^(k / points_per_decade)``; the first crossing is refined (``._search``).
        rtol: relative accuracy of ``beta``; tol: solver tolerance of each evaluation.
        near: a previous ``beta``, tried first inside the final bracket (same root).

    Returns:
        :class:`BetaFit`. An unreachable target is reported with ``reachable=False`` (no
        exception, no warning: a training callback can log it and go on).
    """
    m, features, y = as_moments(h0, labels, num_classes)
    if features is not None and y is not None and metric == "cdnv":
        m = ClassMoments.from_features(features, y, m.num_classes, per_class_scatter=True)
    known = metrics_from_moments(m, weight=torch.zeros_like(m.means))
    if metric not in known:
        raise ValueError(f"metric must be one of {tuple(known)}, got {metric!r}")
    lo, hi = (lambda_H * c for c in DEFAULT_COUPLING_RANGE) if beta_range is None else beta_range
    if not 0 < lo < hi:
        raise ValueError(f"beta_range must satisfy 0 < lo < hi, got {(lo, hi)}")
    solver = Solver(Spectrum.of(m), lambda_W, lambda_H, metric_of(metric), tol)
    search = RootSearch(float(target), float(lo), float(hi), points_per_decade, rtol)
    search.find(solver, near)
    p = search.point
    assert p is not None  # set by find()
    return BetaFit(
        beta=p.beta,
        value=p.value,
        target=float(target),
        metric=metric,
        reachable=search.reachable,
        bracket=search.bracket,
        result=result_of(p.model, p.result, features, y),
        message=search_message(search, metric),
        history=search.history,
        branches=solver.branches,
    )
