"""Every collapse metric of in-memory features: :func:`collapse_metrics` (docs/science.md §1, §8).

Owns the in-memory entry point: the same streaming code as a probe
(:class:`~nclightning.metrics.ClassStatistics` over chunks), then the exact NC4 (a second
sweep classifying every row against the final class means with
:class:`~nclightning.metrics.NCCMismatch`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from nclightning.metrics.formulas import EIG_RTOL, metrics_from_moments
from nclightning.metrics.names import METRIC_KEYS
from nclightning.metrics.ncc import NCCMismatch
from nclightning.metrics.statistics import ClassStatistics

__all__ = ["collapse_metrics"]


def collapse_metrics(
    features: Tensor,
    labels: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    num_classes: int | None = None,
    *,
    predictions: Tensor | None = None,
    ood_mean: Tensor | None = None,
    allow_missing_classes: bool = False,
    compute_dtype: torch.dtype | None = None,
    eig_rtol: float = EIG_RTOL,
    chunk_size: int = 8192,
) -> dict[str, Tensor]:
    """All collapse metrics of ``features[N, d]`` (rows) with ``labels[N]``, 0-dim float64.

    Streams :class:`ClassStatistics` over chunks of ``chunk_size`` rows (same code, same
    numbers as a probe). ``weight[K, d]`` (the classifier) adds ``nc3`` and ``unc3``; ``nc4``
    (Papyan's NC4, exact: every row against the final means of the present classes) is
    reported when ``predictions[N]`` are given or, without them, from the classifier's
    ``argmax(W h + b)``. ``ood_mean[d]`` adds ``nc5``. ``num_classes`` defaults to
    ``labels.max() + 1``. Never synchronises across processes.

    Example:
        >>> import torch
        >>> from nclightning.metrics import collapse_metrics
        >>> y = torch.tensor([0, 0, 1, 1])
        >>> h = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
        >>> m = collapse_metrics(h, y)  # fully collapsed: no within-class spread
        >>> float(m["nc1"]), float(m["cdnv"])
        (0.0, 0.0)
        >>> sorted(m)[:4]
        ['cdnv', 'class_mean_norm', 'feature_norm', 'gnc2_log']
    """
    if features.ndim != 2:
        raise ValueError(f"features must be [N, d] (rows), got shape {tuple(features.shape)}")
    if num_classes is None:
        if labels.numel() == 0:
            raise ValueError("num_classes is required for empty labels")
        num_classes = int(labels.max()) + 1
    stats = ClassStatistics(
        num_classes,
        features.shape[1],
        compute_dtype=compute_dtype,
        allow_missing_classes=allow_missing_classes,
        eig_rtol=eig_rtol,
        sync_on_compute=False,
    ).to(features.device)
    for x, y in zip(features.split(chunk_size), labels.split(chunk_size)):
        stats.update(x, y)
    m = stats.moments()
    out = metrics_from_moments(m, weight, ood_mean=ood_mean, eig_rtol=eig_rtol)
    if predictions is not None or weight is not None:
        ncc = NCCMismatch(m, weight=weight, bias=bias, compute_dtype=compute_dtype)
        preds = [None] * len(range(0, features.shape[0], chunk_size))
        if predictions is not None:
            preds = list(predictions.split(chunk_size))
        for x, p in zip(features.split(chunk_size), preds):
            ncc.update(x, p)
        out["nc4"] = float(ncc.compute())
    dev = features.device
    return {
        k: torch.tensor(out[k], dtype=torch.float64, device=dev) for k in METRIC_KEYS if k in out
    }
