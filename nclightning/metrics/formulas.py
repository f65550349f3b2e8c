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

from collections.abc import Callable

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

_NC1_ROWS = 128  # directions v_i formed at a time in nc1
# numbers per [rows, K] tile of the pairwise pass of metrics_from_moments (1 MiB; at least 64
# rows: many classes need fewer passes over the means); measures.TILE is pair_scalars' own
_PAIR_TILE = 1 << 17

Quadratic = Callable[[Tensor], Tensor]
"""``u^T scatter u`` for each row ``u`` of ``directions[r, d]`` (``[r]``)."""


def _all_finite(t: Tensor, rows: int = 64) -> bool:
    """Whether every entry of ``t`` is finite (``isfinite`` a few rows at a time: on a whole
    ``[K, d]`` matrix it makes ``[K, d]`` float and bool temporaries)."""
    return all(bool(torch.isfinite(part).all()) for part in t.split(rows))


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
    ``M^T = U S V^T`` (``v_i``, ``s_i`` from the smaller Gram matrix,
    :func:`nc1_from_quadratic`), ``Sigma_B = V (S^2/K) V^T`` so
    ``(1/K) Tr(Sigma_W Sigma_B^+) = sum_i (v_i^T Sigma_W v_i) / s_i^2`` over kept ``i``, each
    quadratic form from :meth:`ClassMoments.within_quadratic` (full scatter or its
    projection on the span). Cost ``O(K d^2 + K^2 d)``. NaN for ``K < 2`` or ``Sigma_B = 0``.
    """
    if int(m.present.sum()) < 2:
        return _NAN
    if m.scatter is None and m.span_basis is not None:
        proj = _span_means(m, m.centered_means)
        return nc1_from_quadratic(lambda: proj, m.within_quadratic, m.total, eig_rtol)
    return nc1_from_quadratic(lambda: m.centered_means, m.within_quadratic, m.total, eig_rtol)


def _eigh_(gram: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of a symmetric ``gram``, the eigenvectors written over it.

    ``gram``'s transpose is itself and has the column-major strides that the LAPACK call
    writes its eigenvectors in: given as both input and output, no second ``[n, n]`` matrix
    is made. The same eigenpairs as ``torch.linalg.eigh(gram)``. Input and output aliasing is
    not documented by torch: it is used on CPU only, where host memory is the limit, and
    ``tests/metrics/test_compute_memory.py`` fails loudly if a torch version refuses or
    mishandles it; elsewhere the ordinary call (one more ``[n, n]`` matrix).
    """
    if gram.device.type != "cpu":
        lam, vec = torch.linalg.eigh(gram)
        return lam, vec
    col = gram.mT
    lam = gram.new_empty(gram.shape[0])
    torch.linalg.eigh(col, out=(lam, col))
    return lam, col


