"""Collapse metrics (docs/science.md §1, §8): pure tensor maths, no Lightning import.

Features are rows: ``features[N, d]``, ``labels[N]`` (docs/science.md writes columns).

* :mod:`~nclightning.metrics.names`: the metric keys (single source of every name).
* :class:`ClassStatistics`: streaming ``torchmetrics.Metric``, one pass, exact in the
  collapsed regime, reduced across processes by torchmetrics' sync; scatter modes
  ``"full"``, ``"per_class"``, ``"none"`` and the span mode (``scatter_basis``).
* :class:`NCCMismatch`: streaming NC4 against given class means (``"sum"`` states).
* :class:`ClassMoments`, :func:`metrics_from_moments`: the reduced statistics and formulas;
  :func:`class_quantities`: the per-class arrays (``class_var``, ``cdnv_matrix``,
  ``cosine_matrix``).
* :func:`collapse_metrics`: every metric of in-memory features, with exact NC4.
"""

from nclightning.metrics.collapse import collapse_metrics
from nclightning.metrics.formulas import EIG_RTOL, metrics_from_moments, reported_keys
from nclightning.metrics.measures import class_quantities
from nclightning.metrics.moments import ClassMoments
from nclightning.metrics.names import (
    CLASSIFIER_KEYS,
    DESCRIPTIONS,
    METRIC_KEYS,
    MOMENT_KEYS,
    NCC_KEYS,
    OOD_KEYS,
    PER_CLASS_KEYS,
    SCATTER_KEYS,
)
from nclightning.metrics.ncc import NCCMismatch, NCCReference
from nclightning.metrics.statistics import ClassStatistics

__all__ = [
    "CLASSIFIER_KEYS",
    "DESCRIPTIONS",
    "EIG_RTOL",
    "METRIC_KEYS",
    "MOMENT_KEYS",
    "NCC_KEYS",
    "OOD_KEYS",
    "PER_CLASS_KEYS",
    "SCATTER_KEYS",
    "ClassMoments",
    "ClassStatistics",
    "NCCMismatch",
    "NCCReference",
    "class_quantities",
    "collapse_metrics",
    "metrics_from_moments",
    "reported_keys",
]
