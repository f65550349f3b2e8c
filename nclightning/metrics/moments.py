"""Reduced per-class statistics of a feature matrix (docs/science.md §1-2).

Every collapse metric of docs/science.md §1 and every sufficient statistic the perturbation
solver needs (docs/science.md §2: ``G0 = H0 H0^T``, class sums ``S0 = Y H0^T``, ``D_n = diag(n_k)``)
is a function of four quantities, held here in float64:

* ``counts[K]``: samples per class ``n_k``;
* ``means[K, d]``: class means ``mu_k`` (rows; 0 for a class with no sample);
* ``scatter[d, d]``: pooled within-class scatter ``sum_k sum_i (h_ki - mu_k)(h_ki - mu_k)^T``
  (so ``Sigma_W = scatter / N``);
* ``class_ss[K]``: per-class sum of squared deviations ``sum_i ||h_ki - mu_k||^2``
  (``V_k = class_ss_k / n_k``, used by the CDNV).

Optionally ``class_scatter[K, d, d]`` (per-class scatter matrices) when a caller can afford
``K d^2`` memory; it makes ``class_ss`` transformable under linear maps (perturbation model).

Features are rows (``features[N, d]``), the PyTorch convention; docs/science.md writes columns.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

__all__ = ["ClassMoments"]


@dataclass(frozen=True, eq=False)
class ClassMoments:
    """Float64 per-class moments of a set of features (see module docstring).

    Build from in-memory features with :meth:`from_features` (exact two-pass) or from a
    streaming :class:`~nclightning.metrics.ClassStatistics` via its ``moments()``.
    """

    counts: Tensor  # [K]
    means: Tensor  # [K, d]
    scatter: Tensor  # [d, d]
    class_ss: Tensor  # [K]
    class_scatter: Tensor | None = None  # [K, d, d], optional

    def __post_init__(self) -> None:
        K, d = self.means.shape
        if self.counts.shape != (K,) or self.class_ss.shape != (K,):
            raise ValueError(
                f"counts and class_ss must have shape ({K},), got {tuple(self.counts.shape)} "
                f"and {tuple(self.class_ss.shape)}"
            )
        if self.scatter.shape != (d, d):
            raise ValueError(f"scatter must have shape ({d}, {d}), got {tuple(self.scatter.shape)}")
        if self.class_scatter is not None and self.class_scatter.shape != (K, d, d):
            raise ValueError(
                f"class_scatter must have shape ({K}, {d}, {d}), "
                f"got {tuple(self.class_scatter.shape)}"
            )

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_features(
        cls,
        features: Tensor,
        labels: Tensor,
        num_classes: int | None = None,
        *,
        per_class_scatter: bool = False,
    ) -> ClassMoments:
        """Exact two-pass moments of ``features[N, d]`` with ``labels[N]`` (float64).

        First pass: class means; second pass: deviations from them. ``num_classes`` defaults
        to ``labels.max() + 1``.
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
        d = h.shape[1]
        counts = torch.bincount(y, minlength=K).to(torch.float64)
        if counts.numel() > K:
            raise ValueError(f"labels must lie in 0..{K - 1}, found {int(y.max())}")
        sums = torch.zeros(K, d, dtype=torch.float64, device=h.device).index_add_(0, y, h)
        means = sums / counts.clamp_min(1).unsqueeze(1)
        dev = h - means[y]
        scatter = dev.T @ dev
        class_ss = torch.zeros(K, dtype=torch.float64, device=h.device).index_add_(
            0, y, dev.square().sum(1)
        )
        class_scatter = None
        if per_class_scatter:
            class_scatter = torch.stack([dev[y == k].T @ dev[y == k] for k in range(K)])
        return cls(counts, means, scatter, class_ss, class_scatter)

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

    # -- derived statistics (docs/science.md §1) ------------------------------------------------
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
        """Unweighted mean of the class means of present classes, ``[d]``.

        This is the centre used for ``Sigma_B``, ``M`` (NC2) and NC3; it equals
        :attr:`global_mean` for balanced classes (docs/science.md §1).
        """
        return self.means[self.present].mean(0)

    @property
    def centered_means(self) -> Tensor:
        """``M^T``: rows ``mu_k - mean_of_means`` for present classes, ``[K', d]``."""
        return self.means[self.present] - self.mean_of_means

    @property
    def sigma_w(self) -> Tensor:
        """Within-class covariance ``Sigma_W = scatter / N``, ``[d, d]``."""
        return self.scatter / self.total

    @property
    def sigma_b(self) -> Tensor:
        """Between-class covariance ``(1/K) sum_k (mu_k - mu_c)(mu_k - mu_c)^T``, ``[d, d]``.

        ``mu_c`` is :attr:`mean_of_means`; ``K`` counts present classes.
        """
        m = self.centered_means
        return m.T @ m / m.shape[0]

    @property
    def gram(self) -> Tensor:
        """Uncentred second moment ``sum_i h_i h_i^T`` (``G0 = H0 H0^T`` of docs/science.md §2)."""
        return self.scatter + self.means.T @ (self.counts.unsqueeze(1) * self.means)

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

        def grow(t: Tensor, dims: tuple[int, ...]) -> Tensor:
            pads: list[int] = []
            for axis in reversed(range(t.ndim)):
                pads += [0, extra] if axis in dims else [0, 0]
            return torch.nn.functional.pad(t, pads)

        cs = self.class_scatter
        return replace(
            self,
            means=grow(self.means, (1,)),
            scatter=grow(self.scatter, (0, 1)),
            class_scatter=None if cs is None else grow(cs, (1, 2)),
        )

    def to(self, *args, **kwargs) -> ClassMoments:
        """Move every tensor (``Tensor.to`` semantics)."""
        cs = self.class_scatter
        return replace(
            self,
            counts=self.counts.to(*args, **kwargs),
            means=self.means.to(*args, **kwargs),
            scatter=self.scatter.to(*args, **kwargs),
            class_ss=self.class_ss.to(*args, **kwargs),
            class_scatter=None if cs is None else cs.to(*args, **kwargs),
        )
