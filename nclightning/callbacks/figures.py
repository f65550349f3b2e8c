"""W&B media of a probe: figures drawn by :mod:`nclightning.plotting` and per-class tables.

Keys (W&B sections follow the part before the first ``/``, as for the scalars):
``nc-{probe}/curves`` (every metric over epochs, one line per layer),
``nc-{probe}/{layer}/{cosine_matrix|cdnv_matrix|class_var}`` (per-class figures) and
``.../{name}_table`` (the same numbers as tables, up to ``MAX_TABLE_CLASSES`` classes),
``pm-{probe}-{pair}/figure`` (measured H0, H vs the model's H*, with residuals).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nclightning import plotting
from nclightning.callbacks.outputs import MAX_TABLE_CLASSES, matrix_table
from nclightning.metrics.names import METRIC_KEYS
from nclightning.record import keys

__all__ = ["history_of", "probe_media"]


def history_of(rows: Sequence[Mapping[str, float]], probe: str) -> dict[str, dict[str, list]]:
    """``{layer: {metric: [(epochs_trained, value), ...]}}`` of one probe's rows."""
    out: dict[str, dict[str, list]] = {}
    for row in rows:
        x = row.get(keys.EPOCHS_TRAINED)
        for key, value in row.items():
            k = keys.parse_key(key)
            if x is not None and k is not None and k.kind == "layer" and k.probe == probe:
                out.setdefault(k.layer, {}).setdefault(k.quantity, []).append((x, value))
    return out


def probe_media(probe: str, rows, result, probe_obj) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(images, tables)`` of the latest probe: ``{key: Figure}``, ``{key: (columns, rows)}``."""
    images: dict[str, Any] = {}
    tables: dict[str, Any] = {}
    history = history_of(rows, probe)
    if history:
        images[f"nc-{probe}/curves"] = plotting.metric_curves(
            history, title=f"collapse metrics ({probe} probe)"
        )
    names = probe_obj.class_names
    for alias, arrays in result.per_class.items():
        K = next(iter(arrays.values())).shape[0]
        labels = list(names) if names and len(names) == K else [str(k) for k in range(K)]
        for quantity in ("cosine_matrix", "cdnv_matrix"):
            if quantity in arrays and K <= MAX_TABLE_CLASSES:
                tables[f"{keys.layer_key(probe, alias, quantity)}_table"] = matrix_table(
                    arrays[quantity], labels
                )
    for name, fit in result.fits.items():
        if fit is None:
            continue
        h0, h = keys.split_pair(name)
        metrics = [m for m in (*METRIC_KEYS, "norm_ratio") if m in fit.predicted]
        if metrics:
            images[keys.pair_key(probe, name, "figure")] = plotting.measured_vs_predicted(
                _measured(result, probe, h0),
                fit.measured,
                fit.predicted,
                metrics,
                labels=(f"{h0} (H0, measured)", f"{h} (H, measured)", "H* (model)"),
                title=f"{name} ({fit.status}, coupling {fit.coupling:.3g})",
            )
    return images, tables


def _measured(result, probe: str, layer: str) -> dict[str, float]:
    head = f"nc-{probe}/{layer}/"
    return {k[len(head) :]: v for k, v in result.row.items() if k.startswith(head)}
