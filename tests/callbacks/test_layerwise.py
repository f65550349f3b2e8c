"""LayerwiseTraining (paper Fig. 2 protocol, docs/science.md §6)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from support import RecordingLogger

from nclightning import NeuralCollapseCallback
from nclightning.callbacks import LayerwiseTraining
from nclightning.data import SyntheticDataModule
from nclightning.models import CollapseClassifier


def _model(depth=3, batch_norm=True):
    torch.manual_seed(0)
    return CollapseClassifier(
        num_classes=3,
        input_shape=(8,),
        backbone="mlp",
        backbone_kwargs={"depth": depth, "width": 12, "batch_norm": batch_norm},
        lr=0.1,
        scheduler="none",
    )


def _data():
    return SyntheticDataModule(num_classes=3, samples_per_class=20, shape=(8,), batch_size=20)


class Spy(Callback):
    """Snapshots of what LayerwiseTraining set up, taken during each epoch's first batch."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, model, batch, batch_idx):
        if batch_idx:
            return
        blocks = model.backbone.blocks
        opt = trainer.optimizers[0]
        self.seen.append(
            {
                "depth": model.backbone.active_depth,
                "trainable": [all(p.requires_grad for p in b.parameters()) for b in blocks],
                "training": [b.training for b in blocks],
                "classifier": model.classifier.weight.detach().clone(),
                "blocks": [b[0].weight.detach().clone() for b in blocks],
                "momentum": [p in opt.state for p in model.classifier.parameters()],
            }
        )


def test_stages_freeze_earlier_layers_and_refresh_the_classifier():
    spy, model = Spy(), _model()
    Trainer(
        max_epochs=6,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[LayerwiseTraining(2), spy],
        num_sanity_val_steps=0,
    ).fit(model, _data())
    seen = spy.seen
    assert [s["depth"] for s in seen] == [1, 1, 2, 2, 3, 3]
    assert seen[2]["trainable"] == [False, True, False]
    assert seen[4]["trainable"] == [False, False, True]
    assert seen[4]["training"] == [False, False, True]  # frozen BN stays in eval mode
    # frozen blocks do not move during later stages
    assert torch.equal(seen[2]["blocks"][0], seen[5]["blocks"][0])
    assert not torch.equal(seen[0]["blocks"][0], seen[2]["blocks"][0])  # stage 1 trained it
    # a fresh classifier (and no stale momentum) at each stage start; the same draw on resume
    assert not seen[2]["momentum"][0] and seen[1]["momentum"][0]
    with torch.random.fork_rng():
        torch.manual_seed(0 * 1_000_003 + 2)
        fresh = torch.nn.Linear(12, 3)
    assert torch.equal(seen[2]["classifier"], fresh.weight)


def test_rows_carry_the_probed_depth():
    logger = RecordingLogger()
    cb = NeuralCollapseCallback(
        layers={"h0": "backbone.h0", "deepest": "backbone"},
        pairs=[("h0", "deepest")],
        every_n_epochs=2,
        width_mismatch="skip",
        beta=1.0,
        log_figures_every_n_epochs=0,
    )
    with pytest.warns(UserWarning, match="differ in width"):
        Trainer(
            max_epochs=6,
            accelerator="cpu",
            logger=logger,
            enable_checkpointing=False,
            enable_progress_bar=False,
            callbacks=[LayerwiseTraining(2), cb],
            num_sanity_val_steps=0,
        ).fit(_model(), _data())
    probes = logger.probes()
    assert {e: r["depth"] for e, r in probes.items()} == {0: 1.0, 2: 1.0, 4: 2.0, 6: 3.0}
    assert probes[2]["pm/h0->deepest/beta"] != probes[2]["pm/h0->deepest/beta"]  # NaN: 8 vs 12
    assert probes[4]["pm/h0->deepest/beta"] == 1.0


def test_needs_an_mlp_backbone():
    model = CollapseClassifier(
        num_classes=3, input_shape=(3, 8, 8), backbone="vgg11_bn", backbone_kwargs={"width": 4}
    )
    with pytest.raises(ValueError, match="'mlp' backbone"):
        Trainer(
            max_epochs=1,
            accelerator="cpu",
            logger=False,
            callbacks=[LayerwiseTraining(1)],
            enable_progress_bar=False,
        ).fit(model, SyntheticDataModule(num_classes=3, samples_per_class=4, shape=(3, 8, 8)))
