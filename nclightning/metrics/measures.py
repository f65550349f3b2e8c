"""The further collapse measures of docs/science.md §8, from class moments (no extra pass).

Owns ``gnc2_log`` (hyperspherical uniformity), ``unc3`` (uniform duality), ``nc5`` (ID/OOD
orthogonality), ``feature_norm``, ``class_mean_norm``, the per-class arrays of
:func:`class_quantities` and the pairwise CDNV ratios that :func:`~nclightning.metrics.cdnv`
averages. Same conventions as :mod:`nclightning.metrics.formulas` (docs/science.md §9):
centre ``mu_c`` = the mean of the present class means, variances ``ddof=1`` (0 for a single
value), NaN where a formula is undefined (a zero vector in a cosine, coinciding means).

Memory: every pairwise quantity is a ``[K, K]`` float64 matrix (8 MB at K = 1000); no
``[K, K, d]`` tensor is formed. Pairwise distances use the Gram matrix of the centred rows
except for close pairs, where ``|a|^2 + |b|^2 - 2 a.b`` cancels (close class means, close
unit vectors): those are recomputed from explicit differences in chunks
(:func:`pairwise_sq_distances`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from nclightning.metrics.moments import ClassMoments

__all__ = [
    "PAIR_KEYS",
    "TILE",
    "RunningMoments",
    "cdnv_pairs",
    "check_weight",
    "class_mean_norm",
    "class_quantities",
    "feature_norm",
    "gnc2_log",
    "nc5",
    "pair_scalars",
    "pair_scalars_of",
    "pairwise_sq_distances",
    "row_sq_norms",
    "sq_distance_rows",
    "tile_rows",
    "unc3",
    "unc3_of",
]

_NAN = float("nan")


CLOSE_RTOL = 1e-2
"""Pairs whose squared distance is below this fraction of their squared norms (about the
rows' mean) are recomputed from explicit differences (the Gram shortcut loses
``log10(1 / fraction)`` digits there)."""


TILE = 1 << 19
"""Numbers per ``[rows, K]`` tile of a pairwise quantity (4 MiB in float64): no ``[K, K]``
matrix is formed for the scalars, so K = 32768 classes need ``O(K d)`` memory."""


def tile_rows(n: int, tile: int = TILE) -> list[slice]:
    """Row blocks of an ``[n, n]`` pairwise matrix with at most ``tile`` numbers each."""
    step = max(1, tile // max(1, n))
    return [slice(a, min(a + step, n)) for a in range(0, n, step)]


_SQ_ROWS = 64  # rows squared at a time by row_sq_norms


def row_sq_norms(c: Tensor) -> Tensor:
    """``||c_k||^2`` for each row of ``c[n, d]``, ``[n]`` (a few rows at a time: no ``[n, d]``
    temporary)."""
    if c.shape[0] <= _SQ_ROWS:
        return c.square().sum(1)
    return torch.cat([part.square().sum(1) for part in c.split(_SQ_ROWS)])


def sq_distance_rows(c: Tensor, rows: slice, gram: Tensor | None = None) -> Tensor:
    """Squared distances ``[len(rows), n]`` from the rows ``c[rows]`` to every row of ``c``.

    ``c[n, d]`` must be centred on its mean (see :func:`pairwise_sq_distances`); ``gram``:
    ``c[rows] @ c.T`` when the caller has it. Pairs closer than :data:`CLOSE_RTOL` of their
    squared norms are recomputed from the explicit difference, in chunks.
    """
    return _sq_distance_rows(c, rows, c[rows] @ c.T if gram is None else gram, row_sq_norms(c))


def _sq_distance_rows(c: Tensor, rows: slice, g: Tensor, sq: Tensor) -> Tensor:
    """:func:`sq_distance_rows` given the Gram rows ``g`` and the squared row norms ``sq``;
    in-place steps (at most two ``[len(rows), n]`` temporaries besides ``g``)."""
    norms = sq[rows].unsqueeze(1) + sq.unsqueeze(0)
    d2 = torch.mul(g, -2.0).add_(norms).clamp_min_(0.0)  # the bits of (norms - 2 g).clamp_min(0)
    close = norms.mul_(CLOSE_RTOL).gt_(d2)  # d2 < CLOSE_RTOL * norms, in norms' memory
    i, j = close.nonzero(as_tuple=True)
    del norms, close
    step = max(1, 2**22 // max(1, c.shape[1]))
    for start in range(0, i.numel(), step):
        a, b = i[start : start + step], j[start : start + step]
        d2[a, b] = (c[a + rows.start] - c[b]).square().sum(1)
    return d2


def pairwise_sq_distances(x: Tensor) -> Tensor:
    """Squared Euclidean distances ``[n, n]`` between the rows of ``x[n, d]`` (float64).

    The rows are centred on their mean, distances come from the Gram matrix (one GEMM per
    tile of rows), and every pair closer than :data:`CLOSE_RTOL` of its squared norms is
    recomputed from the explicit difference, in chunks: relative error
    ``<= d eps / CLOSE_RTOL`` (``6e-12`` at d = 512) everywhere, memory ``O(n^2 + n d)``.
    """
    c = x - x.mean(0)
    return torch.cat([sq_distance_rows(c, rows) for rows in tile_rows(c.shape[0])])


class RunningMoments:
    """Count, mean and sum of squared deviations of values added in blocks (Chan et al.'s
    exact pairwise merge: each block two-pass, blocks merged without cancellation)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, values: Tensor) -> None:
        nb = values.numel()
        if not nb:
            return
        mb = float(values.mean())
        m2b = float((values - mb).square_().sum())
        n = self.n + nb
        delta = mb - self.mean
        self.m2 += m2b + delta * delta * self.n * nb / n
        self.mean += delta * nb / n
        self.n = n

    def var(self) -> float:
        """Unbiased variance (``ddof=1``); 0 for a single value."""
        return self.m2 / (self.n - 1) if self.n > 1 else 0.0


