"""The collapse metrics of docs/science.md §1 from class moments, and :func:`metrics_from_moments`.

Owns NC1, NC1-tilde, CDNV, NC2 (ETF, equinorm, equiangle, max-angle) and NC3, plus the one
function that returns every scalar of :data:`~nclightning.metrics.names.METRIC_KEYS`
computable from a :class:`~nclightning.metrics.moments.ClassMoments` (the measures of
docs/science.md §8 live in :mod:`nclightning.metrics.measures`). Values are Python floats.

Conventions (docs/science.md §9):

* ``Sigma_B``, ``M`` (NC2), NC3 and the §8 measures centre the class means on the *mean of
  class means* ``mu_c`` (:attr:`ClassMoments.mean_of_means`); balanced: the sample mean.
* ``K`` is the number of classes present; absent classes are ignored here (the streaming
  statistics decide whether an absent class is an error).
* Every ``std`` is unbiased (``ddof=1``, as in Papyan et al.'s code); the std of a single
  value is 0.
* The pseudo-inverse in NC1 drops eigenvalues of ``Sigma_B`` below ``eig_rtol`` times the
  largest one (default :data:`EIG_RTOL`).
* Undefined values are NaN, never an exception: a ratio whose denominator is 0 (coinciding
  class means, ``Sigma_B = 0``, a zero classifier), a cosine with a zero vector, fewer than
  two classes. NC1 with ``Sigma_B = 0`` is NaN although ``pinv(0) = 0`` would give 0: a
  dead layer must not read as perfect collapse.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nclightning.errors import ConfigurationError
from nclightning.metrics import measures
from nclightning.metrics.moments import SPAN_RTOL, ClassMoments
from nclightning.metrics.names import METRIC_KEYS, MOMENT_KEYS

__all__ = [
    "EIG_RTOL",
    "cdnv",
    "metrics_from_moments",
    "nc1",
    "nc1_tilde",
    "nc2",
    "nc3",
    "reported_keys",
]

EIG_RTOL = 1e-10
"""Relative eigenvalue cut-off of the pseudo-inverse ``Sigma_B^+`` in NC1.

``Sigma_B`` has rank at most ``K - 1`` (its centred means sum to zero); eigenvalues below
``EIG_RTOL * lambda_max`` are treated as zero. In float64 the structural zero sits near
``1e-30 lambda_max``, far below the cut-off, while genuine between-class directions of a
network's features sit far above it."""

_NAN = float("nan")


def _span_means(m: ClassMoments, mt: Tensor) -> Tensor:
    """``mt`` projected on ``m.span_basis`` (checked to lie there up to :data:`SPAN_RTOL`)."""
    basis = m.span_basis
    assert basis is not None
    proj = (mt @ basis) @ basis.T
    if float(torch.linalg.matrix_norm(mt - proj)) > SPAN_RTOL * float(torch.linalg.matrix_norm(mt)):
        raise ConfigurationError(
            "nc1: the class means do not lie in the span of span_basis (the scatter was "
            "accumulated on another span); build the basis from these class means "
            "(ClassMoments.mean_span) or accumulate the full scatter"
        )
    return proj


def nc1(m: ClassMoments, eig_rtol: float = EIG_RTOL) -> float:
    """``(1/K) Tr(Sigma_W Sigma_B^+)`` (Papyan et al. 2020; docs/science.md §1).

    Computed in the range of the centred means ``M^T [K, d]``: with the thin SVD
    ``M^T = U S V^T`` (``v_i``, ``s_i`` from the smaller Gram matrix, :func:`_between_eig`),
    ``Sigma_B = V (S^2/K) V^T`` so ``(1/K) Tr(Sigma_W Sigma_B^+) =
    sum_i (v_i^T Sigma_W v_i) / s_i^2`` over kept ``i``, each quadratic form from
    :meth:`ClassMoments.within_quadratic` (full scatter or its projection on the span).
    Cost ``O(K d^2 + K^2 d)``. NaN for ``K < 2`` or ``Sigma_B = 0``.
    """
    mt = m.centered_means  # [K, d]
    if mt.shape[0] < 2:
        return _NAN
    if m.scatter is None and m.span_basis is not None:
        mt = _span_means(m, mt)
    ev, vh = _between_eig(mt, eig_rtol)
    if vh is None:
        return _NAN
    quad = m.within_quadratic(vh) / m.total  # v_i^T Sigma_W v_i
    return float((quad / ev).sum())


