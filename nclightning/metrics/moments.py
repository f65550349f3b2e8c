"""Reduced per-class statistics of a feature matrix: :class:`ClassMoments` (docs/science.md §1-2).

Every collapse metric of docs/science.md §1 and §8 and every sufficient statistic the
perturbation solver needs (docs/science.md §2: ``G0 = H0 H0^T``, class sums ``S0 = Y H0^T``,
``D_n = diag(n_k)``) is a function of these float64 quantities:

* ``counts[K]``: samples per class ``n_k``;
* ``means[K, d]``: class means ``mu_k`` (rows; 0 for a class with no sample);
* ``scatter[d, d]`` (optional): pooled within-class scatter
  ``sum_k sum_i (h_ki - mu_k)(h_ki - mu_k)^T`` (so ``Sigma_W = scatter / N``);
* ``class_ss[K]``: per-class sum of squared deviations ``sum_i ||h_ki - mu_k||^2``
  (``V_k = class_ss_k / n_k``; ``Tr(scatter) = sum_k class_ss_k``);
* ``class_scatter[K, d, d]`` (optional): per-class scatter matrices (``K d^2`` memory); they
  make ``class_ss`` transformable under linear maps (the perturbation model's cdnv);
* ``span_basis[d, r]``, ``span_scatter[r, r]`` (optional): the scatter projected on an
  orthonormal basis of the span of the centred class means, ``B^T scatter B``: all that NC1
  needs, at ``O(N d K)`` accumulation cost instead of ``O(N d^2)``;
* ``norm_sums[K]`` (optional): ``sum_i ||h_ki||`` per class (the mean feature norm).

Features are rows (``features[N, d]``), the PyTorch convention; docs/science.md writes columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch import Tensor

from nclightning.errors import ConfigurationError

__all__ = ["SPAN_RTOL", "ClassMoments"]

SPAN_RTOL = 1e-6
"""Largest relative norm of a direction's component outside ``span_basis`` that
:meth:`ClassMoments.within_quadratic` accepts (that component's scatter is unknown)."""


_QUAD_ROWS = 128  # directions per block in ClassMoments.within_quadratic


def _check_shape(name: str, t: Tensor | None, shape: tuple[int, ...]) -> None:
    if t is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


@dataclass(frozen=True, eq=False)
class ClassMoments:
    """Float64 per-class moments of a set of features (see the module docstring).

    Build from in-memory features with :meth:`from_features` (exact two-pass) or from a
    streaming :class:`~nclightning.metrics.ClassStatistics` via its ``moments()``.
    Keep the positional order ``counts, means, scatter, class_ss, class_scatter``.
    """

    counts: Tensor  # [K]
    means: Tensor  # [K, d]
    scatter: Tensor | None  # [d, d], None when not accumulated
    class_ss: Tensor  # [K]
    class_scatter: Tensor | None = None  # [K, d, d]
    span_basis: Tensor | None = None  # [d, r], orthonormal columns
    span_scatter: Tensor | None = None  # [r, r] = span_basis^T scatter span_basis
    norm_sums: Tensor | None = None  # [K], sum_i ||h_i|| per class

    def __post_init__(self) -> None:
        if self.means.ndim != 2:
            raise ValueError(f"means must be [K, d], got shape {tuple(self.means.shape)}")
        K, d = self.means.shape
        for name in ("counts", "class_ss", "norm_sums"):
            _check_shape(name, getattr(self, name), (K,))
        _check_shape("scatter", self.scatter, (d, d))
        _check_shape("class_scatter", self.class_scatter, (K, d, d))
        if (self.span_basis is None) != (self.span_scatter is None):
            raise ValueError("span_basis and span_scatter go together: give both or neither")
        if self.span_basis is not None:
            if self.span_basis.ndim != 2 or self.span_basis.shape[0] != d:
                raise ValueError(
                    f"span_basis must be [d, r] with d={d}, got {tuple(self.span_basis.shape)}"
                )
            r = self.span_basis.shape[1]
            _check_shape("span_scatter", self.span_scatter, (r, r))

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_features(
        cls,
        features: Tensor,
        labels: Tensor,
        num_classes: int | None = None,
        *,
        per_class_scatter: bool = False,
        norm_sums: bool = False,
    ) -> ClassMoments:
        """Exact two-pass float64 moments of ``features[N, d]`` with ``labels[N]``.

        First pass: class means; second pass: deviations from them. ``num_classes``
        defaults to ``labels.max() + 1``. Includes ``scatter``; ``class_scatter`` with
        ``per_class_scatter``; ``norm_sums`` (hence ``feature_norm``) with ``norm_sums``
        (off by default: moments that a model transforms, like the perturbation model's
        ``H*``, cannot carry them).
        """
        if features.ndim != 2:
            raise ValueError(f"features must be [N, d], got shape {tuple(features.shape)}")
        if labels.shape != features.shape[:1]:
            raise ValueError(
                f"labels must be [N] with N={features.shape[0]}, got {tuple(labels.shape)}"
            )
        h = features.detach().to(torch.float64)
        y = labels.detach().to(device=h.device, dtype=torch.long)
        K = int(num_classes) if num_classes is not None else int(y.max()) + 1 if y.numel() else 0
        counts = torch.bincount(y, minlength=K).to(torch.float64)
        if counts.numel() > K:
            raise ValueError(f"labels must lie in 0..{K - 1}, found {int(y.max())}")
        zeros = torch.zeros(K, dtype=torch.float64, device=h.device)
        sums = torch.zeros(K, h.shape[1], dtype=torch.float64, device=h.device).index_add_(0, y, h)
        means = sums / counts.clamp_min(1).unsqueeze(1)
        dev = h - means[y]
        class_ss = zeros.clone().index_add_(0, y, dev.square().sum(1))
        sums_of_norms = None
        if norm_sums:
            sums_of_norms = zeros.clone().index_add_(0, y, torch.linalg.vector_norm(h, dim=1))
        class_scatter = None
        if per_class_scatter:
            class_scatter = torch.stack([dev[y == k].T @ dev[y == k] for k in range(K)])
        return cls(counts, means, dev.T @ dev, class_ss, class_scatter, norm_sums=sums_of_norms)

    # -- shapes -----------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def total(self) -> float:
        """``N``, the number of samples."""
        return float(self.counts.sum())

    @property
    def present(self) -> Tensor:
        """Boolean mask ``[K]`` of classes with at least one sample."""
        return self.counts > 0

    # -- derived statistics (docs/science.md §1) --------------------------------------------
    @property
    def class_sums(self) -> Tensor:
        """``S0^T`` in docs/science.md §2 notation, as rows: ``[K, d]`` per-class feature sums."""
        return self.counts.unsqueeze(1) * self.means

    @property
    def global_mean(self) -> Tensor:
        """Sample mean ``mu_G = (1/N) sum_i h_i``, ``[d]`` (Papyan's mu_G)."""
        return self.class_sums.sum(0) / self.total

    @property
    def mean_of_means(self) -> Tensor:
        """Unweighted mean ``mu_c`` of the class means of present classes, ``[d]``.

        The centre of ``Sigma_B``, ``M`` (NC2), NC3 and the measures of docs/science.md §8;
        it equals :attr:`global_mean` for balanced classes (docs/science.md §9).
        """
        present = self.present
        if bool(present.all()):  # no [K, d] copy of the means
            return self.means.mean(0)
        return self.means[present].mean(0)

    @property
    def centered_means(self) -> Tensor:
        """``M^T``: rows ``mu_k - mean_of_means`` for present classes, ``[K', d]`` (one new
        ``[K', d]`` tensor; compute it once where several metrics need it)."""
        present = self.present
        if bool(present.all()):
            return self.means - self.means.mean(0)
        rows = self.means[present]
        return rows.sub_(rows.mean(0))

    @property
    def within_ss(self) -> float:
        """``Tr(scatter) = sum_k class_ss_k``: from ``class_ss`` (every scatter mode has it;
        streamed, it is the more accurate of the two), or from ``scatter`` when ``class_ss``
        is not finite (the perturbation model's ``H*`` without per-class scatter)."""
        total = float(self.class_ss.sum())
        if not math.isfinite(total) and self.scatter is not None:
            return float(torch.trace(self.scatter))
        return total

    def _full_scatter(self, what: str) -> Tensor:
        if self.scatter is None:
            raise ConfigurationError(
                f"{what} needs the full within-class scatter [d, d], which these moments do "
                "not hold (accumulated with scatter='none' or a scatter_basis); accumulate "
                "with ClassStatistics(scatter='full') or use ClassMoments.from_features"
            )
        return self.scatter

    @property
    def sigma_w(self) -> Tensor:
        """Within-class covariance ``Sigma_W = scatter / N``, ``[d, d]`` (needs ``scatter``)."""
        return self._full_scatter("sigma_w") / self.total

    @property
    def sigma_b(self) -> Tensor:
        """Between-class covariance ``(1/K) sum_k (mu_k - mu_c)(mu_k - mu_c)^T``, ``[d, d]``.

        ``mu_c`` is :attr:`mean_of_means`; ``K`` counts present classes.
        """
        m = self.centered_means
        return m.T @ m / m.shape[0]

    @property
    def gram(self) -> Tensor:
        """Uncentred second moment ``sum_i h_i h_i^T`` (``G0 = H0 H0^T``, docs/science.md §2)."""
        means = self.means
        return self._full_scatter("gram") + means.T @ (self.counts.unsqueeze(1) * means)

    def within_quadratic(self, directions: Tensor) -> Tensor:
        """``u^T scatter u`` for each row ``u`` of ``directions[r, d]``, ``[r]``.

        From ``scatter`` when present, else from ``span_scatter``: each direction must then
        lie in the span of ``span_basis`` (outside part at most :data:`SPAN_RTOL` of its
        norm). Raises :class:`~nclightning.errors.ConfigurationError` when neither is held.
        """
        u = directions.to(device=self.means.device, dtype=torch.float64)
        if self.scatter is not None:  # a block of directions at a time (bounded temporaries)
            return torch.cat(
                [((b @ self.scatter) * b).sum(1) for b in u.split(_QUAD_ROWS)] or [u.new_zeros(0)]
            )
        if self.span_basis is None or self.span_scatter is None:
            return ((u @ self._full_scatter("within_quadratic (and nc1)")) * u).sum(1)
        a = u @ self.span_basis  # [r, r'] coordinates in the basis
        outside = torch.linalg.vector_norm(u - a @ self.span_basis.T, dim=1)
        if bool((outside > SPAN_RTOL * torch.linalg.vector_norm(u, dim=1)).any()):
            raise ConfigurationError(
                "within_quadratic: a direction lies outside the span of span_basis, where the "
                "scatter was not accumulated; build the basis from these class means "
                "(ClassMoments.mean_span) or accumulate the full scatter"
            )
        return ((a @ self.span_scatter) * a).sum(1)

    def mean_span(self) -> Tensor:
        """Orthonormal basis ``[d, r]`` of the span of the centred class means.

        ``r = min(K' - 1, d)`` columns (``K'`` present classes): the right singular vectors
        of :attr:`centered_means` with the largest singular values (the structural zero is
        dropped, near-zero ones are kept so that nearby means stay inside the span). Pass it
        as ``ClassStatistics(scatter_basis=...)`` to accumulate only what NC1 needs.
        """
        mt = self.centered_means
        r = min(mt.shape[0] - 1, self.dim)
        if r <= 0:
            return mt.new_zeros(self.dim, 0)
        _, _, vh = torch.linalg.svd(mt, full_matrices=False)
        return cast(Tensor, vh[:r].T.contiguous())

    # -- utilities --------------------------------------------------------------------------
    def pad(self, dim: int) -> ClassMoments:
        """The moments of the features zero-padded to ``dim`` coordinates (``dim >= d``).

        Embeds ``H0`` of a narrower layer in a wider layer's space (the perturbation model
        needs ``H0`` and ``H`` in one space, docs/science.md §2): the extra coordinates are 0.
        """
        d = self.dim
        if dim < d:
            raise ValueError(f"cannot pad {d}-dimensional moments to fewer dimensions ({dim})")
        if dim == d:
            return self
        extra = dim - d

        def grow(t: Tensor | None, dims: tuple[int, ...]) -> Tensor | None:
            if t is None:
                return None
            pads: list[int] = []
            for axis in reversed(range(t.ndim)):
                pads += [0, extra] if axis in dims else [0, 0]
            return torch.nn.functional.pad(t, pads)

        return replace(
            self,
            means=torch.nn.functional.pad(self.means, [0, extra]),
            scatter=grow(self.scatter, (0, 1)),
            class_scatter=grow(self.class_scatter, (1, 2)),
            span_basis=grow(self.span_basis, (0,)),
        )

    def to(self, *args: Any, **kwargs: Any) -> ClassMoments:
        """Move every tensor (``Tensor.to`` semantics)."""
        names: tuple[str, ...] = ("counts", "means", "scatter", "class_ss", "class_scatter")
        names += ("span_basis", "span_scatter", "norm_sums")
        moved: dict[str, Any] = {}
        for name in names:
            t = getattr(self, name)
            moved[name] = None if t is None else t.to(*args, **kwargs)
        return replace(self, **moved)
