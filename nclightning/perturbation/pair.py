"""The perturbation model fitted to a pair of layers, scale free (docs/science.md §7).

Owns :func:`fit_pair` and :class:`PairFit`: the one fit of the model, the entry point of the
callback, ``measure`` and the report. ``H0`` (the earlier layer) is normalised
(:mod:`._scale`), ``beta`` is fitted so that the minimiser ``H*`` of Eq. 2 reproduces one
scale-free metric of the later layer ``H`` (``metric``, one of :data:`FIT_METRICS`; by default
``nc1_tilde``) (:mod:`._search`: the largest coupling that does), or given (``coupling=c``),
and every other metric of ``H*`` is compared with ``H``'s: ``residual = log10(predicted /
measured)`` (0 when equal). The coupling ``beta / lambda_H`` is reported, not ``beta`` of the
raw features (docs/science.md §7).

Statuses (``PairFit.status``, :data:`STATUSES`; their logged codes are
``nclightning.record.keys.PAIR_STATUS``), ``m`` the fitted metric (``PairFit.metric``):

* ``"fitted"``: a coupling reproduces ``m(H)``;
* ``"not_more_collapsed"``: ``m(H) >= m(H0)`` (or ``m(H0)`` undefined). Every metric of
  :data:`FIT_METRICS` is 0 at the UFM optimum (``beta -> 0``) and ``m(H0)`` at ``beta -> inf``
  (``H* = H0``): a value at or above ``H0``'s is no collapse to fit, and the searched map is
  not bounded by it, so it is not searched: coupling ``inf``, predicted = ``H0``'s metrics,
  residuals against ``H``. A measurement, not a failure;
* ``"identical"``: ``H`` equals ``H0`` up to a positive factor: coupling ``inf``, the residual of
  every feature metric 0 (``nc3`` compares the model's ridge classifier with ``weight``);
* ``"fixed"``: no fit: ``H*`` at a given ``coupling`` (``fit_pair(..., coupling=c)``), every
  metric a residual, ``m`` included.

Every compared metric is also predicted by three baselines that need no model
(:data:`BASELINES`, docs/science.md §7.6): ``"h0"`` (``H``'s metric is ``H0``'s), ``"ratio"``
(``H0``'s metric moved toward the UFM optimum 0 by the measured ``r = nc1_tilde(H) /
nc1_tilde(H0)``: times ``r`` for the variance ratios ``nc1_tilde``, ``nc1``, ``cdnv``, times
``sqrt(r)`` for the distances ``nc2_etf``, ``nc2_equinorm``, ``nc3``) and, for ``cdnv`` only,
``"etf"`` (``(K-1)/(2K) nc1_tilde(H)``, the CDNV of equinorm simplex means with ``H``'s
spread). ``"ratio"`` and ``"etf"`` use ``nc1_tilde(H)`` whatever metric is fitted.
``skill[m] = |residual[m]| - min_b |baselines[b][m]|`` in decades: negative where the model
predicts ``m`` better than every baseline.

``linearisation_error``: the relative error of Eq. 5, ``||F - F_eq5|| / ||I - F||``, at the
fitted ``beta``, in the closed form of the collapsed ``H0`` of Theorems 4.1-4.2:
``sqrt(lambda_H / lambda_W) / beta`` (docs/science.md §5.6; not computed for the fitted
``H0``, which would need the dense ``(dN)^2`` operator). ``perturbative``: that error is at
most :data:`LINEARISATION_TOLERANCE` and ``beta >= PERTURBATIVE_FACTOR * max(1, lambda_H)``
(``beta`` of the normalised problem). Outside it the fit is still a minimiser of Eq. 2, but
the paper's perturbation results say nothing about it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nclightning.errors import ConfigurationError, DataError
from nclightning.metrics import ClassMoments, metrics_from_moments
from nclightning.metrics.names import SCALE_FREE_KEYS
from nclightning.perturbation._inputs import as_moments
from nclightning.perturbation._scale import (
    NORMALIZATIONS,
    between_energy,
    fixed_scale,
    rms_norm,
    same_up_to_scale,
    scale_search,
)
from nclightning.perturbation._search import Point, RootSearch, Solver
from nclightning.perturbation._spectral import Spectrum
from nclightning.perturbation.fit import DEFAULT_COUPLING_RANGE, metric_of, search_message
from nclightning.perturbation.solver import DEFAULT_TOL, SolveResult, result_of, ridge_classifier

__all__ = [
    "BASELINES",
    "DEFAULT_NORMALIZATION",
    "FIT_METRICS",
    "LINEARISATION_TOLERANCE",
    "PERTURBATIVE_FACTOR",
    "RESIDUAL_KEYS",
    "STATUSES",
    "PairFit",
    "baseline_predictions",
    "fit_pair",
    "linearisation_error",
]

DEFAULT_NORMALIZATION = "total"
"""Chosen by ``benchmarks/pair_normalisation.py`` (docs/science.md §7): of the normalisations
free of the scale of either layer, the one whose ``H*`` predicts best (``"between"`` predicts
the same metrics to 3 digits and the norm ratio worse). ``"norm_ratio"`` predicts the other
metrics better on two of three networks, at 4-5 times the cost, and only by tying ``H0``'s
scale to ``||H|| / ||H0||``, which moves with any gain on ``H`` alone."""
PERTURBATIVE_FACTOR = 10.0
LINEARISATION_TOLERANCE = 0.1
"""Largest :func:`linearisation_error` of a fit flagged ``perturbative`` (docs/science.md §5.6)."""
STATUSES = ("fitted", "not_more_collapsed", "identical", "fixed")
RESIDUAL_KEYS = ("nc1_tilde", "nc1", "nc2_etf", "nc2_equinorm", "nc3", "cdnv")
"""Metrics compared between ``H*`` and ``H``, less the fitted one (``PairFit.metric``, status
``"fitted"``); ``nc3`` with ``weight``. All scale free: the norm ratio ``||H|| / ||H0||``
moves with the scale of either layer and is a measured fact (``measured["norm_ratio"]``),
never a residual."""
FIT_METRICS = ("nc1_tilde", "nc1", "cdnv", "nc2_etf", "nc2_equinorm")
"""Metrics of ``H`` that ``fit_pair(..., metric=m)`` can fit ``H*`` to: the scale-free
:data:`RESIDUAL_KEYS` of ``H`` alone, each ``m(H0)`` at ``beta -> inf`` and 0 at the UFM optimum
(``beta -> 0``). ``nc3`` is not one: it measures ``H`` against a classifier, and the model's
``W*`` is not that classifier. ``cdnv`` needs ``H0``'s per-class scatter, ``nc1`` ``H``'s
within-class scatter."""
BASELINES = ("h0", "ratio", "etf")
"""Model-free predictions of ``H``'s metrics (module docstring); ``"etf"`` only for ``cdnv``."""
_DISTANCES = ("nc2_etf", "nc2_equinorm", "nc3")

