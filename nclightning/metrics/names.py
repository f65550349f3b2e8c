"""The names of the collapse metrics: the single source every layer of nclightning uses.

Owns the metric keys (the ``{metric}`` part of ``nc-{probe}/{layer}/{metric}``, see
``nclightning.record.keys``), their display order, and which inputs each needs
(docs/science.md §1, §8). Nothing here computes anything.
"""

from __future__ import annotations

__all__ = [
    "CLASSIFIER_KEYS",
    "DESCRIPTIONS",
    "METRIC_KEYS",
    "MOMENT_KEYS",
    "NCC_KEYS",
    "OOD_KEYS",
    "PER_CLASS_KEYS",
    "SCALE_FREE_KEYS",
    "SCALE_KEYS",
    "SCATTER_KEYS",
]

METRIC_KEYS = (
    "nc1",
    "nc1_tilde",
    "cdnv",
    "nc2_etf",
    "nc2_equinorm",
    "nc2_equiangle",
    "nc2_maxangle",
    "gnc2_log",
    "nc3",
    "unc3",
    "nc4",
    "nc4_train_means",
    "nc5",
    "feature_norm",
    "class_mean_norm",
)
"""Every per-layer scalar, in display order (tables, figures, W&B panels)."""

CLASSIFIER_KEYS = ("nc3", "unc3")
"""Scalars that also need the classifier weight ``W[K, d]`` of the layer's features."""

NCC_KEYS = ("nc4", "nc4_train_means")
"""NCC mismatches (:class:`~nclightning.metrics.NCCMismatch`): per-sample predictions against
the same probe's final class means (``nc4``, Papyan's NC4) or against the TRAIN probe's means
(``nc4_train_means``, a held-out probe's NCC generalisation, docs/science.md §8)."""

OOD_KEYS = ("nc5",)
"""Scalars that need the mean feature of an out-of-distribution probe."""

SCALE_KEYS = ("feature_norm", "class_mean_norm")
"""Scalars that measure a layer's scale (not invariant to rescaling its features)."""

SCALE_FREE_KEYS = tuple(k for k in METRIC_KEYS if k not in (*NCC_KEYS, *OOD_KEYS, *SCALE_KEYS))
"""Scalars of the moments and the classifier that rescaling the features leaves unchanged."""

MOMENT_KEYS = tuple(k for k in METRIC_KEYS if k not in (*CLASSIFIER_KEYS, *NCC_KEYS, *OOD_KEYS))
"""Scalars computed from class moments alone (:func:`~nclightning.metrics.metrics_from_moments`).

``nc1`` needs the within-class scatter (full, or projected on the span of the class means)
and ``feature_norm`` the per-class norm sums; each is left out when its statistic was not
accumulated (see :data:`SCATTER_KEYS`)."""

SCATTER_KEYS = ("nc1",)
"""Moment keys that need the within-class scatter (``ClassMoments.within_quadratic``)."""

PER_CLASS_KEYS = ("class_var", "cdnv_matrix", "cosine_matrix")
"""Per-class arrays of :func:`~nclightning.metrics.class_quantities` (not scalars):
``class_var[K]`` (``V_k``), ``cdnv_matrix[K, K]``, ``cosine_matrix[K, K]``."""

DESCRIPTIONS = {
    "nc1": "(1/K) Tr(Sigma_W Sigma_B^+), within- over between-class variability (Papyan)",
    "nc1_tilde": "Tr(Sigma_W) / Tr(Sigma_B) (Tirer et al., Eq. 3)",
    "cdnv": "mean over class pairs of (V_k + V_l) / (2 ||mu_k - mu_l||^2) (Galanti et al.)",
    "nc2_etf": "distance of the centred class-mean Gram matrix from the simplex ETF",
    "nc2_equinorm": "std / mean of the centred class-mean norms (Papyan NC2a)",
    "nc2_equiangle": "std of the cosines between centred class means (Papyan NC2b)",
    "nc2_maxangle": "max |cos + 1/(K-1)| over pairs of centred class means",
    "gnc2_log": "variance of log(1/||u_k - u_l||) over pairs (hyperspherical uniformity)",
    "nc3": "|| W/||W|| - M/||M|| ||_F, classifier-mean self-duality (Papyan NC3)",
    "unc3": "variance of cos(w_k, mu_k - mu_c) over classes (uniform duality)",
    "nc4": "fraction of samples whose prediction differs from the nearest class mean",
    "nc4_train_means": "nc4 of a held-out probe against the TRAIN probe's class means",
    "nc5": "mean |cos(mu_k - mu_c, mu_ood - mu_c)|, ID/OOD orthogonality (Ammar et al.)",
    "feature_norm": "mean feature norm ||h_i|| over samples",
    "class_mean_norm": "mean over classes of ||mu_k - mu_c||",
    "class_var": "V_k, mean squared distance of class k's samples to its mean [K]",
    "cdnv_matrix": "(V_k + V_l) / (2 ||mu_k - mu_l||^2) for every pair [K, K]",
    "cosine_matrix": "cos(mu_k - mu_c, mu_l - mu_c) [K, K] (ETF: -1/(K-1) off the diagonal)",
}
"""One line per key (README tables, figure captions, W&B descriptions)."""
