"""What :func:`~nclightning.perturbation.fit_pair` hands the root search (docs/science.md §7).

Owns the searched coupling range (:data:`DEFAULT_COUPLING_RANGE`), the metric of ``H*`` a
search evaluates (:func:`metric_of`) and the line saying how a search ended
(:func:`search_message`). The search itself is :mod:`._search` (the largest ``beta``
reproducing the target, guarded against non-global local minima); the one fit built on it is
:func:`~nclightning.perturbation.fit_pair`, fixed or fitted coupling, any metric of
:data:`~nclightning.perturbation.FIT_METRICS`.
"""

from __future__ import annotations

from collections.abc import Callable

from nclightning.metrics import metrics_from_moments
from nclightning.perturbation._model import Model, State
from nclightning.perturbation._search import RootSearch
from nclightning.perturbation.solver import feature_moments

__all__ = ["DEFAULT_COUPLING_RANGE", "metric_of", "search_message"]

DEFAULT_COUPLING_RANGE = (1e-4, 1e8)
"""Searched ``beta / lambda_H`` of :func:`~nclightning.perturbation.fit_pair`."""


def metric_of(name: str) -> Callable[[Model, State], float]:
    """``(model, state of W) -> metric of H*`` for :class:`._search.Solver`."""
    if name == "nc1_tilde":
        return lambda model, st: model.nc1_tilde(st)

    def value(model: Model, st: State) -> float:
        spec = model.spec
        Wo = spec.to_original(st.W)
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
