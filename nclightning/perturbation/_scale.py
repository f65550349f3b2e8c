"""Scale of ``H0`` for a scale-free fit of the perturbation model (docs/science.md §4, §7).

Owns the UFM scale ``rho`` and the normalisations of :func:`~nclightning.perturbation.fit_pair`.
Eq. 2 is not scale free: solving it for ``s H0`` at fixed lambdas is the same problem as for
``H0`` with ``lambda_W / s^2``, ``lambda_H s^2``, ``beta s^2`` (docs/science.md §7). A fit
therefore fixes ``s`` by a rule, and reports ``beta / lambda_H`` of the problem for ``s H0``:

* ``"between"``: ``Tr Sigma_B(s H0) = rho (K - 1) / K``, the between-class energy of the UFM
  minimiser (Theorem 2.1: ``K`` orthogonal class means of squared norm ``rho``; centred on their
  mean, ``rho (1 - 1/K)``). ``s`` moves like ``1/t`` when ``H0`` is rescaled by ``t``: every
  output is invariant to rescaling ``H0``, ``H`` or both, except the measured ``||H||/||H0||``.
* ``"total"`` (the default of ``fit_pair``, chosen by ``benchmarks/pair_normalisation.py``):
  ``(1/N) sum_i ||s h0_i||^2 = rho``, the mean squared feature norm of the UFM minimiser (every
  feature has norm ``sqrt(rho)``). Same invariance as ``"between"``.
* ``"norm_ratio"``: ``s`` fitted together with ``beta`` so that ``H*`` also reproduces the
  measured RMS norm ratio ``||H|| / ||H0||`` (so ``norm_ratio`` is fitted, not a residual;
  :func:`scale_search`).
  The measured ratio changes when one layer alone is rescaled, so this fit is invariant only
  to a common rescaling of both layers.

``rho = (1 - c) sqrt(lambda_W / lambda_H)`` with ``c = sqrt(lambda_W lambda_H) < 1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, TypeVar

import torch
from torch import Tensor

from nclightning.errors import ConfigurationError, DataError
from nclightning.metrics import ClassMoments

__all__ = ["NORMALIZATIONS", "SCALE_RANGE", "fixed_scale", "rms_norm", "scale_search", "ufm_scale"]

NORMALIZATIONS = ("between", "total", "norm_ratio")


def ufm_scale(lambda_W: float, lambda_H: float) -> float:
    """``rho`` of Theorem 2.1 (docs/science.md §4): squared norm of the UFM's features."""
    if not (lambda_W > 0 and lambda_H > 0):
        raise ConfigurationError(
            f"a scale-free pair fit needs lambda_W > 0 and lambda_H > 0, got {lambda_W}, {lambda_H}"
        )
    c = math.sqrt(lambda_W * lambda_H)
    if c >= 1:
        raise ConfigurationError(
            f"sqrt(lambda_W * lambda_H) = {c:g} >= 1: the UFM minimiser is 0 (Theorem 2.1) and "
            "gives no scale; choose smaller weight decays"
        )
    return (1 - c) * math.sqrt(lambda_W / lambda_H)


def rms_norm(m: ClassMoments) -> float:
    """``sqrt((1/N) sum_i ||h_i||^2)`` from counts, means and per-class sums of squares."""
    ss = float(m.class_ss.sum()) + float((m.counts * m.means.square().sum(1)).sum())
    return math.sqrt(ss / m.total)


def between_energy(m: ClassMoments) -> float:
    """``Tr Sigma_B`` (centred on the mean of the present classes' means, docs/science.md §1)."""
    mu = m.means[m.present]
    return float((mu - mu.mean(0)).square().sum()) / mu.shape[0]


def fixed_scale(m: ClassMoments, normalization: str, lambda_W: float, lambda_H: float) -> float:
    """``s`` of the ``"between"`` or ``"total"`` rule for ``H0 = m`` (module docstring)."""
    rho = ufm_scale(lambda_W, lambda_H)
    if normalization == "between":
        K = int(m.present.sum())
        energy, target = between_energy(m), rho * (K - 1) / K
    elif normalization == "total":
        energy, target = rms_norm(m) ** 2, rho
    else:
        raise ConfigurationError(
            f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}"
        )
    if not (math.isfinite(energy) and energy > 0):
        raise DataError(
            f"H0 has no {normalization} energy to normalise ({energy:g}): a dead layer or "
            "coinciding class means; the pair cannot be fitted"
        )
    return math.sqrt(target / energy)


