"""What the callback shows in W&B at the end of a run, as plain data (no wandb, no Lightning).

Per-probe work stays with the numbers (:func:`nclightning.callbacks.outputs.log_row`); the
views below are built once, from the probe rows of the whole run and the last probe, when the
fit (or a measurement) ends, and :class:`nclightning.callbacks.outputs.WandbOutputs` logs them:

* :func:`layer_charts`: ``charts-{probe}/{metric}``: every layer of one metric as a line over
  ``epochs_trained`` (the interactive form of ``metrics_{probe}.png``; a layer-wise run: one
  line per stage);
* :func:`pair_charts`: per pair and metric over ``epochs_trained``,
  ``charts-{probe}-{h0}->{h}/{metric}``: ``H`` measured, ``H*`` predicted, ``H0`` measured;
  ``charts-{probe}-{h0}->{h}/residual/{metric}``: the residual of ``H*`` beside every logged
  baseline's (``pm-{probe}-{pair}/baseline/{name}/{metric}``, decades);
* :func:`class_tables`: ``tables/{quantity}_{probe}_{layer}`` for ``quantity`` in
  ``class_var``, ``cdnv_matrix``, ``cosine_matrix`` (docs/science.md §8) of the last probe, up
  to :data:`MAX_TABLE_CLASSES` classes;
* :func:`probe_images`: ``figures/{name}``, the figures ``nclightning report`` writes as
  ``{name}.png`` (:func:`nclightning.record.figures.probe_figures`).

Only finite values become points of a chart: a NaN or infinite value (an undefined metric, an
infinite coupling) leaves a gap, as in the report's figures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nclightning.metrics.names import METRIC_KEYS, PER_CLASS_KEYS
from nclightning.record import keys, views

__all__ = [
    "MAX_TABLE_CLASSES",
    "Chart",
    "class_tables",
    "layer_charts",
    "pair_charts",
    "probe_images",
]

MAX_TABLE_CLASSES = 100
"""Per-class quantities go to W&B as tables up to this many classes."""

Rows = Sequence[Mapping[str, float]]


@dataclass(frozen=True)
class Chart:
    """One line chart: ``lines[name] = [(epochs_trained, value), ...]`` (finite values)."""

    title: str
    lines: dict[str, list[tuple[float, float]]]


def _finite(*values: float | None) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def _series(rows: Rows, key: str) -> list[tuple[float, float]]:
    """``(epochs_trained, value)`` of ``key`` in every row where both are finite."""
    return [
        (float(r[keys.EPOCHS_TRAINED]), float(r[key]))
        for r in rows
        if _finite(r.get(keys.EPOCHS_TRAINED), r.get(key))
    ]


def layer_charts(rows: Rows, probe: str) -> dict[str, Chart]:
    """``charts-{probe}/{metric}``: one line per layer (report order), one chart per metric;
    for a layer-wise run one line per stage (its deepest layer), as ``metrics_{probe}.png``."""
    history = views.layer_history(rows, probe)
    if len(views.depth_values(rows, probe)) >= 2:
        history = views.stage_history(rows, probe)
    charts: dict[str, Chart] = {}
    for metric in views.metric_names(history):
        lines = {
            line: [(float(x), float(y)) for x, y in metrics[metric] if _finite(x, y)]
            for line, metrics in history.items()
            if metric in metrics
        }
        lines = {name: points for name, points in lines.items() if points}
        if lines:
            charts[f"charts-{probe}/{metric}"] = Chart(f"{metric} ({probe} probe)", lines)
    return charts


def _pairs(rows: Rows, probe: str) -> dict[str, list[str]]:
    """``pair -> [metric, ...]`` of every pair of ``probe`` with ``predicted/{metric}`` keys."""
    found: dict[str, set[str]] = {}
    for row in rows:
        for key in row:
            parsed = keys.parse_key(key)
            if parsed is None or parsed.kind != "pair" or parsed.probe != probe:
                continue
            head, _, metric = parsed.quantity.partition("/")
            if head == "predicted" and metric and parsed.pair is not None:
                found.setdefault(parsed.pair, set()).add(metric)
    order = {m: i for i, m in enumerate(METRIC_KEYS)}
    return {p: sorted(ms, key=lambda m: (order.get(m, len(order)), m)) for p, ms in found.items()}


def _baselines(rows: Rows, probe: str, pair: str, metric: str) -> list[str]:
    """Names of the baselines logged as ``pm-{probe}-{pair}/baseline/{name}/{metric}``."""
    head = keys.pair_key(probe, pair, "baseline/")
    names = []
    for row in rows:
        for key in row:
            if key.startswith(head) and key.endswith(f"/{metric}"):
                name = key[len(head) : -len(metric) - 1]
                if name and "/" not in name and name not in names:
                    names.append(name)
    return names


def pair_charts(rows: Rows, probe: str) -> dict[str, Chart]:
    """Per pair and fitted metric (docs/science.md §7.6), two charts:

    * ``charts-{probe}-{pair}/{metric}``: the values of ``H`` measured, ``H*`` predicted and
      ``H0`` measured;
    * ``charts-{probe}-{pair}/residual/{metric}``: in decades, ``log10(x / measured)`` of the
      model's ``H*`` (``residual/{metric}``) and of each model-free baseline logged as
      ``baseline/{name}/{metric}``: 0 is an exact prediction.
    """
    charts: dict[str, Chart] = {}
    for pair, metrics in _pairs(rows, probe).items():
        h0, h = keys.split_pair(pair)
        head = f"charts-{probe}-{pair}"
        for metric in metrics:
            values = {
                f"H ({h}) measured": keys.layer_key(probe, h, metric),
                "H* predicted": keys.pair_key(probe, pair, f"predicted/{metric}"),
                f"H0 ({h0}) measured": keys.layer_key(probe, h0, metric),
            }
            residuals = {"H* predicted": keys.pair_key(probe, pair, f"residual/{metric}")}
            for name in _baselines(rows, probe, pair, metric):
                residuals[f"baseline {name}"] = keys.pair_key(
                    probe, pair, f"baseline/{name}/{metric}"
                )
            for key, title, sources in (
                (f"{head}/{metric}", f"{metric}: {pair} ({probe} probe)", values),
                (
                    f"{head}/residual/{metric}",
                    f"log10(x / measured) of {metric}: {pair} ({probe} probe)",
                    residuals,
                ),
            ):
                lines = {name: _series(rows, k) for name, k in sources.items()}
                lines = {name: points for name, points in lines.items() if points}
                if lines:
                    charts[key] = Chart(title, lines)
    return charts


def class_tables(
    probe: str, per_class: Mapping[str, Mapping[str, Any]], class_names: Sequence[str] | None
) -> dict[str, tuple[list[str], list[list]]]:
    """``tables/{quantity}_{probe}_{layer}``: ``(columns, rows)`` of each per-class quantity.

    ``class_var``: columns ``class``, ``class_var`` (one row per class); the ``[K, K]``
    matrices: ``class`` and one column per class. Non-finite entries (the diagonal of
    ``cdnv_matrix``, absent classes) stay NaN. Layers with more than
    :data:`MAX_TABLE_CLASSES` classes are left out.
    """
    from nclightning.record.figures import safe

    tables: dict[str, tuple[list[str], list[list]]] = {}
    for alias, arrays in per_class.items():
        K = int(arrays["class_var"].shape[0])
        if K > MAX_TABLE_CLASSES:
            continue
        names = list(class_names) if class_names and len(class_names) == K else None
        names = names or [str(k) for k in range(K)]
        for quantity in PER_CLASS_KEYS:
            values = arrays[quantity]
            if quantity == "class_var":
                columns = ["class", quantity]
                data = [[names[k], float(values[k])] for k in range(K)]
            else:
                columns = ["class", *names]
                data = [[names[i], *(float(v) for v in values[i])] for i in range(K)]
            tables[f"tables/{quantity}_{safe(probe)}_{safe(alias)}"] = (columns, data)
    return tables


def probe_images(
    probe: str,
    rows: Rows,
    per_class: Mapping[str, Any] | None,
    class_names: Sequence[str] | None,
    epochs_trained: int,
) -> dict[str, Any]:
    """``{"figures/{name}": Figure}``: the report's figures of ``probe`` (the class figures of
    the last probe, given its ``per_class`` arrays)."""
    from nclightning.record.figures import probe_figures

    snapshot = None
    if per_class:
        snapshot = {
            "layers": per_class,
            "class_names": list(class_names) if class_names else None,
            "epochs_trained": epochs_trained,
        }
    figures = probe_figures(rows, probe, snapshot=snapshot)
    return {f"figures/{name}": fig for name, fig in figures.items()}
