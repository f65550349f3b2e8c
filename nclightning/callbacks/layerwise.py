"""``LayerwiseTraining``: grow any model one stage at a time (docs/science.md §6.2, Fig. 2).

This module owns the schedule of layer-wise training (which depth runs in which epoch), the
freezing of the earlier blocks, the fresh head of each stage and the ``depth`` annotation of
the collapse callback's rows. What it needs from the model is the small protocol
:class:`~nclightning.models.protocols.LayerwiseModel` (``layerwise_blocks``,
``set_layerwise_depth``, ``get_classifier``); :class:`~nclightning.models.CollapseClassifier`
with the ``mlp`` backbone implements it, and so can any ``LightningModule``.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from nclightning.errors import ConfigurationError
from nclightning.models.protocols import LayerwiseModel

__all__ = ["LayerwiseTraining"]


def _reset_parameters(head: nn.Module) -> None:
    """Re-initialise every submodule of ``head`` that defines ``reset_parameters``."""
    resettable: list[Any] = [
        m for m in head.modules() if callable(getattr(m, "reset_parameters", None))
    ]
    if not resettable:
        raise ConfigurationError(
            f"LayerwiseTraining re-initialises the head at each stage, but "
            f"{type(head).__name__} has no submodule with reset_parameters(); return a head "
            "made of standard layers (e.g. nn.Linear) from get_classifier()"
        )
    for module in resettable:
        module.reset_parameters()


class LayerwiseTraining(Callback):
    """Train a network stage by stage: stage ``s`` trains block ``s - 1`` and a fresh head.

    The paper's Fig. 2 protocol: add one hidden layer at a time on top of the frozen earlier
    ones and retrain the new layer and the classifier. With ``epochs_per_stage = E``, epoch
    ``e`` (0-based) runs stage ``depth = min(start_depth + e // E, max_depth)``, where
    ``max_depth = len(model.layerwise_blocks())``:

    * the model runs its first ``depth`` blocks (``model.set_layerwise_depth(depth)``);
    * only block ``depth - 1`` and the head (``model.get_classifier()``) are trained; earlier
      blocks are frozen (``requires_grad=False``, eval mode, so batch-norm statistics stay
      fixed too); parameters outside the blocks and the head are left untouched;
    * at the start of every stage after the first the head is re-initialised (every submodule
      with ``reset_parameters``, seeded by ``seed`` and the depth, so a resumed run re-draws
      the same weights) and the optimizer state (momentum) of the head and of the new block is
      cleared.

    The depth is part of the callback's checkpoint state: a resumed run, and ``validate`` or
    ``test`` from a checkpoint (``nclightning measure``), run the network at the depth it was
    trained to, as does ``validate``/``test`` right after ``fit``.

    The model must implement :class:`~nclightning.models.protocols.LayerwiseModel`
    (:class:`~nclightning.models.CollapseClassifier` does with the ``mlp`` backbone). The
    optimizer must hold the parameters of every block (frozen ones get no gradient). Every row
    the :class:`~nclightning.callbacks.NeuralCollapseCallback` logs carries the ``depth`` of
    the probed network (through :meth:`collapse_annotations`); probe every ``E`` epochs to
    measure the deepest features at the end of each stage.
    """

    def __init__(self, epochs_per_stage: int, start_depth: int = 1, seed: int = 0) -> None:
        if epochs_per_stage < 1 or start_depth < 1:
            raise ConfigurationError(
                f"epochs_per_stage and start_depth must be >= 1, got {epochs_per_stage}, "
                f"{start_depth}"
            )
        self.epochs_per_stage, self.start_depth, self.seed = epochs_per_stage, start_depth, seed
        self.depth: int | None = None
        """The depth the model runs now (``None`` before ``setup``)."""
        self._module: weakref.ref[LightningModule] | None = None

    @staticmethod
    def _model(pl_module: LightningModule) -> LayerwiseModel:
        if not isinstance(pl_module, LayerwiseModel):
            raise ConfigurationError(
                f"LayerwiseTraining needs a model implementing nclightning.models.LayerwiseModel "
                f"(layerwise_blocks(), set_layerwise_depth(depth), get_classifier()); "
                f"{type(pl_module).__name__} lacks "
                + ", ".join(
                    name
                    for name in ("layerwise_blocks", "set_layerwise_depth", "get_classifier")
                    if not callable(getattr(pl_module, name, None))
                )
            )
        return pl_module

    def depth_at(self, epoch: int, max_depth: int) -> int:
        """The stage's depth during (0-based) training epoch ``epoch``."""
        return min(self.start_depth + epoch // self.epochs_per_stage, max_depth)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Only the depth here: the optimizer (built after setup) must hold every block, so
        # freezing waits for the first training epoch. A fit starts at its first stage (a
        # checkpoint's depth replaces it in load_state_dict); validate/test after a fit keep
        # the depth the network was trained to.
        model = self._model(pl_module)
        max_depth = len(model.layerwise_blocks())
        if self.start_depth > max_depth:
            raise ConfigurationError(
                f"start_depth {self.start_depth} exceeds the model's {max_depth} blocks"
            )
        self._module = weakref.ref(pl_module)
        depth = self.depth if stage != "fit" else None
        self._set_depth(
            model, depth if depth is not None else self.depth_at(trainer.current_epoch, max_depth)
        )

    def state_dict(self) -> dict[str, int | None]:
        return {"depth": self.depth}

    def load_state_dict(self, state_dict: dict[str, int | None]) -> None:
        """Restore the checkpoint's depth, applied at once: Lightning restores callbacks after
        ``setup`` and before any probe (``on_train_start``, a ``validate`` pass) runs."""
        depth = state_dict.get("depth")
        module = self._module() if self._module is not None else None
        if depth is not None and module is not None:
            self._set_depth(self._model(module), int(depth))

    def _set_depth(self, model: LayerwiseModel, depth: int) -> None:
        model.set_layerwise_depth(depth)
        self.depth = depth

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        model = self._model(pl_module)
        max_depth = len(model.layerwise_blocks())
        epoch = trainer.current_epoch
        depth = self.depth_at(epoch, max_depth)
        self._set_depth(model, depth)
        self._freeze_all_but(model, depth, training=pl_module.training)
        if epoch > 0 and depth != self.depth_at(epoch - 1, max_depth):
            self._fresh_head(trainer, model, depth)

    @staticmethod
    def _freeze_all_but(model: LayerwiseModel, depth: int, training: bool) -> None:
        """Block ``depth - 1`` trainable (in ``training`` mode), every other block frozen."""
        for i, block in enumerate(model.layerwise_blocks()):
            trainable = i == depth - 1
            block.requires_grad_(trainable)
            block.train(trainable and training)

    def _fresh_head(self, trainer: Trainer, model: LayerwiseModel, depth: int) -> None:
        head = model.get_classifier()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + depth)
            _reset_parameters(head)
        fresh = {*head.parameters(), *model.layerwise_blocks()[depth - 1].parameters()}
        for optimizer in trainer.optimizers:
            for p in fresh:
                optimizer.state.pop(p, None)

    def collapse_annotations(
        self, trainer: Trainer, pl_module: LightningModule
    ) -> dict[str, float]:
        """``{"depth": active depth}``, added to the NeuralCollapseCallback's rows."""
        return {"depth": float(self.depth)} if self.depth is not None else {}
