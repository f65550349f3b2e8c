"""``nclightning report`` on runs made the way users make them: what is drawn is what was logged.

Each figure is read back from its artists (:mod:`drawn`) and compared with ``metrics.csv``
read by the ``csv`` module, value for value and epoch for epoch.
"""

from __future__ import annotations

import math

import pytest
import torch
from drawn import assert_metrics_figure, capture, csv_rows, logged_curves
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nclightning import NeuralCollapseCallback
from nclightning.commands import report
from nclightning.loggers import CSVLogger, RunRecord

EPOCHS = 4


class UsersModule(LightningModule):
    """A user's own module: logs its own epoch metrics (``on_epoch=True``) in both loops."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, _):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self(x), y), on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def users_run(root) -> tuple:
    torch.manual_seed(0)
    y = torch.arange(96) % 3
    x = torch.randn(96, 8) + 3 * nn.functional.pad(nn.functional.one_hot(y, 3), (0, 5))
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(x[:48], y[:48]), batch_size=16)
    layers = {"h0": "body.1", "h": "body.3"}
    callbacks = [
        NeuralCollapseCallback(layers=layers, pairs=[("h0", "h")]),
        NeuralCollapseCallback(probe="val", layers=layers),
        RunRecord(),
    ]
    logger = CSVLogger(str(root), name="mine")
    trainer = Trainer(
        max_epochs=EPOCHS, logger=logger, callbacks=callbacks, log_every_n_steps=2,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(UsersModule(), train, val)
    return logger.log_dir


@pytest.fixture(scope="module")
def users_dir(tmp_path_factory):
    return users_run(tmp_path_factory.mktemp("users"))


def test_every_probe_of_a_users_run_is_drawn_as_logged(users_dir, tmp_path, monkeypatch, capsys):
    figures = capture(monkeypatch)
    assert report.main([str(users_dir), "--out", str(tmp_path)]) == 0
    assert "dropped" not in capsys.readouterr().err
    metrics_csv = f"{users_dir}/metrics.csv"
    for probe in ("train", "val"):
        logged = logged_curves(metrics_csv, probe)
        assert {x for x, _ in logged["h"]["nc1"]} == {float(e) for e in range(EPOCHS + 1)}
        compared = assert_metrics_figure(figures[f"metrics_{probe}"], logged)
        assert compared >= 2 * 4, compared  # both layers, every default metric drawn


def test_the_depth_profile_draws_the_last_probe(users_dir, tmp_path, monkeypatch):
    figures = capture(monkeypatch)
    assert report.main([str(users_dir), "--out", str(tmp_path), "--probe", "train"]) == 0
    rows = [r for r in csv_rows(f"{users_dir}/metrics.csv") if r.get("nc-train/h/nc1")]
    last = rows[-1]
    assert float(last["epochs_trained"]) == EPOCHS
    for panel in figures["depth_profile_train"]:
        metric = panel.title.split(":")[0]
        ((xs, ys),) = panel.plain
        assert panel.xticklabels == ["h0", "h"] and xs == [0.0, 1.0]
        want = [float(last[f"nc-train/{layer}/{metric}"]) for layer in ("h0", "h")]
        assert ys == [v if v > 0 else math.nan for v in want] or all(
            (a == b) or (math.isnan(a) and not b > 0) for a, b in zip(ys, want)
        ), (metric, ys, want)