def nc1_from_quadratic(
    centred_means: Callable[[], Tensor],
    within: Quadratic,
    total: float,
    eig_rtol: float,
    rows: Callable[[int, int], Tensor] | None = None,
) -> float:
    """:func:`nc1` from its parts: ``centred_means()`` returns ``M^T [K', d]``, ``within``
    the quadratic forms of the scatter, ``total`` the number of samples ``N``; ``rows(a, b)``
    (optional) returns the rows ``a:b`` of ``M^T`` alone. No ``[K', d]`` matrix is held
    during the eigensolver: for ``K' <= d``, ``M^T`` is made again after it (by
    ``centred_means()``, or a block of rows at a time by ``rows``).

    ``sum_i (v_i^T scatter v_i) / (N s_i^2)`` over the kept eigenpairs of ``M M^T``, from
    the smaller of the two Gram matrices (``O(K^2 d)`` and a ``min(K, d)``-sized symmetric
    eigensolver instead of an SVD of ``M^T``, several times faster): for ``K <= d``
    ``M^T M = U S^2 U^T`` and ``v_i = M u_i / s_i``, with ``s_i^2`` taken as
    ``||M u_i||^2``; for ``K > d`` the eigenvectors of ``M M^T`` are the ``v_i``.
    Eigenvalues below ``eig_rtol`` times the largest are dropped (NaN when every eigenvalue
    is 0, or for ``K < 2`` or non-finite means). The ``v_i`` are formed :data:`_NC1_ROWS`
    at a time (no ``[r, d]`` matrix).
    """
    mt = centred_means()
    K, d = mt.shape
    if K < 2 or not _all_finite(mt):
        return _NAN
    gram = mt @ mt.T if K <= d else mt.T @ mt
    del mt  # not held during the eigensolver
    lam, u = _eigh_(gram)
    del gram
    top = float(lam.max())
    if not top > 0:
        return _NAN
    first = int((lam <= eig_rtol * top).sum())  # ascending: the kept ones are the last
    if K <= d and rows is None:
        mt = centred_means()
        rows = lambda a, b: mt[a:b]  # noqa: E731
    parts = []
    for start in range(first, lam.shape[0], _NC1_ROWS):
        cols = u[:, start : start + _NC1_ROWS]
        if K <= d:
            assert rows is not None
            w = _times_rows(cols.T, rows, K)  # [b, d], rows s_i v_i
            ev = w.square().sum(1)
            w.div_(ev.sqrt().unsqueeze(1))
        else:
            w, ev = cols.T.contiguous(), lam[start : start + _NC1_ROWS]
        parts.append(within(w) / total / ev)  # (v_i^T Sigma_W v_i) / s_i^2
        del w
    return float(torch.cat(parts).sum()) if parts else 0.0


def _times_rows(a: Tensor, rows: Callable[[int, int], Tensor], n: int) -> Tensor:
    """``a[b, n] @ X[n, d]`` with the rows of ``X`` from ``rows(start, stop)``, :data:`_NC1_ROWS`
    at a time."""
    out: Tensor | None = None
    for start in range(0, n, _NC1_ROWS):
        stop = min(n, start + _NC1_ROWS)
        block = rows(start, stop)
        if out is None:
            out = a[:, start:stop] @ block
        else:
            out.addmm_(a[:, start:stop], block)
        del block
    assert out is not None
    return out


def nc1_tilde(m: ClassMoments) -> float:
    """``Tr(Sigma_W) / Tr(Sigma_B)`` (Eq. 3 of Tirer et al.; docs/science.md §1).

    ``Tr(Sigma_W) =`` :attr:`ClassMoments.within_ss` ``/ N`` (from ``class_ss`` when no
    scatter matrix was accumulated). NaN when ``Tr(Sigma_B) = 0`` or ``K < 2``.
    """
    return _nc1_tilde(m, measures.row_sq_norms(m.centered_means))


def _nc1_tilde(m: ClassMoments, sq: Tensor) -> float:
    """:func:`nc1_tilde` from the squared norms ``sq[K']`` of the centred means."""
    if sq.shape[0] < 2:
        return _NAN
    tr_b = float(sq.sum()) / sq.shape[0]
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
    mt = m.centered_means
    norms = torch.linalg.vector_norm(mt, dim=1)
    return _nc2(norms, measures.pair_scalars_of(m, mt, measures.row_sq_norms(mt)))


def _nc2(norms: Tensor, pairs: dict[str, float]) -> dict[str, float]:
    """:func:`nc2` from the norms ``[K']`` of the centred means and :func:`pair_scalars`."""
    keys = ("nc2_etf", "nc2_equinorm", "nc2_equiangle", "nc2_maxangle")
    if norms.shape[0] < 2 or not float(norms.max()) > 0:
        return dict.fromkeys(keys, _NAN)
    out = {k: pairs.get(k, _NAN) for k in keys}
    out["nc2_equinorm"] = _std(norms) / float(norms.mean())
    return out


def nc3(m: ClassMoments, weight: Tensor) -> float:
    """Self-duality ``|| W/||W||_F - M^T/||M||_F ||_F`` with ``weight = W[K, d]`` (rows).

    Only rows of present classes are compared. NaN when ``W`` or ``M`` is 0 or ``K < 2``.
    """
    return _nc3(m, m.centered_means, weight)


