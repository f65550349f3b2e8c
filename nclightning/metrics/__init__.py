"""Collapse metrics (docs/science.md §1): pure tensor maths, no Lightning import.

Features are rows: ``features[N, d]``, ``labels[N]`` (docs/science.md writes columns).

* :class:`ClassStatistics`: streaming ``torchmetrics.Metric``, one pass, exact in the collapsed
  regime, reduced across processes by torchmetrics' sync.
* :func:`collapse_metrics`: the same numbers for in-memory features, with exact NC4.
* :class:`ClassMoments`, :func:`metrics_from_moments`: the reduced statistics and formulas.
"""

from nclightning.metrics.formulas import EIG_RTOL, METRIC_KEYS, metrics_from_moments
from nclightning.metrics.moments import ClassMoments
from nclightning.metrics.ncc import NCCReference
from nclightning.metrics.statistics import ClassStatistics, collapse_metrics

__all__ = [
    "EIG_RTOL",
    "METRIC_KEYS",
    "ClassMoments",
    "ClassStatistics",
    "NCCReference",
    "collapse_metrics",
    "metrics_from_moments",
]
