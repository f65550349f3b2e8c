"""Backbone registry: name -> constructor ``(input_shape, **kwargs) -> nn.Module``.

Every backbone maps an input batch ``x[B, *input_shape]`` to penultimate features
``[B, out_dim]`` and exposes

* ``out_dim: int``, the feature width ``d``;
* ``feature_layers: dict[str, str]``, alias -> module name relative to the backbone (``""`` is
  the backbone itself): ``"penultimate"`` always, ``"h0"`` (the input of the last same-width
  block, docs/science.md §2) where the architecture has one;
* ``feature_info: list[FeatureInfo]`` (:mod:`nclightning.models.protocols`, timm's
  convention): every distinct feature layer in forward order with its width, known at
  construction, the penultimate features (``""``) last.

=====================  ===============================  ===============================
name                   options (``backbone_kwargs``)    ``h0``
=====================  ===============================  ===============================
``resnet18``           ``width=64``                     ``layer4.0`` (4-D, pooled later)
``resnet18_imagenet``  (none)                           ``layer4.0`` (4-D, pooled later)
``mlp``                ``depth, width, activation,``    ``blocks.{depth-2}`` (depth >= 2)
                       ``batch_norm``
``vgg11_bn``           ``width=64``                     ``features.4.0`` (4-D, pooled later)
=====================  ===============================  ===============================
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from nclightning.models.mlp import MLP
from nclightning.models.resnet import CifarResNet18, ResNet18ImageNet
from nclightning.models.vgg import VGG11BN

__all__ = ["BACKBONES", "build_backbone"]

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": CifarResNet18,
    "resnet18_imagenet": ResNet18ImageNet,
    "mlp": MLP,
    "vgg11_bn": VGG11BN,
}


def build_backbone(name: str, input_shape: Sequence[int], **kwargs: Any) -> nn.Module:
    """Build the backbone ``name`` for samples of shape ``input_shape``.

    ``input_shape`` is ``(C, H, W)`` for images or ``(D,)`` for vectors (the MLP flattens any
    shape; conv nets require ``(C, H, W)``). Raises ``ValueError`` naming the valid choices for
    an unknown name or an unknown option.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid choices: {', '.join(BACKBONES)}")
    factory = BACKBONES[name]
    options = [p for p in inspect.signature(factory).parameters if p != "input_shape"]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ValueError(
            f"backbone {name!r} got unknown option(s) {unknown}; "
            f"valid options: {', '.join(options) or '(none)'}"
        )
    return factory(tuple(int(s) for s in input_shape), **kwargs)
