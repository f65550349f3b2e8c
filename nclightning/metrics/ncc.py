"""NC4, the nearest-class-centre (NCC) mismatch of a classifier (docs/science.md §1).

``NC4 = (1/N) #{i : argmax_k (W h_i + b)_k != argmin_k ||h_i - mu_k||}``. Labels play no
part. The class means ``mu_k`` must be known before the first sample is classified, so a
streaming pass uses *reference* means (those of the previous pass), and in-memory features
use their own exact means in a second sweep (:func:`~nclightning.metrics.collapse_metrics`).

Features are rows (``features[B, d]``); ``weight[K, d]``, ``bias[K]`` follow
``torch.nn.Linear(d, K)``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["NCCReference", "exact_float32_matmul"]


@contextmanager
def exact_float32_matmul():
    """Run float32 matrix products in full IEEE precision (no TF32 / bf16 shortcuts).

    ``torch.set_float32_matmul_precision("high")`` (common with Lightning) would make the
    centred scatter GEMM of :class:`~nclightning.metrics.ClassStatistics` lose ~3 digits.
    """
    prev = torch.get_float32_matmul_precision()
    if prev == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


class NCCReference:
    """Reference class means plus a linear classifier, for counting NC4 mismatches.

    Args:
        means: ``[K, d]`` reference class means (rows).
        weight: ``[K, d]`` classifier weight.
        bias: ``[K]`` classifier bias, or ``None``.
        present: ``[K]`` bool mask of classes eligible as nearest centre (default: rows of
            ``means`` that are finite). The classifier always votes among all ``K`` outputs.

    Everything is stored in float64; :meth:`mismatches` works in the requested precision on
    features re-centred on the mean of the reference means, which keeps float32 decisions
    accurate when the means are large compared with their spread.
    """

    def __init__(
        self,
        means: Tensor,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        present: Tensor | None = None,
    ) -> None:
        means = means.detach().to(torch.float64)
        if means.ndim != 2:
            raise ValueError(f"reference means must be [K, d], got shape {tuple(means.shape)}")
        K, d = means.shape
        if weight is None:  # NCC only: callers compare with predictions they already have
            weight = torch.zeros(0, d, dtype=torch.float64, device=means.device)
            K_w = 0
        else:
            K_w = K
        w = weight.detach().to(device=means.device, dtype=torch.float64)
        if w.shape != (K_w, d):
            raise ValueError(f"classifier weight must be [K, d] = ({K}, {d}), got {tuple(w.shape)}")
        b = torch.zeros(K_w, dtype=torch.float64, device=means.device)
        if bias is not None:
            b = bias.detach().to(device=means.device, dtype=torch.float64)
            if b.shape != (K_w,):
                raise ValueError(f"classifier bias must be [K] = ({K},), got {tuple(b.shape)}")
        if present is None:
            present = torch.isfinite(means).all(1)
        present = present.to(device=means.device, dtype=torch.bool)
        if not bool(present.any()):
            raise ValueError("reference means: no class is present")
        self.num_classes, self.dim = K, d
        self.has_classifier = K_w > 0
        self.classes = present.nonzero().flatten()  # NCC index -> class id
        mu = means[present]
        self.centre = mu.mean(0)  # [d]
        mu_c = mu - self.centre
        self.sq_norms = mu_c.square().sum(1)  # [K']
        self.proj = torch.cat([w, mu_c])  # [K + K', d]: classifier rows, then centred means
        self.bias = w @ self.centre + b  # logits of centred features: W(h - c) + (W c + b)
        self._cache: dict[tuple, tuple[Tensor, ...]] = {}

    def _cast(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, ...]:
        key = (device, dtype)
        if key not in self._cache:
            floats = (self.centre, self.proj, self.bias, self.sq_norms)
            self._cache[key] = (
                *(t.to(device=device, dtype=dtype) for t in floats),
                self.classes.to(device),
            )
        return self._cache[key]

    def predictions(self, features: Tensor, dtype: torch.dtype) -> tuple[Tensor | None, Tensor]:
        """``(classifier argmax, nearest-centre class)`` for ``features[B, d]``, each ``[B]``.

        The classifier's argmax is ``None`` when no classifier was given. Ties go to the
        lowest index (``torch.argmax``/``argmin`` convention).
        """
        centre, proj, bias, sq, classes = self._cast(features.device, dtype)
        K = self.num_classes if self.has_classifier else 0
        xc = features.to(dtype) - centre
        with exact_float32_matmul():
            p = xc @ proj.T  # [B, K + K']
        pred = (p[:, :K] + bias).argmax(1) if K else None
        ncc = classes[(sq - 2 * p[:, K:]).argmin(1)]  # ||x-mu||^2 - ||x||^2, centred
        return pred, ncc

    def mismatches(
        self, features: Tensor, dtype: torch.dtype, predictions: Tensor | None = None
    ) -> Tensor:
        """Number of rows of ``features[B, d]`` where the prediction and the NCC disagree (0-dim).

        The prediction is ``predictions[B]`` when given (e.g. the network's argmax, which for
        the classifier's input layer equals ``argmax(W h + b)``), else the classifier's argmax.
        """
        if features.shape[0] == 0:
            return torch.zeros((), dtype=torch.float64, device=features.device)
        pred, ncc = self.predictions(features, dtype)
        if predictions is not None:
            pred = predictions.to(ncc.device)
        elif pred is None:
            raise ValueError("NC4 needs a classifier (weight) or the predictions of each sample")
        return (pred != ncc).sum().to(torch.float64)
