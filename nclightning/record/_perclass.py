"""Per-class quantities of one layer from its snapshot moments (docs/science.md §8).

Private stand-in for ``nclightning.metrics.class_quantities`` (same names, same conventions:
docs/science.md §1, §8) until that lands; :func:`nclightning.record.views.per_class` is the one
caller, so swapping is a one-line change there.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["class_quantities"]


def class_quantities(counts: Tensor, means: Tensor, class_ss: Tensor) -> dict[str, Tensor]:
    """``class_var [K]``, ``cdnv_matrix [K, K]``, ``cosine_matrix [K, K]`` in float64.

    * ``class_var[k] = V_k = class_ss[k] / counts[k]``, the mean ``||h - mu_k||^2`` of class k;
    * ``cdnv_matrix[k, l] = (V_k + V_l) / (2 ||mu_k - mu_l||^2)`` for ``k != l`` (Galanti et
      al. 2022), NaN on the diagonal;
    * ``cosine_matrix[k, l] = cos(mu_k - mu_c, mu_l - mu_c)``, ``mu_c`` the mean of the present
      classes' means (docs/science.md §9), 1 on the diagonal of a non-zero centred mean.
    Rows and columns of an absent class (count 0), and cosines of a zero centred mean, are NaN.
    """
    counts = counts.to(torch.float64)
    means = means.to(torch.float64)
    present = counts > 0
    nan = torch.full_like(counts, float("nan"))
    var = torch.where(present, class_ss.to(torch.float64) / counts.clamp_min(1), nan)
    # explicit differences: |a|^2 + |b|^2 - 2ab cancels for nearby means
    dist2 = torch.cdist(means, means, compute_mode="donot_use_mm_for_euclid_dist").square()
    cdnv = (var.unsqueeze(0) + var.unsqueeze(1)) / (2 * dist2)
    cdnv.fill_diagonal_(float("nan"))
    centre = means[present].mean(0) if bool(present.any()) else means.new_zeros(means.shape[1])
    centred = means - centre
    norms = centred.norm(dim=1)
    unit = centred / norms.unsqueeze(1)  # NaN rows where the centred mean is 0
    cosine = (unit @ unit.T).clamp(-1.0, 1.0)
    absent = ~present
    for m in (cdnv, cosine):
        m[absent, :] = float("nan")
        m[:, absent] = float("nan")
    return {"class_var": var, "cdnv_matrix": cdnv, "cosine_matrix": cosine}
