"""Views of a run record: from rows of logged keys to the plain series and values figures draw.

Owns the meaning of the keys of :mod:`nclightning.record.keys` for readers: which probes,
layers and pairs a history holds, a metric's series, the epoch of zero training error, the
learning rate, a pair fit at its last epoch (docs/science.md §7), per-class quantities from
a snapshot (docs/science.md §8). Every
function takes ``rows`` (``dict[str, float]``, empty cells absent) and ``x``, the completed
epochs of each row (:func:`nclightning.record.runs.completed_epochs`; ``None``: each row's
``epochs_trained``, as for the callback's own probe rows). A ``Series`` is a list of
``(x, value)`` pairs in logging order. No matplotlib here: :mod:`nclightning.record.figures`
draws these views.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nclightning.metrics.names import METRIC_KEYS
from nclightning.record import keys

__all__ = [
    "DEFAULT_METRICS",
    "TRAIN_ACCURACY",
    "PairView",
    "depth_values",
    "last_values",
    "layer_history",
    "layer_order",
    "lr_series",
    "metric_names",
    "pair_names",
    "pair_view",
    "per_class",
    "probes",
    "stage_history",
    "zero_error_epoch",
]

DEFAULT_METRICS = ("nc1", "nc1_tilde", "cdnv", "nc2_etf", "nc3", "nc4")
"""Metrics drawn when the caller does not choose (those not logged are skipped)."""

TRAIN_ACCURACY = "train/acc"
"""Lightning's epoch-level training accuracy (``CollapseClassifier``), the fallback for the
epoch of zero training error when no train probe logged its accuracy."""

Row = Mapping[str, float]
Series = list[tuple[float, float]]


def _xs(rows: Sequence[Row], x: Sequence[float] | None) -> Sequence[float]:
    if x is None:
        return [float(r.get(keys.EPOCHS_TRAINED, math.nan)) for r in rows]
    if len(x) != len(rows):
        raise ValueError(f"x has {len(x)} entries for {len(rows)} rows")
    return x


def _natural(text: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t]


# ---------------------------------------------------------------------------------------------
# probes, layers, metrics
# ---------------------------------------------------------------------------------------------


def probes(rows: Sequence[Row]) -> list[str]:
    """Probes with per-layer keys: ``train``, ``val``, ``test`` first, then the others."""
    found = set()
    for row in rows:
        for key in row:
            parsed = keys.parse_key(key)
            if parsed is not None and parsed.kind == "layer":
                found.add(parsed.probe)
    rank = {"train": 0, "val": 1, "test": 2}
    return sorted(found, key=lambda p: (rank.get(p, 3), p))


_FIRST = ("input", "x", "h0")
_LAST = ("penultimate", "features", "deepest")


def layer_order(rows: Sequence[Row], probe: str) -> list[str]:
    """Layers of ``probe`` in order of first appearance in ``rows``.

    A CSV logger sorts its columns alphabetically, so layers first logged in the same row are
    ordered by a heuristic: ``input``/``x``/``h0`` first, ``penultimate``/``features``/
    ``deepest`` last, the rest in natural order (``blocks.2`` before ``blocks.10``).
    """
    first: dict[str, int] = {}
    for i, row in enumerate(rows):
        for key in row:
            parsed = keys.parse_key(key)
            if parsed and parsed.kind == "layer" and parsed.probe == probe and parsed.layer:
                first.setdefault(parsed.layer, i)

    def rank(layer: str) -> tuple:
        group = 0 if layer in _FIRST else 2 if layer in _LAST else 1
        return (first[layer], group, _natural(layer))

    return sorted(first, key=rank)


def layer_history(
    rows: Sequence[Row],
    probe: str,
    x: Sequence[float] | None = None,
    layers: Sequence[str] | None = None,
) -> dict[str, dict[str, Series]]:
    """``{layer: {metric: Series}}`` of ``probe`` (rows with an unknown x are left out).

    Layers in ``layers`` order (default :func:`layer_order`); metrics in logging order.
    """
    out: dict[str, dict[str, Series]] = {}
    head = f"nc-{probe}/"
    for xv, row in zip(_xs(rows, x), rows):
        if not math.isfinite(xv):
            continue
        for key, value in row.items():
            if not key.startswith(head):
                continue
            parsed = keys.parse_key(key)
            if parsed is not None and parsed.kind == "layer" and parsed.layer is not None:
                out.setdefault(parsed.layer, {}).setdefault(parsed.quantity, []).append((xv, value))
    order = list(layers) if layers is not None else layer_order(rows, probe)
    return {layer: out[layer] for layer in order if layer in out}


def metric_names(history: Mapping[str, Mapping[str, Series]]) -> list[str]:
    """Metrics of a history: :data:`METRIC_KEYS` order first, then the others sorted."""
    names = {m for metrics in history.values() for m in metrics}
    return [m for m in METRIC_KEYS if m in names] + sorted(names - set(METRIC_KEYS))


def last_values(history: Mapping[str, Mapping[str, Series]]) -> dict[str, dict[str, float]]:
    """``{layer: {metric: last logged value}}``."""
    return {
        layer: {m: float(s[-1][1]) for m, s in metrics.items() if s}
        for layer, metrics in history.items()
    }


def _staged(rows: Sequence[Row], x: Sequence[float] | None) -> Any:
    pairs = [
        (xv, r) for xv, r in zip(_xs(rows, x), rows) if math.isfinite(r.get(keys.DEPTH, math.nan))
    ]
    return [r for _, r in pairs], [xv for xv, _ in pairs]


def _deepest(rows: Sequence[Row], probe: str) -> str | None:
    layers = layer_order(rows, probe)
    return ("deepest" if "deepest" in layers else layers[-1]) if layers else None


def _depth_label(depth: float) -> str:
    return str(int(depth)) if float(depth).is_integer() else str(depth)


def depth_values(rows: Sequence[Row], probe: str) -> dict[str, dict[str, float]]:
    """Layer-wise run: ``{depth: {metric: value}}``, the last value logged at each depth.

    Uses rows with a ``depth`` cell and the layer ``deepest`` (or, without it, the last
    layer of those rows); depths sorted numerically; empty when no row has a ``depth``.
    """
    staged, _ = _staged(rows, None)
    layer = _deepest(staged, probe)
    if layer is None:
        return {}
    by_depth: dict[float, dict[str, float]] = {}
    for row in staged:
        for key, value in row.items():
            parsed = keys.parse_key(key)
            if (
                parsed
                and parsed.kind == "layer"
                and parsed.probe == probe
                and parsed.layer == layer
            ):
                by_depth.setdefault(float(row[keys.DEPTH]), {})[parsed.quantity] = value
    return {_depth_label(d): by_depth[d] for d in sorted(by_depth)}


def stage_history(
    rows: Sequence[Row], probe: str, x: Sequence[float] | None = None
) -> dict[str, dict[str, Series]]:
    """Layer-wise run: ``{"depth D": {metric: Series}}``, the deepest layer at each stage."""
    staged, xs = _staged(rows, x)
    layer = _deepest(staged, probe)
    if layer is None:
        return {}
    out = {}
    for d in sorted({r[keys.DEPTH] for r in staged}):
        sel = [(xv, r) for xv, r in zip(xs, staged) if r[keys.DEPTH] == d]
        hist = layer_history([r for _, r in sel], probe, [xv for xv, _ in sel], [layer])
        if layer in hist:
            out[f"depth {_depth_label(d)}"] = hist[layer]
    return out


# ---------------------------------------------------------------------------------------------
# training: learning rate, zero training error
# ---------------------------------------------------------------------------------------------


def lr_series(rows: Sequence[Row], x: Sequence[float] | None = None) -> dict[str, Series]:
    """``{"lr-SGD": Series, ...}``: LearningRateMonitor's ``lr-*`` keys on the epoch axis."""
    out: dict[str, Series] = {}
    for xv, row in zip(_xs(rows, x), rows):
        if not math.isfinite(xv):
            continue
        for key, value in row.items():
            if key.startswith("lr-"):
                out.setdefault(key, []).append((xv, value))
    return out