def _nc3(m: ClassMoments, mt: Tensor, weight: Tensor) -> float:
    w = measures.check_weight(m, weight)[m.present]  # a copy: changed in place below
    wn, mn = float(torch.linalg.matrix_norm(w)), float(torch.linalg.matrix_norm(mt))
    if mt.shape[0] < 2 or not (wn > 0 and mn > 0):
        return _NAN
    return float(torch.linalg.matrix_norm(w.div_(wn).sub_(mt / mn)))


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

    Memory: the centred means once (``[K, d]``) and bounded temporaries (tiles of the pairs,
    the eigenvectors of the smaller Gram matrix), never a copy of the scatter.
    """
    keys = reported_keys(m, weight, ood_mean)
    if weight is not None:
        measures.check_weight(m, weight)
    if not _all_finite(m.means):
        return dict.fromkeys(keys, _NAN)
    first = {"nc1": nc1(m, eig_rtol)} if "nc1" in keys else {}  # before the centred means
    if ood_mean is not None:
        first["nc5"] = measures.nc5(m, ood_mean)
    out = _metrics(m, keys, m.centered_means, weight, eig_rtol)
    out.update(first)
    return {k: out[k] for k in keys}


def metrics_with_nc1(
    moments: Callable[[], ClassMoments],
    nc1: Callable[[], float],
    weight: Tensor | None = None,
    *,
    eig_rtol: float = EIG_RTOL,
) -> dict[str, float]:
    """:func:`metrics_from_moments` of ``moments()`` (without ``ood_mean``), whose ``nc1``
    comes from ``nc1()``: what :meth:`ClassStatistics.compute` uses, for moments made
    without their scatter (:func:`nc1_from_quadratic` on the state's quadratic forms), so
    that no ``d x d`` scatter is formed.

    The other metrics come first, then the moments are released (their means are centred
    in place), then ``nc1()`` runs: the two never hold memory at the same time.
    """
    m = moments()
    keys = tuple(k for k in METRIC_KEYS if k in {"nc1", *reported_keys(m, weight)})
    if weight is not None:
        measures.check_weight(m, weight)
    if not _all_finite(m.means):
        return dict.fromkeys(keys, _NAN)
    out = _metrics(m, keys, centred_(m.means, m.present), weight, eig_rtol)
    del m  # the means, centred or not: free for nc1
    out["nc1"] = nc1()
    return {k: out[k] for k in keys}


def centred_(means: Tensor, present: Tensor) -> Tensor:
    """The rows of present classes minus their mean, ``[K', d]`` (:attr:`ClassMoments.
    centered_means`, the same numbers): in ``means``' memory when every class is present."""
    if bool(present.all()):
        return means.sub_(means.mean(0))
    rows = means[present]
    return rows.sub_(rows.mean(0))


def _metrics(
    m: ClassMoments,
    keys: tuple[str, ...],
    mt: Tensor,
    weight: Tensor | None,
    eig_rtol: float,
) -> dict[str, float]:
    """The metrics of ``keys`` but ``nc1`` and ``nc5`` from the centred means ``mt`` of ``m``
    (``m.means`` is not read: the caller may have centred it in place)."""
    out: dict[str, float] = {}
    norms = torch.linalg.vector_norm(mt, dim=1)
    sq = measures.row_sq_norms(mt)
    out["nc1_tilde"] = _nc1_tilde(m, sq)
    # one tiled pass over the pairs of classes: small tiles, of at least 64 rows
    tile = max(_PAIR_TILE, 64 * mt.shape[0])
    pairs = measures.pair_scalars_of(m, mt, sq, tile)
    out["cdnv"] = pairs["cdnv"]
    out.update(_nc2(norms, pairs))
    out["gnc2_log"] = pairs["gnc2_log"]
    if weight is not None:
        out["nc3"] = _nc3(m, mt, weight)
        out["unc3"] = measures.unc3_of(m, mt, weight)
    if "feature_norm" in keys:
        out["feature_norm"] = measures.feature_norm(m)
    out["class_mean_norm"] = float(norms.mean()) if norms.numel() else _NAN
    return out