_SCALE_FREE = SCALE_FREE_KEYS
_INF = math.inf


@dataclass(frozen=True, eq=False)
class PairFit:
    """Outcome of :func:`fit_pair` (module docstring).

    Attributes:
        status: ``"fitted"``, ``"not_more_collapsed"``, ``"identical"`` or ``"fixed"``.
        metric: the metric of ``H`` the coupling is fitted to (:data:`FIT_METRICS`, the
            ``metric`` argument): left out of ``residuals`` when ``"fitted"``, compared with
            ``H0``'s for ``"not_more_collapsed"``; with a fixed coupling nothing is fitted.
        coupling: ``beta / lambda_H`` of the normalised problem (``inf`` for the two limits).
        beta: ``beta`` of the normalised problem; scale: ``s``, the model is solved for
            ``s * H0`` (in ``H0``'s units: rescaling ``H0`` by ``t`` divides it by ``t``).
        normalization: the rule that fixed ``s`` (:data:`NORMALIZATIONS`).
        perturbative: ``linearisation_error <= LINEARISATION_TOLERANCE`` and
            ``beta >= PERTURBATIVE_FACTOR * max(1, lambda_H)``.
        linearisation_error: :func:`linearisation_error` at ``beta`` (0 for ``beta = inf``).
        predicted: scale-free metrics of ``H*`` and ``norm_ratio`` = RMS ``||H*|| / ||s H0||``.
        measured: the same metrics of ``H`` and ``norm_ratio`` = RMS ``||H|| / ||H0||`` (a
            measured fact that moves with either layer's scale, not compared).
        residuals: ``log10(predicted / measured)`` for :data:`RESIDUAL_KEYS` but ``metric``
            (status ``"fitted"``; every one otherwise).
        baselines: ``{name: {metric: log10(baseline / measured)}}`` for the same metrics
            (:data:`BASELINES`; ``"etf"`` holds ``cdnv`` only).
        skill: ``|residuals[m]| - min over baselines of |baselines[b][m]|`` (decades).
        objective, grad_norm, converged, message: of the normalised problem's minimiser and
            of the search; solve: the :class:`SolveResult` (``None`` for the limits).
    """

    status: str
    metric: str
    coupling: float
    beta: float
    scale: float
    normalization: str
    perturbative: bool
    linearisation_error: float
    predicted: dict[str, float]
    measured: dict[str, float]
    residuals: dict[str, float]
    baselines: dict[str, dict[str, float]]
    skill: dict[str, float]
    objective: float
    grad_norm: float
    converged: bool
    message: str
    solve: SolveResult | None


