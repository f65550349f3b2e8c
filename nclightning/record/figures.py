"""Named figures of a run record: what ``nclightning report`` writes and the callback logs.

Owns which views of :mod:`nclightning.record.views` feed which :mod:`nclightning.plotting`
figure, and the figures' names: a report writes ``{name}.png``, the callback logs
``figures/{name}`` to W&B, so both show the same figures under the same names.

* ``metrics_{probe}``: collapse metrics over completed epochs, one line per layer (for a
  layer-wise run one per stage), the learning rate under them, zero training error marked;
* ``depth_profile_{probe}``: the last values against the layer (layer-wise run: the depth);
* ``pm_{h0}_to_{h}_{probe}``: the pair's fit (:func:`nclightning.plotting.measured_vs_predicted`);
* ``splits_{probe}_vs_{other}_{layer}``: each metric of one layer on two probes (train and
  held out), with the held-out ``nc4_train_means`` in the nc4 panel;
* ``class_cosine_{probe}_{layer}``, ``class_cdnv_{probe}_{layer}``, ``class_variance_{probe}``:
  per-class quantities of a snapshot (docs/science.md §8);
* ``overlay_{metric}_{probe}`` and ``overlay_{metric}_{probe}_since_zero_error``: several runs
  (a group of seeds as mean and band) at one layer.

Every builder returns ``{name: Figure}`` and appends a line to ``notes`` for each figure it
could not draw and why.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

from nclightning import plotting
from nclightning.metrics.names import METRIC_KEYS
from nclightning.record import keys, views

__all__ = [
    "class_figures",
    "curve_figures",
    "overlay_figures",
    "pair_figures",
    "probe_figures",
    "safe",
    "split_figures",
]

Rows = Sequence[Mapping[str, float]]


Names = Sequence[str] | None
"""Metric or layer names to draw (``None``: all)."""


def safe(name: str) -> str:
    """A file-name-safe form of ``name`` (``h0->h`` becomes ``h0_to_h``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("->", "_to_")).strip("_") or "run"


def _chosen(logged: Sequence[str], metrics: Sequence[str] | None) -> list[str]:
    if metrics:
        return list(metrics)
    return [m for m in views.DEFAULT_METRICS if m in logged] or list(logged)


def _zero_mark(rows: Rows, x: Sequence[float] | None) -> dict[str, float]:
    hit = views.zero_error_epoch(rows, x)
    return {f"zero train error ({hit[1]} = 1)": hit[0]} if hit else {}


def curve_figures(
    rows: Rows,
    probe: str,
    x: Sequence[float] | None = None,
    *,
    metrics: Names = None,
    layers: Names = None,
    lr: Mapping[Any, Any] | None = None,
    label: str = "",
    notes: list[str] | None = None,
) -> dict[str, Figure]:
    """``metrics_{probe}`` and ``depth_profile_{probe}``."""
    notes = [] if notes is None else notes
    name = f"{label} ({probe} probe)" if label else f"{probe} probe"
    hist = views.layer_history(rows, probe, x, layers)
    chosen = _chosen(views.metric_names(hist), metrics)
    by_depth = views.depth_values(rows, probe)
    stages = views.stage_history(rows, probe, x) if len(by_depth) >= 2 else {}
    out = {}
    curves, what = (stages, "deepest layer per stage") if stages else (hist, "collapse metrics")
    try:
        out[f"metrics_{safe(probe)}"] = plotting.metric_curves(
            curves, chosen, title=f"{name}: {what}", lr=lr or None, marks=_zero_mark(rows, x),
            legend_title="stage" if stages else "layer",
        )  # fmt: skip
    except ValueError as err:
        notes.append(f"{name}: no metrics figure ({err})")
    if len(by_depth) >= 2:
        values, xlabel, title = by_depth, "depth (hidden layers)", "deepest features per stage"
    else:
        values, xlabel = views.last_values(hist), "layer"
        last = max((xv for m in hist.values() for s in m.values() for xv, _ in s), default=0)
        title = f"last values ({last:g} epochs)"
    try:
        out[f"depth_profile_{safe(probe)}"] = plotting.depth_profile(
            values, chosen, xlabel=xlabel, title=f"{name}: {title}"
        )
    except ValueError:
        notes.append(f"{name}: no depth profile (no metric logged for two layers)")
    return out


