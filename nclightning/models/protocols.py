"""What the callbacks may ask of a model, stated once: feature descriptions and layer-wise growth.

This module owns the *interfaces* between models and callbacks, not their implementations:

* :class:`FeatureInfo`: one entry of a model's ``feature_info`` (timm's convention, with an
  ``alias``): a layer whose output is a feature space, its width known before any forward
  (docs/science.md §9.7);
* :class:`LayerwiseModel`: the three methods :class:`~nclightning.callbacks.LayerwiseTraining`
  needs to grow a network one stage at a time (docs/science.md §6.2, Fig. 2).

:class:`~nclightning.models.CollapseClassifier` (with the ``mlp`` backbone) implements both; a
user's own ``LightningModule`` implements :class:`LayerwiseModel` by defining its methods (no
base class to inherit, ``isinstance(model, LayerwiseModel)`` checks them structurally).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypedDict, runtime_checkable

from torch import nn

__all__ = ["FeatureInfo", "LayerwiseModel", "prefixed"]


class FeatureInfo(TypedDict):
    """One feature layer of a model, in forward order (timm's ``feature_info`` entries).

    Keys:
        module: the module's name as in ``named_modules()`` of the object that declares the
            entry (``""`` is that object itself: a backbone's penultimate features).
        num_chs: the width ``d`` of the features measured there (channels of a conv map, which
            the collapse callback average-pools to ``[B, d]``).
        reduction: spatial downsampling of a conv map relative to the input (timm's meaning),
            ``None`` for vector outputs.
        alias: the ``feature_layers`` alias whose features are exactly these (``"h0"``,
            ``"penultimate"``), else ``None``.

    Every entry is a distinct feature space: a block whose (pooled) output equals the
    penultimate features, such as the last residual block under global average pooling or
    the last MLP block, is represented by the penultimate entry alone.
    """

    module: str
    num_chs: int
    reduction: int | None
    alias: str | None


def prefixed(entries: Sequence[FeatureInfo], prefix: str) -> list[FeatureInfo]:
    """``entries`` with ``prefix`` (a submodule's name) prepended to each ``module`` name."""
    out: list[FeatureInfo] = []
    for e in entries:
        name = f"{prefix}.{e['module']}" if e["module"] else prefix
        out.append(
            FeatureInfo(
                module=name, num_chs=e["num_chs"], reduction=e["reduction"], alias=e["alias"]
            )
        )
    return out


@runtime_checkable
class LayerwiseModel(Protocol):
    """A model :class:`~nclightning.callbacks.LayerwiseTraining` can grow one stage at a time.

    Stage ``s`` (depth ``s``) trains block ``s - 1`` and the head; blocks ``0 .. s-2`` are the
    frozen part. Parameters in neither the blocks nor the head are left as the model set them.
    """

    def layerwise_blocks(self) -> Sequence[nn.Module]:
        """The growable blocks in forward order; ``len`` is the largest depth."""
        ...

    def set_layerwise_depth(self, depth: int) -> None:
        """Make ``forward`` run blocks ``0 .. depth-1`` and then the head (``1 <= depth``)."""
        ...

    def get_classifier(self) -> nn.Module:
        """The head on top of the deepest active block (re-initialised at each new stage)."""
        ...
