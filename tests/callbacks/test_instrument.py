"""The callback as a faithful instrument: it changes nothing it measures, measures each module's
own output in its layout, and takes predictions from the classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from support import RecordingLogger, nearest_mean, reference_metrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nclightning import NeuralCollapseCallback
from nclightning.data import SyntheticDataModule
from nclightning.record.keys import accuracy_key, layer_key

K, DIM = 4, 16


class DropNet(LightningModule):
    """A user's own module: dropout (draws from the global RNG in training) and an in-place ReLU
    after a tapped Linear (``body.3``)."""

    def __init__(self, dim=DIM, width=24, classes=K, p=0.2):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(dim, width),
            nn.ReLU(),
            nn.Dropout(p),
            nn.Linear(width, width),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _data():
    return SyntheticDataModule(
        num_classes=K,
        samples_per_class=30,
        test_samples_per_class=10,
        shape=(DIM,),
        batch_size=16,
        seed=0,
        separation=3.0,
    )


def _loaders(dm):
    dm.setup("fit")
    train, val = dm.probe_dataset("train"), dm.probe_dataset("val")
    xs, ys = (torch.stack(t) for t in zip(*train))
    xv, yv = (torch.stack(t) for t in zip(*val))
    shuffled = DataLoader(TensorDataset(xs, ys), batch_size=16, shuffle=True)
    return shuffled, DataLoader(TensorDataset(xv, yv), batch_size=32)


def _train(callbacks, mode: str, epochs=3, logger=None):
    seed_everything(0)
    model = DropNet()
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=logger or False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    dm = _data()
    if mode == "datamodule":
        trainer.fit(model, datamodule=dm)
    else:
        train, val = _loaders(dm)
        trainer.fit(model, train_dataloaders=train, val_dataloaders=val)
    return [p.detach().clone() for p in model.parameters()]


LAYERS = {"h0": "body.1", "h": "body.3"}


@pytest.mark.parametrize("mode", ["datamodule", "plain_loader"])
@pytest.mark.parametrize(
    "options",
    [
        dict(every_n_epochs=1, pairs=[("h0", "h")]),
        dict(every_n_epochs=2, probe="val", pairs=[], max_samples=20),
    ],
    ids=["every-epoch-with-fit", "val-every-2"],
)
def test_training_with_the_callback_is_bit_identical(mode, options):
    """Observing changes nothing: same parameters, bit for bit, with the callback and without."""
    bare = _train([], mode)
    options = dict(options)
    if mode == "plain_loader" and options.get("probe") == "val":
        options["probe"] = "val"  # the Trainer's own val loader (no DataModule)
    cb = NeuralCollapseCallback(layers=LAYERS, log_figures=False, **options)
    watched = _train([cb], mode)
    assert len(cb.history) >= 2  # it did probe
    assert all(torch.equal(a, b) for a, b in zip(bare, watched))


class Recorder(Callback):
    """Independent extraction after each probe: the Linear's own output via a cloning hook."""

    def __init__(self, dm, module: str):
        self.dm, self.module, self.epochs = dm, module, {}

    def _record(self, trainer, model, epoch):
        x, y = (torch.stack(t) for t in zip(*self.dm.probe_dataset("train")))
        store = {}
        m = dict(model.named_modules())[self.module]
        handle = m.register_forward_hook(lambda mod, a, o: store.__setitem__("h", o.clone()))
        was = model.training
        model.eval()
        with torch.no_grad():
            pred = model(x).argmax(1)
        model.train(was)
        handle.remove()
        self.epochs[epoch] = (store["h"].double().numpy(), y.numpy(), pred.numpy())

    def on_train_start(self, trainer, model):
        self._record(trainer, model, 0)

    def on_train_epoch_end(self, trainer, model):
        self._record(trainer, model, trainer.current_epoch + 1)