def pair_scalars(m: ClassMoments, tile: int = TILE) -> dict[str, float]:
    """The pairwise scalars in one tiled pass over the pairs of present classes.

    ``cdnv`` (mean over ``k != l`` of :func:`cdnv_pairs`'s ratio), ``nc2_etf``,
    ``nc2_equiangle``, ``nc2_maxangle`` (docs/science.md §1; see
    :func:`~nclightning.metrics.formulas.nc2` for the definitions and NaN rules) and
    ``gnc2_log`` (:func:`gnc2_log`), each equal to its ``[K, K]`` formula, from tiles of
    ``tile`` numbers: memory ``O(K d + tile)``, one ``[rows, d] x [d, K]`` GEMM per tile
    and quantity (``O(K^2 d)`` in all). Keys absent when undefined on every pair are NaN.
    """
    mt = m.centered_means
    return pair_scalars_of(m, mt, row_sq_norms(mt), tile)


def pair_scalars_of(m: ClassMoments, mt: Tensor, sq: Tensor, tile: int = TILE) -> dict[str, float]:
    """:func:`pair_scalars` from the centred means ``mt`` of ``m`` and their squared norms
    ``sq`` (:func:`row_sq_norms`); ``m.means`` is not read. A few ``[rows, K]`` tiles live
    at a time (steps in place)."""
    out = dict.fromkeys(PAIR_KEYS, _NAN)
    K = mt.shape[0]
    if K < 2:
        return out
    v = (m.class_ss / m.counts)[m.present]
    gn = float(torch.linalg.matrix_norm(mt.T @ mt if K > mt.shape[1] else mt @ mt.T))
    norms = torch.linalg.vector_norm(mt, dim=1)
    units = bool((norms > 0).all())
    cdnv_sum, cdnv_ok = 0.0, True
    etf_sq, max_angle = 0.0, 0.0
    # the entries of the ETF's normalised Gram (I - 11^T/K)/sqrt(K-1) off and on the diagonal
    etf_off, etf_on = (0.0 - 1.0 / K) / (K - 1) ** 0.5, (1.0 - 1.0 / K) / (K - 1) ** 0.5
    angles, logs, logs_ok = RunningMoments(), RunningMoments(), units
    for rows in tile_rows(K, tile):
        g = mt[rows] @ mt.T
        at = torch.arange(g.shape[0], device=g.device)
        diag = torch.zeros_like(g, dtype=torch.bool)
        diag[at, at + rows.start] = True
        off_diag = diag.logical_not_()
        del diag
        d2 = _sq_distance_rows(mt, rows, g, sq)[off_diag]
        cdnv_ok = cdnv_ok and bool((d2 > 0).all())
        if cdnv_ok:
            ratio = (v[rows].unsqueeze(1) + v.unsqueeze(0))[off_diag].div_(d2.mul_(2.0))
            cdnv_sum += float(ratio.sum())
            del ratio
        del d2
        if gn > 0:
            dev = torch.div(g, gn).sub_(etf_off)  # g / gn - etf, the diagonal redone below
            dev[at, at + rows.start] = g[at, at + rows.start] / gn - etf_on
            etf_sq += float(dev.square_().sum())
            del dev
        if units:
            cos = g.div_(norms[rows].unsqueeze(1) * norms.unsqueeze(0))  # in g's memory
            off = cos[off_diag]
            angles.add(off)
            max_angle = max(max_angle, float(off.add_(1.0 / (K - 1)).abs_().max()))
            del off
            if logs_ok:
                dist = _unit_distances(mt, norms, rows, cos)
                logs_ok = bool((dist > 0).all())
                if logs_ok:
                    logs.add(dist.log_().neg_())
                del dist
        del g, off_diag
    if cdnv_ok:
        out["cdnv"] = cdnv_sum / (K * (K - 1))
    if gn > 0:
        out["nc2_etf"] = etf_sq**0.5
        if units:
            out["nc2_equiangle"] = angles.var() ** 0.5
            out["nc2_maxangle"] = max_angle
    if logs_ok:
        out["gnc2_log"] = logs.var()
    return out


