"""Panel titles of the collapse metrics (docs/science.md §1, §8): each starts with the key."""

from __future__ import annotations

__all__ = ["METRIC_TITLES", "title_of"]

METRIC_TITLES = {
    "nc1": r"nc1: $\mathrm{Tr}(\Sigma_W\Sigma_B^{+})/K$",
    "nc1_tilde": r"nc1_tilde: $\mathrm{Tr}\,\Sigma_W/\mathrm{Tr}\,\Sigma_B$",
    "cdnv": "cdnv: class-distance normalised variance",
    "nc2_etf": "nc2_etf: distance to simplex ETF",
    "nc2_equinorm": "nc2_equinorm: std/mean of mean norms",
    "nc2_equiangle": "nc2_equiangle: std of mean cosines",
    "nc2_maxangle": r"nc2_maxangle: max $|\cos + 1/(K-1)|$",
    "gnc2_log": "gnc2_log: hyperspherical uniformity",
    "nc3": "nc3: self-duality distance",
    "unc3": "unc3: uniform duality",
    "nc4": "nc4: NCC mismatch rate",
    "nc4_train_means": "nc4_train_means: NCC mismatch, train means",
    "nc5": "nc5: ID/OOD orthogonality",
    "feature_norm": r"feature_norm: mean $\|h\|$",
    "class_mean_norm": r"class_mean_norm: mean $\|\mu_k - \mu_c\|$",
    "norm_ratio": r"norm_ratio: RMS $\|H\|$ / RMS $\|H_0\|$",
}
"""Unknown keys are titled by the key itself."""


def title_of(metric: str) -> str:
    return METRIC_TITLES.get(metric, metric)