def residual(predicted: float, measured: float) -> float:
    """``log10(predicted / measured)``: 0 when equal, ``+-inf`` against 0, NaN if undefined."""
    if predicted == measured:
        return 0.0
    if not (math.isfinite(predicted) and math.isfinite(measured)):
        return math.nan
    if predicted < 0 or measured < 0:
        return math.nan
    if predicted == 0 or measured == 0:
        return -_INF if predicted == 0 else _INF
    return math.log10(predicted / measured)


def _metrics(m: ClassMoments, weight: Tensor | None, norm_ratio: float) -> dict[str, float]:
    values = metrics_from_moments(m, weight=weight)
    out = {k: float(values[k]) for k in _SCALE_FREE if k in values}
    out["norm_ratio"] = norm_ratio
    return out


def _residuals(
    predicted: dict[str, float], measured: dict[str, float], fitted: tuple[str, ...]
) -> dict[str, float]:
    keys = [k for k in RESIDUAL_KEYS if k in predicted and k in measured and k not in fitted]
    return {k: residual(predicted[k], measured[k]) for k in keys}


def linearisation_error(beta: float, lambda_W: float, lambda_H: float) -> float:
    """Relative error ``||F - F_eq5|| / ||I - F||`` of Eq. 5 at the collapsed ``H0``.

    ``sqrt(lambda_H / lambda_W) / beta`` (docs/science.md §5.6): the largest eigenvalue of
    ``beta (I - F_eq5)`` at the UFM minimiser is ``sqrt(lambda_H / lambda_W)``; 0 for
    ``beta = inf`` (``F = I`` exactly).
    """
    if beta == _INF:
        return 0.0
    return math.sqrt(lambda_H / lambda_W) / beta


def _perturbative(beta: float, lambda_W: float, lambda_H: float) -> tuple[bool, float]:
    err = linearisation_error(beta, lambda_W, lambda_H)
    ok = err <= LINEARISATION_TOLERANCE and beta >= PERTURBATIVE_FACTOR * max(1.0, lambda_H)
    return bool(ok), err


def baseline_predictions(
    reference: dict[str, float], target: float, num_classes: int
) -> dict[str, dict[str, float]]:
    """The model-free predictions of ``H``'s metrics (module docstring, :data:`BASELINES`).

    ``reference``: ``H0``'s metrics; ``target``: ``nc1_tilde(H)``; ``num_classes``: ``K``.
    """
    ref0 = reference.get("nc1_tilde", math.nan)
    r = target / ref0 if ref0 > 0 else math.nan
    ratio = {}
    for k in RESIDUAL_KEYS:
        if k in reference:
            factor = math.sqrt(r) if k in _DISTANCES else r
            ratio[k] = reference[k] * factor
    h0 = {k: reference[k] for k in RESIDUAL_KEYS if k in reference}
    etf = {"cdnv": (num_classes - 1) / (2 * num_classes) * target}
    return {"h0": h0, "ratio": ratio, "etf": etf}


def _compare(
    predicted: dict[str, float],
    measured: dict[str, float],
    baseline: dict[str, dict[str, float]],
    fitted: tuple[str, ...],
) -> tuple[dict[str, float], dict[str, dict[str, float]], dict[str, float]]:
    """``(residuals, baselines, skill)`` of ``H*`` and the baselines against ``H``."""
    res = _residuals(predicted, measured, fitted)
    base = {
        name: {k: residual(v[k], measured[k]) for k in res if k in v}
        for name, v in baseline.items()
    }
    skill = {}
    for k, r in res.items():
        best = [abs(b[k]) for b in base.values() if k in b and not math.isnan(b[k])]
        skill[k] = abs(r) - min(best) if best and not math.isnan(r) else math.nan
    return res, base, skill


