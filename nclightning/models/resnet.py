"""ResNet-18 feature backbones: the CIFAR variant and torchvision's ImageNet variant.

Both map images ``x[B, C, H, W]`` to globally average-pooled penultimate features
``[B, out_dim]`` (``out_dim = 8 * width``, 512 by default) and keep torchvision's module names
(``conv1, bn1, layer1..layer4``; each ``layerN`` a ``Sequential`` of two ``BasicBlock``).

``layer4`` ends with two blocks of equal width at equal resolution, so the output of
``layer4.0`` (the input of the last residual block) and the pooled output of ``layer4.1`` live
in the same space: ``H0`` and ``H`` of the perturbation model (docs/science.md §2). Both backbones
declare ``feature_layers = {"penultimate": "", "h0": "layer4.0"}`` (names relative to the
backbone, ``""`` = the backbone itself); ``h0`` is a 4-D map the callback pools.

``feature_info`` (:class:`~nclightning.models.protocols.FeatureInfo`, known at construction):
the stem (``relu``), the residual blocks ``layer1.0 .. layer4.0`` and the pooled penultimate
features ``""``, which are the pooled output of ``layer4.1`` (so that block has no entry of its
own). Reductions: CIFAR stem 1, stages 1-2-4-8; ImageNet stem 2, stages 4-8-16-32.

Reference: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016. The CIFAR
variant swaps the 7x7/2 stem + max-pool for a 3x3 stride-1 conv (the widely used
kuangliu/pytorch-cifar layout), keeping 32x32 inputs at 4x4 resolution in ``layer4``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, ResNet

from nclightning.models.protocols import FeatureInfo

__all__ = ["CifarResNet18", "ResNet18ImageNet", "image_shape", "resnet18_feature_info"]

RESNET_FEATURE_LAYERS = {"penultimate": "", "h0": "layer4.0"}


def resnet18_feature_info(
    width: int, stem_reduction: int, layer1_reduction: int
) -> list[FeatureInfo]:
    """``feature_info`` of a ResNet-18 with stage widths ``width * (1, 2, 4, 8)`` (module doc)."""
    info = [FeatureInfo(module="relu", num_chs=width, reduction=stem_reduction, alias=None)]
    for stage in range(4):
        for block in range(2):
            if (stage, block) == (3, 1):  # pooled, it is the penultimate entry below
                continue
            info.append(
                FeatureInfo(
                    module=f"layer{stage + 1}.{block}",
                    num_chs=width * 2**stage,
                    reduction=layer1_reduction * 2**stage,
                    alias="h0" if (stage, block) == (3, 0) else None,
                )
            )
    info.append(FeatureInfo(module="", num_chs=8 * width, reduction=None, alias="penultimate"))
    return info


def image_shape(name: str, input_shape: Sequence[int]) -> tuple[int, int, int]:
    """Return ``input_shape`` as ``(C, H, W)`` or raise a ``ValueError`` naming ``name``."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(
            f"backbone {name!r} is a conv net and needs an image input_shape (C, H, W), "
            f"got {shape}; use backbone 'mlp' for vector inputs"
        )
    return shape


class CifarResNet18(nn.Module):
    """ResNet-18 for small images: 3x3 stride-1 stem, no max-pool, BasicBlocks [2, 2, 2, 2].

    Stage widths ``width * (1, 2, 4, 8)`` (64-128-256-512 by default); stages 2-4 halve the
    resolution. ``forward``: ``x[B, C, H, W] -> features[B, 8 * width]`` (global average pool,
    no ReLU after pooling; the last block ends in a ReLU, so features are non-negative).
    """

    feature_layers: ClassVar[dict[str, str]] = RESNET_FEATURE_LAYERS

    def __init__(self, input_shape: Sequence[int], width: int = 64) -> None:
        super().__init__()
        in_channels = image_shape("resnet18", input_shape)[0]
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = width
        self.layer1 = self._make_layer(width, stride=1)
        self.layer2 = self._make_layer(2 * width, stride=2)
        self.layer3 = self._make_layer(4 * width, stride=2)
        self.layer4 = self._make_layer(8 * width, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim: int = 8 * width
        self.feature_info = resnet18_feature_info(width, stem_reduction=1, layer1_reduction=1)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        first = BasicBlock(self.inplanes, planes, stride=stride, downsample=downsample)
        self.inplanes = planes
        return nn.Sequential(first, BasicBlock(planes, planes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class ResNet18ImageNet(ResNet):
    """torchvision's ``resnet18(weights=None)`` with ``fc = Identity`` (7x7/2 stem + max-pool).

    ``conv1`` is replaced by a freshly initialised 7x7/2 conv when the input has ``C != 3``
    channels. ``forward``: ``x[B, C, H, W] -> features[B, 512]``.
    """

    feature_layers: ClassVar[dict[str, str]] = RESNET_FEATURE_LAYERS

    def __init__(self, input_shape: Sequence[int]) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2])  # == torchvision.models.resnet18(weights=None)
        in_channels = image_shape("resnet18_imagenet", input_shape)[0]
        if in_channels != 3:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.fc = nn.Identity()
        self.out_dim: int = 512 * BasicBlock.expansion
        self.feature_info = resnet18_feature_info(64, stem_reduction=2, layer1_reduction=4)
