"""From one probe's statistics to its numbers: metrics per layer and pair fits.

Pure composition of :mod:`nclightning.metrics` (docs/science.md §1, §8) and
:mod:`nclightning.perturbation` (§7); no Lightning, no maths of its own. The result is a
:class:`ProbeResult` whose ``row`` uses the keys of :mod:`nclightning.record.keys`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from nclightning.errors import ConfigurationError, DataError
from nclightning.metrics import ClassMoments, class_quantities, metrics_from_moments
from nclightning.record import keys

__all__ = ["PairSettings", "ProbeResult", "layer_row", "match_width", "pair_rows"]


@dataclass(frozen=True)
class PairSettings:
    """How pairs are fitted: ``coupling`` is ``"fit"`` or a fixed number."""

    lambda_W: float
    lambda_H: float
    coupling: float | str = "fit"
    normalization: str | None = None
    coupling_range: tuple[float, float] | None = None
    width_mismatch: str = "error"


@dataclass
class ProbeResult:
    """Everything one probe produced: the logged ``row`` and what figures and snapshots need."""

    row: dict[str, float]
    moments: dict[str, ClassMoments]
    per_class: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    fits: dict[str, Any] = field(default_factory=dict)  # pair name -> PairFit


def layer_row(
    probe: str,
    moments: Mapping[str, ClassMoments],
    *,
    weight: Tensor | None,
    feeding: Sequence[str],
    nc4: Mapping[str, float],
    nc4_train_means: Mapping[str, float],
    ood_means: Mapping[str, Tensor] | None = None,
    accuracy: float | None = None,
) -> dict[str, float]:
    """``nc-{probe}/...`` keys: every metric of every layer, and the classifier's accuracy.

    ``nc3``/``unc3`` only for the layers in ``feeding`` (their features are the classifier's
    input); ``nc4`` for every layer when a classifier exists.
    """
    row: dict[str, float] = {}
    for alias, m in moments.items():
        w = weight if alias in feeding else None
        ood = (ood_means or {}).get(alias)
        values = metrics_from_moments(m, w, ood_mean=ood)
        if alias in nc4:
            values["nc4"] = nc4[alias]
        if alias in nc4_train_means:
            values["nc4_train_means"] = nc4_train_means[alias]
        row.update({keys.layer_key(probe, alias, k): float(v) for k, v in values.items()})
    if accuracy is not None:
        row[keys.accuracy_key(probe)] = float(accuracy)
    return row


def per_class(moments: Mapping[str, ClassMoments]) -> dict[str, dict[str, Tensor]]:
    """Per-class arrays of every layer (class_var, cdnv_matrix, cosine_matrix)."""
    return {alias: class_quantities(m) for alias, m in moments.items()}


def match_width(m0: ClassMoments, m: ClassMoments, policy: str) -> ClassMoments | None:
    """``H0``'s moments in ``H``'s space (``width_mismatch`` policy); ``None`` to skip."""
    if m0.dim == m.dim:
        return m0
    if policy == "skip":
        return None
    if policy == "pad" and m0.dim < m.dim:
        return m0.pad(m.dim)
    raise ConfigurationError(
        f"perturbation pair layers differ in width (H0 has d={m0.dim}, H has d={m.dim}): the "
        "model needs H0 and H in one space. Pick layers of equal width (e.g. the input and "
        "output of a same-width block)"
        + (", or set width_mismatch='pad' to zero-pad H0" if m0.dim < m.dim else "")
        + ", or width_mismatch='skip'"
    )


def fit_pairs(
    moments: Mapping[str, ClassMoments],
    pairs: Sequence[tuple[str, str]],
    settings: PairSettings,
    *,
    weight: Tensor | None,
    feeding: Sequence[str],
    near: Mapping[str, float],
    notes: list[str] | None = None,
    rows: Mapping[str, tuple[Tensor, Tensor]] | None = None,
) -> dict[str, Any]:
    """``pair name -> PairFit``; ``None`` (a NaN row) where the widths differ and the policy
    skips, where features are not finite, or where a layer cannot be fitted (a dead layer:
    the reason goes to ``notes``). ``rows``: ``H0``'s rows and labels by layer, for cdnv of
    ``H*`` where ``H0``'s moments carry no per-class scatter (``fit_pair(h0_features=)``)."""
    from nclightning.perturbation import fit_pair

    fits: dict[str, Any] = {}
    for h0, h in pairs:
        name = keys.pair_name(h0, h)
        m0 = match_width(moments[h0], moments[h], settings.width_mismatch)
        fits[name] = None
        if m0 is None or not _finite(m0) or not _finite(moments[h]):
            continue
        kwargs: dict[str, Any] = {"lambda_W": settings.lambda_W, "lambda_H": settings.lambda_H}
        if settings.normalization is not None:
            kwargs["normalization"] = settings.normalization
        if settings.coupling_range is not None:
            kwargs["coupling_range"] = settings.coupling_range
        if settings.coupling != "fit":
            kwargs["coupling"] = float(settings.coupling)
        w = weight if h in feeding else None
        try:
            if rows and h0 in rows and m0.dim == rows[h0][0].shape[1]:
                kwargs["h0_features"] = rows[h0]
            fits[name] = fit_pair(m0, moments[h], weight=w, near=near.get(name), **kwargs)
        except DataError as err:
            if notes is not None:
                notes.append(f"pair {name}: {err}")
    return fits


def _finite(m: ClassMoments) -> bool:
    return bool(torch.isfinite(m.means).all()) and bool(torch.isfinite(m.class_ss).all())


def pair_rows(probe: str, fits: Mapping[str, Any]) -> dict[str, float]:
    """``pm-{probe}-{pair}/...`` keys of every pair fit (NaN for a skipped pair)."""
    row: dict[str, float] = {}
    for name, fit in fits.items():

        def put(quantity: str, value: float, name: str = name) -> None:
            row[keys.pair_key(probe, name, quantity)] = float(value)

        if fit is None:
            for q in keys.PAIR_QUANTITIES:
                put(q, math.nan)
            continue
        put("coupling", fit.coupling)
        put("beta", fit.beta)
        put("scale", fit.scale)
        put("status", keys.PAIR_STATUS[fit.status])
        put("perturbative", float(bool(fit.perturbative)))
        put("linearisation_error", fit.linearisation_error)
        put("objective", fit.objective)
        put("grad_norm", fit.grad_norm)
        put("converged", float(bool(fit.converged)))
        for metric, value in fit.predicted.items():
            put(f"predicted/{metric}", value)
        for metric, value in fit.residuals.items():
            put(f"residual/{metric}", value)
        for name, residuals in fit.baselines.items():
            for metric, value in residuals.items():
                put(keys.pair_baseline(name, metric), value)
        for metric, value in fit.skill.items():
            put(f"skill/{metric}", value)
        put("measured/norm_ratio", fit.measured["norm_ratio"])
    return row
