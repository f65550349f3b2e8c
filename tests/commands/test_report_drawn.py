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
    clipped = []
    figures = capture(monkeypatch, clipped)
    assert report.main([str(users_dir), "--out", str(tmp_path)]) == 0
    assert "dropped" not in capsys.readouterr().err
    assert len(figures) >= 10 and clipped == []  # no text outside any figure
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


def test_a_run_resumed_in_a_new_folder_is_drawn_whole(tmp_path, monkeypatch, capsys):
    """A user's Trainer resumed from a checkpoint without ``resume_loggers`` logs to a new
    version folder; RunRecord notes there what it continues, and the report draws one run:
    epochs 0-2 from the first folder, 3-4 from the second."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.randn(60, 8) + 3 * nn.functional.pad(nn.functional.one_hot(y, 3), (0, 5))
    data = DataLoader(TensorDataset(x, y), batch_size=20)
    layers = {"h0": "body.1", "h": "body.3"}

    def fit(epochs, ckpt=None):
        logger = CSVLogger(str(tmp_path / "runs"), name="mine")
        trainer = Trainer(
            max_epochs=epochs, logger=logger, log_every_n_steps=1, enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[NeuralCollapseCallback(layers=layers), RunRecord(),
                       ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
        )  # fmt: skip
        trainer.fit(UsersModule(), data, ckpt_path=ckpt)
        return logger.log_dir

    first = fit(2)
    second = fit(EPOCHS, ckpt=str(tmp_path / "ckpt" / "last.ckpt"))
    assert first != second
    figures = capture(monkeypatch)
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    a, b = (
        logged_curves(f"{first}/metrics.csv", "train"),
        logged_curves(f"{second}/metrics.csv", "train"),
    )
    assert [x for x, _ in a["h"]["nc1"]] == [0.0, 1.0, 2.0]
    assert [x for x, _ in b["h"]["nc1"]] == [3.0, 4.0]  # the resumed run does not probe twice
    whole = {lay: {m: a[lay][m] + b[lay][m] for m in a[lay]} for lay in a}
    assert assert_metrics_figure(figures["metrics_train"], whole) >= 8


def test_a_layerwise_run_is_drawn_per_stage_as_logged(tmp_path, monkeypatch):
    """Fig. 2 protocol (LayerwiseTraining on CollapseClassifier): one line per stage of the
    deepest layer; the depth profile draws each stage's last probe."""
    from nclightning.callbacks import LayerwiseTraining
    from nclightning.data import SyntheticDataModule
    from nclightning.models import CollapseClassifier

    torch.manual_seed(0)
    model = CollapseClassifier(
        num_classes=3, input_shape=(8,), backbone="mlp", lr=0.1, scheduler="none",
        backbone_kwargs={"depth": 3, "width": 12, "batch_norm": True},
    )  # fmt: skip
    data = SyntheticDataModule(num_classes=3, samples_per_class=20, shape=(8,), batch_size=20)
    logger = CSVLogger(str(tmp_path / "runs"), name="layerwise")
    callbacks = [
        LayerwiseTraining(epochs_per_stage=2),
        NeuralCollapseCallback(layers={"deepest": "backbone"}),
    ]
    trainer = Trainer(
        max_epochs=6, logger=logger, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(model, data)
    figures = capture(monkeypatch)
    assert report.main([logger.log_dir, "--out", str(tmp_path / "out")]) == 0
    rows = [r for r in csv_rows(f"{logger.log_dir}/metrics.csv") if r.get("nc-train/deepest/nc1")]
    stages: dict[str, dict[str, list]] = {}
    for r in rows:
        stage = stages.setdefault(f"depth {int(float(r['depth']))}", {})
        for metric in ("nc1", "nc1_tilde"):
            stage.setdefault(metric, []).append(
                (float(r["epochs_trained"]), float(r[f"nc-train/deepest/{metric}"]))
            )
    assert list(stages) == ["depth 1", "depth 2", "depth 3"]
    assert (
        assert_metrics_figure(figures["metrics_train"], stages, metrics=("nc1", "nc1_tilde")) == 6
    )
    last = {d: {m: s[-1][1] for m, s in ms.items()} for d, ms in stages.items()}
    for panel in figures["depth_profile_train"]:
        metric = panel.title.split(":")[0]
        if metric in ("nc1", "nc1_tilde"):
            ((_, ys),) = panel.plain
            assert ys == [last[f"depth {d}"][metric] for d in (1, 2, 3)], metric


def test_several_seeds_are_drawn_as_their_mean_and_band(tmp_path, monkeypatch):
    """A study of one setting with three seeds: the overlay's line is the mean of the three
    runs' logged values and its band spans their min and max, epoch for epoch."""
    from figtools import panels

    from nclightning import plotting

    folders = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        y = torch.arange(60) % 3
        x = torch.randn(60, 8) + 3 * nn.functional.pad(nn.functional.one_hot(y, 3), (0, 5))
        logger = CSVLogger(str(tmp_path / "study"), name="same_setting")
        trainer = Trainer(
            max_epochs=3, logger=logger, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, callbacks=[NeuralCollapseCallback(layers={"h": "body.3"})],
        )  # fmt: skip
        trainer.fit(UsersModule(), DataLoader(TensorDataset(x, y), batch_size=20))
        folders.append(logger.log_dir)
    bands = []
    real = plotting.overlay

    def overlay(*args, **kwargs):
        fig = real(*args, **kwargs)
        for ax in panels(fig):
            for c in ax.collections:
                if str(c.get_gid()).startswith("band:"):
                    path = c.get_paths()[0].vertices
                    bands.append((ax.get_title(), path))
            bands.append(
                (
                    "lines",
                    {
                        ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata()))
                        for ln in ax.get_lines()
                    },
                )
            )
        return fig

    monkeypatch.setattr(plotting, "overlay", overlay)
    out = tmp_path / "out"
    assert (
        report.main(
            [str(tmp_path / "study"), "--out", str(out), "--group", "parent", "--metrics", "nc1"]
        )
        == 0
    )
    per_run = [logged_curves(f"{f}/metrics.csv", "train")["h"]["nc1"] for f in folders]
    epochs = [x for x, _ in per_run[0]]
    assert epochs == [0.0, 1.0, 2.0, 3.0]
    values = [[v for _, v in run] for run in per_run]
    mean = [sum(col) / 3 for col in zip(*values)]
    lines_drawn = next(d for name, d in bands if name == "lines")
    (label,) = [k for k in lines_drawn if not k.startswith("_")]
    xs, ys = lines_drawn[label]
    assert xs == epochs and ys == pytest.approx(mean, rel=1e-12)
    vertices = next(v for name, v in bands if name != "lines")
    for x, col in zip(epochs, zip(*values)):  # the band spans min..max of the runs at x
        at_x = sorted(float(y) for vx, y in vertices if vx == x)
        assert at_x[0] == pytest.approx(min(col), rel=1e-12), x
        assert at_x[-1] == pytest.approx(max(col), rel=1e-12), x