def zero_error_epoch(
    rows: Sequence[Row], x: Sequence[float] | None = None, probe: str = "train"
) -> tuple[float, str] | None:
    """``(completed epochs, key)`` when training error first reached zero, else None.

    The first probe whose ``nc-{probe}/accuracy`` is 1; only in a run whose train probe
    logged no accuracy, the first epoch whose Lightning ``train/acc`` is 1 (at ``epoch + 1``
    completed epochs; measured while the weights move, so a later signal).
    """
    xs = _xs(rows, x)
    for key in (keys.accuracy_key(probe), TRAIN_ACCURACY):
        logged = [(xv, r[key]) for xv, r in zip(xs, rows) if key in r and math.isfinite(xv)]
        if logged:
            hits = [xv for xv, v in logged if v >= 1.0]
            return (min(hits), key) if hits else None
    return None


# ---------------------------------------------------------------------------------------------
# pair fits
# ---------------------------------------------------------------------------------------------


def pair_names(rows: Sequence[Row], probe: str) -> list[str]:
    """Pairs ``h0->h`` fitted on ``probe``, in order of first appearance."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            parsed = keys.parse_key(key)
            if parsed and parsed.kind == "pair" and parsed.probe == probe and parsed.pair:
                seen.setdefault(parsed.pair, None)
    return list(seen)


@dataclass
class PairView:
    """A pair fit (docs/science.md §7): its last fitted epoch and its history.

    ``measured_h0``, ``measured_h``, ``predicted``, ``residuals``, ``skill`` map metric names
    to the values at ``epoch`` (``norm_ratio``: 1 for H0 by definition, H's the logged
    ``measured/norm_ratio``); ``baselines`` maps a baseline's name to its residuals there;
    ``fitted`` names the metrics the fit reproduced by construction (``nc1_tilde`` when the
    status at ``epoch`` is ``fitted``); ``coupling``, ``status`` (names of
    :data:`~nclightning.record.keys.PAIR_STATUS`), ``perturbative`` and
    ``linearisation_error`` are series over completed epochs.
    """

    pair: str
    epoch: float
    measured_h0: dict[str, float]
    measured_h: dict[str, float]
    predicted: dict[str, float]
    residuals: dict[str, float]
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    skill: dict[str, float] = field(default_factory=dict)
    fitted: tuple[str, ...] = ()
    coupling: Series = field(default_factory=list)
    status: list[tuple[float, str]] = field(default_factory=list)
    perturbative: Series = field(default_factory=list)
    linearisation_error: Series = field(default_factory=list)


def _value_at(series: Series, epoch: float) -> float:
    """The last value logged at ``epoch``, else the last one before it; NaN when none."""
    at = [v for xv, v in series if xv == epoch]
    if at:
        return at[-1]
    before = [v for xv, v in series if xv < epoch]
    return before[-1] if before else math.nan


def _pair_series(
    rows: Sequence[Row], probe: str, pair: str, xs: Sequence[float]
) -> dict[str, Series]:
    head = f"pm-{probe}-{pair}/"
    out: dict[str, Series] = {}
    for xv, row in zip(xs, rows):
        if math.isfinite(xv):
            for key, value in row.items():
                if key.startswith(head):
                    out.setdefault(key[len(head) :], []).append((xv, value))
    return out


def pair_view(
    rows: Sequence[Row], probe: str, pair: str, x: Sequence[float] | None = None
) -> PairView | None:
    """The pair ``h0->h`` of ``probe`` at the last epoch it predicted a metric (None: never)."""
    xs = _xs(rows, x)
    q = _pair_series(rows, probe, pair, xs)
    predicted_series = {
        k[len("predicted/") :]: s for k, s in q.items() if k.startswith("predicted/")
    }
    if not any(predicted_series.values()):
        return None
    epoch = max(xv for s in predicted_series.values() for xv, _ in s)
    h0, h = keys.split_pair(pair)
    history = layer_history(rows, probe, xs, [h0, h])
    at = {lay: {m: _value_at(s, epoch) for m, s in history.get(lay, {}).items()} for lay in (h0, h)}
    predicted = {m: _value_at(s, epoch) for m, s in predicted_series.items()}
    residuals = _at_epoch(q, "residual/", epoch)
    baselines: dict[str, dict[str, float]] = {}
    for k, v in _at_epoch(q, "baseline/", epoch).items():
        name, _, metric = k.partition("/")
        baselines.setdefault(name, {})[metric] = v
    if "measured/norm_ratio" in q:
        at[h0]["norm_ratio"] = 1.0
        at[h]["norm_ratio"] = _value_at(q["measured/norm_ratio"], epoch)
    elif "norm_ratio" in predicted and "norm_ratio" in residuals:  # records before the baselines
        at[h0]["norm_ratio"] = 1.0
        at[h]["norm_ratio"] = predicted["norm_ratio"] / 10.0 ** residuals.pop("norm_ratio")
    status = [(xv, keys.status_name(v)) for xv, v in q.get("status", []) if math.isfinite(v)]
    fitted = ("nc1_tilde",) if dict(status).get(epoch) == "fitted" else ()
    return PairView(
        pair=pair,
        epoch=epoch,
        measured_h0=at[h0],
        measured_h=at[h],
        predicted=predicted,
        residuals=residuals,
        baselines=baselines,
        skill=_at_epoch(q, "skill/", epoch),
        fitted=fitted,
        coupling=q.get("coupling", []),
        status=status,
        perturbative=q.get("perturbative", []),
        linearisation_error=q.get("linearisation_error", []),
    )


def _at_epoch(q: Mapping[str, Series], prefix: str, epoch: float) -> dict[str, float]:
    """``{rest: value}`` of the quantities ``{prefix}{rest}`` logged at ``epoch`` itself (a
    comparison of another epoch's fit, e.g. of a metric fitted now, is not carried over)."""
    out = {}
    for k, series in q.items():
        at = [v for xv, v in series if xv == epoch and math.isfinite(v)]
        if k.startswith(prefix) and at:
            out[k[len(prefix) :]] = at[-1]
    return out


# ---------------------------------------------------------------------------------------------
# per-class quantities (snapshots)
# ---------------------------------------------------------------------------------------------


def per_class(layer: Mapping[str, Any] | Any) -> dict[str, Any]:
    """``class_var [K]``, ``cdnv_matrix [K, K]``, ``cosine_matrix [K, K]`` as numpy float64.

    ``layer`` is one entry of a snapshot's ``"layers"`` (``counts``, ``means``, ``class_ss``
    tensors, optional ``scatter``), a :class:`~nclightning.metrics.ClassMoments`, or the
    arrays themselves (the callback's ``per_class`` of a probe); the arrays are
    :func:`nclightning.metrics.class_quantities` (docs/science.md §8).
    """
    import numpy as np
    import torch

    from nclightning.metrics import PER_CLASS_KEYS, ClassMoments, class_quantities

    if isinstance(layer, Mapping) and all(k in layer for k in PER_CLASS_KEYS):
        return {k: np.asarray(torch.as_tensor(layer[k]).cpu(), dtype=float) for k in PER_CLASS_KEYS}
    if not isinstance(layer, ClassMoments):
        missing = [k for k in ("counts", "means", "class_ss") if layer.get(k) is None]
        if missing:
            raise ValueError(f"per-class quantities need counts, means and class_ss; no {missing}")
        f64 = {k: layer[k].to(torch.float64) for k in ("counts", "means", "class_ss")}
        scatter = layer.get("scatter")
        layer = ClassMoments(
            f64["counts"],
            f64["means"],
            None if scatter is None else scatter.double(),
            f64["class_ss"],
        )
    return {k: v.cpu().numpy() for k, v in class_quantities(layer).items()}