def pair_figures(
    rows: Rows,
    probe: str,
    x: Sequence[float] | None = None,
    *,
    metrics: Names = None,
    label: str = "",
    notes: list[str] | None = None,
) -> dict[str, Figure]:
    """``pm_{h0}_to_{h}_{probe}`` for every pair fitted on ``probe``."""
    notes = [] if notes is None else notes
    out = {}
    for pair in views.pair_names(rows, probe):
        view = views.pair_view(rows, probe, pair, x)
        if view is None:
            notes.append(f"{pair} on {probe}: no predicted metric logged, no pair figure")
            continue
        compared = set(view.residuals) | set(view.fitted)
        shown = [m for m in METRIC_KEYS if m in view.predicted and m in compared]
        if metrics:
            shown = [m for m in shown if m in metrics]
        h0, h = keys.split_pair(pair)
        status = dict(view.status).get(view.epoch, "?")
        coupling = dict(view.coupling).get(view.epoch, math.nan)
        head = f"{label}: " if label else ""
        try:
            out[f"pm_{safe(pair)}_{safe(probe)}"] = plotting.measured_vs_predicted(
                view.measured_h0, view.measured_h, view.predicted, shown,
                residuals=view.residuals, baselines=view.baselines, fitted=view.fitted,
                coupling=view.coupling, status=view.status, perturbative=view.perturbative,
                labels=(f"H0 = {h0} (measured)", f"H = {h} (measured)", "H* (model)"),
                title=f"{head}{pair}, {probe} probe, {view.epoch:g} epochs: {status}, "
                f"coupling {coupling:.4g}", notes=_pair_notes(view),
            )  # fmt: skip
        except ValueError as err:
            notes.append(f"{pair} on {probe}: no pair figure ({err})")
    return out


def _pair_notes(view: views.PairView) -> list[str]:
    """The caption's facts: the measured norm ratio (a scale, compared with nothing)."""
    ratio = view.measured_h.get("norm_ratio", math.nan)
    if not math.isfinite(ratio):
        return []
    return [f"measured RMS ||H|| / ||H0|| = {ratio:.4g} (moves with either layer's scale)"]


def split_figures(
    rows: Rows,
    probe: str,
    other: str,
    x: Sequence[float] | None = None,
    *,
    metrics: Names = None,
    layers: Sequence[str] | None = None,
    label: str = "",
    notes: list[str] | None = None,
) -> dict[str, Figure]:
    """``splits_{probe}_vs_{other}_{layer}``: both probes per metric, one figure per layer."""
    notes = [] if notes is None else notes
    mine = views.layer_history(rows, probe, x, layers)
    theirs = views.layer_history(rows, other, x, layers)
    out = {}
    for layer in [lay for lay in mine if lay in theirs]:
        lines = {probe: dict(mine[layer]), other: dict(theirs[layer])}
        transfer = lines[other].pop("nc4_train_means", None)
        extra = f"{other} vs {probe} means"
        if transfer:
            lines[extra] = {"nc4": transfer}
        logged = views.metric_names({probe: lines[probe], other: lines[other]})
        chosen = _chosen(logged, metrics)
        if transfer and "nc4" not in chosen:
            chosen.append("nc4")
        head = f"{label}: " if label else ""
        try:
            out[f"splits_{safe(probe)}_vs_{safe(other)}_{safe(layer)}"] = plotting.metric_curves(
                lines, chosen, title=f"{head}{layer}, {probe} against {other}",
                legend_title="probe", cmap="tab10", dashed={extra},
            )  # fmt: skip
        except ValueError as err:
            notes.append(f"{layer}: no {probe}/{other} figure ({err})")
    return out