def _unit_distances(mt: Tensor, norms: Tensor, rows: slice, cos: Tensor) -> Tensor:
    """``||u_k - u_l||`` for ``k`` in ``rows``, ``l > k``, ``u = mt / norms``, from the
    cosines ``cos[rows, K]`` (``2 - 2 cos``; overwrites ``cos``), close pairs recomputed
    from the difference."""
    K = mt.shape[0]
    cols = torch.arange(K, device=mt.device)
    upper = cols.unsqueeze(0) > cols[rows].unsqueeze(1)
    d2 = cos.mul_(-2.0).add_(2.0).clamp_min_(0.0)  # the bits of (2 - 2 cos).clamp_min(0)
    i, j = ((d2 < 2.0 * CLOSE_RTOL) & upper).nonzero(as_tuple=True)
    step = max(1, 2**22 // max(1, mt.shape[1]))
    for start in range(0, i.numel(), step):
        a, b = i[start : start + step], j[start : start + step]
        ua = mt[a + rows.start] / norms[a + rows.start].unsqueeze(1)
        d2[a, b] = (ua - mt[b] / norms[b].unsqueeze(1)).square().sum(1)
    return d2[upper].sqrt_()


PAIR_KEYS = ("cdnv", "nc2_etf", "nc2_equiangle", "nc2_maxangle", "gnc2_log")
"""The scalars of :func:`pair_scalars`."""


def cdnv_pairs(m: ClassMoments) -> Tensor:
    """``(V_k + V_l) / (2 ||mu_k - mu_l||^2)`` over present classes, ``[K', K']``.

    ``V_k = class_ss_k / n_k``. NaN where the two means coincide (the diagonal included).
    """
    p = m.present
    v = m.class_ss[p] / m.counts[p]
    dist2 = pairwise_sq_distances(m.means[p])
    ratio = (v.unsqueeze(0) + v.unsqueeze(1)) / (2 * dist2)
    return torch.where(dist2 > 0, ratio, _NAN)


def check_weight(m: ClassMoments, weight: Tensor) -> Tensor:
    """The classifier ``weight[K, d]`` as float64 on the moments' device (shape checked)."""
    w = weight.detach().to(device=m.means.device, dtype=torch.float64)
    if w.shape != m.means.shape:
        raise ValueError(
            f"classifier weight must be [K, d] = {tuple(m.means.shape)}, got {tuple(w.shape)}"
        )
    return w


def _var(x: Tensor) -> float:
    return float(x.var()) if x.numel() > 1 else 0.0


def _unit(rows: Tensor) -> Tensor | None:
    """Rows normalised to unit norm, or ``None`` when a row is 0 (its direction undefined)."""
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    if not bool((norms > 0).all()):
        return None
    return torch.div(rows, norms)


def gnc2_log(m: ClassMoments) -> float:
    """Variance (ddof 1) over pairs ``k < l`` of ``log(1 / ||u_k - u_l||)`` (docs/science.md §8).

    ``u_k = (mu_k - mu_c) / ||mu_k - mu_c||``; hyperspherical uniformity (Liu et al. 2023):
    0 when all pairwise distances are equal (with ``K = 2``, one pair: 0). NaN for ``K < 2``,
    a centred mean equal to 0, or two coinciding directions (an infinite log).
    """
    return pair_scalars(m)["gnc2_log"]


def unc3(m: ClassMoments, weight: Tensor) -> float:
    """Variance (ddof 1) over present ``k`` of ``cos(w_k, mu_k - mu_c)`` (docs/science.md §8).

    Uniform duality: 0 when every classifier row makes the same angle with its centred class
    mean. ``weight = W[K, d]``. NaN for ``K < 2`` or a zero row of ``W`` or of ``M^T``.
    """
    return unc3_of(m, m.centered_means, weight)


def unc3_of(m: ClassMoments, mt: Tensor, weight: Tensor) -> float:
    """:func:`unc3` from the centred means ``mt`` of ``m`` (``m.means`` is not read)."""
    w = check_weight(m, weight)[m.present]
    wu, mu = _unit(w), _unit(mt)
    if mt.shape[0] < 2 or wu is None or mu is None:
        return _NAN
    return _var((wu * mu).sum(1))


def nc5(m: ClassMoments, ood_mean: Tensor) -> float:
    """Mean over present ``k`` of ``|cos(mu_k - mu_c, mu_ood - mu_c)|`` (docs/science.md §8).

    ``ood_mean[d]``: the mean feature of an out-of-distribution probe (NECO, Ammar et al.
    2024). Both vectors are centred on the in-distribution ``mu_c`` (the centre of NC2):
    centring makes the value invariant to a common translation of ID and OOD features, which
    an uncentred cosine is not (post-ReLU features share a large positive offset). NaN for
    ``K < 2``, ``mu_ood = mu_c`` or a centred class mean equal to 0.
    """
    v = ood_mean.detach().to(device=m.means.device, dtype=torch.float64).reshape(-1)
    if v.shape != (m.dim,):
        raise ValueError(f"ood_mean must be [d] = ({m.dim},), got {tuple(ood_mean.shape)}")
    mt = m.centered_means
    mu, vu = _unit(mt), _unit((v - m.mean_of_means).unsqueeze(0))
    if mt.shape[0] < 2 or mu is None or vu is None:
        return _NAN
    return float((mu @ vu[0]).abs().mean())


def feature_norm(m: ClassMoments) -> float:
    """Mean feature norm ``(1/N) sum_i ||h_i||`` (needs ``m.norm_sums``); NaN for ``N = 0``."""
    if m.norm_sums is None:
        raise ValueError("feature_norm needs ClassMoments.norm_sums (per-class sums of ||h_i||)")
    N = m.total
    return float(m.norm_sums.sum()) / N if N > 0 else _NAN


def class_mean_norm(m: ClassMoments) -> float:
    """``(1/K) sum_k ||mu_k - mu_c||`` over present classes; 0 for one class, NaN for none."""
    mt = m.centered_means
    if mt.shape[0] == 0:
        return _NAN
    return float(torch.linalg.vector_norm(mt, dim=1).mean())


def class_quantities(m: ClassMoments) -> dict[str, Tensor]:
    """Per-class arrays of docs/science.md §8 (float64, rows/columns = class indices).

    * ``class_var[K]``: ``V_k = class_ss_k / n_k``;
    * ``cdnv_matrix[K, K]``: ``(V_k + V_l) / (2 ||mu_k - mu_l||^2)``, NaN on the diagonal and
      where two means coincide;
    * ``cosine_matrix[K, K]``: ``cos(mu_k - mu_c, mu_l - mu_c)`` (the simplex ETF has
      ``-1/(K-1)`` off the diagonal), 1 on the diagonal, NaN for a centred mean equal to 0.

    Entries of absent classes are NaN. Memory ``O(K^2 + K d)`` (K = 1000, d = 512: a few
    ``[K, K]`` matrices of 8 MB each).
    """
    K, p = m.num_classes, m.present
    nan = torch.full((K, K), _NAN, dtype=torch.float64, device=m.means.device)
    class_var = torch.where(p, m.class_ss / m.counts.clamp_min(1), _NAN)
    idx = p.nonzero().flatten()
    cdnv_matrix, cosine_matrix = nan.clone(), nan.clone()
    if idx.numel():
        cdnv_matrix[idx.unsqueeze(1), idx] = cdnv_pairs(m)
        mt = m.centered_means
        norms = torch.linalg.vector_norm(mt, dim=1)
        ok = norms > 0
        cos = (mt @ mt.T) / (norms.unsqueeze(0) * norms.unsqueeze(1))
        cos = torch.where(ok.unsqueeze(0) & ok.unsqueeze(1), cos, _NAN)
        cos.diagonal().copy_(torch.where(ok, 1.0, _NAN))
        cosine_matrix[idx.unsqueeze(1), idx] = cos
    return {"class_var": class_var, "cdnv_matrix": cdnv_matrix, "cosine_matrix": cosine_matrix}
