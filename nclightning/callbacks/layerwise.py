"""``LayerwiseTraining``: grow an MLP one hidden layer per stage (docs/science.md §6, Fig. 2)."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

__all__ = ["LayerwiseTraining"]


class LayerwiseTraining(Callback):
    """Train an MLP layer by layer: stage ``s`` trains hidden block ``s`` and a fresh classifier.

    The paper's Fig. 2 protocol: add one hidden layer at a time on top of the frozen earlier
    ones and retrain the new layer and the classifier. With ``epochs_per_stage = E``, epoch
    ``e`` runs stage ``depth = min(start_depth + e // E, max_depth)``:

    * the backbone runs its first ``depth`` blocks (``MLP.active_depth``);
    * only block ``depth - 1`` and the classifier are trained; earlier blocks are frozen
      (``requires_grad=False``, eval mode, so batch-norm statistics stay fixed too);
    * at the start of every stage after the first the classifier is re-initialised (seeded by
      ``seed`` and the depth, so a resumed run re-draws the same weights) and the optimizer
      state (momentum) of the classifier and of the new block is cleared.

    The model must be a :class:`~nclightning.models.CollapseClassifier` with the ``mlp``
    backbone (its ``depth`` is the largest depth). Every row the
    :class:`~nclightning.callbacks.NeuralCollapseCallback` logs carries the ``depth`` of the
    probed network (through :meth:`collapse_annotations`); probe every ``E`` epochs to measure
    the deepest features at the end of each stage.
    """

    def __init__(self, epochs_per_stage: int, start_depth: int = 1, seed: int = 0) -> None:
        if epochs_per_stage < 1 or start_depth < 1:
            raise ValueError(
                f"epochs_per_stage and start_depth must be >= 1, got {epochs_per_stage}, "
                f"{start_depth}"
            )
        self.epochs_per_stage, self.start_depth, self.seed = epochs_per_stage, start_depth, seed

    @staticmethod
    def _backbone(pl_module: LightningModule) -> nn.Module:
        backbone = getattr(pl_module, "backbone", None)
        if backbone is None or not hasattr(backbone, "active_depth"):
            raise ValueError(
                "LayerwiseTraining needs a CollapseClassifier with the 'mlp' backbone "
                f"(got {type(pl_module).__name__} with {type(backbone).__name__})"
            )
        return backbone

    def depth_at(self, epoch: int, max_depth: int) -> int:
        """The stage's depth during (0-based) training epoch ``epoch``."""
        return min(self.start_depth + epoch // self.epochs_per_stage, max_depth)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Only the depth here: the optimizer (built after setup) must hold every block, so
        # freezing waits for the first training epoch.
        backbone = self._backbone(pl_module)
        if self.start_depth > backbone.depth:
            raise ValueError(f"start_depth {self.start_depth} > the MLP's depth {backbone.depth}")
        backbone.active_depth = self.depth_at(trainer.current_epoch, backbone.depth)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        backbone = self._backbone(pl_module)
        depth = self.depth_at(trainer.current_epoch, backbone.depth)
        new_stage = trainer.current_epoch > 0 and depth != self.depth_at(
            trainer.current_epoch - 1, backbone.depth
        )
        self._apply(pl_module, depth)
        if new_stage:
            self._fresh_classifier(trainer, pl_module, depth)

    def _apply(self, pl_module: LightningModule, depth: int) -> None:
        backbone = self._backbone(pl_module)
        backbone.active_depth = depth
        for i, block in enumerate(backbone.blocks):
            trainable = i == depth - 1
            block.requires_grad_(trainable)
            block.train(trainable and pl_module.training)

    def _fresh_classifier(self, trainer: Trainer, pl_module: LightningModule, depth: int) -> None:
        classifier = pl_module.classifier
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + depth)
            classifier.reset_parameters()
        fresh = {
            *classifier.parameters(),
            *self._backbone(pl_module).blocks[depth - 1].parameters(),
        }
        for optimizer in trainer.optimizers:
            for p in fresh:
                optimizer.state.pop(p, None)

    def collapse_annotations(
        self, trainer: Trainer, pl_module: LightningModule
    ) -> dict[str, float]:
        """``{"depth": active depth}``, added to the NeuralCollapseCallback's rows."""
        return {"depth": float(self._backbone(pl_module).active_depth)}
