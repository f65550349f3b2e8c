"""H0's class moments in the eigenbasis of its within-class scatter (docs/science.md §2, §10).

Owns the one ``O(d^3)`` step of the perturbation solver. With ``Sw0 = Q diag(s) Q^T`` (pooled
within-class scatter of ``H0``) and every vector of the feature space rotated by ``Q``, the
objective of Eq. 2 with ``H`` eliminated and its derivatives cost ``O(K^2 d)`` instead of
``O(K d^2)`` (:mod:`._model`). Every collapse metric is invariant under this rotation, so the
search over ``beta`` (:mod:`._search`) never rotates back; only a final solve does
(:meth:`Spectrum.to_original`). Rescaling ``H0`` by ``t`` rescales ``s`` by ``t^2`` and the means
by ``t`` and keeps ``Q``: one decomposition serves every normalisation (docs/science.md §7); the
original moments are kept unscaled (``Spectrum.scale`` says by how much ``H0`` is multiplied).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nclightning.errors import DataError
from nclightning.metrics import ClassMoments

__all__ = ["Spectrum", "scale_moments"]


def scale_moments(m: ClassMoments, t: float) -> ClassMoments:
    """Moments of the features ``t * H`` (``t > 0``)."""
    cs = m.class_scatter
    return ClassMoments(
        counts=m.counts,
        means=m.means * t,
        scatter=None if m.scatter is None else m.scatter * (t * t),
        class_ss=m.class_ss * (t * t),
        class_scatter=None if cs is None else cs * (t * t),
    )


@dataclass(frozen=True, eq=False)
class Spectrum:
    """``H0`` as the solver sees it: ``Sw0 = basis diag(s) basis^T``, means in that basis.

    Attributes:
        moments: float64 :class:`ClassMoments` of the features before scaling, original basis.
        scale: ``t``, the solver's ``H0`` is ``t`` times the features of ``moments``.
        s: ``[d]`` eigenvalues of ``t^2 Sw0`` (ascending, rounding negatives set to 0).
        basis: ``[d, d]`` orthonormal eigenvectors (columns).
        means: ``[K, d]`` class means of ``t H0`` in the eigenbasis.
    """

    moments: ClassMoments
    scale: float
    s: Tensor
    basis: Tensor
    means: Tensor

    @classmethod
    def of(cls, m: ClassMoments) -> Spectrum:
        """Eigendecomposition of ``m.scatter`` (float64 moments of ``H0``)."""
        if m.scatter is None:
            raise DataError(
                "the perturbation model needs the full within-class scatter of H0, but these "
                "moments carry none: accumulate H0's statistics with a full scatter"
            )
        if not bool(torch.isfinite(m.scatter).all() and torch.isfinite(m.means).all()):
            raise DataError("H0's moments are not finite (NaN or inf features): cannot solve")
        s, basis = torch.linalg.eigh(0.5 * (m.scatter + m.scatter.T))
        return cls(m, 1.0, s.clamp_min(0.0), basis, m.means @ basis)

    @property
    def counts(self) -> Tensor:
        return self.moments.counts

    def scaled(self, t: float) -> Spectrum:
        """The spectrum of ``t * H0`` (same basis, no new decomposition)."""
        t = float(t)
        return Spectrum(self.moments, self.scale * t, self.s * (t * t), self.basis, self.means * t)

    def to_original(self, x: Tensor) -> Tensor:
        """Rows ``x[., d]`` from the eigenbasis back to the original coordinates."""
        return x @ self.basis.T

    def to_eigen(self, x: Tensor) -> Tensor:
        """Rows ``x[., d]`` from the original coordinates into the eigenbasis."""
        return x @ self.basis
