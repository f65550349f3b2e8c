"""``CollapseClassifier``: feature backbone + linear classifier, trained into the terminal phase.

This module owns the LightningModule (losses, weight-decay groups, schedules, logging) and the
accessors the callbacks use to find things without guessing: ``get_classifier()`` (the final
``nn.Linear``), ``feature_layers`` and ``feature_info`` (:mod:`nclightning.models.protocols`),
and, with the ``mlp`` backbone, the :class:`~nclightning.models.protocols.LayerwiseModel`
methods of layer-wise training (docs/science.md §6.2).

``forward(x)``: ``x[B, *input_shape] -> logits[B, K]``, ``logits = W h + b`` with
``h = features(x)`` ``[B, d]`` and ``W = classifier.weight [K, d]``, ``b = classifier.bias [K]``.

Losses (``loss``):

* ``"ce"``: mean cross-entropy over the batch.
* ``"mse"``: squared error against scaled one-hot targets with an optional weight on the
  true-class coordinate (the rescaling of Hui & Belkin, "Evaluation of Neural Architectures
  Trained with Square Loss vs Cross-Entropy in Classification Tasks", ICLR 2021),
  ``M = mse_target_scale``, ``k = mse_true_class_weight``::

      L = 1/(2B) * sum_i [ k (z_{i,y_i} - M)^2 + sum_{c != y_i} z_{i,c}^2 ]

  With ``M = k = 1`` this is ``1/(2N) ||W H + b 1^T - Y||_F^2``, the data term of the paper's
  Eq. 2 (docs/science.md §2.1, §9.8; features as columns there). Unlike Hui & Belkin there is
  no extra ``1/K`` averaging over the classes.

Weight decay (docs/science.md §6.1, Fig. 3 of Tirer et al.) is applied to *all* parameters, in two
groups: every backbone parameter (conv/linear weights, biases, BN affine parameters) gets
``weight_decay`` (lambda_H in the paper's analogy), every classifier parameter (weight and
bias) gets ``classifier_weight_decay`` (lambda_W; ``None`` means the same as
``weight_decay``). :meth:`CollapseClassifier.parameter_groups` returns those groups.

Learning-rate schedules are per epoch (:class:`EpochLR`): ``multistep`` multiplies the LR by
``gamma`` at each epoch in ``milestones`` (absolute epoch numbers, as ``MultiStepLR``);
``cosine`` anneals to 0 over ``trainer.max_epochs`` (``CosineAnnealingLR`` with
``eta_min = 0``); ``none`` keeps it constant. An optional linear warm-up multiplies the LR of
epochs ``e < warmup_epochs`` by ``(e + 1) / (warmup_epochs + 1)``; the cosine then runs over
the remaining ``max_epochs - warmup_epochs`` epochs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from nclightning.errors import ConfigurationError
from nclightning.models.backbones import build_backbone
from nclightning.models.protocols import FeatureInfo, prefixed

__all__ = ["CollapseClassifier", "EpochLR", "mse_loss"]

_STAGES = ("train", "val", "test")


def mse_loss(
    logits: Tensor, targets: Tensor, scale: float = 1.0, true_class_weight: float = 1.0
) -> Tensor:
    """``1/(2B) sum_i sum_c w_ic (z_ic - M [c = y_i])^2`` with ``w_ic = k`` if ``c = y_i`` else 1.

    ``logits[B, K]``, ``targets[B]`` (int64 class indices); returns a scalar
    (``M = scale``, ``k = true_class_weight``; see the module docstring).
    """
    one_hot = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
    weights = 1.0 + (true_class_weight - 1.0) * one_hot
    return 0.5 * (weights * (logits - scale * one_hot) ** 2).sum(dim=1).mean()


@dataclass(frozen=True)
class EpochLR:
    """LR multiplier for epoch ``e`` (``LambdaLR``); see the module docstring for the formulas."""

    scheduler: Literal["multistep", "cosine", "none"]
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_epochs: int = 0
    max_epochs: int | None = None

    def __call__(self, epoch: int) -> float:
        factor = 1.0
        if epoch < self.warmup_epochs:
            factor = (epoch + 1) / (self.warmup_epochs + 1)
        if self.scheduler == "multistep":
            factor *= self.gamma ** sum(epoch >= m for m in self.milestones)
        elif self.scheduler == "cosine":
            assert self.max_epochs is not None
            span = max(self.max_epochs - self.warmup_epochs, 1)
            t = min(max(epoch - self.warmup_epochs, 0), span)
            factor *= 0.5 * (1.0 + math.cos(math.pi * t / span))
        return factor


class CollapseClassifier(LightningModule):
    """Backbone (``self.backbone``) + ``nn.Linear(d, K)`` (``self.classifier``); batches ``(x, y)``.

    Args:
        num_classes: number of classes ``K``.
        input_shape: shape of one sample, ``(C, H, W)`` or ``(D,)`` (linked from the data).
        backbone: a name in :data:`nclightning.models.BACKBONES`.
        backbone_kwargs: options of that backbone (e.g. ``{"depth": 4, "width": 256}``).
        loss: ``"ce"`` or ``"mse"`` (module docstring).
        mse_target_scale: ``M``, the value of the true-class target for ``mse``.
        mse_true_class_weight: ``k``, the weight of the true-class coordinate for ``mse``.
        bias: whether the classifier has a bias ``b``.
        optimizer: ``"sgd"`` (with ``momentum``, ``nesterov``) or ``"adamw"``.
        lr: base learning rate.
        momentum: SGD momentum (ignored by AdamW).
        nesterov: Nesterov momentum for SGD.
        weight_decay: decay of every backbone parameter (BN and biases included).
        classifier_weight_decay: decay of the classifier weight and bias; ``None`` = same as
            ``weight_decay``.
        scheduler: ``"multistep"``, ``"cosine"`` (over ``trainer.max_epochs``) or ``"none"``.
        milestones: epochs at which ``multistep`` multiplies the LR by ``gamma``.
        gamma: multistep factor.
        warmup_epochs: epochs of linear LR warm-up (0 = none).
        channels_last: use ``torch.channels_last`` for conv-net weights and 4-D inputs (a GPU
            speed option; ignored for vector inputs).
    """

    backbone: Any  # a backbone of nclightning.models.backbones (out_dim, feature_info, ...)

    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, ...],
        backbone: str = "mlp",
        backbone_kwargs: dict[str, Any] | None = None,
        loss: Literal["ce", "mse"] = "ce",
        mse_target_scale: float = 1.0,
        mse_true_class_weight: float = 1.0,
        bias: bool = True,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 5e-4,
        classifier_weight_decay: float | None = None,
        scheduler: Literal["multistep", "cosine", "none"] = "multistep",
        milestones: Sequence[int] = (40, 80),
        gamma: float = 0.1,
        warmup_epochs: int = 0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        for arg, value, choices in (
            ("loss", loss, ("ce", "mse")),
            ("optimizer", optimizer, ("sgd", "adamw")),
            ("scheduler", scheduler, ("multistep", "cosine", "none")),
        ):
            if value not in choices:
                raise ValueError(f"unknown {arg} {value!r}; valid choices: {', '.join(choices)}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.save_hyperparameters()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.backbone = build_backbone(backbone, self.input_shape, **(backbone_kwargs or {}))
        self.classifier = nn.Linear(self.backbone.out_dim, num_classes, bias=bias)
        self.use_channels_last = channels_last and len(self.input_shape) == 3
        if self.use_channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        for stage in _STAGES:
            setattr(self, f"{stage}_acc", MulticlassAccuracy(num_classes, average="micro"))
            setattr(self, f"{stage}_loss", MeanMetric())

    # -- model --------------------------------------------------------------------------------
    @property
    def feature_layers(self) -> dict[str, str]:
        """Alias -> module name (as in ``named_modules()``) of the layers holding features.

        ``"penultimate"`` is ``"backbone"`` (output ``[B, d]``, the input of the classifier);
        ``"h0"``, where the backbone has one, is the module whose output is the input of the
        last same-width block (``backbone.layer4.0`` for the ResNets,
        ``backbone.blocks.{depth-2}`` for an MLP of depth >= 2, ``backbone.features.4.0`` for
        VGG-11). Conv outputs are 4-D ``[B, d, h, w]``: global-average-pool them to ``[B, d]``.
        """
        return {
            alias: f"backbone.{name}" if name else "backbone"
            for alias, name in self.backbone.feature_layers.items()
        }

    @property
    def feature_info(self) -> list[FeatureInfo]:
        """The backbone's ``feature_info`` with module names as in ``named_modules()``.

        Every distinct feature layer in forward order, widths known before any forward; the
        last entry is ``"backbone"`` (alias ``"penultimate"``), the classifier's input.
        """
        return prefixed(self.backbone.feature_info, "backbone")

    def get_classifier(self) -> nn.Linear:
        """The final linear classifier ``W[K, d], b[K]`` (timm's accessor name)."""
        return self.classifier

    def layerwise_blocks(self) -> nn.Sequential:
        """The MLP's hidden blocks (:class:`~nclightning.models.protocols.LayerwiseModel`).

        Raises :class:`~nclightning.errors.ConfigurationError` for another backbone.
        """
        blocks = getattr(self.backbone, "layerwise_blocks", None)
        if blocks is None:
            raise ConfigurationError(
                "layer-wise training grows the 'mlp' backbone one block per stage; this "
                f"CollapseClassifier has backbone {self.hparams['backbone']!r}: "
                "use backbone 'mlp', "
                "or a LightningModule that implements nclightning.models.LayerwiseModel"
            )
        return blocks()

    def set_layerwise_depth(self, depth: int) -> None:
        """Run the first ``depth`` MLP blocks, then the classifier (``LayerwiseModel``)."""
        self.layerwise_blocks()  # the same clear error for a backbone that cannot grow
        self.backbone.set_layerwise_depth(depth)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``[B, d]`` of ``x[B, *input_shape]``."""
        if self.use_channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, K]`` of ``x[B, *input_shape]``."""
        return self.classifier(self.features(x))

    def loss_fn(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The configured loss (``ce`` or ``mse``), averaged over the batch."""
        hp: Any = self.hparams
        if hp.loss == "mse":
            return mse_loss(logits, targets, hp.mse_target_scale, hp.mse_true_class_weight)
        return F.cross_entropy(logits, targets)

    # -- steps --------------------------------------------------------------------------------
    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss_fn(logits, y)
        acc, mean_loss = getattr(self, f"{stage}_acc"), getattr(self, f"{stage}_loss")
        acc.update(logits.detach(), y)
        mean_loss.update(loss.detach(), weight=y.shape[0])  # sample-weighted epoch mean
        # torchmetrics objects reduce across processes themselves (no sync_dist needed).
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/loss", mean_loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Logits of ``batch`` (``(x, y)`` or ``x``)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)

    # -- optimisation -------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups: ``features`` (backbone) and ``classifier``.

        Each is ``{"name", "params", "weight_decay"}``; only trainable parameters
        (``requires_grad``) are included and empty groups are dropped, so frozen layers (e.g.
        layer-wise training, docs/science.md §6.2, Fig. 2) are left out.
        """
        hp: Any = self.hparams
        classifier_wd = (
            hp.weight_decay if hp.classifier_weight_decay is None else hp.classifier_weight_decay
        )
        groups: list[dict[str, Any]] = [
            {"name": "features", "module": self.backbone, "weight_decay": float(hp.weight_decay)},
            {"name": "classifier", "module": self.classifier, "weight_decay": float(classifier_wd)},
        ]
        out = []
        for group in groups:
            params = [p for p in group.pop("module").parameters() if p.requires_grad]
            if params:
                out.append({**group, "params": params})
        return out

    def configure_optimizers(self) -> Any:
        hp: Any = self.hparams
        if hp.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                self.parameter_groups(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov
            )
        else:
            opt = torch.optim.AdamW(self.parameter_groups(), lr=hp.lr)
        if hp.scheduler == "none" and hp.warmup_epochs == 0:
            return opt
        max_epochs = None
        if hp.scheduler == "cosine":
            try:
                max_epochs = getattr(self.trainer, "max_epochs", None)
            except RuntimeError:  # not attached to a Trainer
                max_epochs = None
            if max_epochs is None or max_epochs < 1:
                raise ValueError(
                    "scheduler 'cosine' anneals over trainer.max_epochs; set a positive "
                    f"max_epochs (got {max_epochs})"
                )
        schedule = EpochLR(
            hp.scheduler, tuple(hp.milestones), hp.gamma, hp.warmup_epochs, max_epochs
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