def _between_eig(mt: Tensor, eig_rtol: float) -> tuple[Tensor, Tensor | None]:
    """Kept eigenpairs of ``M M^T = mt^T mt``: ``(s_i^2 [r], v_i as rows [r, d])``.

    From the smaller of the two Gram matrices (``O(K^2 d)`` and a ``min(K, d)``-sized
    symmetric eigensolver instead of an SVD of ``mt``, several times faster): for ``K <= d``
    ``mt mt^T = U S^2 U^T`` and ``v_i = mt^T u_i / s_i``, with ``s_i^2`` taken as
    ``||mt^T u_i||^2``. Eigenvalues below ``eig_rtol`` times the largest are dropped;
    ``(ev, None)`` when every eigenvalue is 0.
    """
    K, d = mt.shape
    if K <= d:
        lam, u = torch.linalg.eigh(mt @ mt.T)
    else:
        lam, u = torch.linalg.eigh(mt.T @ mt)
    top = float(lam.max())
    if not top > 0:
        return lam, None
    u = u[:, lam > eig_rtol * top]
    if K > d:
        return lam[lam > eig_rtol * top], u.T.contiguous()
    w = u.T @ mt  # [r, d], rows s_i v_i
    ev = w.square().sum(1)
    return ev, w.div_(ev.sqrt().unsqueeze(1))


def nc1_tilde(m: ClassMoments) -> float:
    """``Tr(Sigma_W) / Tr(Sigma_B)`` (Eq. 3 of Tirer et al.; docs/science.md §1).

    ``Tr(Sigma_W) =`` :attr:`ClassMoments.within_ss` ``/ N`` (from ``class_ss`` when no
    scatter matrix was accumulated). NaN when ``Tr(Sigma_B) = 0`` or ``K < 2``.
    """
    mt = m.centered_means
    if mt.shape[0] < 2:
        return _NAN
    tr_b = float(mt.square().sum()) / mt.shape[0]
    return m.within_ss / m.total / tr_b if tr_b > 0 else _NAN


def cdnv(m: ClassMoments) -> float:
    """Mean over ``k != l`` of ``(V_k + V_l) / (2 ||mu_k - mu_l||^2)`` (Galanti et al. 2022).

    NaN for ``K < 2`` or when two class means coincide (see
    :func:`~nclightning.metrics.measures.cdnv_pairs`).
    """
    return measures.pair_scalars(m)["cdnv"]


def _std(x: Tensor) -> float:
    return float(x.std()) if x.numel() > 1 else 0.0


def nc2(m: ClassMoments) -> dict[str, float]:
    """ETF distance, equinorm and equiangularity of the centred class means (docs/science.md §1).

    * ``nc2_etf = || G/||G||_F - (I - 11^T/K)/sqrt(K-1) ||_F`` with ``G = M^T M``;
    * ``nc2_equinorm = std_k ||mu_k - mu_c|| / mean_k ||mu_k - mu_c||``;
    * ``nc2_equiangle = std_{k != l} cos(mu_k - mu_c, mu_l - mu_c)``;
    * ``nc2_maxangle = max_{k != l} |cos + 1/(K-1)|``.

    NaN where undefined: every value for ``K < 2`` or ``M = 0``; the two angle values when a
    centred mean is 0 (its cosines are undefined). The pairwise values come from the tiled
    pass :func:`~nclightning.metrics.measures.pair_scalars` (no ``[K, K]`` matrix).
    """
    return _nc2(m, measures.pair_scalars(m))


