"""Collapse metrics (SCIENCE.md §1): pure tensor maths, no Lightning import."""

from nclightning.metrics.formulas import EIG_RTOL, METRIC_KEYS, metrics_from_moments
from nclightning.metrics.moments import ClassMoments

__all__ = ["EIG_RTOL", "METRIC_KEYS", "ClassMoments", "metrics_from_moments"]