def test_a_tapped_linear_before_an_inplace_relu_is_measured_on_its_own_output():
    dm, logger = _data(), RecordingLogger()
    recorder = Recorder(dm, "body.3")
    cb = NeuralCollapseCallback(layers={"pre": "body.3"}, pairs=[], log_figures=False)
    seed_everything(0)
    Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=logger,
        callbacks=[cb, recorder],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    ).fit(DropNet(), datamodule=dm)
    probes = logger.probes()
    assert sorted(probes) == [0, 1, 2]
    for epoch, row in probes.items():
        h, y, pred = recorder.epochs[epoch]
        assert (h < 0).any()  # pre-activation values: a ReLU'd copy would have none
        for key, value in reference_metrics(h, y, K).items():
            assert row[layer_key("train", "pre", key)] == pytest.approx(value, rel=1e-5), key
        means = np.stack([h[y == k].mean(0) for k in range(K)])
        nc4 = np.mean(pred != nearest_mean(h, means))  # Papyan's NC4: this probe's own means
        assert row[layer_key("train", "pre", "nc4")] == pytest.approx(nc4, abs=1e-12)
        assert row[accuracy_key("train")] == pytest.approx(np.mean(pred == y))


class TokenNet(LightningModule):
    """``[B, T, d]`` token features (a Linear over positions) and a channels-first Conv1d."""

    def __init__(self, T=5, dim=6, width=8):
        super().__init__()
        self.T, self.dim = T, dim
        self.embed = nn.Linear(dim, width)
        self.conv = nn.Conv1d(width, width, 1)
        self.head = nn.Linear(width, K)

    def forward(self, x):
        tokens = self.embed(x.view(-1, self.T, self.dim))  # [B, T, width]
        maps = self.conv(tokens.transpose(1, 2))  # [B, width, T]
        return self.head(maps.mean(2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _token_run(**options):
    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(K).repeat_interleave(12)
    x = torch.randn(len(y), 30, generator=g) + 2.0 * F.one_hot(y % 30, 30).float()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    logger = RecordingLogger()
    model = TokenNet()
    cb = NeuralCollapseCallback(probe=loader, name="tok", pairs=[], log_figures=False, **options)
    Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=logger,
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    ).fit(model, train_dataloaders=loader)
    model.eval()
    with torch.no_grad():
        tokens = model.embed(x.view(-1, 5, 6))
        maps = model.conv(tokens.transpose(1, 2))
    return logger.probes()[1], tokens.double().numpy(), maps.double().numpy(), y.numpy()


def test_token_outputs_are_pooled_over_positions_and_conv1d_maps_over_length():
    row, tokens, maps, y = _token_run(layers={"tokens": "embed", "maps": "conv"})
    for alias, pooled in (("tokens", tokens.mean(1)), ("maps", maps.mean(2))):
        ref = reference_metrics(pooled, y, K)
        assert row[layer_key("tok", alias, "nc1")] == pytest.approx(ref["nc1"], rel=1e-5), alias
    # forcing channels-first on the tokens averages over the width instead: a different layer
    forced, *_ = _token_run(layers={"tokens": "embed"}, output_fmt={"tokens": "NCHW"})
    assert forced[layer_key("tok", "tokens", "nc1")] == pytest.approx(
        reference_metrics(tokens.mean(2), y, K)["nc1"], rel=1e-5
    )


class EmbeddingNet(DropNet):
    """``forward`` returns embeddings; the head is applied in the training step only."""

    def forward(self, x):
        return self.body(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self(x)), y)


def test_predictions_come_from_the_classifier_and_no_classifier_means_no_nc4():
    dm = _data()
    for classifier, expect_nc4 in (("head", True), (None, False)):
        logger = RecordingLogger()
        cb = NeuralCollapseCallback(
            layers={"h": "body.3"}, pairs=[], classifier=classifier, log_figures=False
        )
        seed_everything(0)
        model = EmbeddingNet()
        Trainer(
            max_epochs=1,
            accelerator="cpu",
            logger=logger,
            callbacks=[cb],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        ).fit(model, datamodule=dm)
        row = logger.probes()[1]
        assert (layer_key("train", "h", "nc4") in row) is expect_nc4
        assert (accuracy_key("train") in row) is expect_nc4
        if expect_nc4:
            x, y = (torch.stack(t) for t in zip(*dm.probe_dataset("train")))
            model.eval()
            with torch.no_grad():
                pred = model.head(model(x)).argmax(1)
            assert row[accuracy_key("train")] == pytest.approx(float((pred == y).float().mean()))
