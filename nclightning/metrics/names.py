"""The names of the collapse metrics: the single source every layer of nclightning uses.

Owns the metric registry (:data:`REGISTRY`: one :class:`MetricSpec` per metric, in display
order: its key, the ``{metric}`` part of ``nc-{probe}/{layer}/{metric}`` (see
``nclightning.record.keys``), its formula, the inputs it needs, when it is NaN, the figure
that draws it, its reference test) and the key tuples derived from it (docs/science.md §1, §8).
Nothing here computes anything.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CLASSIFIER_KEYS",
    "DESCRIPTIONS",
    "METRIC_KEYS",
    "MOMENT_KEYS",
    "NCC_KEYS",
    "OOD_KEYS",
    "PER_CLASS_KEYS",
    "REGISTRY",
    "SCALE_FREE_KEYS",
    "SCALE_KEYS",
    "SCATTER_KEYS",
    "SPECS",
    "MetricSpec",
]


@dataclass(frozen=True)
class MetricSpec:
    """One per-layer collapse metric: everything the layers above need to know about it.

    Adding a measure is one entry here, one formula function and one test against an
    independent reference (``tests/metrics/test_metric_registry.py`` checks that the entry's
    formula, reference, test, README row and docs/science.md row exist).
    """

    name: str
    """The key: the ``{metric}`` of ``nc-{probe}/{layer}/{metric}``."""
    formula: str
    """Dotted path of the function (or metric class) that computes it."""
    needs: tuple[str, ...]
    """Inputs beyond the class means and counts: ``"scatter"`` (within-class scatter),
    ``"class_ss"`` (per-class sums of squares), ``"norm_sums"``, ``"classifier"`` (``W[K, d]``),
    ``"predictions"`` (per-sample, a second sweep), ``"train_means"`` (the TRAIN probe's
    means), ``"ood_mean"`` (an out-of-distribution probe's mean feature)."""
    nan_rule: str
    """When it is NaN (undefined), rather than a number."""
    figure: str
    """The named figure (``nclightning.record.figures``) that draws it."""
    reference: str
    """The independent float64 reference in ``tests/metrics/conftest.py`` that computes it."""
    reference_test: str
    """``file::test`` comparing the formula with that reference."""
    scale: bool = False
    """Whether it measures the layer's scale (not invariant to rescaling the features)."""
    description: str = ""
    """One line (README tables, figure captions, W&B descriptions)."""


_CURVES = "metrics_{probe}"  # every scalar: its curve per layer (and depth_profile_{probe})
_MEASURES = "tests/metrics/test_measures.py::test_measures_match_reference"
_MOMENTS = (
    "tests/metrics/test_collapse_accuracy.py::test_streaming_float32_matches_two_pass_reference"
)
_NC4 = "tests/metrics/test_nc4.py::test_exact_nc4_in_memory_matches_brute_force"
_NC4_TRAIN = "tests/metrics/test_nc4.py::test_streaming_against_given_means"
_F = "nclightning.metrics.formulas."
_M = "nclightning.metrics.measures."
_K2 = "K < 2 present classes"

REGISTRY: tuple[MetricSpec, ...] = (
    MetricSpec(
        "nc1", _F + "nc1", ("scatter",), f"{_K2} or Sigma_B = 0", _CURVES,
        "reference_metrics", _MOMENTS,
        description="(1/K) Tr(Sigma_W Sigma_B^+), within- over between-class variability (Papyan)",
    ),
    MetricSpec(
        "nc1_tilde", _F + "nc1_tilde", ("class_ss",), f"{_K2} or Tr(Sigma_B) = 0", _CURVES,
        "reference_metrics", _MOMENTS,
        description="Tr(Sigma_W) / Tr(Sigma_B) (Tirer et al., Eq. 3)",
    ),
    MetricSpec(
        "cdnv", _F + "cdnv", ("class_ss",), f"{_K2} or two class means coincide", _CURVES,
        "reference_metrics", _MOMENTS,
        description="mean over class pairs of (V_k + V_l) / (2 ||mu_k - mu_l||^2) (Galanti et al.)",
    ),
    MetricSpec(
        "nc2_etf", _F + "nc2", (), f"{_K2} or every centred mean 0", _CURVES,
        "reference_metrics", _MOMENTS,
        description="distance of the centred class-mean Gram matrix from the simplex ETF",
    ),
    MetricSpec(
        "nc2_equinorm", _F + "nc2", (), f"{_K2} or every centred mean 0", _CURVES,
        "reference_metrics", _MOMENTS,
        description="std / mean of the centred class-mean norms (Papyan NC2a)",
    ),
    MetricSpec(
        "nc2_equiangle", _F + "nc2", (), f"{_K2} or a centred mean 0 (its angle undefined)",
        _CURVES, "reference_metrics", _MOMENTS,
        description="std of the cosines between centred class means (Papyan NC2b)",
    ),
    MetricSpec(
        "nc2_maxangle", _F + "nc2", (), f"{_K2} or a centred mean 0 (its angle undefined)",
        _CURVES, "reference_metrics", _MOMENTS,
        description="max |cos + 1/(K-1)| over pairs of centred class means",
    ),
    MetricSpec(
        "gnc2_log", _M + "gnc2_log", (), f"{_K2} or a centred mean 0", _CURVES,
        "reference_measures", _MEASURES,
        description="variance of log(1/||u_k - u_l||) over pairs (hyperspherical uniformity)",
    ),
    MetricSpec(
        "nc3", _F + "nc3", ("classifier",), f"{_K2}, W = 0 or M = 0", _CURVES,
        "reference_metrics", _MOMENTS,
        description="|| W/||W|| - M/||M|| ||_F, classifier-mean self-duality (Papyan NC3)",
    ),
    MetricSpec(
        "unc3", _M + "unc3", ("classifier",), f"{_K2} or a zero row of W or M^T", _CURVES,
        "reference_measures", _MEASURES,
        description="variance of cos(w_k, mu_k - mu_c) over classes (uniform duality)",
    ),
    MetricSpec(
        "nc4", "nclightning.metrics.ncc.NCCMismatch", ("predictions",),
        "no sample, or every eligible class mean coincides", _CURVES,
        "reference_nc4", _NC4,
        description="fraction of samples whose prediction differs from the nearest class mean",
    ),
    MetricSpec(
        "nc4_train_means", "nclightning.metrics.ncc.NCCMismatch", ("predictions", "train_means"),
        "no sample, or every eligible TRAIN mean coincides", _CURVES,
        "reference_nc4", _NC4_TRAIN,
        description="nc4 of a held-out probe against the TRAIN probe's class means",
    ),
    MetricSpec(
        "nc5", _M + "nc5", ("ood_mean",), f"{_K2} or a centred mean 0", _CURVES,
        "reference_measures", _MEASURES,
        description="mean |cos(mu_k - mu_c, mu_ood - mu_c)|, ID/OOD orthogonality (Ammar et al.)",
    ),
    MetricSpec(
        "feature_norm", _M + "feature_norm", ("norm_sums",), "no sample", _CURVES,
        "reference_measures", _MEASURES, scale=True,
        description="mean feature norm ||h_i|| over samples",
    ),
    MetricSpec(
        "class_mean_norm", _M + "class_mean_norm", (), "no present class", _CURVES,
        "reference_measures", _MEASURES, scale=True,
        description="mean over classes of ||mu_k - mu_c||",
    ),
)  # fmt: skip
"""Every per-layer scalar, in display order (tables, figures, W&B panels)."""

SPECS: dict[str, MetricSpec] = {spec.name: spec for spec in REGISTRY}
""":data:`REGISTRY` by name."""


def _keys(*needs: str) -> tuple[str, ...]:
    return tuple(s.name for s in REGISTRY if set(needs) & set(s.needs))


METRIC_KEYS = tuple(SPECS)
"""Every per-layer scalar, in display order (tables, figures, W&B panels)."""

CLASSIFIER_KEYS = _keys("classifier")
"""Scalars that also need the classifier weight ``W[K, d]`` of the layer's features."""

NCC_KEYS = _keys("predictions")
"""NCC mismatches (:class:`~nclightning.metrics.NCCMismatch`): per-sample predictions against
the same probe's final class means (``nc4``, Papyan's NC4) or against the TRAIN probe's means
(``nc4_train_means``, a held-out probe's NCC generalisation, docs/science.md §8)."""

OOD_KEYS = _keys("ood_mean")
"""Scalars that need the mean feature of an out-of-distribution probe."""

SCALE_KEYS = tuple(s.name for s in REGISTRY if s.scale)
"""Scalars that measure a layer's scale (not invariant to rescaling its features)."""

SCALE_FREE_KEYS = tuple(k for k in METRIC_KEYS if k not in (*NCC_KEYS, *OOD_KEYS, *SCALE_KEYS))
"""Scalars of the moments and the classifier that rescaling the features leaves unchanged."""

MOMENT_KEYS = tuple(k for k in METRIC_KEYS if k not in (*CLASSIFIER_KEYS, *NCC_KEYS, *OOD_KEYS))
"""Scalars computed from class moments alone (:func:`~nclightning.metrics.metrics_from_moments`).

``nc1`` needs the within-class scatter (full, or projected on the span of the class means)
and ``feature_norm`` the per-class norm sums; each is left out when its statistic was not
accumulated (see :data:`SCATTER_KEYS`)."""

SCATTER_KEYS = _keys("scatter")
"""Moment keys that need the within-class scatter (``ClassMoments.within_quadratic``)."""

PER_CLASS_KEYS = ("class_var", "cdnv_matrix", "cosine_matrix")
"""Per-class arrays of :func:`~nclightning.metrics.class_quantities` (not scalars):
``class_var[K]`` (``V_k``), ``cdnv_matrix[K, K]``, ``cosine_matrix[K, K]``."""

DESCRIPTIONS = {
    **{spec.name: spec.description for spec in REGISTRY},
    "class_var": "V_k, mean squared distance of class k's samples to its mean [K]",
    "cdnv_matrix": "(V_k + V_l) / (2 ||mu_k - mu_l||^2) for every pair [K, K]",
    "cosine_matrix": "cos(mu_k - mu_c, mu_l - mu_c) [K, K] (ETF: -1/(K-1) off the diagonal)",
}
"""One line per key (README tables, figure captions, W&B descriptions)."""