def _check_pair(h0: Any, h: Any) -> tuple[ClassMoments, ClassMoments]:
    m0, _, _ = as_moments(h0)
    m, _, _ = as_moments(h)
    if m0.dim != m.dim:
        raise ConfigurationError(
            f"fit_pair needs H0 and H in one space, got widths {m0.dim} and {m.dim}: pick "
            "layers of equal width, or zero-pad the narrower H0 with ClassMoments.pad"
        )
    if m0.counts.shape != m.counts.shape or not torch.equal(m0.counts, m.counts):
        raise ConfigurationError(
            "H0 and H must be the moments of the same samples (equal class counts): "
            "accumulate both layers in one pass over the same probe set"
        )
    return m0, m


def fit_pair(
    h0: Any,
    h: Any,
    *,
    lambda_W: float,
    lambda_H: float,
    weight: Tensor | None = None,
    normalization: str = DEFAULT_NORMALIZATION,
    coupling_range: tuple[float, float] = DEFAULT_COUPLING_RANGE,
    near: float | None = None,
    coupling: float | None = None,
    metric: str = "nc1_tilde",
    points_per_decade: float = 1.0,
    rtol: float = 1e-8,
    tol: float = DEFAULT_TOL,
    h0_features: tuple[Tensor, Tensor] | None = None,
) -> PairFit:
    """Fit the perturbation model to the layers ``H0 -> H`` (module docstring).

    Args:
        h0, h: :class:`~nclightning.metrics.ClassMoments` (or objects with ``moments()``) of
            the two layers over the same samples, same width (the caller pads). ``h0`` with
            ``class_scatter`` gives the predicted ``cdnv`` (NaN without); ``h`` needs no scatter.
        lambda_W, lambda_H: Eq. 2 (``sqrt(lambda_W lambda_H) < 1``).
        weight: the classifier ``W[K, d]`` that ``H`` feeds, for ``nc3`` of ``H`` and ``H*``.
        normalization: scale rule for ``H0`` (:data:`NORMALIZATIONS`, docs: ``._scale``).
        coupling_range: searched ``beta / lambda_H`` (grid of ``points_per_decade`` per
            decade, scanned from the top: the largest coupling reproducing the target).
        near: a previous coupling, tried first inside the final bracket (same root to ``rtol``).
        coupling: no fit: ``H*`` at this ``beta / lambda_H`` (status ``"fixed"``; with
            ``"norm_ratio"`` the scale is still fitted to the measured norm ratio).
        metric: the metric of ``H`` that ``H*`` must reproduce (:data:`FIT_METRICS`). The
            largest coupling whose ``H*`` has ``metric(H)`` is reported; a value not below
            ``H0``'s gives status ``"not_more_collapsed"``. ``"cdnv"`` needs ``h0`` with
            ``class_scatter``, ``"nc1"`` ``h`` with its within-class scatter.
        rtol: relative accuracy of the coupling; tol: solver tolerance.
        h0_features: ``(rows[N, d], labels[N])``, the samples whose moments ``h0`` holds:
            where ``h0`` has no per-class scatter, the per-class spread of ``H*`` (its
            ``cdnv``) comes from these rows, ``O(N d K)``, instead of a ``K d^2`` statistic
            (``metric="cdnv"`` still needs the per-class scatter: it is evaluated at every
            step of the search).

    Raises:
        ConfigurationError: widths or class counts differ, unknown normalisation or metric,
            a statistic the metric needs is missing, bad lambdas or coupling range.
        DataError: ``H0`` or ``H`` has no scale (dead layer) or ``metric(H)`` is not finite.

    Example:
        ``H`` is a tighter copy of ``H0``; the fit finds the coupling whose ``H*`` matches its
        ``nc1_tilde``. ``H0`` keeps its per-class scatter, so ``cdnv`` of ``H*`` is defined.

        >>> import torch
        >>> from nclightning.metrics import ClassMoments
        >>> from nclightning.perturbation import fit_pair
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(3).repeat(20)
        >>> mu = 4 * torch.eye(3, dtype=torch.float64)[y]
        >>> h0 = mu + 0.5 * torch.randn(60, 3, generator=g, dtype=torch.float64)
        >>> h = mu + 0.2 * torch.randn(60, 3, generator=g, dtype=torch.float64)
        >>> m0 = ClassMoments.from_features(h0, y, 3, per_class_scatter=True)
        >>> fit = fit_pair(m0, ClassMoments.from_features(h, y, 3), lambda_W=5e-3, lambda_H=5e-3)
        >>> fit.status, fit.converged, round(fit.coupling)
        ('fitted', True, 161)
        >>> sorted(fit.residuals)
        ['cdnv', 'nc1', 'nc2_equinorm', 'nc2_etf']
        >>> sorted(fit.baselines)
        ['etf', 'h0', 'ratio']

        Any metric of :data:`FIT_METRICS` can be the one fitted; ``nc1_tilde`` becomes a residual:

        >>> by_cdnv = fit_pair(
        ...     m0, ClassMoments.from_features(h, y, 3), lambda_W=5e-3, lambda_H=5e-3, metric="cdnv"
        ... )
        >>> by_cdnv.metric, by_cdnv.status, sorted(by_cdnv.residuals)
        ('cdnv', 'fitted', ['nc1', 'nc1_tilde', 'nc2_equinorm', 'nc2_etf'])
        >>> abs(by_cdnv.predicted["cdnv"] / by_cdnv.measured["cdnv"] - 1) < 1e-6
        True
    """
    if normalization not in NORMALIZATIONS:
        raise ConfigurationError(
            f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}"
        )
    if metric not in FIT_METRICS:
        raise ConfigurationError(f"metric must be one of {FIT_METRICS}, got {metric!r}")
    lo, hi = (float(c) for c in coupling_range)
    if not 0 < lo < hi:
        raise ConfigurationError(f"coupling_range must satisfy 0 < lo < hi, got {coupling_range}")
    m0, m = _check_pair(h0, h)
    if metric == "cdnv" and m0.class_scatter is None:
        raise ConfigurationError(
            "metric='cdnv' needs H0's per-class scatter (the cdnv of H* is undefined from "
            "pooled statistics): accumulate H0 with scatter='per_class' "
            "(ClassMoments.from_features(..., per_class_scatter=True))"
        )
    rows = _check_rows(m0, h0_features) if m0.class_scatter is None else None
    energy = between_energy(m)
    if not (math.isfinite(energy) and energy > 0):
        raise DataError(
            f"H has no between-class spread (Tr Sigma_B = {energy:g}): a dead layer or "
            "coinciding class means; nc1_tilde of H is undefined and cannot be fitted"
        )
    measured = _metrics(m, weight, rms_norm(m) / rms_norm(m0))
    if metric not in measured:
        raise ConfigurationError(
            f"metric={metric!r} needs H's within-class scatter, which its moments lack: "
            "accumulate H with a scatter (ClassStatistics(scatter='full'))"
        )
    target = measured[metric]
    if not math.isfinite(target):
        raise DataError(
            f"{metric} of H is {target}: a dead layer, one class or coinciding class means; "
            "cannot fit"
        )
    reference = _metrics(m0, weight, 1.0)
    baseline = baseline_predictions(reference, measured["nc1_tilde"], int(m.present.sum()))
    judge = _Judge(measured, baseline, float(lambda_W), float(lambda_H), metric)
    if coupling is not None:
        return _fixed_pair(m0, judge, normalization, float(coupling), weight, tol, rows)
    if same_up_to_scale(m0, m, measured["norm_ratio"]):
        return _limit("identical", m0, normalization, judge, weight)
    if not target < reference.get(metric, math.nan):
        return _limit("not_more_collapsed", m0, normalization, judge, weight)
    opts: dict[str, Any] = dict(
        lambda_W=lambda_W, lambda_H=lambda_H, target=target, coupling_range=(lo, hi)
    )
    opts.update(ppd=points_per_decade, rtol=rtol, tol=tol, metric=metric)
    base = Spectrum.of(m0)
    if normalization == "norm_ratio":
        s0 = fixed_scale(m0, "between", lambda_W, lambda_H)

        def at_scale(
            s: float, near_s: float | None, window: tuple[float, float] | None
        ) -> _AtScale:
            kw = opts if window is None else {**opts, "coupling_range": window}
            return _search_at_scale(base, s, near=near_s, **kw)

        found, converged, note = scale_search(at_scale, s0, measured["norm_ratio"], near)
    else:
        s = fixed_scale(m0, normalization, lambda_W, lambda_H)
        found, converged, note = _search_at_scale(base, s, near=near, **opts), True, None
    return _pair_fit(found, normalization, weight, judge, converged, note, rows=rows)


