"""``layers="all"``: every block of a network in one pass (the depth profile)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from support import RecordingLogger
from torch.utils.data import DataLoader, TensorDataset

from nclightning import NeuralCollapseCallback
from nclightning.errors import ConfigurationError
from nclightning.record.keys import layer_key

K = 4
RESNET_BLOCKS = [
    "net.maxpool",
    *(f"net.layer{i}.{j}" for i in range(1, 5) for j in range(2)),
    "net.avgpool",
]


class UserResNet(LightningModule):
    """A user's own module around torchvision's ResNet-18."""

    def __init__(self):
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=K)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class CountForwards(Callback):
    """How many forward passes the model ran up to the end of the baseline probe."""

    def __init__(self):
        self.calls = 0
        self.at_baseline = None

    def setup(self, trainer, pl_module, stage):
        pl_module.register_forward_hook(lambda *a: setattr(self, "calls", self.calls + 1))

    def on_train_start(self, trainer, pl_module):  # runs after the probe's own on_train_start
        self.at_baseline = self.calls


def _loader(n=24):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(K).repeat_interleave(n // K)
    x = torch.randn(len(y), 3, 32, 32, generator=g) + y.view(-1, 1, 1, 1).float()
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _fit(cb, count=None, logger=None):
    seed_everything(0)
    loader = _loader()
    Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=logger or False,
        callbacks=[cb] + ([count] if count else []),
        limit_train_batches=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    ).fit(UserResNet(), train_dataloaders=loader)


def test_all_probes_the_stem_every_residual_block_and_the_pooled_features_in_one_pass(caplog):
    logger, count = RecordingLogger(), CountForwards()
    cb = NeuralCollapseCallback(
        layers="all", probe=_loader(), name="train", batch_size=8, log_figures=False
    )
    with caplog.at_level(logging.INFO):
        _fit(cb, count, logger)
    row = logger.probes()[0]
    probed = [k.split("/")[1] for k in row if k.endswith("/nc1")]
    assert probed == RESNET_BLOCKS
    assert all(math.isfinite(row[layer_key("train", layer, "nc1")]) for layer in probed)
    assert layer_key("train", "net.avgpool", "nc3") in row  # the pooled features feed fc
    # two forwards of a 2-sample example (find the blocks, then their widths), then ONE pass
    assert count.at_baseline == 2 + 3
    plan = [r.getMessage() for r in caplog.records if "NeuralCollapseCallback[" in r.getMessage()]
    assert plan and "10 layer(s)" in plan[0] and "MiB" in plan[0]  # the memory estimate


def test_include_and_exclude_filter_the_blocks():
    logger = RecordingLogger()
    cb = NeuralCollapseCallback(
        layers="all",
        include=["net.layer4.*", "net.avgpool"],
        exclude=["*.0"],
        probe=_loader(),
        name="train",
        log_figures=False,
    )
    _fit(cb, logger=logger)
    probed = [k.split("/")[1] for k in logger.probes()[0] if k.endswith("/nc1")]
    assert probed == ["net.layer4.1", "net.avgpool"]


def test_a_filter_that_leaves_nothing_is_a_clear_error():
    cb = NeuralCollapseCallback(layers="all", include=["nothing*"], probe=_loader(), name="train")
    with pytest.raises(ConfigurationError, match="found no block"):
        _fit(cb)
