"""Inputs of the perturbation API (docs/science.md §2): owns turning ``h0`` (features with
labels, ``ClassMoments`` or anything with ``moments()``) into float64 class moments, and the
one-hot label matrix ``Y^T``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from nclightning.metrics import ClassMoments

__all__ = ["as_moments", "one_hot"]


def as_moments(
    h0: Any, labels: Tensor | None = None, num_classes: int | None = None
) -> tuple[ClassMoments, Tensor | None, Tensor | None]:
    """``(moments, features, labels)`` of ``h0``, all float64 (labels int64).

    ``h0`` is a feature matrix ``[N, d]`` (rows; ``labels[N]`` required), a
    :class:`~nclightning.metrics.ClassMoments`, or any object with a ``moments()`` method
    returning one (e.g. :class:`~nclightning.metrics.ClassStatistics`). ``features`` and
    ``labels`` are ``None`` unless raw features were given.
    """
    if isinstance(h0, Tensor):
        if labels is None:
            raise ValueError("labels are required when h0 is a feature matrix")
        if h0.ndim != 2:
            raise ValueError(f"h0 must be [N, d] (rows), got shape {tuple(h0.shape)}")
        x = h0.detach().to(torch.float64)
        y = labels.detach().to(device=x.device, dtype=torch.long)
        moments = ClassMoments.from_features(x, y, num_classes)
        return moments, x, y
    if labels is not None:
        raise ValueError("labels are only accepted together with a feature matrix h0")
    if not isinstance(h0, ClassMoments):
        if not callable(getattr(h0, "moments", None)):
            raise TypeError(
                "h0 must be a Tensor[N, d], a ClassMoments or an object with a moments() "
                f"method, got {type(h0).__name__}"
            )
        h0 = h0.moments()
    moments = h0.to(torch.float64)
    if num_classes is not None and moments.num_classes != num_classes:
        raise ValueError(f"num_classes={num_classes} but the moments hold {moments.num_classes}")
    if moments.total <= 0:
        raise ValueError("h0 holds no sample")
    return moments, None, None


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """Float64 one-hot rows ``[N, K]`` (``Y^T`` in docs/science.md's column notation)."""
    return torch.nn.functional.one_hot(labels, num_classes).to(torch.float64)