def _check_rows(
    m0: ClassMoments, rows: tuple[Tensor, Tensor] | None
) -> tuple[Tensor, Tensor] | None:
    """``h0_features`` checked against ``h0``'s moments (width, one label per row, counts)."""
    if rows is None:
        return None
    x, y = rows
    if x.ndim != 2 or x.shape[1] != m0.dim or y.shape != (x.shape[0],):
        raise ConfigurationError(
            f"h0_features must be (rows[N, {m0.dim}], labels[N]), got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    counts = torch.bincount(y.long().cpu(), minlength=m0.num_classes)[: m0.num_classes]
    if counts.sum() != x.shape[0] or not torch.equal(counts.double(), m0.counts.cpu().double()):
        raise ConfigurationError(
            "h0_features are not the samples of h0's moments (class counts differ): pass the "
            "rows the moments were accumulated from"
        )
    return rows


@dataclass(frozen=True)
class _Judge:
    """What a fit's ``H*`` is judged against: ``H``'s metrics and the baselines' predictions."""

    measured: dict[str, float]
    baseline: dict[str, dict[str, float]]
    lambda_W: float
    lambda_H: float
    metric: str = "nc1_tilde"  # the fitted metric (PairFit.metric)

    def compare(
        self, predicted: dict[str, float], fitted: tuple[str, ...]
    ) -> tuple[dict[str, float], dict[str, dict[str, float]], dict[str, float]]:
        return _compare(predicted, self.measured, self.baseline, fitted)


@dataclass
class _AtScale:
    """The coupling search at one scale ``s`` of ``H0`` (before the moments of ``H*``)."""

    s: float
    search: RootSearch
    solver: Solver
    lambda_H: float
    ratio: float  # RMS ||H*|| / ||s H0||

    @property
    def coupling(self) -> float:
        point = self.search.point
        assert point is not None  # set by find()
        return point.beta / self.lambda_H

    @property
    def converged(self) -> bool:
        return self.search.reachable and not self.search.jump


@torch.inference_mode()  # no autograd bookkeeping in the solves (~12% at K=10)
def _search_at_scale(
    base: Spectrum,
    s: float,
    *,
    lambda_W: float,
    lambda_H: float,
    target: float,
    coupling_range: tuple[float, float],
    near: float | None,
    ppd: float,
    rtol: float,
    tol: float,
    metric: str = "nc1_tilde",
) -> _AtScale:
    """The search for the coupling reproducing ``metric(H) = target`` for ``s H0``."""
    spec = base.scaled(s)
    solver = Solver(spec, lambda_W, lambda_H, metric_of(metric), tol)
    lo, hi = (lambda_H * c for c in coupling_range)
    search = RootSearch(target, lo, hi, ppd, rtol)
    search.find(solver, None if near is None else lambda_H * near)
    p = search.point
    assert p is not None  # set by find()
    ratio = p.model.rms(p.state) / (s * rms_norm(base.moments))
    return _AtScale(s, search, solver, lambda_H, ratio)


@dataclass
class _AtCoupling:
    """``H*`` at a given coupling for ``s H0`` (no search): the interface of :class:`_AtScale`."""

    s: float
    point: Point
    solver: Solver
    lambda_H: float
    ratio: float

    @property
    def search(self) -> _AtCoupling:  # ``search.point``, as for a search
        return self

    @property
    def coupling(self) -> float:
        return self.point.beta / self.lambda_H

    @property
    def converged(self) -> bool:
        return bool(self.point.result.converged)


def _fixed_pair(
    m0: ClassMoments,
    judge: _Judge,
    normalization: str,
    coupling: float,
    weight: Tensor | None,
    tol: float,
    rows: tuple[Tensor, Tensor] | None = None,
) -> PairFit:
    """``H*`` of ``s H0`` at ``coupling``: status ``"fixed"``, every metric a residual."""
    if not (math.isfinite(coupling) and coupling > 0):
        raise ConfigurationError(f"coupling must be a positive number, got {coupling!r}")
    base = Spectrum.of(m0)
    lambda_W, lambda_H = judge.lambda_W, judge.lambda_H

    def at_scale(
        s: float, near: float | None = None, window: tuple[float, float] | None = None
    ) -> _AtCoupling:
        spec = base.scaled(s)
        solver = Solver(spec, lambda_W, lambda_H, metric_of("nc1_tilde"), tol)
        with torch.inference_mode():  # no autograd bookkeeping in the solves (~12% at K=10)
            point = solver.at(lambda_H * coupling, [None])
        ratio = point.model.rms(point.state) / (s * rms_norm(base.moments))
        return _AtCoupling(s, point, solver, lambda_H, ratio)

    note = f"fixed coupling {coupling:g} (no fit)"
    if normalization == "norm_ratio":
        s0 = fixed_scale(m0, "between", lambda_W, lambda_H)
        found, converged, msg = scale_search(at_scale, s0, judge.measured["norm_ratio"])
        note = f"{note}; {msg}" if msg else note
    else:
        found, converged = at_scale(fixed_scale(m0, normalization, lambda_W, lambda_H)), True
    return _pair_fit(found, normalization, weight, judge, converged, note, "fixed", rows)


def _pair_fit(
    found: _AtScale | _AtCoupling,
    normalization: str,
    weight: Tensor | None,
    judge: _Judge,
    converged: bool,
    note: str | None,
    status: str = "fitted",
    rows: tuple[Tensor, Tensor] | None = None,
) -> PairFit:
    """The comparison of ``H*`` with ``H`` at the found coupling (moments of ``H*``; its
    ``class_ss`` from H0's ``rows`` where given)."""
    search, lh = found.search, found.lambda_H
    p = search.point
    assert p is not None  # set by find()
    res = result_of(p.model, p.result, *(rows or (None, None)), rows_only=rows is not None)
    predicted = _metrics(res.moments, res.W if weight is not None else None, found.ratio)
    found_by = search_message(search, judge.metric) if isinstance(search, RootSearch) else ""
    message = note or found_by
    if found.solver.branches:
        message += (
            f"; {found.solver.branches} evaluation(s) where two starts reached different minima"
        )
    residuals, baselines, skill = judge.compare(
        predicted, (judge.metric,) if status == "fitted" else ()
    )
    perturbative, error = _perturbative(p.beta, judge.lambda_W, lh)
    return PairFit(
        status=status,
        metric=judge.metric,
        coupling=p.beta / lh,
        beta=p.beta,
        scale=found.s,
        normalization=normalization,
        perturbative=perturbative,
        linearisation_error=error,
        predicted=predicted,
        measured=judge.measured,
        residuals=residuals,
        baselines=baselines,
        skill=skill,
        objective=res.objective,
        grad_norm=res.grad_norm,
        converged=converged and found.converged and res.converged,
        message=message,
        solve=res,
    )


def _limit(
    status: str, m0: ClassMoments, normalization: str, judge: _Judge, weight: Tensor | None
) -> PairFit:
    """``beta = inf``: ``H* = s H0`` and ``W*`` the ridge classifier of ``s H0``."""
    rule = "between" if normalization == "norm_ratio" else normalization
    s = fixed_scale(m0, rule, judge.lambda_W, judge.lambda_H)
    W, f = ridge_classifier(m0, s, judge.lambda_W, judge.lambda_H)  # s H0 has H0's metrics
    predicted = _metrics(m0, W if weight is not None else None, 1.0)
    metric = judge.metric
    message = (
        "H equals H0 up to a positive factor: beta = inf reproduces it exactly"
        if status == "identical"
        else f"H is not more collapsed than H0 ({metric} {judge.measured[metric]:.6g} >= "
        f"{predicted.get(metric, math.nan):.6g}): no finite coupling reaches it; H* = H0"
    )
    residuals, baselines, skill = judge.compare(predicted, ())
    return PairFit(
        status=status,
        metric=judge.metric,
        coupling=_INF,
        beta=_INF,
        scale=s,
        normalization=normalization,
        perturbative=True,
        linearisation_error=0.0,
        predicted=predicted,
        measured=judge.measured,
        residuals=residuals,
        baselines=baselines,
        skill=skill,
        objective=f,
        grad_norm=0.0,
        converged=True,
        message=message,
        solve=None,
    )
