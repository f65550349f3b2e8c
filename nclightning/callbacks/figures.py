"""W&B media of a probe: the report's named figures and per-class tables.

The figures are :func:`nclightning.record.figures.probe_figures`, the same ones (and names)
``nclightning report`` writes as PNG files: W&B shows ``figures/{name}``. Per-class matrices
also go as tables, ``tables/{name}`` (``cosine_{probe}_{layer}``, ``cdnv_{probe}_{layer}``),
up to :data:`~nclightning.callbacks.outputs.MAX_TABLE_CLASSES` classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nclightning.callbacks.outputs import MAX_TABLE_CLASSES, matrix_table
from nclightning.record.figures import probe_figures, safe

__all__ = ["probe_media"]


def probe_media(
    probe: str,
    rows: Sequence[Mapping[str, float]],
    result: Any,
    class_names: Sequence[str] | None,
    epochs_trained: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(images, tables)``: ``{"figures/{name}": Figure}``, ``{"tables/{name}": (cols, rows)}``.

    ``rows`` are the probe rows so far (a held-out probe's together with the train probe's,
    for the split comparison); ``result`` the latest probe's ``ProbeResult``.
    """
    snapshot = {
        "layers": result.per_class,  # the per-class arrays, computed once per probe
        "class_names": list(class_names) if class_names else None,
        "epochs_trained": epochs_trained,
    }
    figures = probe_figures(rows, probe, snapshot=snapshot)
    images = {f"figures/{name}": fig for name, fig in figures.items()}
    tables: dict[str, Any] = {}
    for alias, arrays in result.per_class.items():
        K = arrays["cosine_matrix"].shape[0]
        if K > MAX_TABLE_CLASSES:
            continue
        labels = list(class_names) if class_names and len(class_names) == K else None
        labels = labels or [str(k) for k in range(K)]
        for quantity, name in (("cosine_matrix", "cosine"), ("cdnv_matrix", "cdnv")):
            key = f"tables/{name}_{safe(probe)}_{safe(alias)}"
            tables[key] = matrix_table(arrays[quantity], labels)
    return images, tables