def _nc2(m: ClassMoments, pairs: dict[str, float]) -> dict[str, float]:
    keys = ("nc2_etf", "nc2_equinorm", "nc2_equiangle", "nc2_maxangle")
    mt = m.centered_means
    if mt.shape[0] < 2:
        return dict.fromkeys(keys, _NAN)
    norms = torch.linalg.vector_norm(mt, dim=1)
    if not float(norms.max()) > 0:
        return dict.fromkeys(keys, _NAN)
    out = {k: pairs.get(k, _NAN) for k in keys}
    out["nc2_equinorm"] = _std(norms) / float(norms.mean())
    return out


def nc3(m: ClassMoments, weight: Tensor) -> float:
    """Self-duality ``|| W/||W||_F - M^T/||M||_F ||_F`` with ``weight = W[K, d]`` (rows).

    Only rows of present classes are compared. NaN when ``W`` or ``M`` is 0 or ``K < 2``.
    """
    w = measures.check_weight(m, weight)[m.present]
    mt = m.centered_means
    wn, mn = float(torch.linalg.matrix_norm(w)), float(torch.linalg.matrix_norm(mt))
    if mt.shape[0] < 2 or not (wn > 0 and mn > 0):
        return _NAN
    return float(torch.linalg.matrix_norm(w / wn - mt / mn))


def reported_keys(
    m: ClassMoments, weight: Tensor | None = None, ood_mean: Tensor | None = None
) -> tuple[str, ...]:
    """The keys :func:`metrics_from_moments` returns for these inputs, in display order.

    A metric whose statistic was not accumulated is left out (``nc1`` without any scatter,
    ``feature_norm`` without norm sums); one whose formula is undefined is NaN.
    """
    keys = set(MOMENT_KEYS)
    if m.scatter is None and m.span_basis is None:
        keys.discard("nc1")
    if m.norm_sums is None:
        keys.discard("feature_norm")
    if weight is not None:
        keys |= {"nc3", "unc3"}
    if ood_mean is not None:
        keys.add("nc5")
    return tuple(k for k in METRIC_KEYS if k in keys)


def metrics_from_moments(
    m: ClassMoments,
    weight: Tensor | None = None,
    *,
    ood_mean: Tensor | None = None,
    eig_rtol: float = EIG_RTOL,
) -> dict[str, float]:
    """Every scalar computable from ``m`` (docs/science.md §1, §8), in display order.

    :data:`~nclightning.metrics.names.MOMENT_KEYS` (see :func:`reported_keys` for which),
    plus ``nc3``, ``unc3`` given the classifier ``weight[K, d]`` and ``nc5`` given the mean
    feature ``ood_mean[d]`` of an out-of-distribution probe. Non-finite class means (a
    diverging run) give NaN for every key; a non-finite scatter, ``class_ss`` or norm sum
    gives NaN for the metrics that use it (the perturbation model's ``H*`` has NaN
    ``class_ss`` without per-class scatter: its cdnv is NaN, the rest is defined).
    """
    keys = reported_keys(m, weight, ood_mean)
    if weight is not None:
        measures.check_weight(m, weight)
    if not bool(torch.isfinite(m.means).all()):
        return dict.fromkeys(keys, _NAN)
    out: dict[str, float] = {}
    if "nc1" in keys:
        out["nc1"] = nc1(m, eig_rtol)
    out["nc1_tilde"] = nc1_tilde(m)
    pairs = measures.pair_scalars(m)  # one tiled pass over the pairs of classes
    out["cdnv"] = pairs["cdnv"]
    out.update(_nc2(m, pairs))
    out["gnc2_log"] = pairs["gnc2_log"]
    if weight is not None:
        out["nc3"] = nc3(m, weight)
        out["unc3"] = measures.unc3(m, weight)
    if ood_mean is not None:
        out["nc5"] = measures.nc5(m, ood_mean)
    if "feature_norm" in keys:
        out["feature_norm"] = measures.feature_norm(m)
    out["class_mean_norm"] = measures.class_mean_norm(m)
    return {k: out[k] for k in keys}
