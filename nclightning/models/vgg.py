"""VGG-11 with batch norm for small images (CIFAR style: no 4096-wide FC head).

Configuration "A" of Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale
Image Recognition", ICLR 2015, with BN after every conv (torchvision's ``vgg11_bn`` feature
extractor) and global average pooling instead of the FC head:

    features.0: conv64              -> max-pool
    features.1: conv128             -> max-pool
    features.2: conv256, conv256    -> max-pool
    features.3: conv512, conv512    -> max-pool
    features.4: conv512, conv512    -> max-pool -> global average pool -> [B, 512]

Every ``convN`` is a ``Sequential(Conv2d 3x3, BatchNorm2d, ReLU)``. Max-pools use
``ceil_mode=True`` so inputs smaller than 32x32 (e.g. 8x8 digits) still work; for even sizes
this is the usual floor pooling. ``features.4.0`` (the input of the last conv block
``features.4.1``) has the same 512 channels as the penultimate features: ``H0`` of the
perturbation model. ``feature_layers = {"penultimate": "", "h0": "features.4.0"}``.

``feature_info`` (:class:`~nclightning.models.protocols.FeatureInfo`, known at construction):
every conv block ``features.i.j`` (reduction ``2^i``, widths 64-128-256-256-512-512-512-512
times ``width / 64``), then the pooled penultimate features ``""``. The last conv block keeps its
own entry: the penultimate features average-pool its *max-pooled* map, a different feature.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from nclightning.models.protocols import FeatureInfo
from nclightning.models.resnet import image_shape

__all__ = ["VGG11BN"]

# Stage widths of VGG-11 ("A") in units of the base width 64.
VGG11_STAGES: tuple[tuple[int, ...], ...] = ((1,), (2,), (4, 4), (8, 8), (8, 8))


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 same-padding conv (no bias, BN follows) -> BatchNorm2d -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class VGG11BN(nn.Module):
    """CIFAR-style VGG-11-BN: ``x[B, C, H, W] -> features[B, 8 * width]`` (512 by default)."""

    feature_layers: ClassVar[dict[str, str]] = {"penultimate": "", "h0": "features.4.0"}

    def __init__(self, input_shape: Sequence[int], width: int = 64) -> None:
        super().__init__()
        in_channels = image_shape("vgg11_bn", input_shape)[0]
        stages = []
        self.feature_info: list[FeatureInfo] = []
        for i, multipliers in enumerate(VGG11_STAGES):
            convs = []
            for j, mult in enumerate(multipliers):
                convs.append(conv_bn_relu(in_channels, mult * width))
                in_channels = mult * width
                alias = "h0" if (i, j) == (4, 0) else None
                self.feature_info.append(
                    FeatureInfo(
                        module=f"features.{i}.{j}", num_chs=in_channels, reduction=2**i, alias=alias
                    )
                )
            stages.append(nn.Sequential(*convs))
        self.features = nn.Sequential(*stages)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim: int = in_channels
        self.feature_info.append(
            FeatureInfo(module="", num_chs=in_channels, reduction=None, alias="penultimate")
        )
        for m in self.modules():  # torchvision's VGG initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.features:
            x = self.pool(stage(x))
        return torch.flatten(self.avgpool(x), 1)