def class_figures(
    snapshot: Mapping[str, Any],
    probe: str,
    *,
    layers: Names = None,
    label: str = "",
    notes: list[str] | None = None,
) -> dict[str, Figure]:
    """Cosine-vs-ETF and CDNV heatmaps per layer, variance bars, from a snapshot's moments.

    ``snapshot`` needs ``"layers"``: ``{alias: moments}`` as a snapshot file holds them
    (``counts``, ``means``, ``class_ss``), ``ClassMoments``, or the per-class arrays already
    computed (``class_var``, ``cdnv_matrix``, ``cosine_matrix``); ``"class_names"`` and
    ``"epochs_trained"`` are used when present.
    """
    notes = [] if notes is None else notes
    moments = snapshot["layers"]
    chosen = [lay for lay in (layers or moments) if lay in moments]
    names = snapshot.get("class_names")
    when = snapshot.get("epochs_trained")
    head = (
        (f"{label}: " if label else "")
        + f"{probe} probe"
        + (f", {when} epochs" if when is not None else "")
    )
    out, variances = {}, {}
    for layer in chosen:
        q = views.per_class(moments[layer])
        if len(q["class_var"]) < 2:
            notes.append(f"{layer}: fewer than two classes, no class matrices")
            continue
        variances[layer] = q["class_var"].tolist()
        title = f"{head}, {layer}"
        out[f"class_cosine_{safe(probe)}_{safe(layer)}"] = plotting.cosine_vs_etf(
            q["cosine_matrix"], names, title=title
        )
        try:
            out[f"class_cdnv_{safe(probe)}_{safe(layer)}"] = plotting.cdnv_heatmap(
                q["cdnv_matrix"], names, title=title
            )
        except ValueError as err:
            notes.append(f"{layer}: no CDNV heatmap ({err})")
    if variances:
        out[f"class_variance_{safe(probe)}"] = plotting.class_variance_bars(
            variances, names, title=head
        )
    return out


def probe_figures(
    rows: Rows,
    probe: str,
    x: Sequence[float] | None = None,
    *,
    snapshot: Mapping[str, Any] | None = None,
    lr: Mapping[Any, Any] | None = None,
    metrics: Sequence[str] | None = None,
    layers: Names = None,
    label: str = "",
    notes: list[str] | None = None,
) -> dict[str, Figure]:
    """Every figure of one probe: curves, depth profile, pairs, class figures (given a
    ``snapshot``), and, for a held-out probe of a run that also probed ``train``, the split
    comparison against it. The callback's call: ``probe_figures(rows, probe, snapshot=...)``.
    """
    notes = [] if notes is None else notes
    kw: dict[str, Any] = {"metrics": metrics, "label": label, "notes": notes}
    out = curve_figures(rows, probe, x, layers=layers, lr=lr, **kw)
    out |= pair_figures(rows, probe, x, **kw)
    if probe != "train" and "train" in views.probes(rows):
        out |= split_figures(rows, "train", probe, x, layers=layers, **kw)
    if snapshot is not None:
        out |= class_figures(snapshot, probe, layers=layers, label=label, notes=notes)
    return out


def overlay_figures(
    runs: Mapping[str, Sequence[tuple[Rows, Sequence[float] | None]]],
    probe: str,
    layer: str,
    metrics: Sequence[str],
    *,
    notes: list[str] | None = None,
) -> dict[str, Figure]:
    """``overlay_{metric}_{probe}`` and its ``_since_zero_error`` twin for several runs.

    ``runs[label]`` lists ``(rows, x)`` of each run of that label (several: a group of seeds,
    drawn as mean and band). The aligned twin shifts every run by its own epoch of zero
    training error (:func:`~nclightning.record.views.zero_error_epoch`); runs that never
    reached it are left out of it and named in ``notes``.
    """
    notes = [] if notes is None else notes
    out: dict[str, Figure] = {}
    never = set()
    for metric in metrics:
        plain: dict[str, Any] = {}
        aligned: dict[str, Any] = {}
        for label, members in runs.items():
            plain[label], shifted = [], []
            for rows, x in members:
                series = views.layer_history(rows, probe, x, [layer]).get(layer, {}).get(metric, [])
                plain[label].append(series)
                hit = views.zero_error_epoch(rows, x)
                if hit is None:
                    never.add(label)
                else:
                    shifted.append([(xv - hit[0], v) for xv, v in series])
            if shifted:
                aligned[label] = shifted
        for suffix, curves, xlabel in (
            ("", plain, "completed epochs"),
            ("_since_zero_error", aligned, "epochs since zero training error"),
        ):
            if not curves:
                continue
            try:
                out[f"overlay_{safe(metric)}_{safe(probe)}{suffix}"] = plotting.overlay(
                    curves, metric=metric, subtitle=f"layer {layer}, {probe} probe",
                    xlabel=xlabel, marks={"zero train error": 0.0} if suffix else None,
                )  # fmt: skip
            except ValueError as err:
                notes.append(f"overlay of {metric}: {err}")
    if never:
        notes.append(
            "never reached zero training error (left out of the aligned overlays): "
            + ", ".join(sorted(never))
        )
    return out