def same_up_to_scale(h0: ClassMoments, h: ClassMoments, t: float, rtol: float = 1e-10) -> bool:
    """Whether ``h`` are the moments of ``t * H0`` (``t > 0``) to ``rtol``."""
    if not torch.equal(h0.counts, h.counts):
        return False

    def close(a: Tensor, b: Tensor) -> bool:
        return float((a - b).norm()) <= rtol * max(float(b.norm()), 1e-300)

    pairs = [(h.means, t * h0.means), (h.class_ss, t * t * h0.class_ss)]
    if h0.scatter is not None and h.scatter is not None:
        pairs.append((h.scatter, t * t * h0.scatter))
    return all(close(a, b) for a, b in pairs)


SCALE_RANGE = (1e-5, 1e3)
"""Searched ``s / s_between`` of the ``"norm_ratio"`` normalisation (grid of one per decade)."""


class ScaleFit(Protocol):
    """What :func:`scale_search` reads of a fit at one scale."""

    @property
    def ratio(self) -> float: ...
    @property
    def coupling(self) -> float: ...
    @property
    def converged(self) -> bool: ...


FitT = TypeVar("FitT", bound=ScaleFit)


def scale_search(
    fit_at: Callable[[float, float | None, tuple[float, float] | None], FitT],
    s0: float,
    ratio: float,
    near: float | None = None,
    rtol: float = 1e-6,
) -> tuple[FitT, bool, str | None]:
    """The ``"norm_ratio"`` fit: the smallest ``s`` with ``norm_ratio(H*) == ratio``.

    ``fit_at(s, near, window)`` fits the coupling at the scale ``s`` (``window``: a narrower
    coupling range, or ``None``): an object with ``ratio``, ``coupling`` and ``converged``.
    ``log10(s / s0)`` (``s0``: the ``"between"`` scale) is scanned on the integers of
    ``log10(SCALE_RANGE)`` upwards: from ``H0`` small against the UFM scale, where the coupling
    is largest and ``H*`` closest to ``H0`` (the rule of the search in ``beta``), skipping
    scales whose coupling search did not converge. The first crossing is refined by regula
    falsi (Illinois) on ``log s`` to ``rtol``, each coupling search there restricted to a
    decade around the couplings at the ends of the bracket (the full range if that fails).
    Returns ``(fit, converged, message or None)``; an unreachable ratio gives the closest fit.
    """
    lo, hi = (round(math.log10(x)) for x in SCALE_RANGE)
    fits: dict[float, FitT] = {}

    def gap(u: float, window: tuple[float, float] | None = None) -> float:
        prev = fits[min(fits, key=lambda v: abs(v - u))].coupling if fits else near
        near_u = prev if prev is not None and math.isfinite(prev) else None
        fits[u] = fit_at(s0 * 10.0**u, near_u, window)
        return math.log(fits[u].ratio / ratio) if fits[u].converged else math.nan

    bracket = _first_crossing(gap, lo, hi)
    if bracket is None:
        valid = [f for f in fits.values() if f.converged] or list(fits.values())
        best = min(valid, key=lambda f: abs(math.log(f.ratio / ratio)))
        msg = (
            f"measured norm ratio {ratio:.4g} not reached for s/s_between in {SCALE_RANGE}: "
            "the closest fit is reported"
        )
        return best, False, msg
    a, fa, b, fb = bracket
    ca, cb = fits[a].coupling, fits[b].coupling
    window = (min(ca, cb) / 10, max(ca, cb) * 10)
    while fa != 0 and abs(b - a) > math.log10(1 + rtol):
        u = (a * fb - b * fa) / (fb - fa)
        fu = gap(u, window)
        if math.isnan(fu):  # the window missed: search the full range there
            fu = gap(u)
        if (fu > 0) == (fb > 0):
            fa *= 0.5
        else:
            a, fa = b, fb
        b, fb = u, fu
    return fits[b if fa != 0 else a], True, None


def _first_crossing(
    gap: Callable[[float], float], lo: int, hi: int
) -> tuple[float, float, float, float] | None:
    """``(a, gap(a), b, gap(b))`` around the first sign change of ``gap`` on ``lo, ..., hi``."""
    prev: tuple[float, float] | None = None
    for k in range(lo, hi + 1):
        g = gap(float(k))
        if math.isnan(g):
            continue
        if g == 0:
            return float(k), g, float(k), g
        if prev is not None and (prev[1] > 0) != (g > 0):
            return prev[0], prev[1], float(k), g
        prev = (float(k), g)
    return None
