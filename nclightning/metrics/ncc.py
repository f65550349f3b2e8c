"""NC4, the nearest-class-centre (NCC) mismatch (docs/science.md §1): :class:`NCCMismatch`.

Owns the NCC decision (:class:`NCCReference`: reference class means, optionally a linear
classifier) and the streaming, DDP-reduced mismatch count :class:`NCCMismatch`:
``NC4 = (1/N) #{i : prediction_i != argmin_k ||h_i - mu_k||}``, with the prediction the
network's (any layer) or a classifier's ``argmax_k (W h_i + b)_k``. Labels play no part. The
class means must be known before the first sample is classified: Papyan's NC4 uses the same
probe's final means (a second sweep over cached features, or a second pass), a held-out
probe's ``nc4_train_means`` the TRAIN probe's means. Also owns
:func:`exact_float32_matmul`, used by every float32 product of this package.

Features are rows (``features[B, d]``); ``weight[K, d]``, ``bias[K]`` follow
``torch.nn.Linear(d, K)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from nclightning.metrics.moments import ClassMoments
from nclightning.metrics.state import Float64States

__all__ = ["NCCMismatch", "NCCReference", "exact_float32_matmul"]


@contextmanager
def exact_float32_matmul() -> Iterator[None]:
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
    accurate when the means are large compared with their spread. Ties go to the lowest
    class index.
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
        self.coincident = mu.shape[0] >= 2 and not bool((mu_c != 0).any())
        """Every eligible mean is the same point: the nearest centre is undefined."""
        self.proj = torch.cat([w, mu_c])  # [K + K', d]: classifier rows, then centred means
        self.bias = w @ self.centre + b  # logits of centred features: W(h - c) + (W c + b)
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, ...]] = {}

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


class NCCMismatch(Float64States, Metric):
    """Streaming NC4: the fraction of samples whose prediction is not the nearest class mean.

    ``update(features[B, d], predictions[B])`` counts rows where ``predictions`` (the class
    each sample is assigned by the network, e.g. the classifier's argmax; any layer's
    features can be compared with it) differs from the nearest reference mean. Without
    ``predictions`` the classifier given here votes (``argmax(W h + b)``). States: two
    float64 ``"sum"`` counters, so torchmetrics' sync adds them across processes.

    Args:
        means: reference class means ``[K, d]`` (identical on every rank), or a
            :class:`ClassMoments` (its ``present`` mask is then the default).
        present: ``[K]`` classes eligible as nearest centre (default: finite rows).
        weight, bias: optional classifier ``W[K, d]``, ``b[K]``.
        compute_dtype: precision of the distances (default: float32, float64 for float64
            features).
        kwargs: ``torchmetrics.Metric`` options.

    :meth:`compute` returns a 0-dim float64 tensor: the mismatch fraction, NaN before any
    sample or when every eligible mean coincides (a dead layer: no nearest centre).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    _F64_STATES = ("mismatches", "samples")
    mismatches: Tensor
    samples: Tensor

    def __init__(
        self,
        means: Tensor | ClassMoments,
        present: Tensor | None = None,
        *,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(means, ClassMoments):
            present = means.present if present is None else present
            means = means.means
        if compute_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be None, float32 or float64, got {compute_dtype}")
        self.compute_dtype = compute_dtype
        self.reference = NCCReference(means, weight, bias, present)
        self.add_state("mismatches", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("samples", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, features: Tensor, predictions: Tensor | None = None) -> None:
        """Count a batch: ``features[B, d]`` (rows), ``predictions[B]`` class indices."""
        ref = self.reference
        if features.ndim != 2 or features.shape[1] != ref.dim:
            raise ValueError(
                f"features must be [B, d] with d={ref.dim} (rows), got {tuple(features.shape)}"
            )
        if predictions is not None and predictions.shape != features.shape[:1]:
            raise ValueError(
                f"predictions must be [B] with B={features.shape[0]}, "
                f"got {tuple(predictions.shape)}"
            )
        if features.device != self.device:
            self.to(features.device)
        x = features.detach()
        dtype = self.compute_dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
        self.mismatches += ref.mismatches(x, dtype, predictions)
        self.samples += x.shape[0]

    def compute(self) -> Tensor:
        """Mismatch fraction (0-dim float64); NaN without samples or with coinciding means."""
        if self.reference.coincident:
            return torch.full((), float("nan"), dtype=torch.float64, device=self.samples.device)
        return self.mismatches / self.samples  # 0 / 0 = NaN before any sample
