"""Multi-layer perceptron feature backbone (the layer-wise MLP of docs/science.md §6.2, Fig. 2).

``x[B, *input_shape]`` is flattened to ``[B, D]`` (``D = prod(input_shape)``) and passed
through ``depth`` hidden blocks ``blocks.0 .. blocks.{depth-1}``, each
``Linear -> [BatchNorm1d] -> activation`` of the same ``width``. The output of the last block
is the penultimate feature ``H`` ``[B, width]``; its input passes through the identity module
``h0`` (a tap for hooks): for ``depth >= 2`` it has the same width and is ``H0`` of the
perturbation model (docs/science.md §2).

``active_depth`` (default ``depth``) runs only the first blocks: layer-wise training
(docs/science.md §6.2, Fig. 2; :class:`~nclightning.callbacks.LayerwiseTraining`) grows it one block
per stage, and ``h0`` always taps the input of the deepest active block. The MLP implements the
block half of :class:`~nclightning.models.protocols.LayerwiseModel` (``layerwise_blocks``,
``set_layerwise_depth``); the classifier that owns it supplies the head.

``feature_info`` (:class:`~nclightning.models.protocols.FeatureInfo`, widths known at
construction): ``blocks.0 .. blocks.{depth-2}`` (the last of them is ``h0``'s features at full
depth), then ``""``, the penultimate features (= the output of ``blocks.{depth-1}``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from nclightning.errors import ConfigurationError
from nclightning.models.protocols import FeatureInfo

__all__ = ["MLP"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


class MLP(nn.Module):
    """``depth`` equal-width hidden layers on flattened inputs: ``x[B, ...] -> [B, width]``.

    Args:
        input_shape: shape of one sample, any rank (``(D,)``, ``(C, H, W)``, ...).
        depth: number of hidden blocks (>= 1).
        width: width of every hidden block; ``out_dim == width``.
        activation: one of ``relu``, ``gelu``, ``tanh``, ``identity`` (a deep linear network).
        batch_norm: insert ``BatchNorm1d`` after each ``Linear``; the ``Linear`` then has no
            bias (it would be cancelled by the normalisation).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        depth: int = 3,
        width: int = 512,
        activation: Literal["relu", "gelu", "tanh", "identity"] = "relu",
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"mlp needs depth >= 1 and width >= 1, got {depth=}, {width=}")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown mlp activation {activation!r}; choose one of {sorted(ACTIVATIONS)}"
            )
        in_features = math.prod(int(s) for s in input_shape)
        self.flatten = nn.Flatten()
        blocks = []
        for i in range(depth):
            layers: list[nn.Module] = [
                nn.Linear(in_features if i == 0 else width, width, bias=not batch_norm)
            ]
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(ACTIVATIONS[activation]())
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.Sequential(*blocks)
        self.h0 = nn.Identity()
        self.depth = depth
        self._active_depth = depth
        self.out_dim: int = width
        self.feature_layers: dict[str, str] = {"penultimate": ""}
        if depth >= 2:
            self.feature_layers["h0"] = "h0"
        self.feature_info: list[FeatureInfo] = [
            FeatureInfo(
                module=f"blocks.{i}",
                num_chs=width,
                reduction=None,
                alias="h0" if i == depth - 2 else None,
            )
            for i in range(depth - 1)
        ]
        self.feature_info.append(
            FeatureInfo(module="", num_chs=width, reduction=None, alias="penultimate")
        )

    @property
    def active_depth(self) -> int:
        """Number of blocks ``forward`` runs (``1..depth``)."""
        return self._active_depth

    @active_depth.setter
    def active_depth(self, value: int) -> None:
        if not 1 <= int(value) <= self.depth:
            raise ConfigurationError(f"active_depth must be in 1..{self.depth}, got {value}")
        self._active_depth = int(value)

    def layerwise_blocks(self) -> nn.Sequential:
        """The hidden blocks ``blocks.0 .. blocks.{depth-1}`` (layer-wise growth)."""
        return self.blocks

    def set_layerwise_depth(self, depth: int) -> None:
        """Run the first ``depth`` blocks from now on (sets :attr:`active_depth`)."""
        self.active_depth = depth

    def forward(self, x: Tensor) -> Tensor:
        h = self.flatten(x)
        last = self.active_depth - 1
        for block in self.blocks[:last]:
            h = block(h)
        return self.blocks[last](self.h0(h))
